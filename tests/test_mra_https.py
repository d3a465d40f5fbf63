"""HTTPS over MRA end to end through the real processes: client → E:8443 → tunnel → C → UCM/CUC.

Covers the sign-in a client does over raw HTTPS (DNS SRV through the lab DNS external view,
get_edge_config, then UDS, TFTP and VMREST through the descriptor lane with the cookie), the
error answers (401, 403, 404, 429, 502, cookie expiry) and hostile input.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from edge.lab import pid_alive
from mra_client.edge_http import EdgeHttpClient, StepError, b64, discover_edge
from tests.conftest import RunningLab, edge_cli


async def _signed_in(lab: RunningLab, user: str = "alice", password: str = "lab-pass") -> EdgeHttpClient:
    host, port, address = await discover_edge(
        lab.config.lab.domain, lab.config.dns.address, lab.config.dns.port
    )
    assert (host, port) == (lab.config.expe[0].fqdn, 8443)
    client = lab.edge_http(address)
    await client.__aenter__()
    await client.get_edge_config(user, password)
    return client


def test_client_signin_over_raw_https(lab: RunningLab) -> None:
    async def flow() -> None:
        host, port, address = await discover_edge(
            lab.config.lab.domain, lab.config.dns.address, lab.config.dns.port
        )
        assert (host, port, address) == ("expe.example.com", 8443, lab.config.expe[0].external_address)
        async with lab.edge_http(address) as client:
            config, result = await client.get_edge_config("alice", "lab-pass")
            assert result.headers["Server"] == "CE_C ECS"
            assert result.headers["Content-Type"].startswith("text/xml")
            cookie = result.headers["Set-Cookie"]
            assert cookie.startswith("X-Auth=") and "Secure" in cookie and "HttpOnly" in cookie
            root = ET.fromstring(result.body)
            assert root.tag == "getEdgeConfigResponse" and root.get("version") == "1.0"
            uds = config.services["_cisco-uds"]
            assert uds.servers == [(10, 10, 8443, "ucm1.example.com")]
            assert config.services["_cuplogin"].servers[0][3] == "imp1.example.com"
            assert config.tftp == ["ucm1.example.com"]
            assert config.sip_edge == [("expe.example.com", 5061)]
            assert config.xmpp_edge == [("expe.example.com", 5222)]
            assert config.http_edge == [("expe.example.com", 8443)]
            assert config.uds == [("ucm1.example.com", 8443)]
            assert config.sip_route == (
                f"<sip:{lab.config.expc.address}:5061;transport=tls;zone-id=1;directed;lr>"
            )
            assert root.find(".//turnEdgeServer") is not None
            # An unresolvable service answers NameError (spec §4).
            config2, _ = await client.get_edge_config("alice", "lab-pass", ("_cisco-uds", "_nosuch"))
            assert config2.services["_nosuch"].error == "NameError"
            # UDS, TFTP and VMREST through the descriptor lane with the cookie.
            user = await client.internal_get(
                "uds", "https", "ucm1.example.com", 8443, "/cucm-uds/user/alice", basic=("alice", "lab-pass")
            )
            assert ET.fromstring(user.body).findtext("phoneNumber") == "1001"
            version = await client.internal_get("uds", "https", "ucm1.example.com", 8443, "/cucm-uds/version")
            assert ET.fromstring(version.body).tag == "versionInformation"
            tftp = await client.internal_get("tftp", "http", "ucm1.example.com", 6970, "/CSFALICE.cnf.xml")
            assert b"<device" in tftp.body
            vm = await client.internal_get(
                "vmrest",
                "https",
                "cuc1.example.com",
                443,
                "/vmrest/mailbox/folders/inbox/messages",
                basic=("alice", "lab-pass"),
            )
            assert ET.fromstring(vm.body).tag == "Messages"

    asyncio.run(flow())


def test_curl_signin_as_in_the_readme(lab: RunningLab) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is installed by scripts/install-system-deps"
    e = lab.config.expe[0]
    ca = str(lab.state_dir / "certs" / "ca.pem")
    resolve = f"{e.fqdn}:{e.https_port}:{e.external_address}"
    base = f"https://{e.fqdn}:{e.https_port}"
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-i",
            "--cacert",
            ca,
            "--resolve",
            resolve,
            "-u",
            "alice:lab-pass",
            f"{base}/{b64('example.com')}/get_edge_config?service_name=_cisco-uds&service_name=_cuplogin",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.startswith("HTTP/1.1 200")
    cookie = next(line for line in out.splitlines() if line.lower().startswith("set-cookie:"))
    token = cookie.split("X-Auth=", 1)[1].split(";", 1)[0]
    lane = b64("example.com/https/ucm1.example.com/8443")
    uds = subprocess.run(
        [
            curl,
            "-sS",
            "--cacert",
            ca,
            "--resolve",
            resolve,
            "-b",
            f"X-Auth={token}",
            f"{base}/{lane}/cucm-uds/version",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "<versionInformation" in uds


def test_error_answers(lab: RunningLab) -> None:
    async def flow() -> dict[str, Any]:
        client = await _signed_in(lab)
        out: dict[str, Any] = {}
        try:
            with pytest.raises(StepError) as bad:
                async with lab.edge_http(lab.config.expe[0].external_address) as other:
                    await other.get_edge_config("alice", "wrong")
            out["bad_password"] = bad.value.detail
            no_auth = await client.request("GET", f"/{b64('example.com')}/get_edge_config")
            out["no_auth"] = (no_auth.status, no_auth.headers.get("WWW-Authenticate"))
            unknown = await client.request(
                "GET",
                f"/{b64('other.test')}/get_edge_config",
                headers={"Authorization": "Basic YWxpY2U6bGFiLXBhc3M="},
            )
            out["unknown_domain"] = unknown.status
            lane = client.descriptor("https", "ucm1.example.com", 8443)
            out["blocked_path"] = (await client.request("GET", lane + "/axl/")).status
            blocked_host = client.descriptor("https", "evil.example.com", 8443)
            out["blocked_host"] = (await client.request("GET", blocked_host + "/cucm-uds/version")).status
            out["blocked_method"] = (await client.request("DELETE", lane + "/cucm-uds/version")).status
            out["garbage_cookie"] = (
                await client.request("GET", lane + "/cucm-uds/version", headers={"Cookie": "X-Auth=forged.x"})
            ).status
            saved = client.cookie
            client.cookie = None
            out["no_cookie"] = (await client.request("GET", lane + "/cucm-uds/version")).status
            client.cookie = saved
            out["traversal"] = (await client.request("GET", lane + "/cucm-uds/../axl/")).status
            out["encoded_slash"] = (await client.request("GET", lane + "/cucm-uds%2f..%2faxl/")).status
            out["not_a_token"] = (await client.request("GET", "/!!!/get_edge_config")).status
            big = await client.request("GET", lane + "/cucm-uds/version", headers={"X-Big": "a" * 20000})
            out["huge_header"] = big.status
            body = await client.request("POST", lane + "/ssp/oauth/token", data=b"x" * (1024 * 1024 + 10))
            out["huge_body"] = body.status
            out["still_ok"] = (await client.request("GET", lane + "/cucm-uds/version")).status
        finally:
            await client.__aexit__(None, None, None)
        return out

    out = asyncio.run(flow())
    assert out["bad_password"].startswith("401 Cisco-Edge")
    assert out["no_auth"] == (401, 'Basic realm="Cisco-Edge"')
    assert out["unknown_domain"] == 404
    assert out["blocked_path"] == 403
    assert out["blocked_host"] == 403
    assert out["blocked_method"] == 403
    assert out["garbage_cookie"] == 401
    assert out["no_cookie"] == 401
    assert out["traversal"] == 403
    assert out["encoded_slash"] == 403
    assert out["not_a_token"] == 404
    assert out["huge_header"] == 400
    assert out["huge_body"] == 413
    assert out["still_ok"] == 200, "hostile requests leave the edge serving"


def test_authorization_rate_control_answers_429(lab: RunningLab) -> None:
    async def flow() -> list[int]:
        statuses = []
        async with lab.edge_http(lab.config.expe[0].external_address) as client:
            for _ in range(10):
                try:
                    await client.get_edge_config("bob", "lab-pass")
                    statuses.append(200)
                except StepError as exc:
                    statuses.append(int(exc.detail.split()[0]))
        return statuses

    statuses = asyncio.run(flow())
    # 8 authorizations of one user per 300 s (spec §4); the module's other tests sign bob in never.
    assert statuses[:8] == [200] * 8
    assert statuses[8:] == [429, 429]


def test_backend_down_is_502_and_client_cli_names_the_step(lab: RunningLab) -> None:
    cuc_pid = lab.component("cuc1")["pid"]

    async def vmrest() -> int:
        client = await _signed_in(lab)
        try:
            r = await client.request(
                "GET",
                client.descriptor("https", "cuc1.example.com", 443) + "/vmrest/version",
                headers={"Authorization": "Basic YWxpY2U6bGFiLXBhc3M="},
            )
            assert r.status == 200
            os.kill(cuc_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pid_alive(cuc_pid):  # noqa: ASYNC110 - polling a pid
                await asyncio.sleep(0.05)
            r = await client.request(
                "GET",
                client.descriptor("https", "cuc1.example.com", 443) + "/vmrest/version",
                headers={"Authorization": "Basic YWxpY2U6bGFiLXBhc3M="},
            )
            assert r.body.decode().strip() == "Next Hop Connection Failed"
            return r.status
        finally:
            await client.__aexit__(None, None, None)

    assert asyncio.run(vmrest()) == 502
    bad = edge_cli("client", "signin", "--user", "alice", "--password", "nope", *lab.args, check=False)
    assert bad.returncode != 0
    assert "get_edge_config: 401 Cisco-Edge" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = edge_cli("client", "signin", "--user", "alice", "--json", *lab.args)
    ladder = json.loads(good.stdout)
    assert ladder["ok"] is True
    assert [s["name"] for s in ladder["steps"]] == [
        "discovery",
        "get_edge_config",
        "UDS user",
        "TFTP config",
        "SIP connect",
        "REGISTER",
        "STUN keepalive",
    ]


def test_cookie_expires(lab_factory: Any) -> None:
    lab = lab_factory("expc.access.credentials_refresh_min=0.04")  # 2.4 s cookies

    async def flow() -> tuple[int, int, float]:
        client = await _signed_in(lab)
        try:
            lane = client.descriptor("https", "ucm1.example.com", 8443) + "/cucm-uds/version"
            first = (await client.request("GET", lane)).status
            started = time.monotonic()
            status = first
            while status == 200 and time.monotonic() - started < 15:
                await asyncio.sleep(0.2)
                status = (await client.request("GET", lane)).status
            return first, status, time.monotonic() - started
        finally:
            await client.__aexit__(None, None, None)

    first, later, waited = asyncio.run(flow())
    assert first == 200
    assert later == 401
    assert 1.5 < waited < 6

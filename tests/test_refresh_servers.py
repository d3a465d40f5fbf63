"""Refresh servers on Expressway-C (spec §4 automatic allow-list rules per discovered node, §8).

End to end through the real processes: a Unified CM cluster of three nodes of which C is
configured with the publisher only. `ucm2` runs; `ucm3` is in the cluster's UDS `servers` list
but answers nothing (a socket that accepts and never speaks). Before a refresh, the descriptor
lane to `ucm2` is refused (403); during the refresh MRA requests get 503; afterwards `ucm2` is
allowed, both subscribers show in C's status and admin API with their state, and get_edge_config
lists the reachable nodes only. Plus the UDS `servers` parser on hostile input.

IM&P and Unity Connection likewise: C is configured with `imp1` and `cuc1` (plus `cuc3`, a
publisher the test plays); `imp1`'s AXL `listProcessNode` adds `imp7` (known only to it), `cuc1`'s
VMREST `cluster` adds the running `cuc2` and `cuc9` (known only to it). Before a refresh the lane
to `cuc2` is 403, afterwards it is allowed and every discovered node shows with its source. Bad
answers of `cuc3` (garbage, a huge body, 500) are reported and leave its known nodes in place.
Plus the AXL and VMREST `cluster` parsers on hostile input.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from edge.config import ConfigError, load_config
from edge.lab import wait_zones_active
from edge.lab_pki import lab_pki
from edge.pki import server_context
from edge_c.discovery import (
    AXL_LIST_PROCESS_NODE,
    MAX_SERVERS,
    DiscoveryError,
    parse_axl_process_nodes,
    parse_uds_servers,
    parse_vmrest_cluster,
)
from mock_ucm.axl import list_process_node_response
from mra_client.edge_http import b64
from tests.conftest import RunningLab, lab_overrides
from tests.test_admin_api import call

# -- the UDS `servers` parser ------------------------------------------------------------------


def test_parse_uds_servers_as_unified_cm_answers() -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
        b'<servers version="14.0.1" uri="https://ucm1.example.com:8443/cucm-uds/servers">'
        b"<server>UCM1.example.com</server><server> ucm2.example.com. </server>"
        b"<server>ucm1.example.com</server><server>bad host!</server><server/></servers>"
    )
    assert parse_uds_servers(body) == ["ucm1.example.com", "ucm2.example.com"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<servers>", "not XML"),
        (b"<users><server>ucm1.example.com</server></users>", "root <users>"),
        (b"<servers><server>-bad-</server></servers>", "names no server"),
        (b"<servers/>", "names no server"),
        (b"<servers>" + b"x" * (300 * 1024) + b"</servers>", "too large"),
        (b'<!DOCTYPE s [<!ENTITY a "aaaa">]><servers><server>&a;.example.com</server>', "not XML"),
    ],
)
def test_parse_uds_servers_refuses_what_it_cannot_use(body: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError, match=reason):
        parse_uds_servers(body)


def test_parse_uds_servers_is_bounded() -> None:
    body = "<servers>" + "".join(f"<server>n{i}.example.com</server>" for i in range(500)) + "</servers>"
    assert len(parse_uds_servers(body.encode())) == MAX_SERVERS


@given(st.binary(max_size=2048))
def test_parse_uds_servers_never_raises_anything_else(body: bytes) -> None:
    try:
        names = parse_uds_servers(body)
    except DiscoveryError:
        return
    assert names and all(n == n.lower() and len(n) <= 253 for n in names)


def test_configured_publisher_must_be_a_ucm_node() -> None:
    with pytest.raises(ConfigError, match=r"expc\.ucm_publishers names 'ucm9', which is not a ucm node"):
        load_config(None, overrides=['expc.ucm_publishers=["ucm9"]'], environ={})
    assert load_config(None, overrides=['expc.ucm_publishers=["ucm1"]'], environ={}).expc.ucm_publishers == [
        "ucm1"
    ]


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def cluster_lab(tmp_path: Path) -> Iterator[RunningLab]:
    state = tmp_path / "lab"
    base = lab_overrides(state)
    prefix = next(o for o in base if o.startswith("ucm.0.address=")).split('"')[1].rsplit(".", 2)[0]
    nodes = ", ".join(
        [
            f'{{name = "ucm1", fqdn = "ucm1.example.com", address = "{prefix}.3.20"}}',
            f'{{name = "ucm2", fqdn = "ucm2.example.com", address = "{prefix}.3.21"}}',
            # In the cluster (UDS servers lists it) but not started by the lab: the test plays it.
            f'{{name = "ucm3", fqdn = "ucm3.example.com", address = "{prefix}.3.22", external = true}}',
        ]
    )
    lab = RunningLab(
        state,
        [*base, f"ucm=[{nodes}]", 'expc.ucm_publishers=["ucm1"]', "expc.refresh_servers_on_start=false"],
    )
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def _by_fqdn(nodes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n["fqdn"]: n for n in nodes}


def test_refresh_discovers_subscribers_and_opens_the_allow_list(cluster_lab: RunningLab) -> None:
    lab = cluster_lab
    status = asyncio.run(wait_zones_active(lab.config, 30))
    assert all(z["state"] == "Active" for z in status["zones"]), status["zones"]
    ucm3 = next(n for n in lab.config.ucm if n.name == "ucm3")

    # Before any refresh C knows the configured publisher only.
    code, _, servers = call(lab, "expc", "GET", "/servers")
    assert code == 200 and [n["fqdn"] for n in servers["ucm"]] == ["ucm1.example.com"]
    assert servers["ucm"][0]["state"] == "not checked" and servers["last_refresh"] == {}

    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind((ucm3.address, ucm3.https_port))
    silent.listen(16)  # the kernel completes TCP handshakes; nobody ever answers TLS
    try:
        out = asyncio.run(_refresh_flow(lab, silent))
    finally:
        silent.close()

    assert out["before"] == {"ucm1": 200, "ucm2": 403}
    assert out["during"] == (503, "5", "refreshing servers", 503)
    assert out["refresh"][0] == 200
    result = out["refresh"][1]
    ucm = _by_fqdn(result["ucm"])
    assert list(ucm) == ["ucm1.example.com", "ucm2.example.com", "ucm3.example.com"]
    assert (ucm["ucm1.example.com"]["source"], ucm["ucm1.example.com"]["state"]) == ("configured", "active")
    assert (ucm["ucm2.example.com"]["source"], ucm["ucm2.example.com"]["state"]) == ("discovered", "active")
    assert ucm["ucm2.example.com"]["address"] == next(n.address for n in lab.config.ucm if n.name == "ucm2")
    assert ucm["ucm3.example.com"]["state"] == "unreachable" and ucm["ucm3.example.com"]["down"] is True
    assert "no answer within" in ucm["ucm3.example.com"]["reason"]
    assert [n["state"] for n in result["imp"] + result["cuc"]] == ["active", "active"]
    assert result["result"]["oauth_keys"] >= 1 and result["result"]["errors"] == []
    assert result["refreshing"] is False

    assert out["after"]["ucm2_version"] == 200
    assert out["after"]["ucm2_user"] == (200, "alice")
    assert out["after"]["ucm3_closed"] == 502  # allowed now; the node itself is gone
    assert out["after"]["tftp"] == ["ucm1.example.com", "ucm2.example.com"]

    # C's status page data and allow list show the discovered subscriber.
    c_nodes = _by_fqdn(lab.component("expc")["nodes"]["ucm"])
    assert c_nodes["ucm2.example.com"]["state"] == "active" and not c_nodes["ucm2.example.com"]["down"]
    _, _, rules = call(lab, "expc", "GET", "/allowlist/rules")
    automatic = {r["url"] for r in rules["rules"] if r["automatic"]}
    assert "https://ucm2.example.com:8443/cucm-uds/" in automatic
    assert "http://ucm2.example.com:6970/" in automatic


async def _refresh_flow(lab: RunningLab, silent: socket.socket) -> dict[str, Any]:
    out: dict[str, Any] = {}
    basic = "Basic " + base64.b64encode(b"alice:lab-pass").decode()
    async with lab.edge_http() as client:
        await client.get_edge_config("alice", "lab-pass")

        async def lane(host: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
            r = await client.request("GET", client.descriptor("https", host, 8443) + path, headers=headers)
            return r.status, r.headers, r.body

        out["before"] = {
            "ucm1": (await lane("ucm1.example.com", "/cucm-uds/version"))[0],
            "ucm2": (await lane("ucm2.example.com", "/cucm-uds/version"))[0],
        }

        # The refresh waits for ucm3 up to the probe timeout; MRA requests meanwhile get 503.
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: result.update(r=call(lab, "expc", "POST", "/servers/refresh")), daemon=True
        )
        worker.start()
        deadline = time.monotonic() + 10
        while not call(lab, "expc", "GET", "/servers")[2]["refreshing"]:
            assert time.monotonic() < deadline, "the refresh never started"
            await asyncio.sleep(0.02)
        code, headers, body = await lane("ucm1.example.com", "/cucm-uds/version")
        edge_config = f"/{b64(lab.config.lab.domain)}/get_edge_config"
        config = await client.request("GET", edge_config, headers={"Authorization": basic})
        out["during"] = (code, headers.get("Retry-After"), body.decode().strip(), config.status)
        await asyncio.to_thread(worker.join, 30)
        out["refresh"] = (result["r"][0], result["r"][2])

        user = await lane("ucm2.example.com", "/cucm-uds/user/alice", Authorization=basic)
        silent.close()  # ucm3 is now allowed but refuses connections: 502 at once
        parsed, _ = await client.get_edge_config("alice", "lab-pass")
        out["after"] = {
            "ucm2_version": (await lane("ucm2.example.com", "/cucm-uds/version"))[0],
            "ucm2_user": (user[0], ET.fromstring(user[2]).findtext("userName")),
            "ucm3_closed": (await lane("ucm3.example.com", "/cucm-uds/version"))[0],
            "tftp": parsed.tftp,
        }
    return out


# -- the AXL listProcessNode and VMREST cluster parsers -----------------------------------------

_SOAP = 'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"'


def _axl(inner: str) -> bytes:
    return f"<soapenv:Envelope {_SOAP}><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>".encode()


def _process_node(name: str, role: str = "CUCM IM and Presence") -> str:
    return f"<processNode><name>{name}</name><processNodeRole>{role}</processNodeRole></processNode>"


def test_parse_axl_process_nodes_reads_the_mock_answer() -> None:
    # The mock's own answer (EnterpriseWideData first, as AXL lists it) round-trips.
    answer = list_process_node_response(["imp1.example.com", "IMP2.example.com."])
    assert isinstance(answer.body, bytes)
    assert parse_axl_process_nodes(answer.body) == ["imp1.example.com", "imp2.example.com"]


def test_parse_axl_process_nodes_keeps_im_and_presence_nodes_only() -> None:
    nodes = "".join(
        [
            _process_node("EnterpriseWideData", "CUCM Voice/Video"),
            _process_node("ucm1.example.com", "CUCM Voice/Video"),
            _process_node("imp1.example.com"),
            _process_node("imp1.example.com"),
            _process_node("bad host!"),
            "<processNode><name>norole.example.com</name></processNode>",
            _process_node(" imp2.example.com ", "cucm im and presence"),
        ]
    )
    body = _axl(
        f'<ns:listProcessNodeResponse xmlns:ns="urn:x"><return>{nodes}</return></ns:listProcessNodeResponse>'
    )
    assert parse_axl_process_nodes(body) == ["imp1.example.com", "imp2.example.com"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<Envelope>", "not XML"),
        (b"<servers><server>imp1.example.com</server></servers>", "not a SOAP <Envelope>"),
        (_axl(""), "no SOAP body"),
        (
            _axl("<soapenv:Fault><faultcode>x</faultcode><faultstring>Denied</faultstring></soapenv:Fault>"),
            "fault: Denied",
        ),
        (_axl("<getUserResponse/>"), "not listProcessNodeResponse"),
        (_axl("<listProcessNodeResponse><return/></listProcessNodeResponse>"), "names no server"),
        (_axl("<listProcessNodeResponse>" + "x" * (300 * 1024) + "</listProcessNodeResponse>"), "too large"),
        (
            b'<!DOCTYPE e [<!ENTITY a "imp1">]>'
            + _axl(f"<listProcessNodeResponse>{_process_node('&a;.x')}</listProcessNodeResponse>"),
            "entities",
        ),
    ],
)
def test_parse_axl_process_nodes_refuses_what_it_cannot_use(body: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError, match=reason):
        parse_axl_process_nodes(body)


def test_axl_request_is_a_list_process_node_envelope() -> None:
    root = ET.fromstring(AXL_LIST_PROCESS_NODE)
    body = root.find("{http://schemas.xmlsoap.org/soap/envelope/}Body")
    assert body is not None and body[0].tag.endswith("}listProcessNode")


def test_parse_vmrest_cluster() -> None:
    body = (
        b'<Servers total="4"><Server><Key>1</Key><HostName>CUC1.example.com</HostName></Server>'
        b"<Server><HostName>cuc2.example.com.</HostName></Server><Server><HostName>no way</HostName>"
        b"</Server><Server/><HostName>stray.example.com</HostName></Servers>"
    )
    assert parse_vmrest_cluster(body) == ["cuc1.example.com", "cuc2.example.com"]
    many = "".join(f"<Server><HostName>c{i}.example.com</HostName></Server>" for i in range(300))
    assert len(parse_vmrest_cluster(f"<Servers>{many}</Servers>".encode())) == MAX_SERVERS


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not XML"),
        (b"<Users/>", "root <Users>"),
        (b"<Servers><Server><HostName>-x-</HostName></Server></Servers>", "names no server"),
        (b"<Servers>" + b" " * (300 * 1024) + b"</Servers>", "too large"),
    ],
)
def test_parse_vmrest_cluster_refuses_what_it_cannot_use(body: bytes, reason: str) -> None:
    with pytest.raises(DiscoveryError, match=reason):
        parse_vmrest_cluster(body)


@given(st.binary(max_size=2048))
def test_cluster_parsers_never_raise_anything_else(body: bytes) -> None:
    for parse in (parse_axl_process_nodes, parse_vmrest_cluster):
        try:
            names = parse(body)
        except DiscoveryError:
            continue
        assert names and all(n == n.lower() and len(n) <= 253 for n in names)


_hosts = st.lists(
    st.sampled_from(["imp1.example.com", "IMP2.Example.com", "bad host", "", "x" * 300, "&amp;"])
)


@given(_hosts, st.sampled_from(["CUCM IM and Presence", "CUCM Voice/Video", ""]))
def test_axl_parser_on_generated_envelopes(names: list[str], role: str) -> None:
    body = _axl(
        "<listProcessNodeResponse><return>"
        + "".join(_process_node(n, role) for n in names)
        + "</return></listProcessNodeResponse>"
    )
    valid = [n.lower() for n in names if n.lower() in {"imp1.example.com", "imp2.example.com"}]
    if role != "CUCM IM and Presence" or not valid:
        with pytest.raises(DiscoveryError):
            parse_axl_process_nodes(body)
    else:
        assert parse_axl_process_nodes(body) == list(dict.fromkeys(valid))


def test_imp_and_cuc_publishers_must_name_their_nodes() -> None:
    with pytest.raises(ConfigError, match=r"expc\.imp_publishers names 'cuc1', which is not a imp node"):
        load_config(None, overrides=['expc.imp_publishers=["cuc1"]'], environ={})
    with pytest.raises(ConfigError, match=r"expc\.cuc_publishers names 'x', which is not a cuc node"):
        load_config(None, overrides=['expc.cuc_publishers=["x"]'], environ={})


# -- end to end: IM&P and Unity Connection -------------------------------------------------------


@pytest.fixture
def uc_lab(tmp_path: Path) -> Iterator[RunningLab]:
    state = tmp_path / "lab"
    base = lab_overrides(state)
    prefix = next(o for o in base if o.startswith("cuc.0.address=")).split('"')[1].rsplit(".", 2)[0]
    cuc = ", ".join(
        [
            f'{{name = "cuc1", fqdn = "cuc1.example.com", address = "{prefix}.3.40",'
            ' cluster_extra = ["cuc9.example.com"]}',
            f'{{name = "cuc2", fqdn = "cuc2.example.com", address = "{prefix}.3.41"}}',
            # Another cluster's publisher, configured on C; the test plays it.
            f'{{name = "cuc3", fqdn = "cuc3.example.com", address = "{prefix}.3.42", external = true}}',
        ]
    )
    lab = RunningLab(
        state,
        [
            *base,
            f"cuc=[{cuc}]",
            'imp.0.cluster_extra=["imp7.example.com"]',
            'expc.imp_publishers=["imp1"]',
            'expc.cuc_publishers=["cuc1", "cuc3"]',
            "expc.refresh_servers_on_start=false",
        ],
    )
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def test_refresh_discovers_imp_and_unity_nodes(uc_lab: RunningLab) -> None:
    lab = uc_lab
    status = asyncio.run(wait_zones_active(lab.config, 30))
    assert all(z["state"] == "Active" for z in status["zones"]), status["zones"]

    code, _, servers = call(lab, "expc", "GET", "/servers")
    assert code == 200
    assert [n["fqdn"] for n in servers["imp"]] == ["imp1.example.com"]
    assert [n["fqdn"] for n in servers["cuc"]] == ["cuc1.example.com", "cuc3.example.com"]

    out = asyncio.run(_uc_refresh_flow(lab))

    assert out["before"] == 403
    first = out["refreshes"][0]
    imp = _by_fqdn(first["imp"])
    assert list(imp) == ["imp1.example.com", "imp7.example.com"]
    assert (imp["imp1.example.com"]["source"], imp["imp1.example.com"]["state"]) == ("configured", "active")
    assert (imp["imp7.example.com"]["source"], imp["imp7.example.com"]["state"]) == (
        "discovered",
        "unreachable",
    )
    assert imp["imp7.example.com"]["cluster"] == "imp1.example.com"
    cuc = _by_fqdn(first["cuc"])
    assert list(cuc) == [
        "cuc1.example.com",
        "cuc2.example.com",
        "cuc9.example.com",
        "cuc3.example.com",
        "cuc8.example.com",
    ]
    assert (cuc["cuc2.example.com"]["source"], cuc["cuc2.example.com"]["state"]) == ("discovered", "active")
    assert (
        cuc["cuc2.example.com"]["name"] == "cuc2" and cuc["cuc2.example.com"]["cluster"] == "cuc1.example.com"
    )
    assert cuc["cuc9.example.com"]["state"] == "unreachable" and "DNS" in cuc["cuc9.example.com"]["reason"]
    assert (cuc["cuc3.example.com"]["source"], cuc["cuc3.example.com"]["state"]) == ("configured", "active")
    assert cuc["cuc8.example.com"]["source"] == "discovered"
    assert first["result"]["errors"] == []
    assert out["after"] == (200, "14.0.1.10000-117")
    # cuc3's publisher was asked with the lab's admin credentials.
    assert out["auth"] == [("admin", "lab-admin-pass")] * 4

    # Bad answers from cuc3: reported, and cuc3's cluster stays as the last refresh learnt it.
    reasons = ["not XML", "too large", "answered 500"]
    for result, reason in zip(out["refreshes"][1:], reasons, strict=True):
        errors = result["result"]["errors"]
        assert len(errors) == 1 and errors[0].startswith("cuc3.example.com: ") and reason in errors[0], errors
        assert list(_by_fqdn(result["cuc"])) == list(cuc)
        assert [n["fqdn"] for n in result["imp"]] == ["imp1.example.com", "imp7.example.com"]
    assert out["after_bad"] == 200

    _, _, rules = call(lab, "expc", "GET", "/allowlist/rules")
    automatic = {r["url"] for r in rules["rules"] if r["automatic"]}
    assert {
        "https://cuc2.example.com:443/vmrest/",
        "https://cuc9.example.com:443/vmrest/",
        "https://cuc8.example.com:443/vmrest/",
        "https://imp7.example.com:8443/EPASSoap/",
    } <= automatic
    c_nodes = lab.component("expc")["nodes"]
    assert _by_fqdn(c_nodes["cuc"])["cuc2.example.com"]["source"] == "discovered"
    assert _by_fqdn(c_nodes["imp"])["imp7.example.com"]["source"] == "discovered"


async def _uc_refresh_flow(lab: RunningLab) -> dict[str, Any]:
    """Refresh four times while playing cuc3: a good answer, then garbage, a huge body and a 500."""
    cuc3 = next(n for n in lab.config.cuc if n.name == "cuc3")
    answers: list[str] = ["good", "garbage", "huge", "500"]
    seen_auth: list[tuple[str, str]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        user, _, password = (
            base64.b64decode(request.headers["Authorization"].split()[1]).decode().partition(":")
        )
        seen_auth.append((user, password))
        answer = answers.pop(0)
        if answer == "good":
            body = (
                "<Servers><Server><HostName>cuc3.example.com</HostName></Server>"
                "<Server><HostName>cuc8.example.com</HostName></Server></Servers>"
            )
            return web.Response(body=body.encode(), content_type="application/xml")
        if answer == "garbage":
            return web.Response(body=b"\x00<Servers><Server>", content_type="application/xml")
        if answer == "huge":  # chunked: no Content-Length to refuse it by
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            resp.force_close()
            await resp.prepare(request)
            await resp.write(b"<Servers>")
            for _ in range(40):
                await resp.write(b"<Server><HostName>cuc8.example.com</HostName></Server>" * 200)
            return resp
        return web.Response(status=500, text="boom")

    async def cluster(request: web.Request) -> web.StreamResponse:
        resp = await answer(request)
        resp.force_close()  # no keep-alive connection from C outlives the test's server
        return resp

    async def version(request: web.Request) -> web.Response:
        resp = web.Response(body=b"<VersionInfo/>", content_type="application/xml")
        resp.force_close()
        return resp

    app = web.Application()
    app.router.add_get("/vmrest/cluster", cluster)
    app.router.add_get("/vmrest/version", version)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = server_context(lab_pki(lab.config), "cuc3", require_client_cert=False)
    await web.TCPSite(runner, cuc3.address, cuc3.https_port, ssl_context=ctx, reuse_address=True).start()
    out: dict[str, Any] = {"refreshes": []}
    try:
        async with lab.edge_http() as client:
            await client.get_edge_config("alice", "lab-pass")
            basic = "Basic " + base64.b64encode(b"alice:lab-pass").decode()

            async def cuc2_version() -> tuple[int, bytes]:
                url = client.descriptor("https", "cuc2.example.com", 443) + "/vmrest/version"
                r = await client.request("GET", url, headers={"Authorization": basic})
                return r.status, r.body

            out["before"] = (await cuc2_version())[0]
            for _ in range(4):
                code, _, result = await asyncio.to_thread(call, lab, "expc", "POST", "/servers/refresh")
                assert code == 200, result
                out["refreshes"].append(result)
                if "after" not in out:
                    status, body = await cuc2_version()
                    out["after"] = (status, ET.fromstring(body).findtext("version"))
            out["after_bad"] = (await cuc2_version())[0]
    finally:
        await runner.cleanup()
    out["auth"] = seen_auth
    return out

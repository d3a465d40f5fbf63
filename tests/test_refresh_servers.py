"""Refresh servers on Expressway-C (spec §4 automatic allow-list rules per discovered node, §8).

End to end through the real processes: a Unified CM cluster of three nodes of which C is
configured with the publisher only. `ucm2` runs; `ucm3` is in the cluster's UDS `servers` list
but answers nothing (a socket that accepts and never speaks). Before a refresh, the descriptor
lane to `ucm2` is refused (403); during the refresh MRA requests get 503; afterwards `ucm2` is
allowed, both subscribers show in C's status and admin API with their state, and get_edge_config
lists the reachable nodes only. Plus the UDS `servers` parser on hostile input.
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
from hypothesis import given
from hypothesis import strategies as st

from edge.config import ConfigError, load_config
from edge.lab import wait_zones_active
from edge_c.discovery import MAX_SERVERS, DiscoveryError, parse_uds_servers
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

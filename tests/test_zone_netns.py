"""The traversal zone across a real DMZ firewall (shared/spec/MRA.md §1).

Inside, DMZ and outside are separate network namespaces; the DMZ may not open any connection
towards the inside. The zone must still come up (C dials out) and carry an MRA client's HTTPS
sign-in and a descriptor-lane request from the outside all the way to Unified CM.
"""

from __future__ import annotations

import base64
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import LabConfig, dump_toml, load_config
from tests.conftest import edge_cli
from tests.netns import (
    DMZ_INSIDE_ADDR,
    DMZ_OUTSIDE_ADDR,
    IN_DMZ_NET,
    INSIDE_LAN,
    NetnsUnavailable,
    NsProcess,
    ProcessGroup,
    Topology,
    ns_tool,
)

pytestmark = pytest.mark.netns

INSIDE = {
    "dns": "198.18.10.53",
    "expc": "198.18.10.10",
    "ucm": "198.18.10.20",
    "imp": "198.18.10.30",
    "cuc": "198.18.10.40",
}
READY_DEADLINE_S = 20.0
ZONE_DEADLINE_S = 15.0


def b64(text: str) -> str:
    return base64.b64encode(text.lower().encode()).decode().rstrip("=")


def netns_config(state: Path) -> LabConfig:
    return load_config(
        None,
        overrides=[
            f'lab.state_dir="{state}"',
            "lab.demo=false",
            f'dns.address="{INSIDE["dns"]}"',
            f'dns.internal_clients=["{INSIDE_LAN}", "{IN_DMZ_NET}"]',
            f'expe.0.internal_address="{DMZ_INSIDE_ADDR}"',
            f'expe.0.external_address="{DMZ_OUTSIDE_ADDR}"',
            f'expc.address="{INSIDE["expc"]}"',
            f'ucm.0.address="{INSIDE["ucm"]}"',
            f'imp.0.address="{INSIDE["imp"]}"',
            f'cuc.0.address="{INSIDE["cuc"]}"',
        ],
        environ={},
    )


@pytest.fixture
def topo() -> Iterator[Topology]:
    topology = Topology()
    try:
        try:
            topology.build(list(INSIDE.values()))
        except NetnsUnavailable as exc:
            print(f"skipping: {exc}")
            pytest.skip(f"network namespaces not permitted here: {exc}")
        topology.dmz_firewall()
        yield topology
    finally:
        errors = topology.close()
        assert not errors, f"could not delete namespaces: {errors}"
        left = [n for n in topology.namespaces() if topology.suffix in n]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    logs = tmp_path / "logs"
    logs.mkdir()
    group = ProcessGroup(logs)
    try:
        yield group
    finally:
        group.stop_all()


def wait_ready(proc: NsProcess, host: str, port: int) -> dict[str, Any]:
    deadline = time.monotonic() + READY_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.log_tail()}")
        status = ns_tool(proc.ns, "status", {"host": host, "port": port, "timeout_s": 0.5})
        if status is not None and status.get("pid") == proc.popen.pid:
            if status.get("state") == "ready":
                return dict(status)
            assert status.get("state") != "failed", f"{proc.name}: {status.get('failure')}"
        time.sleep(0.1)  # readiness-probe interval, bounded by the deadline
    raise AssertionError(f"{proc.name} not ready within {READY_DEADLINE_S} s:\n{proc.log_tail()}")


def wait_zone(ns: str, host: str, port: int, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + ZONE_DEADLINE_S
    zone: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = ns_tool(ns, "status", {"host": host, "port": port})
        if status is not None:
            zone = status["zones"][0]
            if zone["state"] == state:
                return zone
        time.sleep(0.1)
    raise AssertionError(f"zone not {state} within {ZONE_DEADLINE_S} s: {zone}")


def test_zone_through_dmz_firewall(topo: Topology, procs: ProcessGroup, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = netns_config(state)
    config_path = state / "lab.toml"
    config_path.write_text(dump_toml(config))
    edge_cli("certs", "generate", "--config", str(config_path))

    started = time.monotonic()
    for name, role in config.components():
        ns = topo.dmz if role == "expe" else topo.inside
        proc = procs.start(ns, name, config_path)
        wait_ready(proc, *config.admin_endpoint(name))
    c_admin = config.admin_endpoint("expc")
    e_admin = config.admin_endpoint("expe")
    c_zone = wait_zone(topo.inside, *c_admin, "Active")
    e_zone = wait_zone(topo.dmz, *e_admin, "Active")
    print(f"all components ready and zone Active after {time.monotonic() - started:.2f} s")
    assert {ch["channel"]: ch["state"] for ch in c_zone["channels"]} == {
        "sip": "active",
        "https": "active",
        "xmpp": "active",
    }
    assert {ch["channel"] for ch in e_zone["channels"]} >= {"sip", "https", "xmpp"}

    # The firewall is in force: from the DMZ, C's SIP port does not even answer a SYN, while the
    # same port accepts a connection from the inside.
    c_sip = config.expc.address, config.expc.sip_tls_port
    inside_probe = ns_tool(topo.inside, "connect", {"host": c_sip[0], "port": c_sip[1], "timeout_s": 3})
    assert inside_probe["error"] is None, f"C's SIP port does not listen: {inside_probe}"
    dropped_before = topo.dropped_packets()
    dmz_probe = ns_tool(topo.dmz, "connect", {"host": c_sip[0], "port": c_sip[1], "timeout_s": 1.5})
    assert dmz_probe["error"] is not None, "the DMZ could open a connection to C: no firewall"
    assert topo.dropped_packets() > dropped_before, "the DROP rule did not see the DMZ's SYN"

    # The zone carries traffic: an MRA sign-in from the outside, then UDS through the descriptor lane.
    edge = config.expe[0]
    cafile = str(state / "certs" / "ca.pem")
    basic = base64.b64encode(b"alice:lab-pass").decode()
    request = {
        "address": edge.external_address,
        "port": edge.https_port,
        "server_name": edge.fqdn,
        "cafile": cafile,
    }
    answer = ns_tool(
        topo.outside,
        "https",
        {
            **request,
            "path": f"/{b64('example.com')}/get_edge_config?service_name=_cisco-uds&service_name=_cuplogin",
            "headers": {"Authorization": f"Basic {basic}"},
        },
    )
    assert answer["status"] == 200, answer
    assert ET.fromstring(answer["body"]).tag == "getEdgeConfigResponse"
    cookies = [v for k, v in answer["headers"] if k.lower() == "set-cookie" and v.startswith("X-Auth=")]
    assert cookies, f"no X-Auth cookie: {answer['headers']}"
    x_auth = cookies[0].split(";", 1)[0].split("=", 1)[1]

    uds = ns_tool(
        topo.outside,
        "https",
        {
            **request,
            "path": f"/{b64('example.com/https/ucm1.example.com/8443')}/cucm-uds/version",
            "headers": {"Cookie": f"X-Auth={x_auth}"},
        },
    )
    assert uds["status"] == 200, uds
    assert ET.fromstring(uds["body"]).tag == "versionInformation"
    print(
        f"get_edge_config {answer['elapsed_s'] * 1000:.0f} ms, UDS version {uds['elapsed_s'] * 1000:.0f} ms"
    )

    # E never reached C: the whole exchange above rode connections C opened.
    assert wait_zone(topo.inside, *c_admin, "Active")["reconnects"] == 0

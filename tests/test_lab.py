"""The lab as a user drives it: `edge lab up --detach`, `status --json`, crash reporting, `down`."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from pathlib import Path

from tests.conftest import RunningLab, edge_cli, lab_overrides

EXPECTED = {"dns", "ucm1", "imp1", "cuc1", "expe", "expc"}


def _port_free(host: str, port: int, transport: str) -> bool:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _open_files_limits(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as fh:
        for line in fh:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError("no 'Max open files' line")


def test_lab_up_status_crash_and_down(tmp_path: Path) -> None:
    lab = RunningLab(tmp_path / "state", lab_overrides(tmp_path / "state"))
    # Started from a shell with the usual soft limit of 1,024 open files (the components inherit
    # it), each component lifts its own to the hard limit: 4 sockets per relayed call.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    try:
        lab.up()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        out = edge_cli("lab", "status", "--json", *lab.args)
        status = json.loads(out.stdout)
        assert status["state"] == "ready"
        comps = {c["name"]: c for c in status["components"]}
        assert set(comps) == EXPECTED
        pids = {c["pid"] for c in comps.values()}
        assert len(pids) == len(EXPECTED), "each component is its own OS process"
        for comp in comps.values():
            assert comp["state"] == "ready"
            assert comp["listeners"], f"{comp['name']} lists no listener"
            c_soft, c_hard = _open_files_limits(comp["pid"])
            assert c_soft == c_hard and (c_soft == "unlimited" or int(c_soft) > 1024), (comp["name"], c_soft)
            for lst in comp["listeners"]:
                assert set(lst) == {"name", "transport", "host", "port"}
        # each process bound to its own loopback address (spec §1)
        hosts = {name: {lst["host"] for lst in c["listeners"]} for name, c in comps.items()}
        assert hosts["expc"].isdisjoint(hosts["expe"])
        assert hosts["ucm1"].isdisjoint(hosts["expe"])
        # the human table names every component
        table = edge_cli("lab", "status", *lab.args).stdout
        for name in EXPECTED:
            assert name in table

        # a crashed component is reported as such, and the lab as degraded
        victim = comps["cuc1"]["pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _pid_gone(victim) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = edge_cli("lab", "status", "--json", *lab.args, check=False)
        assert after.returncode == 1
        st = json.loads(after.stdout)
        crashed = {c["name"]: c for c in st["components"]}["cuc1"]
        assert crashed["state"] == "crashed"
        assert st["state"] == "degraded"
    finally:
        down = edge_cli("lab", "down", *lab.args, check=False)
    assert "stopped" in down.stdout
    for comp in comps.values():
        assert _pid_gone(comp["pid"]), f"{comp['name']} still running"
        for lst in comp["listeners"]:
            assert _port_free(lst["host"], lst["port"], lst["transport"]), f"{lst} still bound"
    again = edge_cli("lab", "status", "--json", *lab.args, check=False)
    assert json.loads(again.stdout)["state"] == "down"


def test_second_lab_up_is_refused_while_one_runs(tmp_path: Path) -> None:
    lab = RunningLab(tmp_path / "state", lab_overrides(tmp_path / "state"))
    lab.up()
    try:
        second = edge_cli("lab", "up", "--detach", *lab.args, check=False)
        assert second.returncode != 0
        assert "already running" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        lab.down()


def test_component_that_cannot_bind_fails_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    overrides = lab_overrides(state)
    lab = RunningLab(state, overrides)
    host = lab.config.cuc[0].address
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((host, lab.config.cuc[0].https_port))
    blocker.listen()
    try:
        result = edge_cli("lab", "up", "--detach", *lab.args, check=False)
        assert result.returncode != 0
        assert "cuc1" in result.stderr
        assert "Traceback" not in result.stderr
        status = json.loads(edge_cli("lab", "status", "--json", *lab.args, check=False).stdout)
        assert status["state"] == "down", "a failed start leaves nothing running"
    finally:
        blocker.close()
        lab.down()


def test_lab_up_runs_the_demo_flow(tmp_path: Path) -> None:
    """The README's lab command: every component up, then the demo MRA flow, printed."""
    state = tmp_path / "state"
    lab = RunningLab(state, [*lab_overrides(state), "lab.demo=true"])
    try:
        out = edge_cli("lab", "up", "--detach", *lab.args, timeout=180)
        assert "MRA lab: ready" in out.stdout
        assert "demo:" in out.stdout
        assert "✗" not in out.stdout, out.stdout
        for step in ("get_edge_config", "REGISTER", "STUN keepalive", "call 9999", "XMPP sign-in", "chat"):
            assert step in out.stdout
    finally:
        lab.down()


def test_restart_one_component(tmp_path: Path) -> None:
    """`edge lab restart expe`: a new E process, the zone Active again, the rest untouched, and
    `lab down` stops the new process (lab.json records it)."""
    lab = RunningLab(tmp_path / "state", lab_overrides(tmp_path / "state"))
    lab.up()
    try:
        before = {
            c["name"]: c["pid"]
            for c in json.loads(edge_cli("lab", "status", "--json", *lab.args).stdout)["components"]
        }
        out = edge_cli("lab", "restart", "expe", *lab.args)
        assert "expe restarted" in out.stdout
        assert _pid_gone(before["expe"])
        deadline = time.monotonic() + 20
        while True:
            status = json.loads(edge_cli("lab", "status", "--json", *lab.args, check=False).stdout)
            if all(z["state"] == "Active" for z in status["zones"]) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        after = {c["name"]: c for c in status["components"]}
        assert status["state"] == "ready"
        assert after["expe"]["pid"] != before["expe"]
        assert {n: c["pid"] for n, c in after.items() if n != "expe"} == {
            n: p for n, p in before.items() if n != "expe"
        }
        assert [z["state"] for z in status["zones"]] == ["Active"] * len(status["zones"])
        unknown = edge_cli("lab", "restart", "nosuch", *lab.args, check=False)
        assert unknown.returncode != 0
        assert "no component 'nosuch'" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    finally:
        edge_cli("lab", "down", *lab.args, check=False)
    assert _pid_gone(after["expe"]["pid"])

"""The Unified Communications traversal zone between the real C and E processes (spec §1–3).

Every lab here is started through the real CLI (`edge lab up --detach`) on its own loopback
block; zone state is read from `edge lab status` (or, for a component this test restarted by
hand, from its own admin /status).
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import load_config
from edge.lab import pid_alive
from edge.lab_pki import cert_specs
from edge.pki import ensure_lab_pki
from tests.conftest import REPO, RunningLab, lab_overrides
from tests.netns import fetch_status, https_request

LabFactory = Callable[..., RunningLab]
ZONE_DEADLINE_S = 15.0
# Small keepalive and back-off so loss and recovery show within seconds.
FAST = (
    "expc.zone.keepalive_interval_s=1",
    "expc.zone.keepalive_timeout_s=3",
    "expc.zone.reconnect_max_s=2",
)

# `edge lab up` waits up to lab.ready_timeout_s for the zone to be Active; a lab whose zone can
# never come up need not wait the default 20 s for that.
NO_LONG_WAIT = ("lab.ready_timeout_s=10",)

# -- helpers ----------------------------------------------------------------------------------


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def private_block(tmp_path: Path) -> tuple[str, ...]:
    """Address overrides for a 127.<b> block nobody uses right now.

    conftest numbers blocks from 127.20 per pytest process, so two test sessions running at once
    in the same tree collide; a random block checked for free admin ports avoids that.
    """
    rng = random.Random()
    for _ in range(50):
        block = rng.randrange(150, 250)
        extra = [o for o in lab_overrides(tmp_path, block) if not o.startswith("lab.")]
        config = load_config(None, overrides=extra, environ={})
        if all(_bindable(*config.admin_endpoint(name)) for name, _ in config.components()):
            return tuple(extra)
    raise AssertionError("no free 127.x block for a lab")


@pytest.fixture
def start_lab(lab_factory: LabFactory, tmp_path: Path) -> LabFactory:
    """`lab_factory` on a loopback block of its own (see `private_block`)."""

    def start(*extra: str) -> RunningLab:
        return lab_factory(*private_block(tmp_path), *extra)

    return start


def c_zone(lab: RunningLab) -> dict[str, Any]:
    return dict(lab.component("expc")["zones"][0])


def e_zone(lab: RunningLab) -> dict[str, Any]:
    return dict(lab.component("expe")["zones"][0])


def admin_zone(lab: RunningLab, name: str) -> dict[str, Any] | None:
    """A zone read straight from a component's admin /status (works for a hand-started process)."""
    status = fetch_status(*lab.config.admin_endpoint(name), timeout_s=1.0)
    return None if status is None or not status.get("zones") else dict(status["zones"][0])


def wait_zone(
    read: Callable[[], dict[str, Any] | None],
    until: Callable[[dict[str, Any]], bool],
    what: str,
    deadline_s: float = ZONE_DEADLINE_S,
) -> dict[str, Any]:
    """Poll a zone status until `until` holds; fail with the last status seen at the deadline."""
    deadline = time.monotonic() + deadline_s
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        last = read()
        if last is not None and until(last):
            return last
        time.sleep(0.05)  # status-polling interval, bounded by the deadline
    raise AssertionError(f"zone not {what} within {deadline_s} s; last status: {last}")


def channels(zone: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {ch["channel"]: ch for ch in zone["channels"]}


def all_failed_with(text: str) -> Callable[[dict[str, Any]], bool]:
    def check(zone: dict[str, Any]) -> bool:
        chans = channels(zone)
        return (
            zone["state"] == "Failed"
            and {"sip", "https"} <= set(chans)
            and all(text in chans[name]["reason"] for name in ("sip", "https"))
        )

    return check


def is_active(zone: dict[str, Any]) -> bool:
    return bool(zone["state"] == "Active")


def kill_and_reap(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid), f"pid {pid} survived SIGKILL"


class HandStarted:
    """Components this test (re)starts itself, as the supervisor would; stopped by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, lab: RunningLab, name: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE__")}
        env["PYTHONUNBUFFERED"] = "1"
        log = lab.state_dir / "logs" / f"{name}.restarted.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", name, "--config", str(lab.state_dir / "lab.toml")],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        self.procs.append(proc)
        host, port = lab.config.admin_endpoint(name)
        deadline = time.monotonic() + lab.config.lab.ready_timeout_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{name} exited {proc.returncode}: {log.read_text()[-2000:]}"
            status = fetch_status(host, port, timeout_s=0.5)
            if status is not None and status.get("pid") == proc.pid and status.get("state") == "ready":
                return proc
            time.sleep(0.05)  # readiness-probe interval
        raise AssertionError(f"{name} not ready: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def hand_started() -> Iterator[HandStarted]:
    group = HandStarted()
    try:
        yield group
    finally:
        group.stop()


# -- tests ------------------------------------------------------------------------------------


def test_default_lab_zone_active_on_both_sides(start_lab: LabFactory) -> None:
    lab = start_lab()
    started = time.monotonic()
    zc = wait_zone(lambda: c_zone(lab), is_active, "Active on C")
    ze = wait_zone(lambda: e_zone(lab), is_active, "Active on E")
    print(f"zone Active on both sides {time.monotonic() - started:.2f} s after `lab up` returned")
    for zone, peer in ((zc, "expe"), (ze, "expc")):
        assert zone["name"] == "CollaborationEdgeZone"
        assert zone["reason"] == ""
        assert zone["reconnects"] == 0
        assert isinstance(zone["since"], float) and zone["since"] <= time.time()
        chans = channels(zone)
        assert {"sip", "https"} <= set(chans)
        for name in ("sip", "https"):
            assert chans[name]["state"] == "active", chans[name]
            assert chans[name]["peer"] == peer
    # The summary at the top of `edge lab status` lists the zone of both Expressways.
    summary = {z["component"]: z["state"] for z in lab.status()["zones"]}
    assert summary == {"expc": "Active", "expe": "Active"}


def test_wrong_zone_password_stays_failed(start_lab: LabFactory) -> None:
    lab = start_lab('expc.zone.password="nope"', "expc.zone.reconnect_max_s=1", *NO_LONG_WAIT)
    zc = wait_zone(lambda: c_zone(lab), all_failed_with("authentication failed"), "Failed (auth) on C")
    assert "authentication failed" in zc["reason"]
    ze = wait_zone(lambda: e_zone(lab), all_failed_with("authentication failed"), "Failed (auth) on E")
    assert "rejected" in ze["reason"].lower()
    # It stays Failed while C keeps retrying: E counts several rejected attempts meanwhile.
    deadline = time.monotonic() + ZONE_DEADLINE_S
    rejected = 0
    while time.monotonic() < deadline and rejected < 3:
        assert c_zone(lab)["state"] == "Failed"
        rejected = lab.component("expe")["links"]["https"]["rejected"]
        time.sleep(0.05)
    assert rejected >= 3, f"C did not retry: E rejected {rejected} links"
    assert c_zone(lab)["state"] == "Failed" and c_zone(lab)["reconnects"] == 0


def test_wrong_tls_verify_subject_name_fails(start_lab: LabFactory) -> None:
    lab = start_lab('expe.0.tls_verify_subject_name="someone-else.example.com"', *NO_LONG_WAIT)
    zc = wait_zone(lambda: c_zone(lab), all_failed_with("TLS verify subject name"), "Failed (SAN) on C")
    assert "someone-else.example.com" in zc["reason"]
    ze = wait_zone(lambda: e_zone(lab), all_failed_with("TLS verify subject name"), "Failed (SAN) on E")
    assert "someone-else.example.com" in ze["reason"]


def test_e_certificate_from_another_ca_fails_verification(
    start_lab: LabFactory, hand_started: HandStarted, tmp_path: Path
) -> None:
    lab = start_lab(*FAST)
    wait_zone(lambda: c_zone(lab), is_active, "Active on C")
    certs = lab.state_dir / "certs"
    # A throwaway CA issues E a certificate with exactly the names the lab CA gave it.
    spec = next(s for s in cert_specs(lab.config) if s.name == "expe")
    rogue = ensure_lab_pki(tmp_path / "rogue-ca", [spec])
    assert (rogue.directory / "ca.pem").read_bytes() != (certs / "ca.pem").read_bytes()
    kill_and_reap(int(lab.component("expe")["pid"]))
    for suffix in (".pem", "-chain.pem", ".key"):
        shutil.copyfile(rogue.directory / f"expe{suffix}", certs / f"expe{suffix}")
    hand_started.start(lab, "expe")
    zc = wait_zone(lambda: c_zone(lab), all_failed_with("TLS verification of peer failed"), "Failed (CA)")
    assert zc["state"] == "Failed"
    assert admin_zone(lab, "expe") is not None  # E itself runs, C refuses it


def test_zone_recovers_after_e_is_killed_and_restarted(
    start_lab: LabFactory, hand_started: HandStarted
) -> None:
    lab = start_lab(*FAST)
    wait_zone(lambda: c_zone(lab), is_active, "Active on C")
    killed = time.monotonic()
    kill_and_reap(int(lab.component("expe")["pid"]))
    zc = wait_zone(lambda: c_zone(lab), all_failed_with("lost"), "Failed (lost) on C")
    detected = time.monotonic() - killed
    assert "expe" in zc["reason"] and "lost" in zc["reason"]
    # The loss stays visible while reconnects fail (E is down: refused), not only for a moment.
    wait_zone(lambda: c_zone(lab), all_failed_with("reconnect"), "Failed (reconnecting) on C")
    assert all_failed_with("lost")(c_zone(lab))

    restarted = time.monotonic()
    hand_started.start(lab, "expe")
    zc = wait_zone(lambda: c_zone(lab), is_active, "Active again on C")
    recovered = time.monotonic() - restarted
    assert zc["reconnects"] > 0
    assert all(ch["reconnects"] >= 1 for ch in zc["channels"])
    ze = wait_zone(lambda: admin_zone(lab, "expe"), is_active, "Active on the restarted E")
    assert {"sip", "https"} <= set(channels(ze))
    print(f"loss detected in {detected:.2f} s; Active again {recovered:.2f} s after E was ready")


def test_https_answers_502_when_c_is_killed(start_lab: LabFactory) -> None:
    lab = start_lab(*FAST)
    wait_zone(lambda: e_zone(lab), is_active, "Active on E")
    kill_and_reap(int(lab.component("expc")["pid"]))
    edge = lab.config.expe[0]
    domain = base64.b64encode(lab.config.lab.domain.lower().encode()).decode().rstrip("=")
    answer = https_request(
        edge.external_address,
        edge.https_port,
        edge.fqdn,
        f"/{domain}/get_edge_config?service_name=_cisco-uds&service_name=_cuplogin",
        cafile=str(lab.state_dir / "certs" / "ca.pem"),
        headers={"Authorization": "Basic " + base64.b64encode(b"alice:lab-pass").decode()},
        timeout_s=10.0,
    )
    print(f"502 answered in {answer.elapsed_s * 1000:.0f} ms")
    assert answer.status == 502, answer
    assert answer.body.strip() == "Next Hop Connection Failed"
    assert answer.header("Server") == "CE_C ECS"
    assert answer.elapsed_s < 5.0
    ze = wait_zone(lambda: e_zone(lab), lambda z: z["state"] == "Failed", "Failed on E")
    assert "lost" in ze["reason"], ze

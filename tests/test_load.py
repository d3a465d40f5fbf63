"""`edge load` against the real lab processes (issue #9): the report's figures match what E, C,
the UCM and the IM&P count themselves; the HTML report renders in headless Chromium; Ctrl-C
still hangs up, signs out and writes the report; failures are counted by kind.

Every run is small (a handful of users for ~10 s). The lab's authorization rate control allows 8
authorizations of one user per 300 s (spec §4), so each test signs in its own users (`--first`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mra_client.xmpp_lean import LeanXmppSession
from tests.conftest import ARTIFACTS, RunningLab, lab_overrides
from tests.web.cdp import Browser, chromium_path

LOAD_USERS = 40  # lab.load.count: load00001…load00040


@pytest.fixture(scope="module")
def load_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningLab]:
    state = tmp_path_factory.mktemp("loadlab")
    lab = RunningLab(state, [*lab_overrides(state), f"load.count={LOAD_USERS}"])
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE__")}


def _load_args(lab: RunningLab, report: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge", "load", *extra, "--report", str(report), "--no-progress", *lab.args]


def run_load(
    lab: RunningLab, report: Path, *extra: str, timeout: float = 90
) -> tuple[int, str, dict[str, Any]]:
    proc = subprocess.run(
        _load_args(lab, report, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert report.exists(), f"no report written:\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, proc.stdout, json.loads(report.read_text())


def counters(lab: RunningLab) -> dict[str, Any]:
    """The lab's own figures: E, C, the UCM (registrar, calls, echo) and the IM&P."""
    e, c, ucm, imp = (lab.component(n) for n in ("expe", "expc", "ucm1", "imp1"))
    return {
        "e_registrations": e["sip"]["registrations"],
        "e_registrations_peak": e["sip"]["registrations_peak"],
        "e_media": e["media"]["totals"],
        "c_calls": c["sip"]["calls"]["counts"],
        "ucm_registrations": ucm["sip"]["registrations"],
        "ucm_calls": ucm["sip"]["calls"],
        "ucm_echo_packets": ucm["sip"]["echo"]["packets"],
        "imp_messages": imp["xmpp"]["messages_routed"],
        "imp_sessions": imp["xmpp"]["sessions_current"],
    }


@dataclass
class Watch:
    """Polls the lab while a run goes on: registrations E shows, calls C (the B2BUA) shows."""

    lab: RunningLab
    max_registrations: int = 0
    max_calls: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                e, c = self.lab.component("expe"), self.lab.component("expc")
            except (OSError, urllib.error.URLError):
                continue
            self.max_registrations = max(self.max_registrations, e["sip"]["registrations"])
            self.max_calls = max(self.max_calls, c["sip"]["calls"]["current"])
            self.stop.wait(0.1)


@dataclass
class SmallRun:
    code: int
    stdout: str
    report: dict[str, Any]
    html: Path
    before: dict[str, Any]
    after: dict[str, Any]
    watch: Watch


@pytest.fixture(scope="module")
def small_run(load_lab: RunningLab, tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    """5 users, 2 echo calls of 3 s, a chat a second, for 10 s (users load00001…load00005)."""
    out = tmp_path_factory.mktemp("load") / "small.json"
    before = counters(load_lab)
    watch = Watch(load_lab)
    poller = threading.Thread(target=watch.run, daemon=True)
    poller.start()
    try:
        code, stdout, report = run_load(
            load_lab,
            out,
            *("--users", "5", "--first", "1", "--rate", "10", "--calls", "2", "--call-rate", "2"),
            *("--hold", "3", "--messages-per-min", "60", "--duration", "10"),
        )
    finally:
        watch.stop.set()
        poller.join(timeout=5)
    return SmallRun(code, stdout, report, out.with_suffix(".html"), before, counters(load_lab), watch)


def test_report_figures_match_the_lab_counters(small_run: SmallRun) -> None:
    r, before, after = small_run.report, small_run.before, small_run.after
    assert small_run.code == 0, small_run.stdout
    assert r["stopped"] == "duration reached (10 s)"
    assert r["errors"] == {"total": 0, "by_kind": []}
    # Sign-ins and registrations: every user registered once through E, C and the UCM.
    assert r["signins"] == {**r["signins"], "attempted": 5, "ok": 5, "failed": 0, "signed_out": 5}
    assert r["registrations"]["peak"] == 5 == small_run.watch.max_registrations
    assert after["e_registrations_peak"] >= 5
    ucm_b, ucm_a = before["ucm_registrations"], after["ucm_registrations"]
    assert ucm_a["new"] - ucm_b["new"] == 5
    assert ucm_a["unregistrations"] - ucm_b["unregistrations"] == 5, "sign-out unregisters"
    assert r["registrations"]["current"] == 0 == after["e_registrations"] == ucm_a["current"]
    # Calls: both reached the UCM's echo through C's B2BUA and were hung up.
    calls = r["calls"]
    assert (calls["attempted"], calls["ok"], calls["failed"], calls["active"]) == (2, 2, 0, 0)
    assert calls["peak_active"] == 2 == small_run.watch.max_calls
    assert calls["setup_ms"]["count"] == 2 and 0 < calls["setup_ms"]["p50"] <= calls["setup_ms"]["max"]
    assert after["ucm_calls"]["echo_calls"] - before["ucm_calls"]["echo_calls"] == 2
    assert after["ucm_calls"]["active"] == 0
    assert after["c_calls"]["answered"] - before["c_calls"]["answered"] == 2
    assert after["c_calls"]["ended"] - before["c_calls"]["ended"] == 2
    # Media: 3 s at 50 pps each way per call; every packet the client got back was echoed by the
    # UCM, and the UCM echoed nothing the client did not send. E relayed both directions.
    media = r["media"]
    assert 2 * 140 <= media["packets_sent"] <= 2 * 160
    echoed = after["ucm_echo_packets"] - before["ucm_echo_packets"]
    assert media["packets_received"] <= echoed <= media["packets_sent"]
    assert media["packets_lost"] == media["packets_sent"] - media["packets_received"]
    assert media["loss_pct"] < 2.0 and media["mismatched"] == 0 and media["auth_failures"] == 0
    e_rx = after["e_media"]["rx_packets"] - before["e_media"]["rx_packets"]
    e_tx = after["e_media"]["tx_packets"] - before["e_media"]["tx_packets"]
    assert e_rx >= media["packets_sent"] + media["packets_received"]
    assert e_tx >= media["packets_received"] + echoed
    assert len(media["per_call"]) == 2 and all(c["jitter_ms"] >= 0 for c in media["per_call"])
    # Chat: one a second between the users over MRA, each routed once by the IM&P.
    msgs = r["messages"]
    assert 6 <= msgs["sent"] <= 11
    assert msgs["received"] == msgs["sent"] and msgs["lost"] == 0
    assert after["imp_messages"] - before["imp_messages"] == msgs["sent"]
    assert r["xmpp"]["sessions_peak"] == 5 and after["imp_sessions"] == before["imp_sessions"]
    # The timeline has a sample a second and ends with everyone signed out.
    tl = r["timeline"]
    assert len(tl) >= 10 and max(s["registrations"] for s in tl) == 5 and tl[-1]["registrations"] == 0
    assert "sign-ins ok / failed / attempted   5 / 0 / 5" in small_run.stdout


CHECK_PLOTS = """(() => {
  const plots = Array.from(document.querySelectorAll('svg.plot'));
  const lines = Array.from(document.querySelectorAll('svg.plot polyline.series'));
  const bars = id => Array.from(document.querySelectorAll(`svg[data-plot="${id}"] rect.bar`));
  return {
    plots: plots.map(p => p.getAttribute('data-plot')),
    rendered: plots.every(p => p.getBoundingClientRect().width > 100),
    regPoints: +document.querySelector('polyline[data-series="registrations"]').getAttribute('data-points'),
    linesDrawn: lines.filter(l => l.getBBox().width > 0).length,
    setupCalls: bars('setup').reduce((n, b) => n + +b.getAttribute('data-value'), 0),
    lossBars: bars('loss').length,
    jitterBars: bars('jitter').length,
    noErrors: document.querySelector('p.empty[data-plot="errors"]') !== null,
    ready: document.body.getAttribute('data-ready'),
    errors: window.__pageErrors,
  };
})()"""


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium")
def test_html_report_renders_its_plots(small_run: SmallRun) -> None:
    page_html = small_run.html.read_text()
    assert "http://" not in page_html and "https://" not in page_html and " src=" not in page_html

    async def flow() -> tuple[dict[str, Any], str]:
        async with Browser() as page:
            await page.call(
                "Page.addScriptToEvaluateOnNewDocument",
                source="window.__pageErrors = []; window.addEventListener('error',"
                " e => window.__pageErrors.push(String(e.message)));",
            )
            await page.goto(small_run.html.as_uri())
            await page.wait_for("document.body && document.body.getAttribute('data-ready') === '1'")
            result = await page.evaluate(CHECK_PLOTS)
            box = await page.evaluate(
                "(() => { const r = document.querySelector('svg[data-plot=\"registrations\"]')"
                ".getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
            )
            await page.call("Input.dispatchMouseEvent", type="mouseMoved", x=box[0], y=box[1])
            readout = await page.wait_for(
                "document.querySelector('.readout[data-for=\"registrations\"]').textContent"
            )
            await page.screenshot(ARTIFACTS / "load-report.png")
            return result, str(readout)

    result, readout = asyncio.run(flow())
    assert result["errors"] == [] and result["ready"] == "1"
    assert result["plots"] == ["registrations", "calls", "setup", "loss", "jitter", "media", "messages"]
    assert result["rendered"] and result["linesDrawn"] == 9
    assert result["regPoints"] == len(small_run.report["timeline"])
    assert result["setupCalls"] == 2 and result["lossBars"] == 2 and result["jitterBars"] == 2
    assert result["noErrors"]
    assert readout.startswith("t=") and "registrations" in readout


def test_calls_between_users(load_lab: RunningLab, tmp_path: Path) -> None:
    """`--call-to users`: one load user calls another through E → C → UCM → C → E; both send SRTP."""
    before = counters(load_lab)
    code, stdout, r = run_load(
        load_lab,
        tmp_path / "u2u.json",
        *("--users", "4", "--first", "6", "--calls", "2", "--call-rate", "4", "--hold", "3"),
        *("--call-to", "users", "--no-xmpp", "--duration", "8"),
    )
    after = counters(load_lab)
    assert code == 0, stdout
    assert (r["calls"]["attempted"], r["calls"]["ok"], r["calls"]["answered_by_users"]) == (2, 2, 2)
    for call in r["media"]["per_call"]:
        # Both directions: 2 × ~150 packets; E may drop the first packet or two towards a leg it
        # has not latched yet (symmetric RTP, spec §7).
        assert call["sent"] >= 2 * 140 and call["lost"] <= 4, call
    # Each call is two B2BUA calls on C (outside → UCM, UCM → outside) and one relayed call on UCM.
    assert after["c_calls"]["answered"] - before["c_calls"]["answered"] == 4
    assert after["ucm_calls"]["answered"] - before["ucm_calls"]["answered"] == 2
    assert r["xmpp"]["sessions_peak"] == 0


def test_sigint_mid_run_hangs_up_signs_out_and_writes_the_report(
    load_lab: RunningLab, tmp_path: Path
) -> None:
    report = tmp_path / "interrupted.json"
    proc = subprocess.Popen(
        _load_args(
            load_lab,
            report,
            *("--users", "3", "--first", "10", "--calls", "2", "--call-rate", "5"),
            *("--hold", "60", "--duration", "120"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while load_lab.component("expc")["sip"]["calls"]["current"] < 2:  # both calls up: mid-run
            assert proc.poll() is None and time.monotonic() < deadline, "calls never came up"
            time.sleep(0.1)
        assert not report.exists()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=45)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "Traceback" not in stdout + stderr, stdout + stderr
    assert proc.returncode == 0, stdout + stderr
    r = json.loads(report.read_text())
    assert r["stopped"] == "interrupted (SIGINT)" and r["elapsed_s"] < 60
    assert (r["calls"]["attempted"], r["calls"]["ok"], r["calls"]["active"]) == (2, 2, 0)
    assert r["signins"]["signed_out"] == 3 and r["registrations"]["current"] == 0
    assert r["media"]["packets_received"] > 0
    assert Path(report.with_suffix(".html")).read_text().startswith("<!DOCTYPE html>")
    assert load_lab.component("expe")["sip"]["registrations"] == 0, "signed out"
    assert load_lab.component("expc")["sip"]["calls"]["current"] == 0, "hung up"
    assert "stopped: interrupted (SIGINT)" in stdout


def test_failures_are_counted_by_kind(load_lab: RunningLab, tmp_path: Path) -> None:
    code, stdout, r = run_load(
        load_lab,
        tmp_path / "bad.json",
        *("--users", "3", "--first", "20", "--password", "wrong-{n}", "--duration", "5"),
        *("--calls", "1", "--messages-per-min", "30"),
    )
    assert code == 1, stdout
    assert r["signins"] == {**r["signins"], "attempted": 3, "ok": 0, "failed": 3}
    kinds = {e["kind"]: e for e in r["errors"]["by_kind"]}
    assert kinds["get_edge_config 401"]["count"] == 3
    assert kinds["get_edge_config 401"]["example"].startswith("get_edge_config: 401 Cisco-Edge")
    assert kinds["call not placed: no idle user"]["count"] == 1
    assert r["calls"]["attempted"] == 0 and r["registrations"]["peak"] == 0
    assert "3 × get_edge_config 401: get_edge_config: 401 Cisco-Edge" in stdout


def test_sip_only_registers_users_and_the_report_matches_the_lab(
    load_lab: RunningLab, tmp_path: Path
) -> None:
    """`--sip-only` (registration scale): one full sign-in for the run (get_edge_config, UDS, TFTP:
    3 HTTPS requests through E), then per user only discovery, TLS to E, REGISTER and STUN."""
    before = counters(load_lab)
    https_before = load_lab.component("expe")["https"]["requests"]
    watch = Watch(load_lab)
    poller = threading.Thread(target=watch.run, daemon=True)
    poller.start()
    try:
        code, stdout, r = run_load(
            load_lab,
            tmp_path / "sip-only.json",
            *("--users", "6", "--first", "25", "--rate", "20", "--sip-only", "--no-xmpp"),
            *("--stun-interval", "2", "--duration", "8"),
        )
    finally:
        watch.stop.set()
        poller.join(timeout=5)
    after = counters(load_lab)
    assert code == 0, stdout
    assert r["settings"]["sip_only"] is True and r["errors"]["total"] == 0
    assert r["signins"] == {**r["signins"], "attempted": 6, "ok": 6, "failed": 0, "signed_out": 6}
    assert load_lab.component("expe")["https"]["requests"] - https_before == 3
    assert r["registrations"]["peak"] == 6 == watch.max_registrations
    ucm_b, ucm_a = before["ucm_registrations"], after["ucm_registrations"]
    assert ucm_a["new"] - ucm_b["new"] == 6
    assert ucm_a["unregistrations"] - ucm_b["unregistrations"] == 6, "sign-out unregisters"
    assert r["registrations"]["current"] == 0 == after["e_registrations"] == ucm_a["current"]
    # STUN every 2 s on each flow for ~7 s after its sign-in, all answered by E (path to UCM alive).
    stun = r["stun"]
    assert stun["sent"] == stun["answered"] and 6 * 3 <= stun["sent"] <= 6 * 6
    assert r["xmpp"]["sessions_peak"] == 0


def test_lean_xmpp_bare_sessions_and_batched_chats(load_lab: RunningLab) -> None:
    """What the XMPP benchmark does with the load engine's client: bound sessions without roster or
    presence through E → C → IM&P, chats written in one batch, received as raw bytes."""
    e, domain = load_lab.config.expe[0], load_lab.config.lab.domain
    ctx = ssl.create_default_context(cafile=str(load_lab.state_dir / "certs" / "ca.pem"))
    password = load_lab.config.load.password
    got = bytearray()

    async def flow() -> tuple[list[int], int, int, int]:
        a = LeanXmppSession(
            username="load00031", password=password, domain=domain, resource="b", ssl_context=ctx
        )
        b = LeanXmppSession(
            username="load00032",
            password=password,
            domain=domain,
            resource="b",
            ssl_context=ctx,
            on_data=got.extend,
        )
        before = load_lab.component("imp1")["xmpp"]["sessions_current"]
        try:
            await a.login(e.external_address, e.xmpp_port, online=False)
            await b.login(e.external_address, e.xmpp_port, online=False)
            held = load_lab.component("imp1")["xmpp"]["sessions_current"] - before
            assert a.send_chats(b.jid, (f"#{n}#" for n in range(20))) == 20
            await a.drain()
            for _ in range(100):  # bounded: 10 s
                if len(re.findall(rb"#(\d+)#", bytes(got))) >= 20:
                    break
                await asyncio.sleep(0.1)
        finally:
            await a.close()
            await b.close()
        marks = [int(m) for m in re.findall(rb"#(\d+)#", bytes(got))]
        return marks, held, a.messages_sent, b.messages_received

    marks, held, sent, parsed = asyncio.run(flow())
    assert held == 2
    assert marks == list(range(20)) and sent == 20
    assert parsed == 0, "raw mode hands bytes to on_data and parses nothing"
    assert b"<error" not in got

"""The sans-IO parts of `edge load` with a fake clock: media streams, timers, counters, settings,
and the HTML report (no lab needed; the lab runs are in tests/test_load.py)."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from typing import Any

import pytest

from media_relay.srtp import generate_crypto
from mra_client.edge_http import EdgeConfig, StepError
from mra_client.load import sip_only
from mra_client.load.media import MAX_BURST, PTIME_S, MediaStream
from mra_client.load.report import render_html
from mra_client.load.settings import LoadSettings, LoadSettingsError
from mra_client.load.stats import CallMedia, LoadStats, LogHistogram, error_kind, percentile
from mra_client.load.timers import Job, Timers
from mra_client.signin import ClientSettings, Ladder, SignedIn


def _pair(start: float) -> tuple[MediaStream, MediaStream, LogHistogram]:
    """Two ends of one call: what A protects with its key, B unprotects with the same key."""
    key_a, key_b = generate_crypto(1), generate_crypto(1)
    latency = LogHistogram()
    a = MediaStream(key_a, key_b, ("127.0.0.1", 2000), start, latency)
    b = MediaStream(key_b, key_a, ("127.0.0.1", 3000), start, latency)
    return a, b, latency


def test_stream_paces_50_pps_and_counts_what_comes_back() -> None:
    a, b, latency = _pair(start=100.0)
    delay = 0.005
    now = 100.0
    for _ in range(50):  # one second of 20 ms ticks
        for packet in a.due(now):
            b.receive(packet, now + delay)
        now += PTIME_S
    assert a.sent == 50 and b.received == 50
    assert b.mismatched == 0 and b.auth_failures == 0
    assert b.jitter_ms < 0.2, "constant delay: (almost) no jitter"  # ts rounding to 1/8000 s only
    assert latency.count == 50
    assert 4.9 <= latency.percentile(50) <= 5.7  # bucket upper bound of 5 ms


def test_stream_jitter_and_late_ticks() -> None:
    a, b, _ = _pair(start=0.0)
    now = 0.0
    for i in range(100):
        for packet in a.due(now):
            b.receive(packet, now + (0.010 if i % 2 else 0.0))  # 10 ms alternating delay
        now += PTIME_S
    assert b.received == 100
    assert 5.0 < b.jitter_ms < 11.0  # RFC 3550 A.8 converges towards the 10 ms variation
    sent_before = a.sent
    burst = a.due(now + 1.0)  # a tick 1 s late: at most MAX_BURST now, the rest counted skipped
    assert len(burst) == MAX_BURST
    assert a.skipped == 51 - MAX_BURST and a.sent == sent_before + MAX_BURST
    a.stop_at = now + 1.0
    assert a.due(now + 2.0) == []


def test_stream_counts_foreign_and_garbled_packets() -> None:
    a, b, _ = _pair(start=0.0)
    stranger, _, _ = _pair(start=0.0)
    for packet in stranger.due(0.0):
        b.receive(packet, 0.0)
    packet = a.due(0.0)[0]
    b.receive(packet[:-3] + b"xyz", 0.0)
    assert b.received == 0 and b.auth_failures == 2


def test_timers_pop_in_deadline_order_and_bounded() -> None:
    timers = Timers()
    timers.schedule(5.0, 1, Job.STUN_KEEPALIVE, 0)
    timers.schedule(1.0, 2, Job.REGISTER_REFRESH, 0)
    timers.schedule(3.0, 3, Job.XMPP_KEEPALIVE, 7)
    assert timers.next_deadline() == 1.0
    assert [d.user for d in timers.pop_due(3.0)] == [2, 3]
    assert timers.pop_due(4.9) == []
    for i in range(10):
        timers.schedule(6.0, i, Job.STUN_KEEPALIVE, 0)
    assert len(timers.pop_due(10.0, limit=4)) == 4 and len(timers) == 7


@pytest.mark.parametrize(
    ("step", "detail", "kind"),
    [
        ("get_edge_config", "401 Cisco-Edge", "get_edge_config 401"),
        ("INVITE", "488 Not Acceptable Here", "INVITE 488"),
        ("XMPP sign-in", "SASL failure: not-authorized", "XMPP sign-in: not-authorized"),
        (
            "SIP connect",
            "expe.example.com:5061: [Errno 111] Connect call failed",
            "SIP connect: Connect call failed",
        ),
        (
            "STUN keepalive",
            "no answer within 3 s (path to UCM down?)",
            "STUN keepalive: no answer within 3 s",
        ),
    ],
)
def test_error_kinds_group_by_step_and_status(step: str, detail: str, kind: str) -> None:
    assert error_kind(step, detail) == kind


def test_stats_counts_peaks_errors_and_timeline() -> None:
    stats = LoadStats(started_at=10.0)
    for _ in range(3):
        stats.registered(+1)
    stats.registered(-1)
    stats.call_started()
    stats.call_started()
    stats.call_ended(True)
    stats.error("get_edge_config 401", "get_edge_config: 401 Cisco-Edge", 11.0)
    stats.error("get_edge_config 401", "get_edge_config: 401 Cisco-Edge (second)", 12.5)
    stats.call_media.append(CallMedia(1, "9999", sent=100, received=98, lost=2, loss_pct=2.0, jitter_ms=0.5))
    stats.sample(12.0, media_live=(40, 39))
    report = stats.as_dict()
    assert report["registrations"] == {"current": 2, "peak": 3, "refreshes_ok": 0, "refreshes_failed": 0}
    assert (
        report["calls"]["active"] == 1 and report["calls"]["peak_active"] == 2 and report["calls"]["ok"] == 1
    )
    assert report["errors"]["by_kind"] == [
        {
            "kind": "get_edge_config 401",
            "count": 2,
            "example": "get_edge_config: 401 Cisco-Edge",
            "first_at_s": 1.0,
            "last_at_s": 2.5,
        }
    ]
    assert report["media"]["loss_pct"] == 2.0
    assert report["timeline"][0]["t"] == 2.0 and report["timeline"][0]["media_sent"] == 40


def test_percentiles() -> None:
    assert percentile([], 50) == 0.0
    values = [float(v) for v in range(1, 101)]
    assert (
        percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    )
    hist = LogHistogram()
    for v in values:
        hist.add(v)
    assert 50.0 <= hist.percentile(50) <= 50.0 * 10**0.1 and hist.percentile(100) == 100.0


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(LoadSettingsError, match="--users"):
        LoadSettings(users=0)
    with pytest.raises(LoadSettingsError, match="--user-pattern"):
        LoadSettings(user_pattern="same-for-all")
    with pytest.raises(LoadSettingsError, match="bad pattern"):
        LoadSettings(user_pattern="user{x}")
    with pytest.raises(LoadSettingsError, match="--messages-per-min needs XMPP"):
        LoadSettings(messages_per_min=10, xmpp=False)
    with pytest.raises(LoadSettingsError, match="--stun-interval"):
        LoadSettings(stun_interval_s=0)
    assert LoadSettings(sip_only=True, xmpp=False).as_dict()["sip_only"] is True
    s = LoadSettings(user_pattern="user{n:04d}", password_pattern="pw{n}", first_index=7)
    assert (s.username(0), s.password(2)) == ("user0007", "pw9")


def test_html_report_is_self_contained() -> None:
    stats = LoadStats(started_at=0.0)
    for t in range(5):
        stats.registered(+1)
        stats.sample(float(t))
    stats.setup_ms += [12.0, 15.5, 40.0]
    stats.call_media.append(CallMedia(1, "9999", 50, 50, 0, 0.0, 0.3))
    stats.error("INVITE 503", "INVITE: 503 Service Unavailable </script><b>", 3.0)
    report = {
        "started_at": "2026-01-01T00:00:00+0000",
        "elapsed_s": 5.0,
        "stopped": "duration reached (5 s)",
        "settings": LoadSettings(users=5, calls=1).as_dict(),
        "edge": {"domain": "example.com", "dns": "127.0.0.1:53", "ca_file": "ca.pem"},
        "host": {
            "cpus": 2,
            "load_average_before": [0.1, 0.1, 0.1],
            "load_average_after": [0.2, 0.1, 0.1],
            "generator_cpu_s": 1.0,
            "generator_max_rss_mib": 50.0,
        },
        **stats.as_dict(),
    }
    page = render_html(report)
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", page), "nothing loaded from elsewhere"
    assert "<b>" not in page.replace("<body>", ""), "error texts are escaped"
    data = re.search(r"<script type='application/json' id='report-data'>(.*?)</script>", page, re.S)
    assert data is not None and json.loads(data.group(1))["registrations"]["peak"] == 5
    assert page.count('<svg class="plot"') == 8  # 4 line plots, 3 bar plots, errors by kind
    assert 'data-series="registrations" data-points="5"' in page


def test_live_progress_renders_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from mra_client.load.engine import LoadEngine
    from mra_client.load.progress import Progress
    from mra_client.signin import ClientSettings

    client = ClientSettings("", "", "example.com", "127.0.0.1", 53, ca_file="", ssl_context=ssl_context())
    engine = LoadEngine(LoadSettings(users=3, calls=2, duration_s=5), client)
    engine.stats.registered(+2)
    engine.stats.setup_ms.append(12.5)
    engine.stats.error("INVITE 503", "INVITE: 503 Service Unavailable", engine.stats.started_at)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with Progress(console) as progress:
        assert progress.live is not None, "a terminal gets the live table"
        progress.update(engine)
    text = out.getvalue()
    assert "registrations" in text and "2 (peak 2)" in text and "INVITE 503 ×1" in text
    plain = io.StringIO()
    with Progress(Console(file=plain, force_terminal=False)) as progress:
        assert progress.live is None
        progress.update(engine)
    assert "registrations 2" in plain.getvalue()


def ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _config(tag: str) -> EdgeConfig:
    return EdgeConfig({}, [("e.example.com", 5061)], tag, [], [], [], [])


def test_sip_only_does_one_full_signin_per_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--sip-only`: concurrent sign-ins wait for the first full ladder (HTTP steps included),
    then reuse its edge config; a failed first ladder is retried by the next user."""
    full: list[str] = []
    short: list[tuple[str, str | None]] = []

    async def fake_sign_in(settings: ClientSettings, ladder: Ladder) -> SignedIn:
        full.append(settings.username)
        await asyncio.sleep(0.01)  # the others queue up meanwhile
        if settings.username == "u0":
            raise StepError("get_edge_config", "503")
        return SignedIn(None, _config(f"route-of-{settings.username}"), None, "", ("e", 8443, "a"))  # type: ignore[arg-type]

    class Probe(sip_only.SipOnlySignIn):
        async def _sign_in(self, settings: ClientSettings, ladder: Ladder, config: EdgeConfig) -> Any:
            short.append((settings.username, config.sip_route))
            return settings.username

    monkeypatch.setattr(sip_only, "sign_in", fake_sign_in)
    probe = Probe()

    async def run() -> list[object]:
        def user(i: int) -> ClientSettings:
            return ClientSettings(f"u{i}", "pw", "example.com", "127.0.0.1", 53, "ca.pem")

        return await asyncio.gather(*(probe(user(i), Ladder()) for i in range(6)), return_exceptions=True)

    results = asyncio.run(run())
    assert isinstance(results[0], StepError) and isinstance(results[1], SignedIn)
    assert full == ["u0", "u1"] and probe.full_signins == 2
    assert short == [(f"u{i}", "route-of-u1") for i in range(2, 6)]
    assert results[2:] == ["u2", "u3", "u4", "u5"]

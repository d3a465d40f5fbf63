"""What a load run counts (sans-IO: plain counters fed by the engine, time passed in).

Memory stays bounded whatever the run length: latencies that can grow with packet counts go into
a fixed log-bucket histogram; the timeline is one small sample per interval (the run's duration
is bounded, so is the timeline); per-call media summaries are bounded by `--calls`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

_STATUS = re.compile(r"^(\d{3})\b")


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """count, min, p50, p90, p95, p99, max, mean (ms or whatever unit `values` are in)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "min": round(ordered[0], 3),
        "p50": round(percentile(ordered, 50), 3),
        "p90": round(percentile(ordered, 90), 3),
        "p95": round(percentile(ordered, 95), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
    }


class LogHistogram:
    """Values in ms in log-spaced buckets (10 per decade, 0.01 ms .. 100 s): O(1) memory."""

    PER_DECADE = 10
    LOW_MS = 0.01
    BUCKETS = 70

    def __init__(self) -> None:
        self.counts = [0] * (self.BUCKETS + 1)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, value_ms: float) -> None:
        if value_ms <= self.LOW_MS:
            index = 0
        else:
            index = min(self.BUCKETS, int(math.log10(value_ms / self.LOW_MS) * self.PER_DECADE) + 1)
        self.counts[index] += 1
        self.count += 1
        self.total += value_ms
        self.max = max(self.max, value_ms)

    def upper_ms(self, index: int) -> float:
        return float(self.LOW_MS * 10 ** (index / self.PER_DECADE))

    def percentile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-th percentile (capped at the max seen)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self.upper_ms(index), self.max)
        return self.max

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        return {
            "count": self.count,
            "p50": round(self.percentile(50), 3),
            "p90": round(self.percentile(90), 3),
            "p99": round(self.percentile(99), 3),
            "max": round(self.max, 3),
            "mean": round(self.total / self.count, 3),
        }


@dataclass
class ErrorKind:
    kind: str
    count: int = 0
    example: str = ""
    first_at_s: float = 0.0
    last_at_s: float = 0.0


def error_kind(step: str, detail: str) -> str:
    """`("get_edge_config", "401 Cisco-Edge …")` → `get_edge_config 401`; without a status code,
    the step and the detail's first words with digits blanked (`SIP connect: connection refused`)."""
    match = _STATUS.match(detail.strip())
    if match:
        return f"{step} {match.group(1)}"
    last = detail.rsplit(":", 1)[-1]
    # Addresses, ports, decimals and [Errno n] vary between occurrences; plain counts ("3 s") do not.
    words = re.sub(r"\[[^\]]*\]|\b\d+(?:[.:]\d+)+\b|\(.*?\)", " ", last).split()
    short = " ".join(words[:5]) or "failed"
    return f"{step}: {short}"


@dataclass
class CallMedia:
    """One call's media as measured by the generator (both directions of a user-to-user call)."""

    call: int
    target: str
    sent: int
    received: int
    lost: int
    loss_pct: float
    jitter_ms: float
    mismatched: int = 0
    auth_failures: int = 0


@dataclass
class Sample:
    t: float
    signins_ok: int
    signins_failed: int
    registrations: int
    xmpp_sessions: int
    calls_active: int
    calls_ok: int
    calls_failed: int
    media_sent: int
    media_received: int
    messages_sent: int
    messages_received: int
    errors: int
    loop_lag_ms: float
    """The generator's worst event-loop lag since the previous sample."""


@dataclass
class LoadStats:
    started_at: float
    signins_attempted: int = 0
    signins_ok: int = 0
    signins_failed: int = 0
    signed_out: int = 0
    signin_ms: list[float] = field(default_factory=list)
    registrations: int = 0
    registrations_peak: int = 0
    refreshes_ok: int = 0
    refreshes_failed: int = 0
    stun_sent: int = 0
    stun_answered: int = 0
    xmpp_sessions: int = 0
    xmpp_sessions_peak: int = 0
    calls_attempted: int = 0
    calls_ok: int = 0
    calls_failed: int = 0
    calls_active: int = 0
    calls_active_peak: int = 0
    calls_answered_here: int = 0
    setup_ms: list[float] = field(default_factory=list)
    media_sent: int = 0
    media_received: int = 0
    media_mismatched: int = 0
    media_auth_failures: int = 0
    media_skipped: int = 0
    latency: LogHistogram = field(default_factory=LogHistogram)
    call_media: list[CallMedia] = field(default_factory=list)
    messages_sent: int = 0
    messages_received: int = 0
    messages_failed: int = 0
    message_ms: LogHistogram = field(default_factory=LogHistogram)
    loop_lag: LogHistogram = field(default_factory=LogHistogram)
    loop_lag_window_ms: float = 0.0
    errors: dict[str, ErrorKind] = field(default_factory=dict)
    timeline: list[Sample] = field(default_factory=list)

    # -- updates -----------------------------------------------------------------------

    def error(self, kind: str, example: str, now: float) -> None:
        entry = self.errors.get(kind)
        t = round(now - self.started_at, 3)
        if entry is None:
            entry = self.errors[kind] = ErrorKind(kind, example=example[:300], first_at_s=t)
        entry.count += 1
        entry.last_at_s = t

    @property
    def errors_total(self) -> int:
        return sum(e.count for e in self.errors.values())

    def lagged(self, lag_ms: float) -> None:
        self.loop_lag.add(lag_ms)
        self.loop_lag_window_ms = max(self.loop_lag_window_ms, lag_ms)

    def registered(self, delta: int) -> None:
        self.registrations += delta
        self.registrations_peak = max(self.registrations_peak, self.registrations)

    def xmpp_online(self, delta: int) -> None:
        self.xmpp_sessions += delta
        self.xmpp_sessions_peak = max(self.xmpp_sessions_peak, self.xmpp_sessions)

    def call_started(self) -> None:
        self.calls_attempted += 1
        self.calls_active += 1
        self.calls_active_peak = max(self.calls_active_peak, self.calls_active)

    def call_ended(self, ok: bool) -> None:
        self.calls_active -= 1
        if ok:
            self.calls_ok += 1
        else:
            self.calls_failed += 1

    def sample(self, now: float, media_live: tuple[int, int] = (0, 0)) -> Sample:
        """One timeline point; `media_live` adds the packets of calls still in progress."""
        s = Sample(
            t=round(now - self.started_at, 3),
            signins_ok=self.signins_ok,
            signins_failed=self.signins_failed,
            registrations=self.registrations,
            xmpp_sessions=self.xmpp_sessions,
            calls_active=self.calls_active,
            calls_ok=self.calls_ok,
            calls_failed=self.calls_failed,
            media_sent=self.media_sent + media_live[0],
            media_received=self.media_received + media_live[1],
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            errors=self.errors_total,
            loop_lag_ms=round(self.loop_lag_window_ms, 3),
        )
        self.loop_lag_window_ms = 0.0
        self.timeline.append(s)
        return s

    # -- the report ----------------------------------------------------------------------

    def media_summary(self) -> dict[str, Any]:
        lost = sum(c.lost for c in self.call_media)
        expected = sum(c.sent for c in self.call_media)
        jitters = [c.jitter_ms for c in self.call_media if c.received]
        return {
            "packets_sent": self.media_sent,
            "packets_received": self.media_received,
            "packets_lost": lost,
            "loss_pct": round(100.0 * lost / expected, 3) if expected else 0.0,
            "jitter_ms": summary(jitters),
            "latency_ms": self.latency.summary(),
            "mismatched": self.media_mismatched,
            "auth_failures": self.media_auth_failures,
            "generator_skipped": self.media_skipped,
            "per_call": [asdict(c) for c in self.call_media],
        }

    def as_dict(self) -> dict[str, Any]:
        lost = self.messages_sent - self.messages_received - self.messages_failed
        return {
            "signins": {
                "attempted": self.signins_attempted,
                "ok": self.signins_ok,
                "failed": self.signins_failed,
                "signed_out": self.signed_out,
                "latency_ms": summary(self.signin_ms),
            },
            "registrations": {
                "current": self.registrations,
                "peak": self.registrations_peak,
                "refreshes_ok": self.refreshes_ok,
                "refreshes_failed": self.refreshes_failed,
            },
            "stun": {"sent": self.stun_sent, "answered": self.stun_answered},
            "xmpp": {"sessions_current": self.xmpp_sessions, "sessions_peak": self.xmpp_sessions_peak},
            "calls": {
                "attempted": self.calls_attempted,
                "ok": self.calls_ok,
                "failed": self.calls_failed,
                "active": self.calls_active,
                "peak_active": self.calls_active_peak,
                "answered_by_users": self.calls_answered_here,
                "setup_ms": summary(self.setup_ms),
                "setup_ms_values": [round(v, 3) for v in self.setup_ms],
            },
            "media": self.media_summary(),
            "messages": {
                "sent": self.messages_sent,
                "received": self.messages_received,
                "failed_to_send": self.messages_failed,
                "lost": max(0, lost),
                "latency_ms": self.message_ms.summary(),
            },
            "generator": {
                "loop_lag_ms": self.loop_lag.summary(),
                "media_skipped": self.media_skipped,
            },
            "errors": {
                "total": self.errors_total,
                "by_kind": [
                    asdict(e) for e in sorted(self.errors.values(), key=lambda e: (-e.count, e.kind))
                ],
            },
            "timeline": [asdict(s) for s in self.timeline],
        }

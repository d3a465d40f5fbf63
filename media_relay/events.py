"""Events the relay core reports (never on the per-packet path except a leg's first latch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamTimedOut:
    """No packet on either leg for ``inactivity_timeout_s``; the stream was removed (spec §7)."""

    stream_id: str
    idle_s: float
    at: float


@dataclass(frozen=True, slots=True)
class LegLatched:
    """A latching leg learnt its remote address from its first packet (symmetric RTP)."""

    stream_id: str
    leg: int
    rtcp: bool
    remote: tuple[str, int]
    at: float


RelayEvent = StreamTimedOut | LegLatched

"""The Unified Communications traversal zone: channel supervision and status (spec §1–3).

C keeps every channel to every E peer up by itself: connect, hold until lost, back off with
capped exponential delay and jitter, reconnect. E only listens. Both sides report per-channel
state (active / connecting / failed, with the reason and since-when) for `/status`,
`/metrics` and `edge lab status`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from traversal.backoff import backoff_delay

log = logging.getLogger(__name__)


class ChannelConnection(Protocol):
    """What a connected channel offers the supervisor (a traversal link, the SIP connection)."""

    async def wait_closed(self) -> str: ...

    def close(self, reason: str) -> None: ...


def describe_failure(exc: BaseException) -> str:
    """Turn a connect failure into the reason an operator reads in status."""
    from traversal.channel import LinkRejectedError

    if isinstance(exc, LinkRejectedError):
        return f"rejected by peer: {exc.reason}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification of peer failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "ALERT" in reason.upper() or "alert" in str(exc):
            return f"TLS handshake rejected by peer ({reason})"
        return f"TLS error: {reason}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, ConnectionError | OSError):
        return f"network error: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class ChannelStatus:
    channel: str
    peer: str
    state: str = "connecting"
    reason: str = "not connected yet"
    since: float = field(default_factory=time.time)
    reconnects: int = 0
    connects: int = 0
    failures: int = 0

    def set(self, state: str, reason: str) -> None:
        if state != self.state or reason != self.reason:
            self.state, self.reason, self.since = state, reason, time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "peer": self.peer,
            "state": self.state,
            "reason": self.reason,
            "since": self.since,
            "reconnects": self.reconnects,
        }


class ChannelSupervisor:
    """Keeps one outbound channel to one peer up, forever, until stopped."""

    def __init__(
        self,
        channel: str,
        peer: str,
        connect: Callable[[], Awaitable[ChannelConnection]],
        *,
        on_up: Callable[[ChannelConnection], None] | None = None,
        on_down: Callable[[ChannelConnection, str], None] | None = None,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.status = ChannelStatus(channel, peer)
        self._connect = connect
        self._on_up = on_up
        self._on_down = on_down
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng or random.Random()
        self.connection: ChannelConnection | None = None
        self._stopping = False
        self._wake = asyncio.Event()

    @property
    def is_up(self) -> bool:
        return self.connection is not None

    async def run(self) -> None:
        attempt = 0
        lost: str | None = None  # why the last established channel went down, until one is up again
        while not self._stopping:
            try:
                conn = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = describe_failure(exc)
                self.status.failures += 1
                # Keep saying that the channel was lost (and why) while reconnects fail: "connection
                # refused" alone would hide from the operator that an established link went down.
                self.status.set("failed", reason if lost is None else f"lost: {lost}; reconnect: {reason}")
                log.warning("zone %s to %s: %s", self.status.channel, self.status.peer, reason)
            else:
                attempt = 0
                lost = None
                if self.status.connects:
                    self.status.reconnects += 1
                self.status.connects += 1
                self.connection = conn
                self.status.set("active", "")
                log.info("zone %s to %s: active", self.status.channel, self.status.peer)
                if self._on_up:
                    self._on_up(conn)
                try:
                    reason = await conn.wait_closed()
                finally:
                    self.connection = None
                    if self._on_down:
                        self._on_down(conn, "channel lost")
                if self._stopping:
                    break
                lost = reason
                self.status.set("failed", f"lost: {reason}")
                log.warning("zone %s to %s: lost (%s)", self.status.channel, self.status.peer, reason)
            delay = backoff_delay(
                attempt, initial_s=self._initial_s, max_s=self._max_s, jitter=0.5, rng=self._rng
            )
            attempt += 1
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    def retry_now(self) -> None:
        """Skip the current back-off (an operator asked to reconnect)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self.connection is not None:
            self.connection.close("zone stopped")


def zone_summary(name: str, channels: list[ChannelStatus]) -> dict[str, Any]:
    """Active only when every channel to every peer is active; else Failed with the first reason."""
    failed = [c for c in channels if c.state != "active"]
    if not channels:
        state, reason, since = "Failed", "no channels configured", time.time()
    elif failed:
        worst = min(failed, key=lambda c: c.since)
        state = "Failed"
        reason = f"{worst.channel} to {worst.peer}: {worst.reason}"
        since = worst.since
    else:
        state, reason, since = "Active", "", max(c.since for c in channels)
    return {
        "name": name,
        "state": state,
        "reason": reason,
        "since": since,
        "reconnects": sum(c.reconnects for c in channels),
        "channels": [c.as_dict() for c in channels],
    }

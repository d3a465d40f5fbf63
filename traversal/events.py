"""Events emitted by the traversal-link core (`traversal.link.LinkConnection`).

Small frozen dataclasses, past tense (shared/STYLE.md "Architecture" 3). The core returns them
from `receive_data`, `handle_timer`, `connection_lost` and `close`; the asyncio adapter
(`traversal.channel`) dispatches on their type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias


@dataclass(frozen=True, slots=True)
class AuthenticationRequested:
    """Server side: the client's HELLO arrived; call `accept_hello()` or `reject_hello(reason)`."""

    username: str
    password: str = field(repr=False)
    channel: str
    version: int


@dataclass(frozen=True, slots=True)
class LinkEstablished:
    """The handshake completed (client: HELLO_ACCEPT received; server: `accept_hello()` called)."""

    channel: str


@dataclass(frozen=True, slots=True)
class LinkRejected:
    """Client side: the server answered HELLO_REJECT. The link is closed."""

    reason: str


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream; call `accept_stream(id)` or `reject_stream(id, reason)`."""

    stream_id: int
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer accepted a stream we opened."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """The peer refused a stream we opened (OPEN_REJECT). The stream is gone."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream payload; hand it on and call `acknowledge_received(id, len(data))` once consumed."""

    stream_id: int
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END): no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream was aborted by the peer (RESET) or because the link was lost."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """A keepalive PING of ours was answered; `rtt_s` is the measured round trip."""

    rtt_s: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer sent GOAWAY. In this protocol GOAWAY always ends the link; LinkLost follows."""

    reason: str


@dataclass(frozen=True, slots=True)
class LinkLost:
    """The link is closed: keepalive/handshake timeout, protocol error, peer GOAWAY, local close,
    or the transport went away. Always the last event of a link (except after LinkRejected)."""

    reason: str


Event: TypeAlias = (
    AuthenticationRequested
    | LinkEstablished
    | LinkRejected
    | StreamOpened
    | StreamAccepted
    | StreamRejected
    | DataReceived
    | StreamEnded
    | StreamReset
    | PingAcknowledged
    | GoAwayReceived
    | LinkLost
)

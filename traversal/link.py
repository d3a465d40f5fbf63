"""Sans-IO core of the C→E traversal link (shared/spec/MRA.md §1, §2: ports 2222 and 7400).

Expressway-C always dials out to Expressway-E and keeps one long-lived link per channel; E then
pushes inbound work (an HTTP request, an XMPP session) down that link as a new stream. This module
is the framing and state logic only: it is fed bytes and the time, and returns typed events and
bytes to send. It never imports asyncio, socket or ssl (shared/STYLE.md "Architecture" 1, 2).

Wire format: every frame is a 10-byte header, then `length` bytes of payload::

    type u8 | flags u8 (reserved, 0) | stream id u32 | length u32      (network byte order)

Link-level frames (HELLO, HELLO_ACCEPT, HELLO_REJECT, PING, PONG, GOAWAY) use stream id 0; the
others name a stream. Client-opened streams are odd, server-opened even (as HTTP/2, RFC 9113 §5.1.1).
HELLO and HELLO_ACCEPT carry a small JSON object with the protocol version and each side's receive
limits (initial window, max frame payload, max concurrent streams, max control payload), so each
side sends within the other's limits, and `"early_data": true`: this side accepts DATA and END on
a stream it has not accepted yet. To a peer that announced it, the opener sends a request's OPEN,
DATA and END back to back, without waiting a round trip for OPEN_ACCEPT (as HTTP/2 HEADERS then
DATA, RFC 9113 §5.1); if the peer rejects the stream it drops that data (its id was used).
Flow control is credit based per stream (RFC 9113 §5.2 without the connection-level window):
the receiver returns credit with WINDOW_UPDATE as the application acknowledges consumed bytes.
GOAWAY always ends the link (unlike HTTP/2): it is sent on a protocol error, a timeout or a local
close, and is followed by closing the transport.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from traversal import events as ev

PROTOCOL_VERSION: Final = 1
HEADER: Final = struct.Struct(">BBII")
HEADER_BYTES: Final = HEADER.size
MAX_STREAM_ID: Final = 2**32 - 1
MAX_WINDOW_BYTES: Final = 2**31 - 1
_MAX_REASON_BYTES: Final = 256
_PING_BYTES: Final = 8


class FrameType(enum.IntEnum):
    HELLO = 1
    HELLO_ACCEPT = 2
    HELLO_REJECT = 3
    PING = 4
    PONG = 5
    OPEN = 6
    OPEN_ACCEPT = 7
    OPEN_REJECT = 8
    DATA = 9
    WINDOW_UPDATE = 10
    END = 11
    RESET = 12
    GOAWAY = 13


_LINK_FRAMES: Final = frozenset(
    {
        FrameType.HELLO,
        FrameType.HELLO_ACCEPT,
        FrameType.HELLO_REJECT,
        FrameType.PING,
        FrameType.PONG,
        FrameType.GOAWAY,
    }
)
# Payload sizes fixed by the protocol; every other frame is bounded by a configured limit.
_FIXED_PAYLOAD: Final = {
    FrameType.PING: _PING_BYTES,
    FrameType.PONG: _PING_BYTES,
    FrameType.WINDOW_UPDATE: 4,
    FrameType.OPEN_ACCEPT: 0,
    FrameType.END: 0,
}


class Role(enum.Enum):
    CLIENT = "client"  # Expressway-C: dials out, sends HELLO, opens odd stream ids
    SERVER = "server"  # Expressway-E: authenticates, opens even stream ids


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Limits and timers of one side of a link; the receive limits are announced in HELLO."""

    max_frame_payload_bytes: int = 16 * 1024  # largest DATA payload we accept
    max_control_payload_bytes: int = 4096  # largest HELLO / OPEN metadata / reason we accept
    initial_window_bytes: int = 256 * 1024  # per-stream credit we grant the peer
    max_concurrent_streams: int = 20_000  # streams the peer may have open towards us
    keepalive_interval_s: float = 10.0  # both sides PING this often once established
    keepalive_timeout_s: float = 30.0  # LinkLost when nothing at all arrived for this long
    handshake_timeout_s: float = 10.0  # HELLO → HELLO_ACCEPT/REJECT must complete within

    def __post_init__(self) -> None:
        if not 1 <= self.max_frame_payload_bytes <= 16 * 1024 * 1024:
            raise ValueError("max_frame_payload_bytes must be in 1..16 MiB")
        if not 2 * _MAX_REASON_BYTES <= self.max_control_payload_bytes <= 1024 * 1024:
            raise ValueError("max_control_payload_bytes must be in 512..1 MiB")
        if not 1 <= self.initial_window_bytes <= MAX_WINDOW_BYTES:
            raise ValueError("initial_window_bytes must be in 1..2**31-1")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be positive")
        if not 0 < self.keepalive_interval_s < self.keepalive_timeout_s:
            raise ValueError("need 0 < keepalive_interval_s < keepalive_timeout_s")
        if self.handshake_timeout_s <= 0:
            raise ValueError("handshake_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class Hello:
    """What the client presents in HELLO."""

    channel: str  # "https" (port 2222) or "xmpp" (port 7400)
    username: str
    password: str = field(repr=False)


class LinkUsageError(Exception):
    """The application called the core in a way its state does not allow (a local bug)."""


class _ProtocolError(Exception):
    """The peer broke the protocol; converted once into GOAWAY + LinkLost."""


def encode_frame(ftype: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(ftype, flags, stream_id, len(payload)) + payload


def _encode_reason(reason: str) -> bytes:
    raw = reason.encode("utf-8")[:_MAX_REASON_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def _decode_reason(payload: bytes) -> str:
    return payload.decode("utf-8", errors="replace")


def _decode_json_object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
        raise _ProtocolError(f"malformed {what}") from exc
    if not isinstance(obj, dict):
        raise _ProtocolError(f"malformed {what}")
    return obj


@dataclass(frozen=True, slots=True)
class _PeerLimits:
    window: int
    max_frame: int
    max_streams: int
    max_control: int

    @classmethod
    def from_config(cls, config: LinkConfig) -> _PeerLimits:
        return cls(
            config.initial_window_bytes,
            config.max_frame_payload_bytes,
            config.max_concurrent_streams,
            config.max_control_payload_bytes,
        )

    @classmethod
    def parse(cls, obj: dict[str, Any], what: str) -> _PeerLimits:
        values: list[int] = []
        for key in ("window", "max_frame", "max_streams", "max_control"):
            value = obj.get(key)
            if type(value) is not int or not 0 < value <= MAX_WINDOW_BYTES:
                raise _ProtocolError(f"malformed {what}")
            values.append(value)
        return cls(*values)

    def as_json(self) -> dict[str, int]:
        return asdict(self)


# --- link state machine -------------------------------------------------------------------


class LinkState(enum.Enum):
    IDLE = "idle"
    HELLO_SENT = "hello-sent"  # client, waiting for HELLO_ACCEPT / HELLO_REJECT
    AWAITING_HELLO = "awaiting-hello"  # server, waiting for the client's HELLO
    AUTHENTICATING = "authenticating"  # server, the application is checking the credentials
    ESTABLISHED = "established"
    CLOSED = "closed"


class _LinkInput(enum.Enum):
    START_CLIENT = "start-client"
    START_SERVER = "start-server"
    HELLO_RECEIVED = "hello-received"
    HELLO_ACCEPTED = "hello-accepted"
    HELLO_REJECTED = "hello-rejected"
    ACCEPT_RECEIVED = "accept-received"
    REJECT_RECEIVED = "reject-received"
    CLOSE = "close"


_LS, _LI = LinkState, _LinkInput
_LINK_TRANSITIONS: Final[dict[tuple[LinkState, _LinkInput], LinkState]] = {
    (_LS.IDLE, _LI.START_CLIENT): _LS.HELLO_SENT,
    (_LS.IDLE, _LI.START_SERVER): _LS.AWAITING_HELLO,
    (_LS.AWAITING_HELLO, _LI.HELLO_RECEIVED): _LS.AUTHENTICATING,
    (_LS.AUTHENTICATING, _LI.HELLO_ACCEPTED): _LS.ESTABLISHED,
    (_LS.AUTHENTICATING, _LI.HELLO_REJECTED): _LS.CLOSED,
    (_LS.HELLO_SENT, _LI.ACCEPT_RECEIVED): _LS.ESTABLISHED,
    (_LS.HELLO_SENT, _LI.REJECT_RECEIVED): _LS.CLOSED,
    **{(s, _LI.CLOSE): _LS.CLOSED for s in LinkState if s is not _LS.CLOSED},
}
_STREAM_FRAMES: Final = frozenset(FrameType) - _LINK_FRAMES
_FRAMES_ALLOWED: Final[dict[LinkState, frozenset[FrameType]]] = {
    _LS.IDLE: frozenset(),
    _LS.HELLO_SENT: frozenset({FrameType.HELLO_ACCEPT, FrameType.HELLO_REJECT, FrameType.GOAWAY}),
    _LS.AWAITING_HELLO: frozenset({FrameType.HELLO, FrameType.GOAWAY}),
    _LS.AUTHENTICATING: frozenset({FrameType.GOAWAY}),  # no stream before the handshake completes
    _LS.ESTABLISHED: _STREAM_FRAMES | {FrameType.PING, FrameType.PONG, FrameType.GOAWAY},
    _LS.CLOSED: frozenset(),
}


# --- stream state machine -----------------------------------------------------------------


class StreamState(enum.Enum):
    OPENING = "opening"  # we sent OPEN, waiting for OPEN_ACCEPT / OPEN_REJECT
    OPENING_ENDED = "opening-ended"  # as OPENING, and we half-closed already (early data)
    PENDING = "pending"  # the peer sent OPEN, the application has not decided
    PENDING_ENDED = "pending-ended"  # as PENDING, and the peer half-closed already (early data)
    OPEN = "open"
    LOCAL_ENDED = "local-ended"  # we half-closed (END sent, or queued behind buffered data)
    REMOTE_ENDED = "remote-ended"  # the peer half-closed
    CLOSED = "closed"  # both ended; kept only while our buffered data and END drain


class _StreamInput(enum.Enum):
    ACCEPT_SENT = "accept-sent"
    ACCEPT_RECEIVED = "accept-received"
    REJECT_SENT = "reject-sent"
    REJECT_RECEIVED = "reject-received"
    DATA_SENT = "data-sent"
    DATA_RECEIVED = "data-received"
    WINDOW_RECEIVED = "window-update-received"
    END_SENT = "end-sent"
    END_RECEIVED = "end-received"


_SS, _SI = StreamState, _StreamInput
_STREAM_TRANSITIONS: Final[dict[tuple[StreamState, _StreamInput], StreamState]] = {
    (_SS.OPENING, _SI.ACCEPT_RECEIVED): _SS.OPEN,
    (_SS.OPENING, _SI.REJECT_RECEIVED): _SS.CLOSED,
    (_SS.OPENING, _SI.DATA_SENT): _SS.OPENING,  # early data: framed now or once accepted
    (_SS.OPENING, _SI.END_SENT): _SS.OPENING_ENDED,
    (_SS.OPENING_ENDED, _SI.ACCEPT_RECEIVED): _SS.LOCAL_ENDED,
    (_SS.OPENING_ENDED, _SI.REJECT_RECEIVED): _SS.CLOSED,
    (_SS.PENDING, _SI.ACCEPT_SENT): _SS.OPEN,
    (_SS.PENDING, _SI.REJECT_SENT): _SS.CLOSED,
    (_SS.PENDING, _SI.DATA_RECEIVED): _SS.PENDING,
    (_SS.PENDING, _SI.END_RECEIVED): _SS.PENDING_ENDED,
    (_SS.PENDING_ENDED, _SI.ACCEPT_SENT): _SS.REMOTE_ENDED,
    (_SS.PENDING_ENDED, _SI.REJECT_SENT): _SS.CLOSED,
    (_SS.OPEN, _SI.DATA_SENT): _SS.OPEN,
    (_SS.OPEN, _SI.DATA_RECEIVED): _SS.OPEN,
    (_SS.OPEN, _SI.WINDOW_RECEIVED): _SS.OPEN,
    (_SS.OPEN, _SI.END_SENT): _SS.LOCAL_ENDED,
    (_SS.OPEN, _SI.END_RECEIVED): _SS.REMOTE_ENDED,
    (_SS.LOCAL_ENDED, _SI.DATA_RECEIVED): _SS.LOCAL_ENDED,
    (_SS.LOCAL_ENDED, _SI.WINDOW_RECEIVED): _SS.LOCAL_ENDED,
    (_SS.LOCAL_ENDED, _SI.END_RECEIVED): _SS.CLOSED,
    (_SS.REMOTE_ENDED, _SI.DATA_SENT): _SS.REMOTE_ENDED,
    (_SS.REMOTE_ENDED, _SI.WINDOW_RECEIVED): _SS.REMOTE_ENDED,
    (_SS.REMOTE_ENDED, _SI.END_SENT): _SS.CLOSED,
    (_SS.CLOSED, _SI.WINDOW_RECEIVED): _SS.CLOSED,
}


class _Stream:
    """Per-stream bookkeeping; slotted and lazily buffered so an idle stream costs ~200 bytes."""

    __slots__ = ("accept_owed", "end_queued", "recv_credit", "send_buffer", "send_window", "state", "unacked")

    def __init__(self, state: StreamState, send_window: int, recv_credit: int) -> None:
        self.state = state
        self.send_window = send_window  # bytes the peer lets us send now
        self.recv_credit = recv_credit  # bytes we let the peer send now
        self.unacked = 0  # consumed by the application, credit not yet returned
        self.send_buffer: bytearray | None = None  # data beyond the peer's window
        self.end_queued = False  # END waits behind send_buffer
        self.accept_owed = False  # accepted, OPEN_ACCEPT not sent yet (rides our first frame)


_Events = list[ev.Event]
_Handler = Callable[["LinkConnection", int, bytes, float, _Events], None]


class LinkConnection:
    """One end of a traversal link. Feed it bytes and time; read events and bytes to send."""

    def __init__(self, role: Role, *, config: LinkConfig | None = None) -> None:
        self.role = role
        self.config = config if config is not None else LinkConfig()
        self.state = LinkState.IDLE
        self.channel = ""
        self.close_reason: str | None = None
        self.established_at: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.pings_sent = 0
        self.pings_unanswered = 0  # pings sent since the last matching PONG
        self.last_rtt_s: float | None = None
        self._peer = _PeerLimits.from_config(self.config)  # replaced by the peer's HELLO(_ACCEPT)
        self._peer_early_data = False  # the peer takes DATA/END before it accepted the stream
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._streams: dict[int, _Stream] = {}
        self._local_count = 0
        self._remote_count = 0
        self._next_stream_id = 1 if role is Role.CLIENT else 2
        self._highest_peer_id = 0
        self._handshake_deadline = 0.0
        self._last_received_at = 0.0
        self._next_ping_at = 0.0
        self._ping_payload: bytes | None = None
        self._ping_sent_at = 0.0
        self._ping_counter = 0

    # --- status ---------------------------------------------------------------------------

    @property
    def streams_open(self) -> int:
        return len(self._streams)

    def stream_state(self, stream_id: int) -> StreamState | None:
        stream = self._streams.get(stream_id)
        return stream.state if stream is not None else None

    def buffered_bytes(self, stream_id: int) -> int:
        """Bytes accepted by `send_data` but not yet framed (waiting for the peer's window)."""
        stream = self._streams.get(stream_id)
        return len(stream.send_buffer) if stream is not None and stream.send_buffer else 0

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None else 0

    # --- handshake ------------------------------------------------------------------------

    def initiate(self, now: float, hello: Hello | None = None) -> None:
        """Start the link when the transport is up: a client must pass `hello`, a server not."""
        if (hello is None) != (self.role is Role.SERVER):
            raise LinkUsageError("a client initiates with a Hello, a server without")
        self._transition(_LI.START_CLIENT if hello else _LI.START_SERVER)
        self._handshake_deadline = now + self.config.handshake_timeout_s
        self._last_received_at = now
        if hello is not None:
            self.channel = hello.channel
            body = {"version": PROTOCOL_VERSION, "channel": hello.channel}
            body |= {"username": hello.username, "password": hello.password}
            self._emit(FrameType.HELLO, 0, json.dumps(body | self._own_limits()).encode())

    def accept_hello(self, now: float) -> None:
        self._transition(_LI.HELLO_ACCEPTED)
        body = {"version": PROTOCOL_VERSION} | self._own_limits()
        self._emit(FrameType.HELLO_ACCEPT, 0, json.dumps(body).encode())
        self._established(now)

    def reject_hello(self, reason: str) -> None:
        self._transition(_LI.HELLO_REJECTED)
        self._emit(FrameType.HELLO_REJECT, 0, _encode_reason(reason))
        self.close_reason = f"rejected: {reason}"

    # --- streams --------------------------------------------------------------------------

    def open_stream(self, metadata: dict[str, Any], now: float) -> int:
        if self.state is not LinkState.ESTABLISHED:
            raise LinkUsageError(f"cannot open a stream in state {self.state.value}")
        if self._local_count >= self._peer.max_streams:
            raise LinkUsageError("peer's max concurrent streams reached")
        if self._next_stream_id > MAX_STREAM_ID:
            raise LinkUsageError("stream ids exhausted")
        payload = json.dumps(metadata, separators=(",", ":")).encode()
        if len(payload) > self._peer.max_control:
            raise LinkUsageError("stream metadata too large")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        self._add_stream(stream_id, _Stream(_SS.OPENING, self._peer.window, self.config.initial_window_bytes))
        self._emit(FrameType.OPEN, stream_id, payload)
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a peer's stream. If it already carried early data (so the opener is not waiting
        for the accept), OPEN_ACCEPT is deferred to go out with our first frame on the stream:
        a request's answer then costs the opener one wake-up, not two."""
        early = self._streams.get(stream_id)
        was_early = early is not None and (
            early.state is _SS.PENDING_ENDED or early.recv_credit < self.config.initial_window_bytes
        )
        stream = self._local_step(stream_id, _SI.ACCEPT_SENT)
        if was_early:
            stream.accept_owed = True
        else:
            self._emit(FrameType.OPEN_ACCEPT, stream_id)

    def _pay_accept(self, stream_id: int, stream: _Stream) -> None:
        if stream.accept_owed:
            stream.accept_owed = False
            self._emit(FrameType.OPEN_ACCEPT, stream_id)

    def reject_stream(self, stream_id: int, reason: str) -> None:
        self._local_step(stream_id, _SI.REJECT_SENT)
        self._emit(FrameType.OPEN_REJECT, stream_id, _encode_reason(reason))
        self._remove_stream(stream_id)

    def send_data(self, stream_id: int, data: bytes, now: float) -> None:
        """Queue stream data; it is framed as the peer's window allows (see `buffered_bytes`)."""
        stream = self._local_step(stream_id, _SI.DATA_SENT)
        if data:
            if stream.send_buffer is None:
                stream.send_buffer = bytearray()
            stream.send_buffer += data
            self._flush_stream(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        stream = self._local_step(stream_id, _SI.END_SENT)
        stream.end_queued = True
        self._flush_stream(stream_id, stream)

    def reset_stream(self, stream_id: int, reason: str) -> None:
        """Abort a stream; a no-op if it is already gone (the peer may have reset it first)."""
        if stream_id in self._streams and self.state is LinkState.ESTABLISHED:
            self._emit(FrameType.RESET, stream_id, _encode_reason(reason))
            self._remove_stream(stream_id)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed `n` bytes of DataReceived: return that credit to the peer."""
        stream = self._streams.get(stream_id)
        if stream is None or n <= 0:
            return  # the stream is gone; credit no longer matters
        if stream.recv_credit + stream.unacked + n > self.config.initial_window_bytes:
            raise LinkUsageError(f"acknowledged more than received on stream {stream_id}")
        stream.unacked += n
        # Batch small acknowledgements; a quarter of the window keeps the peer streaming.
        if stream.unacked >= max(1, self.config.initial_window_bytes // 4) and stream.state in (
            _SS.OPEN,
            _SS.LOCAL_ENDED,
        ):
            self._pay_accept(stream_id, stream)
            self._emit(FrameType.WINDOW_UPDATE, stream_id, stream.unacked.to_bytes(4, "big"))
            stream.recv_credit += stream.unacked
            stream.unacked = 0

    # --- I/O and time ---------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[ev.Event]:
        if self.state is LinkState.CLOSED or not data:
            return []
        self.bytes_in += len(data)
        self._last_received_at = now  # any byte proves the peer alive
        self._inbuf += data
        events: list[ev.Event] = []
        try:
            self._parse_frames(now, events)
        except _ProtocolError as exc:
            events.extend(self._fail(f"protocol error: {exc}", send_goaway=True))
        return events

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        if self.state in (LinkState.IDLE, LinkState.CLOSED):
            return None
        if self.state is not LinkState.ESTABLISHED:
            return self._handshake_deadline
        return min(self._next_ping_at, self._last_received_at + self.config.keepalive_timeout_s)

    def handle_timer(self, now: float) -> list[ev.Event]:
        if self.state in (LinkState.IDLE, LinkState.CLOSED):
            return []
        if self.state is not LinkState.ESTABLISHED:
            if now >= self._handshake_deadline:
                return self._fail("handshake timeout", send_goaway=True)
            return []
        if now >= self._last_received_at + self.config.keepalive_timeout_s:
            return self._fail("keepalive timeout", send_goaway=True)
        if now >= self._next_ping_at:
            self._send_ping(now)
        return []

    def close(self, reason: str, now: float = 0.0) -> list[ev.Event]:
        """Close the link: GOAWAY(reason), open streams reset, LinkLost(reason)."""
        return self._fail(reason, send_goaway=True)

    def connection_lost(self, reason: str, now: float = 0.0) -> list[ev.Event]:
        """The transport is gone (EOF, error): reset open streams and report LinkLost."""
        return self._fail(reason, send_goaway=False)

    # --- internals ------------------------------------------------------------------------

    def _own_limits(self) -> dict[str, int | bool]:
        return {**_PeerLimits.from_config(self.config).as_json(), "early_data": True}

    def _transition(self, inp: _LinkInput) -> None:
        new = _LINK_TRANSITIONS.get((self.state, inp))
        if new is None:
            raise LinkUsageError(f"{inp.value} not allowed in link state {self.state.value}")
        self.state = new

    def _established(self, now: float) -> None:
        self.established_at = now
        self._last_received_at = max(self._last_received_at, now)
        self._next_ping_at = now + self.config.keepalive_interval_s

    def _emit(self, ftype: FrameType, stream_id: int, payload: bytes = b"") -> None:
        frame = encode_frame(ftype, stream_id, payload)
        self.bytes_out += len(frame)
        self._out.append(frame)

    def _send_ping(self, now: float) -> None:
        self._ping_counter += 1
        self._ping_payload = self._ping_counter.to_bytes(_PING_BYTES, "big")
        self._ping_sent_at = now
        self._next_ping_at = now + self.config.keepalive_interval_s
        self.pings_sent += 1
        self.pings_unanswered += 1
        self._emit(FrameType.PING, 0, self._ping_payload)

    def _fail(self, reason: str, *, send_goaway: bool) -> list[ev.Event]:
        if self.state is LinkState.CLOSED:
            return []
        if send_goaway and self.state is not LinkState.IDLE:
            self._emit(FrameType.GOAWAY, 0, _encode_reason(reason))
        self._transition(_LI.CLOSE)
        self.close_reason = reason
        self._inbuf.clear()
        events: list[ev.Event] = [ev.StreamReset(sid, f"link lost: {reason}") for sid in self._streams]
        self._streams.clear()
        self._local_count = self._remote_count = 0
        events.append(ev.LinkLost(reason))
        return events

    def _is_local_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == (self.role is Role.CLIENT)

    def _add_stream(self, stream_id: int, stream: _Stream) -> None:
        self._streams[stream_id] = stream
        if self._is_local_id(stream_id):
            self._local_count += 1
        else:
            self._remote_count += 1

    def _remove_stream(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            if self._is_local_id(stream_id):
                self._local_count -= 1
            else:
                self._remote_count -= 1

    def _maybe_retire(self, stream_id: int, stream: _Stream) -> None:
        if stream.state is _SS.CLOSED and not stream.end_queued:
            self._remove_stream(stream_id)

    def _local_step(self, stream_id: int, inp: _StreamInput) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None or self.state is not LinkState.ESTABLISHED:
            raise LinkUsageError(f"stream {stream_id} is not open")
        new = _STREAM_TRANSITIONS.get((stream.state, inp))
        if new is None:
            raise LinkUsageError(f"{inp.value} not allowed on stream {stream_id} ({stream.state.value})")
        stream.state = new
        return stream

    def _flush_stream(self, stream_id: int, stream: _Stream) -> None:
        if stream.state in (_SS.PENDING, _SS.PENDING_ENDED):
            return  # never before we accepted
        if stream.state in (_SS.OPENING, _SS.OPENING_ENDED) and not self._peer_early_data:
            return  # held until OPEN_ACCEPT
        buf = stream.send_buffer
        if stream.accept_owed and ((buf and stream.send_window > 0) or (not buf and stream.end_queued)):
            self._pay_accept(stream_id, stream)
        if buf:
            view = memoryview(buf)
            sent = 0
            max_frame = self._peer.max_frame
            while sent < len(buf) and stream.send_window > 0:
                n = min(len(buf) - sent, stream.send_window, max_frame)
                self._emit(FrameType.DATA, stream_id, bytes(view[sent : sent + n]))
                stream.send_window -= n
                sent += n
            view.release()
            del buf[:sent]
        if not buf:
            stream.send_buffer = None
            if stream.end_queued:
                stream.end_queued = False
                self._emit(FrameType.END, stream_id)
                self._maybe_retire(stream_id, stream)

    # --- input ----------------------------------------------------------------------------

    def _parse_frames(self, now: float, events: list[ev.Event]) -> None:
        buf = self._inbuf
        offset = 0
        try:
            while self.state is not LinkState.CLOSED and len(buf) - offset >= HEADER_BYTES:
                ftype_raw, _flags, stream_id, length = HEADER.unpack_from(buf, offset)
                ftype = self._check_header(ftype_raw, stream_id, length)
                end = offset + HEADER_BYTES + length
                if len(buf) < end:
                    break  # wait for the rest of the payload
                payload = bytes(buf[offset + HEADER_BYTES : end])
                offset = end
                _HANDLERS[ftype](self, stream_id, payload, now, events)
        finally:
            if self.state is LinkState.CLOSED:
                buf.clear()
            else:
                del buf[:offset]

    def _check_header(self, ftype_raw: int, stream_id: int, length: int) -> FrameType:
        """Validate a header before its payload arrives, so oversize frames fail at once."""
        try:
            ftype = FrameType(ftype_raw)
        except ValueError:
            raise _ProtocolError(f"unknown frame type {ftype_raw}") from None
        if ftype not in _FRAMES_ALLOWED[self.state]:
            raise _ProtocolError(f"unexpected {ftype.name} in state {self.state.value}")
        if (stream_id == 0) != (ftype in _LINK_FRAMES):
            raise _ProtocolError(f"{ftype.name} with invalid stream id {stream_id}")
        fixed = _FIXED_PAYLOAD.get(ftype)
        if fixed is not None:
            if length != fixed:
                raise _ProtocolError(f"{ftype.name} payload must be {fixed} bytes")
        elif ftype is FrameType.DATA:
            if length > self.config.max_frame_payload_bytes:
                raise _ProtocolError("frame too large")
        elif length > self.config.max_control_payload_bytes:
            raise _ProtocolError("frame too large")
        return ftype

    def _peer_stream(self, stream_id: int, ftype: FrameType) -> _Stream | None:
        """The stream a frame names; None for a stream that existed (a legitimate race, e.g.
        DATA in flight when we sent RESET); a protocol error for one never opened."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        used = (
            stream_id < self._next_stream_id
            if self._is_local_id(stream_id)
            else (stream_id <= self._highest_peer_id)
        )
        if not used:
            raise _ProtocolError(f"{ftype.name} on idle stream {stream_id}")
        return None

    def _peer_step(self, stream_id: int, stream: _Stream, inp: _StreamInput) -> None:
        new = _STREAM_TRANSITIONS.get((stream.state, inp))
        if new is None:
            raise _ProtocolError(f"{inp.value} on stream {stream_id} in state {stream.state.value}")
        stream.state = new

    def _handle_hello(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        obj = _decode_json_object(body, "HELLO")
        fields = [obj.get(k) for k in ("channel", "username", "password")]
        version = obj.get("version")
        if type(version) is not int or not all(isinstance(f, str) for f in fields):
            raise _ProtocolError("malformed HELLO")
        self._peer = _PeerLimits.parse(obj, "HELLO")
        self._peer_early_data = obj.get("early_data") is True
        self._transition(_LI.HELLO_RECEIVED)
        channel, username, password = (str(f) for f in fields)
        self.channel = channel
        if version != PROTOCOL_VERSION:
            self.reject_hello(f"unsupported protocol version {version}")
            out.append(ev.LinkLost(f"unsupported protocol version {version}"))
            return
        out.append(ev.AuthenticationRequested(username, password, channel, version))

    def _handle_hello_accept(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        obj = _decode_json_object(body, "HELLO_ACCEPT")
        self._peer = _PeerLimits.parse(obj, "HELLO_ACCEPT")
        self._peer_early_data = obj.get("early_data") is True
        self._transition(_LI.ACCEPT_RECEIVED)
        self._established(now)
        out.append(ev.LinkEstablished(self.channel))

    def _handle_hello_reject(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        self._transition(_LI.REJECT_RECEIVED)
        self.close_reason = f"rejected: {_decode_reason(body)}"
        out.append(ev.LinkRejected(_decode_reason(body)))

    def _handle_ping(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        self._emit(FrameType.PONG, 0, body)

    def _handle_pong(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        if body != self._ping_payload:
            return  # answer to an older ping we already gave up on; liveness was still noted
        self._ping_payload = None
        self.pings_unanswered = 0
        self.last_rtt_s = now - self._ping_sent_at
        out.append(ev.PingAcknowledged(self.last_rtt_s))

    def _handle_goaway(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        reason = _decode_reason(body)
        out.append(ev.GoAwayReceived(reason))
        out.extend(self._fail(f"peer went away: {reason}", send_goaway=False))

    def _handle_open(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        if self._is_local_id(sid) or sid <= self._highest_peer_id:
            raise _ProtocolError(f"OPEN with invalid stream id {sid}")
        self._highest_peer_id = sid
        metadata = _decode_json_object(body, "OPEN metadata")
        if self._remote_count >= self.config.max_concurrent_streams:
            self._emit(FrameType.OPEN_REJECT, sid, b"too many streams")
            return
        self._add_stream(sid, _Stream(_SS.PENDING, self._peer.window, self.config.initial_window_bytes))
        out.append(ev.StreamOpened(sid, metadata))

    def _handle_open_accept(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        stream = self._peer_stream(sid, FrameType.OPEN_ACCEPT)
        if stream is not None:
            self._peer_step(sid, stream, _SI.ACCEPT_RECEIVED)
            out.append(ev.StreamAccepted(sid))
            self._flush_stream(sid, stream)

    def _handle_open_reject(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        stream = self._peer_stream(sid, FrameType.OPEN_REJECT)
        if stream is not None:
            self._peer_step(sid, stream, _SI.REJECT_RECEIVED)
            self._remove_stream(sid)
            out.append(ev.StreamRejected(sid, _decode_reason(body)))

    def _handle_data(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        stream = self._peer_stream(sid, FrameType.DATA)
        if stream is None:
            return
        self._peer_step(sid, stream, _SI.DATA_RECEIVED)
        if len(body) > stream.recv_credit:
            raise _ProtocolError(f"flow control window exceeded on stream {sid}")
        stream.recv_credit -= len(body)
        if body:
            out.append(ev.DataReceived(sid, body))

    def _handle_window_update(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        increment = int.from_bytes(body, "big")
        if increment == 0:
            raise _ProtocolError("WINDOW_UPDATE of zero")
        stream = self._peer_stream(sid, FrameType.WINDOW_UPDATE)
        if stream is None:
            return
        self._peer_step(sid, stream, _SI.WINDOW_RECEIVED)
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW_BYTES:
            raise _ProtocolError(f"window overflow on stream {sid}")
        self._flush_stream(sid, stream)

    def _handle_end(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        stream = self._peer_stream(sid, FrameType.END)
        if stream is not None:
            self._peer_step(sid, stream, _SI.END_RECEIVED)
            out.append(ev.StreamEnded(sid))
            self._maybe_retire(sid, stream)

    def _handle_reset(self, sid: int, body: bytes, now: float, out: _Events) -> None:
        if self._peer_stream(sid, FrameType.RESET) is not None:
            self._remove_stream(sid)
            out.append(ev.StreamReset(sid, _decode_reason(body)))


_HANDLERS: Final[dict[FrameType, _Handler]] = {
    FrameType.HELLO: LinkConnection._handle_hello,
    FrameType.HELLO_ACCEPT: LinkConnection._handle_hello_accept,
    FrameType.HELLO_REJECT: LinkConnection._handle_hello_reject,
    FrameType.PING: LinkConnection._handle_ping,
    FrameType.PONG: LinkConnection._handle_pong,
    FrameType.GOAWAY: LinkConnection._handle_goaway,
    FrameType.OPEN: LinkConnection._handle_open,
    FrameType.OPEN_ACCEPT: LinkConnection._handle_open_accept,
    FrameType.OPEN_REJECT: LinkConnection._handle_open_reject,
    FrameType.DATA: LinkConnection._handle_data,
    FrameType.WINDOW_UPDATE: LinkConnection._handle_window_update,
    FrameType.END: LinkConnection._handle_end,
    FrameType.RESET: LinkConnection._handle_reset,
}

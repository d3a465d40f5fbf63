"""asyncio adapter for the traversal link (the sans-IO core is `traversal.link`).

Expressway-C calls `connect_link` towards E's port 2222 ("https") or 7400 ("xmpp"); E runs
`serve_links`. Either side then opens streams with `LinkEndpoint.open_stream` and serves the
peer's streams with `set_stream_handler` (shared/spec/MRA.md §1: E pushes inbound work down the
link C opened). The adapter stays thin (shared/STYLE.md "Architecture" 8): one `asyncio.Protocol`
feeds the core, flushes its bytes, re-arms one timer handle and turns events into futures.

Peer-opened streams: the optional `gate(metadata) -> reason | None` given to `set_stream_handler`
decides synchronously (a reason sends OPEN_REJECT); otherwise the stream is accepted *before*
the handler runs. Streams that arrive before any handler is set wait (unanswered) until one is.
When a handler returns, the stream's write side is closed (END); if it raises, the stream is
reset. Backpressure: `LinkStream.drain()` waits while the peer's window or the transport's write
buffer is full; reading is paused while the streams' unread data exceeds `_PAUSE_READING_BYTES`.

Unread data counts against the link only while more can arrive and someone can read it: a served
stream's buffer is dropped (and credited back) when its handler returns, and what arrives for it
later is dropped as it comes; a stream ended by both sides leaves the count, its buffer staying
with whoever holds the stream (END after data: the owner still reads it all). Otherwise every
session that ends with data unread would leave it counted, until the link stops reading for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from traversal import events as ev
from traversal.link import Hello, LinkConfig, LinkConnection, LinkState, LinkUsageError, Role, StreamState

__all__ = [
    "LinkClosedError",
    "LinkConfig",
    "LinkEndpoint",
    "LinkError",
    "LinkProtocol",
    "LinkRejectedError",
    "LinkStream",
    "StreamClosedError",
    "StreamRejectedError",
    "StreamResetError",
    "connect_link",
    "serve_links",
]

logger = logging.getLogger(__name__)

_WRITE_BUFFER_HIGH_BYTES = 256 * 1024  # transport buffer above which drain() waits
_DRAIN_LOW_WATER_BYTES = 64 * 1024  # a stream's unsent data below which drain() returns
_PAUSE_READING_BYTES = 8 * 1024 * 1024  # unread stream data (all streams) that pauses the socket
_READ_CHUNK_BYTES = 64 * 1024


class LinkError(Exception):
    """Base of the adapter's errors; `reason` is the protocol's reason text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkRejectedError(LinkError):
    """The server refused the HELLO (bad credentials, peer certificate not allowed, …)."""


class LinkClosedError(LinkError):
    """The link is closed (or closed during the handshake)."""


class StreamRejectedError(LinkError):
    """The peer answered OPEN_REJECT."""


class StreamResetError(LinkError):
    """The stream was reset by the peer, by `abort()`, or because the link was lost."""


class StreamClosedError(LinkError):
    """Writing after `write_eof()`/`close()`."""


StreamHandler = Callable[["LinkStream"], Awaitable[None]]
StreamGate = Callable[[dict[str, Any]], str | None]
Authenticate = Callable[[str, str, str], str | None]
VerifyPeer = Callable[[ssl_module.SSLObject], str | None]


class LinkStream:
    """One multiplexed stream; reads look like `asyncio.StreamReader`, writes like a writer."""

    def __init__(self, endpoint: LinkEndpoint, stream_id: int, metadata: dict[str, Any]) -> None:
        self._endpoint = endpoint
        self.stream_id = stream_id
        self.metadata = metadata
        self._buffer = bytearray()
        # `_buffer` counts in the endpoint's `unread_bytes` until the stream leaves the link.
        self._counted = True
        self._abandoned = False  # its handler returned: nobody reads it, data is dropped on arrival
        self._eof = False
        self._write_closed = False
        self._reset: str | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<LinkStream {self.stream_id} {self.metadata!r}>"

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    @property
    def reset_reason(self) -> str | None:
        return self._reset

    # --- reading --------------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes as soon as any are available; `n < 0` reads to EOF; b"" at EOF."""
        if n < 0:
            chunks = []
            while chunk := await self.read(_READ_CHUNK_BYTES):
                chunks.append(chunk)
            return b"".join(chunks)
        if n == 0:
            return b""
        await self._wait_readable()
        return self._consume(min(n, len(self._buffer)))

    def read_available(self) -> bytes:
        """Whatever is buffered now, without waiting (b"" if nothing); StreamResetError if reset."""
        if self._reset is not None:
            raise StreamResetError(self._reset)
        return self._consume(len(self._buffer)) if self._buffer else b""

    @property
    def eof_received(self) -> bool:
        """The peer ended its side (data may still be buffered: see `at_eof`)."""
        return self._eof

    async def readexactly(self, n: int) -> bytes:
        """Exactly `n` bytes, or `asyncio.IncompleteReadError` at EOF (reads as it goes)."""
        out = bytearray()
        while len(out) < n:
            chunk = await self.read(n - len(out))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(out), n)
            out += chunk
        return bytes(out)

    async def readuntil(self, separator: bytes = b"\n", *, limit: int = 64 * 1024) -> bytes:
        """Data up to and including `separator`. `limit` must stay below the receive window
        (unconsumed bytes are not credited back), else a long line could stall the stream."""
        while True:
            index = self._buffer.find(separator)
            if index >= 0:
                return self._consume(index + len(separator))
            if len(self._buffer) > limit:
                raise asyncio.LimitOverrunError("separator not found within limit", len(self._buffer))
            if self._eof:
                raise asyncio.IncompleteReadError(self._consume(len(self._buffer)), None)
            await self._wait_readable(more_than=len(self._buffer))

    async def readline(self) -> bytes:
        return await self.readuntil(b"\n")

    async def _wait_readable(self, more_than: int = 0) -> None:
        while self._reset is None and len(self._buffer) <= more_than and not self._eof:
            self._read_waiter = self._endpoint.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._reset is not None:
            raise StreamResetError(self._reset)

    def _consume(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        if self._counted:  # else the link has forgotten the stream: no count, no credit to return
            self._endpoint._consumed(self.stream_id, n)
        return data

    # --- writing --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._reset is not None:
            raise StreamResetError(self._reset)
        if self._write_closed:
            raise StreamClosedError("stream closed for writing")
        self._endpoint._send(self.stream_id, data)

    async def drain(self) -> None:
        """Wait while the peer's window or the transport buffer holds our data back."""
        while self._reset is None and self._endpoint._write_blocked(self.stream_id):
            self._drain_waiter = self._endpoint.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._reset is not None:
            raise StreamResetError(self._reset)

    def write_eof(self) -> None:
        """Half-close: END follows any data still buffered. Reading continues."""
        if self._reset is None and not self._write_closed:
            self._write_closed = True
            self._endpoint._end(self.stream_id)

    def close(self) -> None:
        """Graceful close of our side (same as `write_eof`); use `abort` to discard."""
        self.write_eof()

    def abort(self, reason: str = "aborted") -> None:
        """RESET the stream: both directions stop now; pending reads raise StreamResetError."""
        if self._reset is None:
            self._endpoint._abort_stream(self.stream_id, reason)
            self._set_reset(reason)

    # --- fed by the endpoint --------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        self._wake_reader()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake_reader()

    def _set_reset(self, reason: str) -> None:
        if self._reset is None:
            self._reset = reason
            self._endpoint._uncount(self)
            self._buffer.clear()
        self._wake_reader()
        self._wake_drain()

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _wake_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)


class _Unanswered:
    """A stream the peer opened while no handler was set, and what it sent meanwhile."""

    __slots__ = ("data", "ended", "opened")

    def __init__(self, opened: ev.StreamOpened) -> None:
        self.opened = opened
        self.data = bytearray()
        self.ended = False


class LinkEndpoint:
    """One end of an established (or establishing) link, client or server side."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        role: Role,
        config: LinkConfig | None,
        *,
        hello: Hello | None = None,
        authenticate: Authenticate | None = None,
        verify_peer: VerifyPeer | None = None,
        on_link: Callable[[LinkEndpoint], object] | None = None,
    ) -> None:
        self.loop = loop
        self._core = LinkConnection(role, config=config)
        self._hello = hello
        self._authenticate = authenticate
        self._verify_peer = verify_peer
        self._on_link = on_link
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._streams: dict[int, LinkStream] = {}
        self._open_waiters: dict[int, asyncio.Future[None]] = {}
        # Opened by the peer before a handler was set, with any early data and END (link.py).
        self._unanswered: dict[int, _Unanswered] = {}
        self._handler: StreamHandler | None = None
        self._gate: StreamGate | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handshake: asyncio.Future[None] = loop.create_future()
        self._closed: asyncio.Future[str] = loop.create_future()
        self._write_paused = False
        self._reading_paused = False
        self._flush_pending = False
        self._unread_bytes = 0
        # Ended by both sides, our END queued behind data: the core retires them silently once
        # the peer's credit lets it out, so `_after_input` checks them.
        self._ending: set[int] = set()
        self._since = time.time()
        self._peer_address = ""
        self._peer_names: list[str] = []

    # --- public API -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._core.state is LinkState.ESTABLISHED and not self._closed.done()

    @property
    def channel(self) -> str:
        return self._core.channel

    @property
    def core(self) -> LinkConnection:
        """The sans-IO core (read-only use: counters, state)."""
        return self._core

    @property
    def unread_bytes(self) -> int:
        """Stream data received and held for a reader that has not read it yet (all streams);
        reading from the socket pauses above `_PAUSE_READING_BYTES`."""
        return self._unread_bytes

    def set_stream_handler(self, handler: StreamHandler, *, gate: StreamGate | None = None) -> None:
        """Serve streams the peer opens; `gate(metadata)` may return a reason to reject one."""
        self._handler, self._gate = handler, gate
        waiting, self._unanswered = self._unanswered, {}
        for early in waiting.values():
            self._discard_unread(len(early.data))  # counted again below if the stream is served
            stream = self._answer_open(early.opened)
            if stream is not None:
                if early.data:
                    self._on_data(stream.stream_id, bytes(early.data))
                if early.ended:
                    stream._feed_eof()
                    self._reap(stream.stream_id)
        self._flush()

    async def open_stream(self, metadata: dict[str, Any], *, wait_accepted: bool = True) -> LinkStream:
        """Open a stream and wait for OPEN_ACCEPT (StreamRejectedError / StreamResetError).

        With `wait_accepted=False` the stream is returned at once and may be written and ended
        right away: to a peer that takes early data the bytes leave with the OPEN, saving a round
        trip; a rejection then shows as StreamResetError on the stream's next read or drain.
        """
        if not self.is_open:
            raise LinkClosedError(self._core.close_reason or "link not established")
        try:
            stream_id = self._core.open_stream(metadata, self.loop.time())
        except LinkUsageError as exc:
            raise LinkError(str(exc)) from None
        stream = self._streams[stream_id] = LinkStream(self, stream_id, metadata)
        self._flush()
        if not wait_accepted:
            return stream
        waiter = self._open_waiters[stream_id] = self.loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            stream.abort("cancelled")
            raise
        finally:
            self._open_waiters.pop(stream_id, None)
        return stream

    async def wait_closed(self) -> str:
        """Wait until the link is gone; returns the reason (e.g. "keepalive timeout")."""
        return await asyncio.shield(self._closed)

    def close(self, reason: str = "closed") -> None:
        """GOAWAY(reason), reset every stream, close the transport, cancel owned tasks."""
        self._dispatch(self._core.close(reason, self.loop.time()))
        self._flush_now()

    def abort(self, reason: str = "aborted") -> None:
        """Drop the transport without GOAWAY (what a crash or a cable pull looks like)."""
        if self._transport is not None:
            self._transport.abort()
        self._dispatch(self._core.connection_lost(reason, self.loop.time()))

    def status(self) -> dict[str, Any]:
        core = self._core
        rtt = core.last_rtt_s
        return {
            "state": core.state.value,
            "role": core.role.value,
            "channel": core.channel,
            "since": self._since,
            "streams": core.streams_open,
            "rtt_ms": None if rtt is None else round(rtt * 1000.0, 3),
            "bytes_in": core.bytes_in,
            "bytes_out": core.bytes_out,
            "pings_sent": core.pings_sent,
            "pings_unanswered": core.pings_unanswered,
            "peer": self._peer_address,
            "peer_cert_names": list(self._peer_names),
            "close_reason": core.close_reason,
        }

    # --- transport side (called by LinkProtocol) ------------------------------------------

    def _connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=_WRITE_BUFFER_HIGH_BYTES)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer_address = f"{peer[0]}:{peer[1]}"
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._peer_names = _cert_names(ssl_object.getpeercert())
        self._core.initiate(self.loop.time(), self._hello)
        self._after_input([])

    def _data_received(self, data: bytes) -> None:
        self._after_input(self._core.receive_data(data, self.loop.time()))

    def _connection_lost(self, exc: Exception | None) -> None:
        reason = "connection lost" if exc is None else f"connection lost: {exc}"
        self._dispatch(self._core.connection_lost(reason, self.loop.time()))
        self._transport = None
        self._finish(reason)

    def _pause_writing(self) -> None:
        self._write_paused = True

    def _resume_writing(self) -> None:
        self._write_paused = False
        for stream in list(self._streams.values()):
            stream._wake_drain()

    # --- stream side (called by LinkStream) -----------------------------------------------

    def _send(self, stream_id: int, data: bytes) -> None:
        try:
            self._core.send_data(stream_id, data, self.loop.time())
        except LinkUsageError as exc:
            raise StreamClosedError(str(exc)) from None
        self._flush()

    def _end(self, stream_id: int) -> None:
        with contextlib.suppress(LinkUsageError):  # already reset / link gone: nothing to end
            self._core.end_stream(stream_id)
        self._reap(stream_id)
        self._flush()

    def _abort_stream(self, stream_id: int, reason: str) -> None:
        self._core.reset_stream(stream_id, reason)
        self._streams.pop(stream_id, None)
        self._flush()

    def _consumed(self, stream_id: int, n: int) -> None:
        self._discard_unread(n)
        self._core.acknowledge_received(stream_id, n)
        self._flush()

    def _discard_unread(self, n: int) -> None:
        self._unread_bytes -= n
        if self._reading_paused and self._unread_bytes <= _PAUSE_READING_BYTES // 2:
            self._reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def _write_blocked(self, stream_id: int) -> bool:
        if stream_id not in self._streams:  # reaped: all it sent is framed, nothing wakes it later
            return False
        return self._write_paused or self._core.buffered_bytes(stream_id) > _DRAIN_LOW_WATER_BYTES

    # --- events ---------------------------------------------------------------------------

    def _after_input(self, events: list[ev.Event]) -> None:
        self._dispatch(events)
        if self._ending:
            for sid in list(self._ending):
                self._reap(sid)
        for stream in list(self._streams.values()):
            if stream._drain_waiter is not None and not self._write_blocked(stream.stream_id):
                stream._wake_drain()
        if self._unread_bytes > _PAUSE_READING_BYTES and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._flush()

    def _dispatch(self, events: list[ev.Event]) -> None:
        for event in events:
            match event:
                case ev.AuthenticationRequested():
                    self._authenticate_peer(event)
                case ev.LinkEstablished():
                    self._set_established()
                case ev.LinkRejected(reason=reason):
                    if not self._handshake.done():
                        self._handshake.set_exception(LinkRejectedError(reason))
                    self._finish(f"rejected: {reason}")
                case ev.StreamOpened():
                    if self._handler is None:
                        self._unanswered[event.stream_id] = _Unanswered(event)
                    else:
                        self._answer_open(event)
                case ev.StreamAccepted(stream_id=sid):
                    self._settle_open(sid, None)
                case ev.StreamRejected(stream_id=sid, reason=reason):
                    if (stream := self._streams.pop(sid, None)) is not None:
                        stream._set_reset(f"rejected: {reason}")  # seen if nobody waited for the accept
                    self._settle_open(sid, StreamRejectedError(reason))
                case ev.DataReceived(stream_id=sid, data=data):
                    if (early := self._unanswered.get(sid)) is not None:
                        early.data += data
                        self._unread_bytes += len(data)
                    else:
                        self._on_data(sid, data)
                case ev.StreamEnded(stream_id=sid):
                    if (early := self._unanswered.get(sid)) is not None:
                        early.ended = True
                    elif (stream := self._streams.get(sid)) is not None:
                        stream._feed_eof()
                        self._reap(sid)
                case ev.StreamReset(stream_id=sid, reason=reason):
                    if (early := self._unanswered.pop(sid, None)) is not None:
                        self._discard_unread(len(early.data))
                    if (stream := self._streams.pop(sid, None)) is not None:
                        stream._set_reset(reason)
                    self._settle_open(sid, StreamResetError(reason))
                case ev.GoAwayReceived(reason=reason):
                    logger.info("link %s: peer sent GOAWAY: %s", self._peer_address, reason)
                case ev.LinkLost(reason=reason):
                    self._finish(reason)
                case ev.PingAcknowledged():
                    pass

    def _authenticate_peer(self, event: ev.AuthenticationRequested) -> None:
        reason: str | None = None
        if self._verify_peer is not None:
            ssl_object = self._transport.get_extra_info("ssl_object") if self._transport else None
            reason = "TLS required" if ssl_object is None else self._verify_peer(ssl_object)
        if reason is None and self._authenticate is not None:
            reason = self._authenticate(event.username, event.password, event.channel)
        if reason is not None:
            logger.info("link %s: refused %r: %s", self._peer_address, event.username, reason)
            self._core.reject_hello(reason)
            self._finish(f"rejected: {reason}")
            return
        self._core.accept_hello(self.loop.time())
        self._set_established()
        if self._on_link is not None:
            try:
                result = self._on_link(self)
            except Exception:  # an application bug must not kill the protocol callback
                logger.exception("link %s: on_link failed", self._peer_address)
                self.close("internal error")
                return
            if asyncio.iscoroutine(result):
                self._spawn(result)

    def _set_established(self) -> None:
        self._since = time.time()
        logger.info("link %s: established (%s)", self._peer_address, self._core.channel)
        if not self._handshake.done():
            self._handshake.set_result(None)

    def _answer_open(self, opened: ev.StreamOpened) -> LinkStream | None:
        sid = opened.stream_id
        reason = self._gate(opened.metadata) if self._gate is not None else None
        if reason is not None:
            self._core.reject_stream(sid, reason)
            return None
        self._core.accept_stream(sid)
        stream = self._streams[sid] = LinkStream(self, sid, opened.metadata)
        assert self._handler is not None
        self._spawn(self._run_handler(self._handler, stream))
        return stream

    async def _run_handler(self, handler: StreamHandler, stream: LinkStream) -> None:
        try:
            await handler(stream)
        except StreamResetError:
            if stream.reset_reason is None:  # another stream's reset escaped: this one is not done
                stream.abort("handler failed")
        except Exception:
            logger.exception("link %s: stream handler failed on %r", self._peer_address, stream)
            stream.abort("handler failed")
        else:
            stream.close()
        finally:
            self._abandon(stream)

    def _settle_open(self, stream_id: int, error: Exception | None) -> None:
        waiter = self._open_waiters.get(stream_id)
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)

    def _on_data(self, stream_id: int, data: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream._abandoned:  # nobody will read it; keep the peer's window open
            self._core.acknowledge_received(stream_id, len(data))
            return
        self._unread_bytes += len(data)
        stream._feed(data)

    def _abandon(self, stream: LinkStream) -> None:
        """Its handler is done: drop what it left unread and return that credit, so neither the
        link's unread count nor the peer's window keeps it (the peer may still be sending)."""
        stream._abandoned = True
        unread = len(stream._buffer)
        stream._buffer.clear()
        if stream._counted and unread:
            self._discard_unread(unread)
            self._core.acknowledge_received(stream.stream_id, unread)
            self._flush()

    def _uncount(self, stream: LinkStream) -> None:
        """`stream` leaves the link: its buffer no longer counts (the caller drops or keeps it)."""
        if stream._counted:
            stream._counted = False
            self._discard_unread(len(stream._buffer))

    def _reap(self, stream_id: int) -> None:
        """Forget a stream both sides ended. Its data stays readable through the LinkStream but no
        longer counts against the link: nothing more can arrive on it, so pausing the socket
        would not help its reader, and an owner that dropped it would leave the bytes counted."""
        state = self._core.stream_state(stream_id)
        if state is None:
            self._ending.discard(stream_id)
            if (stream := self._streams.pop(stream_id, None)) is not None:
                self._uncount(stream)
                stream._wake_drain()
        elif state is StreamState.CLOSED:  # our END still waits behind data for the peer's credit
            self._ending.add(stream_id)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, reason: str) -> None:
        """The link is over: settle every future, stop the timer, cancel owned tasks."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._handshake.done() and self._core.role is Role.CLIENT:  # only a client awaits it
            self._handshake.set_exception(LinkClosedError(reason))
        for sid, stream in list(self._streams.items()):
            stream._set_reset(f"link lost: {reason}")
            self._settle_open(sid, StreamResetError(f"link lost: {reason}"))
        self._streams.clear()
        self._ending.clear()
        for early in self._unanswered.values():
            self._discard_unread(len(early.data))
        self._unanswered.clear()
        # Handlers woken above see StreamResetError first (their wake-ups are already queued);
        # whatever is still running one loop iteration later is cancelled.
        self.loop.call_soon(self._cancel_tasks)
        if not self._closed.done():
            logger.info("link %s: closed: %s", self._peer_address, reason)
            self._closed.set_result(reason)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def _flush(self) -> None:
        """Write what the core queued at the end of this loop iteration, not at once.

        Every stream's frames produced in one iteration (requests, answers, window updates of
        many streams) then leave as one transport write: one TLS record and one send() instead of
        one per frame, which is what bounded the HTTPS tunnel's request rate (benchmarks/https).
        """
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        data = self._core.data_to_send()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if data:
                transport.write(data)
            if self._core.state is LinkState.CLOSED:
                transport.close()  # after the final GOAWAY / HELLO_REJECT is written
        self._rearm_timer()

    def _rearm_timer(self) -> None:
        deadline = self._core.get_timer()
        if deadline is None or self._closed.done():
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None and self._timer_at == deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        # call_at may fire up to one clock tick early; never hand the core a time before its deadline
        self._after_input(self._core.handle_timer(max(self.loop.time(), self._timer_at)))


def _cert_names(cert: Any) -> list[str]:
    """SAN DNS names and addresses of a verified peer certificate (never the CN, §3)."""
    if not isinstance(cert, dict):
        return []
    return [str(value) for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]


class LinkProtocol(asyncio.Protocol):
    """The asyncio side: hands transport callbacks to its `LinkEndpoint`."""

    def __init__(self, endpoint: LinkEndpoint) -> None:
        self.endpoint = endpoint

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self.endpoint._connection_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self.endpoint._data_received(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports the loss

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint._connection_lost(exc)

    def pause_writing(self) -> None:
        self.endpoint._pause_writing()

    def resume_writing(self) -> None:
        self.endpoint._resume_writing()


async def connect_link(
    host: str,
    port: int,
    *,
    ssl: ssl_module.SSLContext,
    server_hostname: str,
    channel: str,
    username: str,
    password: str,
    config: LinkConfig | None = None,
    local_addr: tuple[str, int] | None = None,
    timeout_s: float = 10.0,
    stream_handler: StreamHandler | None = None,
) -> LinkEndpoint:
    """Dial E, do mutual TLS and the HELLO handshake within `timeout_s`.

    Raises LinkRejectedError(reason), LinkClosedError (lost during the handshake), TimeoutError,
    or the ssl.SSLError / OSError of a TLS/TCP failure. Pass `stream_handler` to serve streams
    E opens right after the handshake (it can also be set later; such streams wait).
    """
    loop = asyncio.get_running_loop()
    endpoint = LinkEndpoint(loop, Role.CLIENT, config, hello=Hello(channel, username, password))
    if stream_handler is not None:
        endpoint.set_stream_handler(stream_handler)
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: LinkProtocol(endpoint),
                host,
                port,
                ssl=ssl,
                server_hostname=server_hostname,
                local_addr=local_addr,
            )
            await endpoint._handshake
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    return endpoint


async def serve_links(
    host: str,
    port: int,
    *,
    ssl: ssl_module.SSLContext,
    authenticate: Authenticate,
    verify_peer: VerifyPeer,
    on_link: Callable[[LinkEndpoint], object],
    config: LinkConfig | None = None,
) -> asyncio.Server:
    """Listen for links. Per HELLO: `verify_peer(ssl_object)` then `authenticate(username,
    password, channel)`; either returning a reason refuses the link with that HELLO_REJECT reason.
    `on_link(endpoint)` runs once a link is established; set the stream handler there (a returned
    coroutine is run as a task owned by the link). Closing the returned server stops listening
    only; close established links through their endpoints."""
    loop = asyncio.get_running_loop()

    def factory() -> LinkProtocol:
        endpoint = LinkEndpoint(
            loop, Role.SERVER, config, authenticate=authenticate, verify_peer=verify_peer, on_link=on_link
        )
        return LinkProtocol(endpoint)

    return await loop.create_server(factory, host, port, ssl=ssl)

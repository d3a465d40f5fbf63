"""Expressway-E's XMPP listener on 5222 (spec §6).

E speaks only the first, unauthenticated part of the client stream itself: the stream header for
the edge domain and mandatory STARTTLS with E's certificate. After the TLS upgrade the client's
stream (SASL and everything after) is carried byte for byte to Expressway-C over a stream of the
XMPP traversal link that C opened on 7400. E never dials C and never authenticates the user.

One `_ClientConnection` protocol per client, on a plain TCP transport: it answers the header and
`<starttls/>` with a small framer, upgrades with `edge.xmpp.tls.TlsLayer`, then hands the session
to `edge.xmpp.relay.StreamRelay`, whose `run()` is the session's only task. Nothing of the
pre-TLS parser survives the upgrade: a held session is a TLS end, a relay and a link stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from edge.xmpp.events import StanzaReceived, StreamErrorDetected, StreamHeaderReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.linger import linger_close
from edge.xmpp.relay import StreamRelay
from edge.xmpp.stanza import NS_TLS, element, features, qn, serialize, stream_error, stream_header
from edge.xmpp.tls import TlsLayer

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0  # TCP accept → TLS established (header, STARTTLS, TLS handshake)
LINK_DOWN_ANSWER_WAIT_S = 5.0  # how long we wait for the restarted header to answer it with an error
STOP_DEADLINE_S = 3.0
# Client bytes held while the traversal stream opens; beyond this the client is not read.
MAX_PENDING_BYTES = 64 * 1024


class EdgeXmpp:
    def __init__(
        self,
        *,
        domain: str,
        address: str,
        port: int,
        ssl_context: ssl.SSLContext,
        open_stream: Callable[[dict[str, Any]], Awaitable[Any]],
        max_stanza_bytes: int = 65536,
    ) -> None:
        self.domain = domain.lower()
        self.address = address
        self.port = port
        self.ssl_context = ssl_context
        self.open_stream = open_stream
        self.max_stanza_bytes = max_stanza_bytes
        self.current = 0
        self.peak = 0
        self.counters: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conns: set[_ClientConnection] = set()

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def start(self) -> tuple[str, str, str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ClientConnection(self), self.address, self.port, reuse_address=True
        )
        return ("xmpp", "tcp", self.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_DEADLINE_S)
        for task in list(self._tasks):
            task.cancel()

    def status(self) -> dict[str, Any]:
        return {"sessions": self.current, "sessions_peak": self.peak, "counters": dict(self.counters)}

    def _header(self) -> bytes:
        return stream_header(None, self.domain, secrets.token_hex(8))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


class _Phase(enum.Enum):
    PLAIN = "plain"  # stream header and STARTTLS, parsed here
    TLS_HANDSHAKE = "tls-handshake"
    OPENING = "opening"  # TLS up, the traversal stream is being opened
    RELAY = "relay"
    CLOSED = "closed"


class _ClientConnection(asyncio.Protocol):
    """One client on 5222: the plain transport's protocol, then the `TlsLayer`'s app."""

    __slots__ = (
        "_eof",
        "_first_data",
        "_framer",
        "_header_sent",
        "_lost",
        "_owner",
        "_pending",
        "_pending_bytes",
        "_phase",
        "_relay",
        "_timer",
        "_tls",
        "_transport",
    )

    def __init__(self, owner: EdgeXmpp) -> None:
        self._owner = owner
        self._phase = _Phase.PLAIN
        self._transport: asyncio.Transport | None = None
        self._framer: XmlStreamFramer | None = XmlStreamFramer(max_stanza_bytes=4096, max_depth=4)
        self._header_sent = False
        self._timer: asyncio.TimerHandle | None = None
        self._tls: TlsLayer | None = None
        self._relay: StreamRelay | None = None
        self._pending: list[bytes] | None = None  # client bytes while the stream opens
        self._pending_bytes = 0
        self._eof = False
        self._lost: str | None = None
        self._first_data: asyncio.Future[None] | None = None

    def abort(self) -> None:
        if self._tls is not None:
            self._tls.abort()
        elif self._transport is not None:
            self._transport.abort()

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"

    # -- plain phase: header and STARTTLS (RFC 6120 §5) ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._owner._conns.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._phase is _Phase.RELAY:
            assert self._relay is not None
            self._relay.connection_data(data)
        elif self._phase is _Phase.OPENING:
            self._hold(data)
        elif self._phase is _Phase.PLAIN:
            self._plain_data(data)

    def _plain_data(self, data: bytes) -> None:
        assert self._framer is not None and self._transport is not None
        owner = self._owner
        for event in self._framer.receive_data(data):
            if isinstance(event, StreamErrorDetected):
                # RFC 6120 §4.9.1.1: our header first, unless the client already has it.
                header = b"" if self._header_sent else owner._header()
                self._refuse(event.condition, header + stream_error(event.condition, event.text))
                return
            if isinstance(event, StreamHeaderReceived):
                if (event.attrs.get("to") or "").lower() != owner.domain:
                    self._refuse("host-unknown", owner._header() + stream_error("host-unknown"))
                    return
                tls = element(qn(NS_TLS, "starttls"), None, element(qn(NS_TLS, "required")))
                self._transport.write(owner._header() + serialize(features(tls)))
                self._header_sent = True
            elif isinstance(event, StanzaReceived):
                if not self._header_sent or event.element.tag != qn(NS_TLS, "starttls"):
                    # RFC 6120 §5.3.1: TLS is mandatory here; nothing else before it.
                    self._refuse("not-authorized", stream_error("not-authorized", "STARTTLS required"))
                    return
                self._transport.write(serialize(element(qn(NS_TLS, "proceed"))))
                self._framer.close()
                self._framer = None
                self._phase = _Phase.TLS_HANDSHAKE
                self._tls = TlsLayer.upgrade(self._transport, self, owner.ssl_context, server_side=True)
                return

    def _refuse(self, condition: str, payload: bytes) -> None:
        assert self._transport is not None
        self._owner._count(f"refused_{condition}")
        self._phase = _Phase.CLOSED  # from now on data_received drops the client's input
        self._transport.write(payload)
        if self._timer is not None:
            self._timer.cancel()
        # The client may still be sending (a stanza over the limit): a plain close could reset
        # the connection before it reads the error (edge.xmpp.linger).
        self._timer = linger_close(self._transport)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._phase in (_Phase.PLAIN, _Phase.TLS_HANDSHAKE):
            self._owner._count("handshake_failed")
            log.info("xmpp %s: handshake failed: timed out", self._peer())
            self._phase = _Phase.CLOSED
            self.abort()

    # -- TLS up: open the traversal stream, then relay ---------------------------------------------

    def tls_established(self, tls: TlsLayer) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        owner = self._owner
        owner.current += 1
        owner.peak = max(owner.peak, owner.current)
        owner._count("sessions")
        self._phase = _Phase.OPENING
        owner._spawn(self._session(tls))

    def _hold(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = []
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > MAX_PENDING_BYTES and self._tls is not None:
            self._tls.pause_reading()
        if self._first_data is not None and not self._first_data.done():
            self._first_data.set_result(None)

    async def _session(self, tls: TlsLayer) -> None:
        # One coroutine frame for the whole held session (on top of the relay's): at 10,000
        # sessions every frame kept alive costs a few MiB.
        owner = self._owner
        client = self._peer()
        stream: Any = None
        try:
            try:
                stream = await owner.open_stream({"kind": "xmpp", "client": client, "domain": owner.domain})
            except Exception as exc:  # no link from C: the client gets a proper stream error
                owner._count("next_hop_failed")
                log.warning("xmpp %s: traversal link unavailable: %s", client, exc)
                await self._answer_link_down(tls)
                return
            ended = await self._start_relay(tls, stream).run()
            self._relay = None
            self._phase = _Phase.CLOSED
            if ended.by_stream:
                if not ended.clean:  # link lost, stream reset or C ended without closing the stream
                    if ended.reason != "stream ended":
                        owner._count("link_lost")
                    log.info("xmpp %s: traversal stream ended: %s", client, ended.reason)
                    tls.write(stream_error("remote-connection-failed"))
                tls.close()
        finally:
            owner.current -= 1
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    async def _answer_link_down(self, tls: TlsLayer) -> None:
        """Wait (briefly) for the restarted stream header, answer it with an error, close."""
        if self._pending is None and self._lost is None:
            self._first_data = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_data, LINK_DOWN_ANSWER_WAIT_S)
        if self._lost is None:
            tls.write(self._owner._header() + stream_error("remote-connection-failed", "traversal link down"))
        self._phase = _Phase.CLOSED
        tls.close()

    def _start_relay(self, tls: TlsLayer, stream: Any) -> StreamRelay:
        """Hand the session to a relay, with what the client sent while the stream opened."""
        relay = self._relay = StreamRelay(stream, tls)
        self._phase = _Phase.RELAY
        if self._pending_bytes > MAX_PENDING_BYTES and self._lost is None:
            tls.resume_reading()  # the relay pauses again itself if the link needs draining
        pending, self._pending, self._pending_bytes = self._pending, None, 0
        for data in pending or ():
            relay.connection_data(data)
        if self._eof:
            relay.connection_eof()
        if self._lost is not None:
            relay.connection_lost(self._lost)
        return relay

    # -- TlsApp / protocol callbacks -----------------------------------------------------------------

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._relay is not None:
            self._relay.connection_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self._owner
        owner._conns.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._framer is not None:
            self._framer.close()
            self._framer = None
        phase, self._lost = self._phase, str(exc) if exc else "connection closed"
        if phase in (_Phase.PLAIN, _Phase.TLS_HANDSHAKE):  # closed or failed before TLS was up
            self._phase = _Phase.CLOSED
            owner._count("handshake_failed")
            log.info("xmpp %s: handshake failed: %s", self._peer(), self._lost)
        if self._first_data is not None and not self._first_data.done():
            self._first_data.set_result(None)
        if self._relay is not None:
            self._relay.connection_lost(self._lost)

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.pause_writing()

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.resume_writing()

"""TLS over memory BIOs on a plain asyncio transport: the lean TLS end of an XMPP session.

Used for every TLS end an XMPP session has in our processes: client → Expressway-E (after
STARTTLS), Expressway-C → IM&P (direct TLS, spec §6) and the mock IM&P's server ends.

Why not `loop.start_tls` / `create_connection(ssl=...)`: uvloop's SSL transport allocates a
256 KiB receive buffer and a protocol plus a transport object per connection; measured on this
machine a held uvloop TLS server end costs ~25 KiB RSS against ~17 KiB for this layer (the
`ssl.SSLObject`, its two `MemoryBIO`s and one slotted object over uvloop's plain TCP transport,
which already owns a loop-wide receive buffer). With 10,000 sessions and three TLS ends each
that difference is ~250 MiB (benchmarks/xmpp/README.md).

The layer is the plain transport's `asyncio.Protocol` and looks like a transport to its `TlsApp`
(write, close, abort, pause/resume reading, extra info). The app hears `tls_established` once
the handshake is done, then `data_received` / `eof_received`, and `connection_lost` exactly
once, also when the handshake fails or times out. Certificate checks are the context's own
(`check_hostname`, `verify_mode`); nothing is relaxed here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from typing import Any, Protocol

from edge.xmpp.linger import linger_close

log = logging.getLogger(__name__)

# A TLS record carries at most 16 KiB of plaintext (RFC 8446 §5.1). Feeding and writing in
# record-sized slices keeps each MemoryBIO's buffer (which OpenSSL never shrinks) near one or
# two records however large a burst is, instead of as large as the largest burst ever seen.
_RECORD_BYTES = 16 * 1024
_FEED_BYTES = _RECORD_BYTES + 512


class TlsApp(Protocol):
    """What sits on top of a `TlsLayer` (an XMPP session end)."""

    def tls_established(self, tls: TlsLayer) -> None: ...

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...  # the result is ignored (no half-close)

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


class _State(enum.Enum):
    CONNECTING = "connecting"  # no transport yet
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"  # our close/abort is under way; connection_lost follows
    CLOSED = "closed"


class TlsLayer(asyncio.Protocol):
    """One TLS end over a plain transport; see the module docstring."""

    __slots__ = (
        "_app",
        "_context",
        "_error",
        "_handshake_timeout_s",
        "_incoming",
        "_outgoing",
        "_pending",
        "_server_hostname",
        "_server_side",
        "_sslobj",
        "_state",
        "_timer",
        "_transport",
    )

    def __init__(
        self,
        app: TlsApp,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        handshake_timeout_s: float | None = None,
    ) -> None:
        self._app = app
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        self._handshake_timeout_s = handshake_timeout_s
        self._state = _State.CONNECTING
        self._transport: asyncio.Transport | None = None
        self._sslobj: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._timer: asyncio.TimerHandle | None = None  # the handshake's deadline, then the linger's
        self._pending: list[bytes] | None = None  # written before the handshake completed
        self._error: Exception | None = None

    @classmethod
    def upgrade(
        cls,
        transport: asyncio.Transport,
        app: TlsApp,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        handshake_timeout_s: float | None = None,
    ) -> TlsLayer:
        """STARTTLS: take over an established plain `transport` and start the handshake."""
        layer = cls(
            app,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            handshake_timeout_s=handshake_timeout_s,
        )
        transport.set_protocol(layer)
        layer.connection_made(transport)
        return layer

    # -- the app's transport ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._state is _State.OPEN:
            self._encrypt(data)
        elif self._state in (_State.CONNECTING, _State.HANDSHAKE) and data:
            if self._pending is None:
                self._pending = []
            self._pending.append(bytes(data))

    def close(self) -> None:
        """Graceful: close_notify after what is buffered, then a lingering TCP close.

        The peer's input is read and discarded until its EOF (or `LINGER_TIMEOUT_S`): closing
        with input unread would reset the connection and could lose our last bytes, typically
        a stream error (`edge.xmpp.linger`). `connection_lost` follows the peer's EOF.
        """
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        was_open = self._state is _State.OPEN
        self._state = _State.CLOSING
        self._cancel_timer()
        if was_open and self._sslobj is not None:
            try:
                self._sslobj.unwrap()
            except (ssl.SSLError, ValueError):  # WantRead: we do not wait for the peer's close_notify
                pass
            self._flush()
        if self._transport is not None:
            self._timer = linger_close(self._transport)

    def abort(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSING
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self._state in (_State.CLOSING, _State.CLOSED)

    def pause_reading(self) -> None:
        # Not while closing: the lingering close must keep draining the peer's input.
        if self._state is _State.CLOSING:
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sslobj
        if name == "peercert":
            return self._sslobj.getpeercert() if self._sslobj is not None else default
        if name == "cipher":
            return self._sslobj.cipher() if self._sslobj is not None else default
        if self._transport is None:
            return default
        return self._transport.get_extra_info(name, default)

    # -- asyncio.Protocol (the plain transport) ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self._transport = transport  # type: ignore[assignment]
        self._state = _State.HANDSHAKE
        try:
            self._sslobj = self._context.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=self._server_side,
                server_hostname=self._server_hostname,
            )
        except (ssl.SSLError, ValueError) as exc:
            self._fail(exc)
            return
        if self._handshake_timeout_s is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._handshake_timeout_s, self._handshake_timed_out)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        # Input after close() (or a failure) is dropped here, unparsed: see close().
        size = len(data)
        for offset in range(0, size, _FEED_BYTES):
            if self._state not in (_State.HANDSHAKE, _State.OPEN):
                return
            self._incoming.write(data if size <= _FEED_BYTES else data[offset : offset + _FEED_BYTES])
            if self._state is _State.HANDSHAKE:
                self._handshake()
            if self._state is _State.OPEN:
                self._decrypt()

    def eof_received(self) -> bool | None:
        if self._state is _State.HANDSHAKE:
            self._error = ConnectionResetError("connection closed during the TLS handshake")
        elif self._state is _State.OPEN:
            self._app.eof_received()
        # No half-close under TLS: the transport closes, connection_lost follows. When we are
        # closing, this is the end of the linger (the peer read everything and is done).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._cancel_timer()
        self._pending = None
        self._app.connection_lost(self._error if self._error is not None else exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    # -- internals ----------------------------------------------------------------------------------

    def _handshake(self) -> None:
        assert self._sslobj is not None
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as exc:  # includes certificate verification failures
            self._flush()  # the alert, if OpenSSL wrote one
            self._fail(exc)
            return
        self._flush()
        self._cancel_timer()
        self._state = _State.OPEN
        self._app.tls_established(self)
        pending, self._pending = self._pending, None
        for data in pending or ():
            self.write(data)

    def _decrypt(self) -> None:
        sslobj, incoming = self._sslobj, self._incoming
        assert sslobj is not None
        chunks: list[bytes] = []
        closed = False
        try:
            # Checking what is pending avoids most SSLWantReadError raises (costly) for peers
            # that send whole records, which is the common case.
            while incoming.pending or sslobj.pending():
                chunk = sslobj.read(_RECORD_BYTES)
                if not chunk:
                    closed = True  # close_notify
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            self._flush()
            self._fail(exc)
            return
        self._flush()  # reading may answer (TLS 1.3 KeyUpdate)
        if chunks:
            self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if closed and self._state is _State.OPEN:
            self._app.eof_received()
            self.close()

    def _encrypt(self, data: bytes) -> None:
        sslobj = self._sslobj
        assert sslobj is not None
        try:
            if len(data) <= _RECORD_BYTES:
                sslobj.write(data)
                self._flush()
            else:
                view = memoryview(data)
                for offset in range(0, len(view), _RECORD_BYTES):
                    sslobj.write(view[offset : offset + _RECORD_BYTES])
                    self._flush()
        except ssl.SSLError as exc:
            self._fail(exc)

    def _flush(self) -> None:
        if self._outgoing.pending:
            data = self._outgoing.read()
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def _fail(self, exc: Exception) -> None:
        log.debug("tls %s: %s", self.get_extra_info("peername"), exc)
        if self._error is None:
            self._error = exc
        self.abort()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._state is _State.HANDSHAKE:
            self._fail(TimeoutError("TLS handshake timed out"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

"""asyncio adapter of the lab IM&P: listeners, per-connection protocols, STARTTLS upgrades.

Thin by design (shared/STYLE.md §8): each `_ImpProtocol` feeds `ImpCore` and performs the outputs
it returns. Listeners are ``(host, port, mode)``: ``"starttls"`` (5222 style, plain TCP then
mandatory STARTTLS) or ``"tls"`` (direct TLS, what Expressway-C uses on 7400; spec §2, §6).
TLS is `edge.xmpp.tls.TlsLayer` over uvloop's plain TCP transport in both cases (a few KiB less
per held connection than uvloop's own SSL transport; benchmarks/xmpp/README.md).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

from edge.xmpp.linger import linger_close
from edge.xmpp.tls import TlsLayer
from mock_ucm.imp.core import AuthCheck, ImpCore
from mock_ucm.imp.events import CloseRequested, DataQueued, ImpOutput, TlsUpgradeRequested

log = logging.getLogger(__name__)

Listener = tuple[str, int, str]
LISTENER_MODES = ("starttls", "tls")
TLS_HANDSHAKE_TIMEOUT_S = 10.0
STOP_DEADLINE_S = 5.0
# A client that does not read is cut off rather than letting its queue grow without bound.
MAX_WRITE_BUFFER_BYTES = 4 * 1024 * 1024


class ImpServer:
    """The mock IM&P XMPP server (RFC 6120/6121 subset) on one presence ``domain``."""

    def __init__(
        self,
        domain: str,
        *,
        authenticate_plain: AuthCheck,
        validate_token: AuthCheck,
        ssl_context: ssl.SSLContext,
        users: list[str],
        max_stanza_bytes: int = 65536,
        max_offline_per_user: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = ImpCore(
            domain,
            authenticate_plain=authenticate_plain,
            validate_token=validate_token,
            users=users,
            max_stanza_bytes=max_stanza_bytes,
            max_offline_per_user=max_offline_per_user,
        )
        self._ssl_context = ssl_context
        self._clock = clock
        self._servers: list[asyncio.Server] = []
        self._listeners: list[Listener] = []
        self._conns: dict[int, _ImpProtocol] = {}
        self._conn_ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def listeners(self) -> list[Listener]:
        """``(host, port, mode)`` with the ports actually bound (port 0 → ephemeral)."""
        return list(self._listeners)

    async def start(self, listeners: list[Listener]) -> None:
        loop = asyncio.get_running_loop()
        for host, port, mode in listeners:
            if mode not in LISTENER_MODES:
                raise ValueError(f"listener mode {mode!r}: expected one of {LISTENER_MODES}")
            secure = mode == "tls"
            server = await loop.create_server(functools.partial(_ImpProtocol, self, secure), host, port)
            self._servers.append(server)
            bound = server.sockets[0].getsockname()
            self._listeners.append((host, int(bound[1]), mode))
            log.info("imp listening on %s:%d (%s)", host, bound[1], mode)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._apply(self.core.shutdown())
        try:
            await asyncio.wait_for(self._idle.wait(), STOP_DEADLINE_S)
        except TimeoutError:
            for proto in list(self._conns.values()):
                proto.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    def status(self) -> dict[str, Any]:
        status = self.core.status()
        status["listeners"] = [{"host": h, "port": p, "mode": m} for h, p, m in self._listeners]
        return status

    # -- plumbing used by the protocols ---------------------------------------------------------

    def _register(self, proto: _ImpProtocol) -> int:
        conn_id = next(self._conn_ids)
        self._conns[conn_id] = proto
        self._idle.clear()
        return conn_id

    def _unregister(self, conn_id: int) -> None:
        self._conns.pop(conn_id, None)
        if not self._conns:
            self._idle.set()
        self._apply(self.core.connection_lost(conn_id, self._clock()))

    def _apply(self, outputs: list[ImpOutput]) -> None:
        for out in outputs:
            proto = self._conns.get(out.conn_id)
            if proto is None:
                continue
            if isinstance(out, DataQueued):
                proto.write(out.data)
            elif isinstance(out, TlsUpgradeRequested):
                proto.upgrade()
            elif isinstance(out, CloseRequested):
                proto.close()


class _ImpProtocol(asyncio.Protocol):
    """One client connection: plain TCP, then (STARTTLS, or at once on a "tls" listener) the app
    of an `edge.xmpp.tls.TlsLayer`. The core sees a "tls" connection only once TLS is up."""

    __slots__ = ("_conn_id", "_linger", "_lost", "_out", "_secure", "_server", "_transport")

    def __init__(self, server: ImpServer, secure: bool) -> None:
        self._server = server
        self._secure = secure
        self._transport: asyncio.Transport | None = None
        self._out: asyncio.Transport | TlsLayer | None = None  # where the core's bytes go
        self._conn_id = 0
        self._lost = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._conn_id = self._server._register(self)
        log.debug("imp conn=%d from %s", self._conn_id, transport.get_extra_info("peername"))
        if self._secure:
            self._start_tls(transport)
        else:
            self._out = transport
            core = self._server.core
            self._server._apply(core.connection_made(self._conn_id, secure=False, now=self._server._clock()))

    def tls_established(self, tls: TlsLayer) -> None:
        self._out = tls
        core, now = self._server.core, self._server._clock()
        if self._secure:
            self._server._apply(core.connection_made(self._conn_id, secure=True, now=now))
        else:
            self._server._apply(core.tls_established(self._conn_id, now))

    def data_received(self, data: bytes) -> None:
        core = self._server.core
        self._server._apply(core.data_received(self._conn_id, data, self._server._clock()))

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost ends the session

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if not self._lost:
            self._lost = True
            if exc is not None and self._out is None:  # lost during the TLS handshake
                log.info("imp conn=%d TLS handshake failed: %s", self._conn_id, exc)
            self._server._unregister(self._conn_id)

    def write(self, data: bytes) -> None:
        out = self._out
        if out is None or out.is_closing() or self._linger is not None:  # closed, or half-closed
            return
        out.write(data)
        if out.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            log.warning("imp conn=%d not reading; dropping it", self._conn_id)
            out.abort()

    def close(self) -> None:
        """After the core's last bytes (a stream error or our ``</stream:stream>``).

        Lingering on both kinds of connection (edge.xmpp.linger): the peer may still be sending,
        e.g. the rest of a stanza over the limit, and a reset could destroy the error in flight.
        Its input is dropped meanwhile: the core ignores a closed session's data.
        """
        out, transport = self._out, self._transport
        if out is not None and out is not transport:
            out.close()  # TlsLayer: close_notify, then its own lingering close
        elif out is not None:
            if self._linger is None:
                self._linger = linger_close(out)
        elif transport is not None:  # the TLS handshake is under way: nothing was said yet
            transport.close()

    def abort(self) -> None:
        out = self._out if self._out is not None else self._transport
        if out is not None:
            out.abort()

    def upgrade(self) -> None:
        """STARTTLS, right after ``<proceed/>`` was written: later bytes go to the TLS layer."""
        assert self._transport is not None
        self._start_tls(self._transport)

    def _start_tls(self, transport: asyncio.Transport) -> None:
        self._out = None  # nothing is written until the handshake is done
        TlsLayer.upgrade(
            transport,
            self,
            self._server._ssl_context,
            server_side=True,
            handshake_timeout_s=TLS_HANDSHAKE_TIMEOUT_S,
        )

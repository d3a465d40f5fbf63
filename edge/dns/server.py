"""asyncio adapters for the DNS core: one UDP and one TCP listener on the same port.

Thin by design (shared/STYLE.md §8): the protocols feed bytes to a `QueryHandler` (normally
`edge.dns.core.DnsCore`) and send back what it returns. TCP follows RFC 7766: several queries per
connection (§6.2.1), an idle timeout (§6.2.3), and here also a bounded message size and a
bounded number of connections, so a misbehaving client cannot exhaust the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import NamedTuple, Protocol, cast

from edge.dns.framing import FrameTooLarge, TcpFramer, frame

log = logging.getLogger(__name__)


class QueryHandler(Protocol):
    def handle_query(self, wire: bytes, client_ip: str, *, tcp: bool) -> bytes | None: ...


class DnsListener(NamedTuple):
    """A bound socket as `edge lab status --json` reports it (spec §9)."""

    name: str
    transport: str
    host: str
    port: int


class DnsServer:
    """Serves `core` on UDP and TCP ``host:port``; port 0 picks one free port for both."""

    def __init__(
        self,
        core: QueryHandler,
        host: str,
        port: int,
        *,
        name: str = "dns",
        tcp_idle_timeout_s: float = 10.0,
        max_tcp_connections: int = 128,
        max_tcp_query_bytes: int = 4096,
        bind_attempts: int = 8,
        stop_timeout_s: float = 2.0,
    ) -> None:
        self.core = core
        self.host = host
        self.port = port
        self.name = name
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_query_bytes = max_tcp_query_bytes
        self.bind_attempts = bind_attempts
        self.stop_timeout_s = stop_timeout_s
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[_TcpProtocol] = set()
        self._bound_port = 0
        self._tcp_rejected = 0
        self._tcp_oversize = 0

    @property
    def listeners(self) -> list[DnsListener]:
        if self._udp is None:
            return []
        return [
            DnsListener(self.name, "udp", self.host, self._bound_port),
            DnsListener(self.name, "tcp", self.host, self._bound_port),
        ]

    @property
    def bound_port(self) -> int:
        return self._bound_port

    def stats(self) -> dict[str, int]:
        return {
            "tcp_connections": len(self._connections),
            "tcp_rejected": self._tcp_rejected,
            "tcp_oversize": self._tcp_oversize,
        }

    async def start(self) -> None:
        """Bind UDP, then TCP on the same port; with port 0, retry if TCP finds it taken."""
        if self._udp is not None:
            raise RuntimeError("DnsServer already started")
        loop = asyncio.get_running_loop()
        attempts = self.bind_attempts if self.port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, self.port)
            )
            port = int(udp.get_extra_info("sockname")[1])
            try:
                tcp = await loop.create_server(lambda: _TcpProtocol(self), self.host, port)
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE or attempt + 1 == attempts:
                    raise
                log.debug("dns: TCP port %d taken, picking another ephemeral port", port)
                continue
            self._udp, self._tcp, self._bound_port = udp, tcp, port
            log.info("dns %s listening on %s port %d (udp+tcp)", self.name, self.host, port)
            return

    async def stop(self) -> None:
        """Close both listeners and every TCP connection; bounded by ``stop_timeout_s``."""
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._connections):
                conn.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tcp.wait_closed(), self.stop_timeout_s)
        self._udp, self._tcp = None, None

    def _answer(self, wire: bytes, client_ip: str, *, tcp: bool) -> bytes | None:
        try:
            return self.core.handle_query(wire, client_ip, tcp=tcp)
        except Exception:  # the core converts bad input itself; this guards against our own bugs
            log.exception("dns: query from %s failed", client_ip)
            return None


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not every loop's UDP transport subclasses DatagramTransport (CPython 3.11's selector one).
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self._server._answer(data, str(addr[0]), tcp=False)
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do, keep serving.
        log.debug("dns udp: %s", exc)


class _TcpProtocol(asyncio.Protocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._framer = TcpFramer(server.max_tcp_query_bytes)
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        peer = self._transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        if len(self._server._connections) >= self._server.max_tcp_connections:
            self._server._tcp_rejected += 1
            log.info("dns tcp: connection limit reached, rejecting %s", self._peer)
            self._transport.abort()
            return
        self._server._connections.add(self)
        self._touch()
        self._arm(self._server.tcp_idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        self._touch()
        try:
            messages = self._framer.receive_data(data)
        except FrameTooLarge as exc:
            self._server._tcp_oversize += 1
            log.info("dns tcp %s: %s, closing", self._peer, exc)
            self.abort()
            return
        for message in messages:
            reply = self._server._answer(message, self._peer, tcp=True)
            if reply is not None and self._transport is not None and not self._transport.is_closing():
                self._transport.write(frame(reply))

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its queries (backpressure).
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _touch(self) -> None:
        self._deadline = asyncio.get_running_loop().time() + self._server.tcp_idle_timeout_s

    def _arm(self, delay_s: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._on_timer)

    def _on_timer(self) -> None:
        # One timer per connection, re-armed lazily to the latest deadline (RFC 7766 §6.2.3).
        remaining = self._deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            self._arm(remaining)
            return
        self._timer = None
        log.debug("dns tcp %s: idle for %.1fs, closing", self._peer, self._server.tcp_idle_timeout_s)
        if self._transport is not None:
            self._transport.close()

"""The relay's asyncio adapter: one ``DatagramProtocol`` per bound local port, one shared table.

Thin by design (shared/STYLE.md §8): ``datagram_received`` hands the datagram to
``RelayTable.receive_datagram`` and does one ``sendto`` on the egress port's transport; one timer
handle drives inactivity timeouts. Run it under uvloop: the stock loop is ~4x slower here
(shared/TOOLS.md). On C, ``transcoding=True`` routes through ``receive_and_transcode`` so
``RelayTable.set_transcoder`` (SRTP B2BUA, ``srtp.SrtpTranscoder``) takes effect.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from media_relay.errors import PortsExhaustedError
from media_relay.events import StreamTimedOut
from media_relay.table import Addr, LegSpec, PortAllocator, RelayTable, Stream

log = logging.getLogger(__name__)

_BIND_ATTEMPTS = 16  # pairs tried when the allocator's next pair is taken by another process


class _PortProtocol(asyncio.DatagramProtocol):
    """Plain relay: a few dict lookups and one sendto per packet."""

    def __init__(self, worker: RelayWorker) -> None:
        self._port = 0
        self._worker = worker
        self._receive = worker.table.receive_datagram
        self._transports = worker._transports
        self._time = worker._loop.time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._port = int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        route = self._receive(self._port, data, addr, self._time())
        if route is not None:
            try:
                self._transports[route[0]].sendto(data, route[1])
            except KeyError:  # egress port closed under a live stream (zero-cost when not raised)
                self._worker.socket_errors += 1

    def error_received(self, exc: Exception) -> None:
        self._worker.socket_errors += 1


class _TranscodingProtocol(_PortProtocol):
    def __init__(self, worker: RelayWorker) -> None:
        super().__init__(worker)
        self._relay = worker.table.receive_and_transcode

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        out = self._relay(self._port, data, addr, self._time())
        if out is not None:
            try:
                self._transports[out[0]].sendto(out[2], out[1])
            except KeyError:
                self._worker.socket_errors += 1


class _Ipv6PortProtocol(_PortProtocol):
    # asyncio reports IPv6 peers as (host, port, flowinfo, scope_id); the table keys on (host, port).
    def datagram_received(self, data: bytes, addr: Any) -> None:
        super().datagram_received(data, (addr[0], addr[1]))


class _Ipv6TranscodingProtocol(_TranscodingProtocol):
    def datagram_received(self, data: bytes, addr: Any) -> None:
        super().datagram_received(data, (addr[0], addr[1]))


class _PendingTransport(asyncio.DatagramTransport):
    """A socket bound synchronously (``RelayWorker.bind_port_now``) that has not joined the loop.

    It already owns its port; datagrams sent to it wait in the kernel buffer; ``sendto`` writes
    straight to the socket, so the relay and ``RelayWorker.send`` can use it at once. Replaced by
    the loop's transport one iteration later.
    """

    def __init__(self, sock: socket.socket, worker: RelayWorker) -> None:
        super().__init__()
        self.sock = sock
        self.closed = False
        self.attaching = False
        self._worker = worker

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self._worker.socket_errors += 1

    def close(self) -> None:
        self.closed = True
        if not self.attaching:
            self.sock.close()  # the port is free at once (a new call may want it)
        # else the attach task owns the socket: it closes the transport once it exists
        # (cancelling the task instead could leak the fd under uvloop).

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        if name == "sockname":
            return self.sock.getsockname()
        return default


class RelayWorker:
    """Binds ports on ``host`` and relays between them according to one ``RelayTable``.

    Ports may also be bound on other local addresses (``host=`` of the bind methods; E's stream
    legs span its external and internal addresses); a port number is unique within a worker.
    """

    def __init__(
        self,
        host: str,
        *,
        allocator: PortAllocator | None = None,
        table: RelayTable | None = None,
        transcoding: bool = False,
        on_timeout: Callable[[StreamTimedOut], None] | None = None,
    ) -> None:
        self.host = host
        self.allocator = allocator
        self.table = table if table is not None else RelayTable()
        self.transcoding = transcoding
        self.on_timeout = on_timeout
        self.socket_errors = 0
        self._loop = asyncio.get_running_loop()
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._allocated: set[int] = set()  # RTP ports of pairs taken from the allocator
        self._stream_pairs: dict[str, list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._attaching: set[asyncio.Task[None]] = set()

    def time(self) -> float:
        """The relay table's clock (the loop's)."""
        return self._loop.time()

    @property
    def ports(self) -> list[int]:
        return sorted(self._transports)

    def _factory(self, host: str) -> type[_PortProtocol]:
        if self.transcoding:
            return _Ipv6TranscodingProtocol if ":" in host else _TranscodingProtocol
        return _Ipv6PortProtocol if ":" in host else _PortProtocol

    async def bind_port(self, port: int, *, host: str | None = None) -> int:
        """Bind one local UDP port (``0`` = any; e.g. E's shared 2776/2777). Returns the port."""
        host = self.host if host is None else host
        factory = self._factory(host)
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: factory(self), local_addr=(host, port)
        )
        bound = int(transport.get_extra_info("sockname")[1])
        if bound in self._transports:
            transport.close()
            raise ValueError(f"port {bound} already bound by this worker")
        self._transports[bound] = transport
        return bound

    async def bind_pair(
        self, rtp_port: int | None = None, *, rtcp_mux: bool = False, host: str | None = None
    ) -> tuple[int, int]:
        """Bind an RTP/RTCP pair: the given even port (and +1), or the allocator's next free pair."""
        if rtp_port is not None:
            return await self._bind_exact(rtp_port, rtcp_mux, host)
        if self.allocator is None:
            raise ValueError("no allocator: pass rtp_port")
        for _ in range(_BIND_ATTEMPTS):
            rtp, _rtcp = self.allocator.allocate()
            try:
                pair = await self._bind_exact(rtp, rtcp_mux, host)
            except OSError as exc:
                self.allocator.release(rtp)
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            except BaseException:  # e.g. ValueError: the port is bound here on another host
                self.allocator.release(rtp)
                raise
            self._allocated.add(rtp)
            return pair
        raise PortsExhaustedError(f"{_BIND_ATTEMPTS} port pairs in a row were in use")

    async def _bind_exact(self, rtp_port: int, rtcp_mux: bool, host: str | None) -> tuple[int, int]:
        await self.bind_port(rtp_port, host=host)
        if rtcp_mux:
            return rtp_port, rtp_port
        try:
            await self.bind_port(rtp_port + 1, host=host)
        except BaseException:
            self.close_port(rtp_port)
            raise
        return rtp_port, rtp_port + 1

    # -- synchronous binding (SDP handling in SIP code cannot await) -----------------------------

    def bind_port_now(self, port: int, *, host: str | None = None) -> int:
        """``bind_port`` without awaiting: the socket is bound (the port is ours) on return and
        joins the loop in a later iteration; until then datagrams wait in the kernel buffer and
        sends go straight to the socket. ``wait_bound()`` waits for every such port."""
        host = self.host if host is None else host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((host, port))
            bound = int(sock.getsockname()[1])
            if bound in self._transports:
                raise ValueError(f"port {bound} already bound by this worker")
        except BaseException:
            sock.close()
            raise
        pending = _PendingTransport(sock, self)
        self._transports[bound] = pending
        task = self._loop.create_task(self._attach(bound, pending, host))
        self._attaching.add(task)
        task.add_done_callback(self._attaching.discard)
        return bound

    async def _attach(self, port: int, pending: _PendingTransport, host: str) -> None:
        if pending.closed:
            return
        pending.attaching = True
        factory = self._factory(host)
        try:
            transport, _ = await self._loop.create_datagram_endpoint(lambda: factory(self), sock=pending.sock)
        except OSError as exc:
            log.warning("port %d could not join the loop: %s", port, exc)
            self.socket_errors += 1
            pending.sock.close()
            if self._transports.get(port) is pending:
                del self._transports[port]
            return
        if pending.closed or self._transports.get(port) is not pending:
            transport.close()
        else:
            self._transports[port] = transport

    def bind_pair_now(self, *, rtcp_mux: bool = False, host: str | None = None) -> tuple[int, int]:
        """``bind_pair()`` from the allocator, without awaiting (see ``bind_port_now``)."""
        if self.allocator is None:
            raise ValueError("no allocator")
        for _ in range(_BIND_ATTEMPTS):
            rtp, _rtcp = self.allocator.allocate()
            try:
                self.bind_port_now(rtp, host=host)
                if not rtcp_mux:
                    try:
                        self.bind_port_now(rtp + 1, host=host)
                    except BaseException:
                        self.close_port(rtp)
                        raise
            except OSError as exc:
                self.allocator.release(rtp)
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            except BaseException:
                self.allocator.release(rtp)
                raise
            self._allocated.add(rtp)
            return rtp, rtp if rtcp_mux else rtp + 1
        raise PortsExhaustedError(f"{_BIND_ATTEMPTS} port pairs in a row were in use")

    async def wait_bound(self) -> None:
        """Until every port from ``bind_port_now`` has joined the loop (or failed to)."""
        while self._attaching:
            await asyncio.gather(*self._attaching, return_exceptions=True)

    def send(self, local_port: int, data: bytes, addr: Addr) -> bool:
        """Send one datagram from a bound local port (e.g. C's first packet towards E, which
        opens the DMZ firewall, spec §7). Returns False when the port is not bound here."""
        transport = self._transports.get(local_port)
        if transport is None:
            return False
        transport.sendto(data, addr)
        return True

    def close_port(self, port: int) -> None:
        transport = self._transports.pop(port, None)
        if transport is not None:
            transport.close()

    def release_pair(self, rtp_port: int) -> None:
        """Close a pair from ``bind_pair`` and give it back to the allocator."""
        self.close_port(rtp_port)
        self.close_port(rtp_port + 1)
        if rtp_port in self._allocated and self.allocator is not None:
            self._allocated.discard(rtp_port)
            self.allocator.release(rtp_port)

    def add_stream(
        self,
        stream_id: str,
        a: LegSpec,
        b: LegSpec,
        *,
        clock_rate: int = 8000,
        inactivity_timeout_s: float | None = None,
    ) -> Stream:
        """Add a stream to the table (its local ports must be bound here) and re-arm the timer."""
        for spec in (a, b):
            for port in (spec.local_rtp_port, spec.local_rtcp_port):
                if port not in self._transports:
                    raise ValueError(f"local port {port} is not bound by this worker")
        stream = self.table.add_stream(
            stream_id,
            a,
            b,
            self._loop.time(),
            clock_rate=clock_rate,
            inactivity_timeout_s=inactivity_timeout_s,
        )
        self._stream_pairs[stream_id] = [
            spec.local_rtp_port
            for spec in (a, b)
            if not spec.demux and spec.local_rtp_port in self._allocated
        ]
        self._arm_timer()
        log.debug("stream %s added", stream_id)
        return stream

    def remove_stream(self, stream_id: str, *, release_ports: bool = True) -> Stream:
        """Remove a stream; by default also close and free the allocator pairs it used."""
        stream = self.table.remove_stream(stream_id)
        pairs = self._stream_pairs.pop(stream_id, [])
        if release_ports:
            for rtp in pairs:
                self.release_pair(rtp)
        return stream

    def stats(self) -> dict[str, Any]:
        snap = self.table.snapshot()
        snap["worker"] = {
            "host": self.host,
            "bound_ports": len(self._transports),
            "socket_errors": self.socket_errors,
            "allocator_in_use": None if self.allocator is None else self.allocator.in_use,
        }
        return snap

    # -- timer --------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        at = self.table.get_timer()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        for event in self.table.handle_timer(self._loop.time()):
            log.info("stream %s timed out after %.1f s idle", event.stream_id, event.idle_s)
            for rtp in self._stream_pairs.pop(event.stream_id, []):
                self.release_pair(rtp)
            if self.on_timeout is not None:
                self.on_timeout(event)
        self._arm_timer()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for port in list(self._transports):
            self.close_port(port)
        await self.wait_bound()  # pending ports close their transports as they attach
        await asyncio.sleep(0)  # let transports run their connection_lost callbacks

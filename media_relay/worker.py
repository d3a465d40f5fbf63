"""The relay's asyncio adapter: bound local ports, one shared table, one timer.

Thin by design (shared/STYLE.md §8). Two ways to move packets, same table, same counters:

* **native** (``media_relay/_fastpath.c`` built, IPv4 ports, ``EDGE_MEDIA_FASTPATH`` not ``0``):
  the worker binds the sockets itself and registers them with a ``_fastpath.Forwarder``, whose
  fd the loop watches (``loop.add_reader``): one callback per loop iteration reads every ready
  socket and forwards the packets of established flows, in C. By default through io_uring (the
  fd is the ring's eventfd; every socket has a multishot receive armed, a turn's sends go in
  one submission: ``_uring.h``), else (``EDGE_MEDIA_URING=0``, a kernel that refuses io_uring,
  threads) through an epoll set, recvmmsg and sendmmsg.
  What the forwarder does not know (first packets, strangers, garbage) comes back as a list and
  goes through ``RelayTable.receive_datagram`` as before. ``fastpath.FlowSync`` keeps the
  forwarder's flows equal to the table's routes and folds counters back lazily: before
  snapshots and ``totals()``, when a flow goes, and (``last_seen`` only) for the streams an
  inactivity check would time out; nothing runs over every flow periodically, so the loop has
  no once-a-second stall. On C (``transcoding=True``) a flow carries its leg's native SRTP
  transcoder (``srtp.SrtpTranscoder.native``) and the forwarder unprotects/protects in C;
  without libsrtp2 in the extension C's flows stay in Python (pylibsrtp per packet).
* **python**: one ``DatagramProtocol`` per port; ``datagram_received`` hands the datagram to
  ``receive_datagram`` (``receive_and_transcode`` on C) and does one ``sendto``.

Run it under uvloop: the stock loop is ~4x slower here (shared/TOOLS.md).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from media_relay import fastpath, kernel, kernel_srtp
from media_relay.errors import PortsExhaustedError
from media_relay.events import StreamTimedOut
from media_relay.table import Addr, LegSpec, PortAllocator, RelayTable, Stream

if TYPE_CHECKING:
    from media_relay._fastpath import Forwarder

log = logging.getLogger(__name__)

_BIND_ATTEMPTS = 16  # pairs tried when the allocator's next pair is taken by another process
# Native path: an inactivity check also refreshes ``last_seen`` of streams due this much later,
# so that refreshes (and timer wake-ups) come in batches rather than one per stream.
IDLE_REFRESH_SLACK_S = 5.0
# C: how soon a transcoding flow installed before its first packet is looked at again, to move
# it into the kernel once its SSRC is known (media_relay/kernel_srtp.py)
PROMOTE_AFTER_S = 0.05
# Socket buffers (the kernel doubles them for bookkeeping). A relay port carries one stream;
# E's demux ports carry every C-facing stream (spec §7: 2776/2777), so they get far more.
RELAY_RCVBUF_BYTES = 512 << 10
RELAY_SNDBUF_BYTES = 512 << 10
DEMUX_RCVBUF_BYTES = 8 << 20
DEMUX_SNDBUF_BYTES = 4 << 20
_SO_RCVBUFFORCE = int(getattr(socket, "SO_RCVBUFFORCE", 33))
_SO_SNDBUFFORCE = int(getattr(socket, "SO_SNDBUFFORCE", 32))


def open_udp_socket(host: str, port: int, rcvbuf_bytes: int, sndbuf_bytes: int) -> socket.socket:
    """A bound non-blocking UDP socket with the given buffer sizes: ``SO_*BUFFORCE`` where
    permitted (root, CAP_NET_ADMIN), else ``SO_*BUF`` (capped by net.core.[rw]mem_max)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for force, plain, size in (
            (_SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf_bytes),
            (_SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf_bytes),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


THREADS_ENV_VAR = "EDGE_MEDIA_THREADS"
SERVED_WAIT_S = 1.0  # a shard thread waits this long at most for the loop to take its hand-backs


def relay_threads() -> int:
    """``EDGE_MEDIA_THREADS`` (1..16; default 1): forwarder threads of a native relay worker."""
    try:
        n = int(os.environ.get(THREADS_ENV_VAR, "1"))
    except ValueError:
        return 1
    return min(16, max(1, n))


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


class _SocketTransport(asyncio.DatagramTransport):
    """A socket the worker owns, presented as a transport: ``sendto`` writes straight to it
    (a full send buffer drops the datagram and counts a socket error, as a relay should)."""

    def __init__(self, sock: socket.socket, worker: RelayWorker) -> None:
        super().__init__()
        self.sock = sock
        self.closed = False
        self._worker = worker

    def sendto(self, data: Any, addr: Any = None) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self._worker.socket_errors += 1

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self.sock
        if name == "sockname":
            return self.sock.getsockname()
        return default


class _NativePort(_SocketTransport):
    """A port read by the native forwarder (registered with it under ``fd``: epoll set or io_uring)."""

    def __init__(self, sock: socket.socket, worker: RelayWorker) -> None:
        super().__init__(sock, worker)
        self.fd = sock.fileno()


class _PendingTransport(_SocketTransport):
    """A socket bound synchronously (``RelayWorker.bind_port_now``) that has not joined the loop.

    It already owns its port; datagrams sent to it wait in the kernel buffer; ``sendto`` writes
    straight to the socket, so the relay and ``RelayWorker.send`` can use it at once. Replaced by
    the loop's transport one iteration later. (Python path only: native ports join at once.)
    """

    def __init__(self, sock: socket.socket, worker: RelayWorker) -> None:
        super().__init__(sock, worker)
        self.attaching = False

    def close(self) -> None:
        self.closed = True
        if not self.attaching:
            self.sock.close()  # the port is free at once (a new call may want it)
        # else the attach task owns the socket: it closes the transport once it exists
        # (cancelling the task instead could leak the fd under uvloop).


class RelayWorker:
    """Binds ports on ``host`` and relays between them according to one ``RelayTable``.

    Ports may also be bound on other local addresses (``host=`` of the bind methods; E's stream
    legs span its external and internal addresses); a port number is unique within a worker.
    ``native``: None = the native fast path when built and not switched off (``fastpath``);
    True requires it; False = the pure-Python path. ``uring``: None = ``EDGE_MEDIA_URING``; the
    native path on io_uring instead of epoll (one thread only; falls back to epoll, with
    ``uring_error`` set, where the kernel refuses it). ``helper``: None = ``EDGE_MEDIA_HELPER``;
    an io_uring forwarder starts its send helper (``_helper.h``: while the relay is saturated,
    a second thread sends half of the flows' datagrams from another core).

    Mutate streams through the worker (``add_stream``, ``remove_stream``) or the table's methods
    (``set_remote``, ``relatch``, ``set_transcoder``), which the native path follows; read
    counters through ``stats()`` / ``totals()`` or after ``flush()``.
    """

    def __init__(
        self,
        host: str,
        *,
        allocator: PortAllocator | None = None,
        table: RelayTable | None = None,
        transcoding: bool = False,
        on_timeout: Callable[[StreamTimedOut], None] | None = None,
        native: bool | None = None,
        kernel_forwarding: bool | None = None,
        threads: int | None = None,
        uring: bool | None = None,
        helper: bool | None = None,
    ) -> None:
        self.host = host
        self.allocator = allocator
        self.table = table if table is not None else RelayTable()
        self.transcoding = transcoding
        self.on_timeout = on_timeout
        self.socket_errors = 0
        self._loop = asyncio.get_running_loop()
        self._transports: dict[int, asyncio.DatagramTransport] = {}
        self._native_socks: dict[int, socket.socket] = {}  # the sockets of native ports
        self._allocated: set[int] = set()  # RTP ports of pairs taken from the allocator
        self._stream_pairs: dict[str, list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._attaching: set[asyncio.Task[None]] = set()
        if native is None:
            native = fastpath.available()
        # threads > 1: ports are spread over that many forwarders (shards, by RTP pair); the
        # first is read from the event loop, each other one by a thread of its own in C,
        # without the GIL (Forwarder.run), so the relay uses more than one core.
        if threads is None:
            threads = relay_threads()
        if uring is None:
            uring = fastpath.uring_wanted()
        if helper is None:
            helper = fastpath.helper_wanted()
        if kernel_forwarding is None:
            kernel_forwarding = kernel.wanted()
        self.uring_error: str | None = None
        self._forwarder = None
        if native and uring and threads <= 1:
            try:
                mode = fastpath.HELPER_ELASTIC if helper else fastpath.HELPER_OFF
                self._forwarder = fastpath.new_forwarder(uring=True, helper=mode)
            except OSError as exc:
                self.uring_error = f"io_uring unavailable ({exc}): epoll"
                log.warning("media: %s", self.uring_error)
        elif native and uring:
            self.uring_error = "io_uring is for a relay read by the event loop alone: epoll with threads"
        if native and self._forwarder is None:
            self._forwarder = fastpath.new_forwarder()
        self._served: list[tuple[Forwarder, threading.Thread]] = []
        self._shards: list[Forwarder] = [] if self._forwarder is None else [self._forwarder]
        if self._forwarder is not None:
            for i in range(1, max(1, threads)):
                fwd = fastpath.new_forwarder()
                thread = threading.Thread(
                    target=fwd.run, args=(self._from_thread,), name=f"media-relay-{i}", daemon=True
                )
                self._served.append((fwd, thread))
                self._shards.append(fwd)
        self._flows: fastpath.FlowSync | None = None
        self._promote: asyncio.TimerHandle | None = None
        self._sync_pending = False
        self._reader_fd: int | None = None
        self._kernel: kernel.KernelForwarder | None = None
        self._srtp_kernel: kernel_srtp.SrtpKernel | None = None
        self.kernel_error: str | None = None
        if kernel_forwarding and self._forwarder is not None and not transcoding:
            try:
                self._kernel = kernel.KernelForwarder.open()
            except kernel.KernelUnavailable as exc:
                self.kernel_error = str(exc)
                log.warning("media: no kernel forwarding, established flows stay native: %s", exc)
        elif kernel_forwarding and self._forwarder is not None:
            try:
                self._srtp_kernel = kernel_srtp.SrtpKernel.open()
            except kernel.KernelUnavailable as exc:
                self.kernel_error = str(exc)
                log.warning("media: no kernel SRTP, established flows stay native: %s", exc)
        if self._forwarder is not None:
            self._flows = fastpath.FlowSync(
                self._forwarder,
                self.table,
                self._native_fd,
                self._kernel,
                self._native_local,
                shards=self._shards,
                srtp_kernel=self._srtp_kernel,
                on_waiting=self._promote_soon,
            )
            self.table.track_changes = True
            self.table.on_change = self._sync_soon
            on_ready = self._on_readable_transcoding if transcoding else self._on_readable
            self._reader_fd = self._forwarder.fileno()
            self._loop.add_reader(self._reader_fd, on_ready)
            for _, thread in self._served:
                thread.start()

    @property
    def path(self) -> str:
        """``native`` or ``python``: how this worker moves packets (status JSON)."""
        return "python" if self._forwarder is None else "native"

    @property
    def kernel_forwarding(self) -> bool:
        """Established flows go through the kernel: plain ones (``media_relay.kernel``, E),
        transcoding ones (``media_relay.kernel_srtp``, C)."""
        return self._kernel is not None or self._srtp_kernel is not None

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

    def _native_fd(self, port: int) -> int | None:
        transport = self._transports.get(port)
        return transport.fd if isinstance(transport, _NativePort) else None

    def _native_local(self, port: int) -> Addr | None:
        sock = self._native_socks.get(port)
        if sock is None:
            return None
        name = sock.getsockname()
        return (str(name[0]), int(name[1]))

    def _open(
        self, host: str, port: int, rcvbuf_bytes: int | None, sndbuf_bytes: int | None
    ) -> socket.socket:
        rcv = RELAY_RCVBUF_BYTES if rcvbuf_bytes is None else rcvbuf_bytes
        snd = RELAY_SNDBUF_BYTES if sndbuf_bytes is None else sndbuf_bytes
        return open_udp_socket(host, port, rcv, snd)

    def _bind_native(self, sock: socket.socket) -> int:
        """Register a bound socket with its forwarder: it is read from the next loop turn."""
        assert self._forwarder is not None
        try:
            bound = int(sock.getsockname()[1])
            if bound in self._transports:
                raise ValueError(f"port {bound} already bound by this worker")
            port = _NativePort(sock, self)
            fastpath.shard_of(self._shards, bound).add_socket(port.fd, bound)
        except BaseException:
            sock.close()
            raise
        self._transports[bound] = port
        self._native_socks[bound] = sock
        return bound

    async def bind_port(
        self,
        port: int,
        *,
        host: str | None = None,
        rcvbuf_bytes: int | None = None,
        sndbuf_bytes: int | None = None,
    ) -> int:
        """Bind one local UDP port (``0`` = any; e.g. E's shared 2776/2777). Returns the port.
        Buffer sizes default to ``RELAY_RCVBUF_BYTES`` / ``RELAY_SNDBUF_BYTES``."""
        host = self.host if host is None else host
        sock = self._open(host, port, rcvbuf_bytes, sndbuf_bytes)
        if self._forwarder is not None and ":" not in host:
            return self._bind_native(sock)
        factory = self._factory(host)
        try:
            transport, _ = await self._loop.create_datagram_endpoint(lambda: factory(self), sock=sock)
        except BaseException:
            sock.close()
            raise
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
        sock = self._open(host, port, None, None)
        if self._forwarder is not None and ":" not in host:
            return self._bind_native(sock)
        try:
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
        if transport is None:
            return
        self._native_socks.pop(port, None)
        if isinstance(transport, _NativePort) and self._forwarder is not None:
            if self._flows is not None:
                self._flows.drop_port(port)  # folds their counters back first
            try:
                stale = fastpath.shard_of(self._shards, port).remove_socket(transport.fd, port)
            except OSError as exc:
                log.warning("port %d: leaving the forwarder failed: %s", port, exc)
                self.socket_errors += 1
            else:
                if stale:
                    log.warning("port %d: %d native flows were still using it", port, stale)
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
        if self._flows is not None:
            self._flows.drop_stream(self.table.get_stream(stream_id))
        stream = self.table.remove_stream(stream_id)
        pairs = self._stream_pairs.pop(stream_id, [])
        if release_ports:
            for rtp in pairs:
                self.release_pair(rtp)
        return stream

    def _sync_soon(self) -> None:
        """The table changed (signalling: a re-INVITE, a relatch): mirror it into the flows at
        the next loop iteration, whether or not a packet wakes the worker before then (a flow in
        the kernel never wakes it)."""
        if not self._sync_pending:
            self._sync_pending = True
            self._loop.call_soon(self._sync_now)

    def _sync_now(self) -> None:
        self._sync_pending = False
        if self._flows is not None and self.table.changed:
            self._flows.sync(self.table.take_changed())

    def _promote_soon(self) -> None:
        """C: a native flow waits for its first packet's SSRC to move into the kernel; look
        again shortly (a flush moves every flow that has one)."""
        if self._promote is None and self._srtp_kernel is not None:
            self._promote = self._loop.call_later(PROMOTE_AFTER_S, self._promote_now)

    def _promote_now(self) -> None:
        self._promote = None
        if self._flows is not None and self._srtp_kernel is not None:
            self._flows.flush()
            if self._flows.waiting:
                self._promote_soon()

    def flush(self) -> None:
        """Bring the table's counters, receiver stats and ``last_seen`` up to date (native path:
        fold in what the forwarder counted; a no-op on the Python path)."""
        if self._flows is not None:
            self._flows.flush()

    def totals(self) -> dict[str, int]:
        self.flush()
        return self.table.totals()

    def stats(self) -> dict[str, Any]:
        self.flush()
        snap = self.table.snapshot()
        errors = self.socket_errors
        worker: dict[str, Any] = {
            "host": self.host,
            "bound_ports": len(self._transports),
            "allocator_in_use": None if self.allocator is None else self.allocator.in_use,
            "fastpath": self.path,
        }
        if self.transcoding:  # whose SRTP: the forwarder's (C) or pylibsrtp's per packet
            primitives = fastpath.srtp_primitives()
            worker["srtp"] = "python" if self._forwarder is None or primitives is None else "native"
            worker["srtp_primitives"] = primitives if worker["srtp"] == "native" else "pylibsrtp"
        if self._forwarder is not None:
            native: dict[str, Any] = {}
            for fwd in self._shards:
                for key, value in fwd.counters().items():
                    native[key] = native.get(key, 0) + value
            native["threads"] = len(self._shards)
            native["backend"] = "io_uring" if native.pop("uring") else "epoll"
            if self.uring_error is not None:
                worker["uring_error"] = self.uring_error
            errors += native["send_errors"] + native["recv_errors"]
            worker["native"] = native
        installed = self._kernel if self._kernel is not None else self._srtp_kernel
        if installed is not None and self._flows is not None:
            worker["kernel"] = {
                "flows": self._flows.kernel_flows,
                "installs": installed.installs,
                "install_errors": installed.install_errors,
                "srtp": installed is self._srtp_kernel,
            }
        elif self.kernel_error is not None:
            worker["kernel"] = {"error": self.kernel_error}
        worker["socket_errors"] = errors
        snap["worker"] = worker
        return snap

    # -- native path ----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """The forwarder has ready sockets (epoll) or completions (io_uring): forward natively, the
        rest via the table."""
        assert self._forwarder is not None and self._flows is not None
        table = self.table
        if table.changed:  # e.g. a re-INVITE re-pointed a leg: before any packet moves
            self._flows.sync(table.take_changed())
        self._relay_plain(self._forwarder.poll())

    def _relay_plain(self, slow: list[tuple[int, bytes, Addr]]) -> None:
        if not slow:
            return
        table = self.table
        now = self._loop.time()
        receive = table.receive_datagram
        transports = self._transports
        for port, data, addr in slow:
            route = receive(port, data, addr, now)
            if route is not None:
                out = transports.get(route[0])
                if out is None:  # egress port closed under a live stream
                    self.socket_errors += 1
                else:
                    out.sendto(data, route[1])
        if table.changed and self._flows is not None:  # latched legs: native from the next packet
            self._flows.sync(table.take_changed())

    def _on_readable_transcoding(self) -> None:
        """C: established flows transcode in C; the rest via ``receive_and_transcode``."""
        assert self._forwarder is not None and self._flows is not None
        table = self.table
        if table.changed:  # e.g. a re-INVITE gave a leg new keys: before any packet moves
            self._flows.sync(table.take_changed())
        self._relay_transcoding(self._forwarder.poll())

    def _relay_transcoding(self, slow: list[tuple[int, bytes, Addr]]) -> None:
        if not slow:
            return
        table = self.table
        now = self._loop.time()
        relay = table.receive_and_transcode
        socks = self._native_socks
        for port, data, addr in slow:
            out = relay(port, data, addr, now)
            if out is not None:
                try:  # straight to the socket: one Python frame less per packet
                    socks[out[0]].sendto(out[2], out[1])
                except KeyError:  # egress port closed, or not native (IPv6)
                    egress = self._transports.get(out[0])
                    if egress is None:
                        self.socket_errors += 1
                    else:
                        egress.sendto(out[2], out[1])
                except OSError:  # send buffer full: dropped
                    self.socket_errors += 1
        if table.changed and self._flows is not None:  # latched legs: native from the next packet
            self._flows.sync(table.take_changed())

    def _from_thread(self, slow: list[tuple[int, bytes, Addr]]) -> None:
        """In a shard's thread (Forwarder.run), with the GIL: hand what the table must see, and
        any change of the table's routes, to the event loop, and wait until it is done. The
        shard reads nothing meanwhile, so a leg's first packets (relayed by the table, which
        then installs the flow) cannot be overtaken by the next ones (relayed natively)."""
        if slow or self.table.changed:
            done = threading.Event()
            try:
                self._loop.call_soon_threadsafe(self._on_served, slow, done)
            except RuntimeError:  # the loop is closed: the worker is going away
                return
            done.wait(SERVED_WAIT_S)

    def _on_served(self, slow: list[tuple[int, bytes, Addr]], done: threading.Event) -> None:
        try:
            if self._flows is None:  # closed meanwhile
                return
            table = self.table
            if table.changed:
                self._flows.sync(table.take_changed())
            if self.transcoding:
                self._relay_transcoding(slow)
            else:
                self._relay_plain(slow)
        finally:
            done.set()

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
        now = self._loop.time()
        if self._flows is not None:  # the forwarder's last_seen decides who idled out
            self._flows.refresh_idle(self.table.due(now + IDLE_REFRESH_SLACK_S), now)
        events = self.table.handle_timer(now)
        if events and self._flows is not None:
            self._flows.drop_detached()
        for event in events:
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
        if self._reader_fd is not None:
            self._loop.remove_reader(self._reader_fd)
            self._reader_fd = None
        for fwd, _ in self._served:
            fwd.interrupt()
        for _, thread in self._served:
            if thread.is_alive():
                await asyncio.to_thread(thread.join)
        self.flush()
        for port in list(self._transports):
            self.close_port(port)
        if self._flows is not None:
            self._flows.close()
            self._flows = None
        for fwd in self._shards:
            fwd.close()
        self._served = []
        if self._kernel is not None:
            self._kernel.close()
            self._kernel = None
        if self._promote is not None:
            self._promote.cancel()
            self._promote = None
        if self._srtp_kernel is not None:
            self._srtp_kernel.close()
            self._srtp_kernel = None
        await self.wait_bound()  # pending ports close their transports as they attach
        await asyncio.sleep(0)  # let transports run their connection_lost callbacks

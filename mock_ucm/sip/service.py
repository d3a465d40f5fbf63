"""asyncio adapter of the mock UCM SIP service: TCP/TLS listeners, flows, echo sockets, one timer.

Thin by design (shared/STYLE.md §8): each `_SipFlow` frames bytes with edge.sip's StreamFramer
and feeds `UcmSipCore`; the service performs the outputs. A framed message goes to the core's
REGISTER fast path first (bytes in, the 200's bytes out, fastpath.py) and is parsed only if that
declines; what a flow writes during one loop turn leaves in one transport write (WriteBatch), and
the expiry timer is re-armed only when the core's earliest deadline may have moved earlier.
Responses go back on the flow their request came in on (RFC 3261 §18.2.2); requests to a device
go to its Contact (or Path) over a connection whose remote address is that host:port, opened
(TCP, or TLS trusting the lab CA) and kept for reuse when none exists — the way UCM reaches
Expressway-C (spec §5).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from edge.config import LabConfig, UcmNode
from edge.sip.errors import SipParseError
from edge.sip.events import (
    FramingError,
    KeepaliveReceived,
    MessageFramed,
    MessageReceived,
    StunReceived,
    TransactionKey,
)
from edge.sip.framing import StreamFramer
from edge.sip.message import MAX_MESSAGE_BYTES, Request, Response, Validation, make_response, parse_message
from edge.write_batch import WriteBatch
from mock_ucm.sip.calls import LocalNode
from mock_ucm.sip.core import UcmSipCore
from mock_ucm.sip.echo import EchoSession
from mock_ucm.sip.events import DEFAULT_PORTS, OutgoingRequest, OutgoingResponse, SipOutput, Target

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
STOP_DEADLINE_S = 5.0
MAX_WRITE_BUFFER_BYTES = 16 * 1024 * 1024  # a peer that does not read at all is cut off
# TCP backpressure (RFC 3261 §18 leaves flow control to the transport): above this many bytes
# waiting for the peer, the flow stops reading its requests until the peer has taken its answers,
# so an overloaded Expressway-C slows down instead of being cut off with every binding behind it.
PAUSE_READING_BYTES = 1024 * 1024
MAX_STATUS_BINDINGS = 100
RemoteKey = tuple[str, str, int]  # (transport, host, port)


class UcmSipService:
    """SIP on one UCM node: registrar, B2BUA and echo number over TCP and TLS."""

    def __init__(
        self,
        config: LabConfig,
        node: UcmNode,
        *,
        ssl_context: ssl.SSLContext | None,
        client_ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        digest_secret: bytes | None = None,
    ) -> None:
        self.node = node
        self.local = LocalNode(
            node.name, node.address, config.lab.domain, node.sip_tcp_port, node.sip_tls_port
        )
        self.echo = _EchoSockets(node.address, self._spawn)
        self.core = UcmSipCore(
            config,
            node,
            self.local,
            echo_ports=self.echo,
            digest_secret=digest_secret or secrets.token_bytes(32),
        )
        self._ssl = ssl_context
        self._client_ssl = client_ssl_context
        self._clock = clock
        self.max_message_bytes = max_message_bytes
        self._servers: list[tuple[str, str, asyncio.Server]] = []
        self._listeners: list[tuple[str, str, str, int]] = []
        self._flows: dict[int, _SipFlow] = {}
        self._by_remote: dict[RemoteKey, _SipFlow] = {}
        self._connecting: dict[RemoteKey, list[tuple[bytes, TransactionKey | None]]] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        # plain-int counters (shared/STYLE.md: what /metrics exports)
        self.connections_accepted = 0
        self.backpressure_pauses = 0  # flows that stopped reading until the peer took our answers
        self.connections_opened = 0
        self.connect_failures = 0
        self.messages_in = 0
        self.messages_out = 0
        self.parse_errors = 0
        self.keepalives = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host = self.node.address
        tcp = await loop.create_server(lambda: _SipFlow(self, "tcp"), host, self.node.sip_tcp_port)
        self.local.tcp_port = self._add_listener("sip-tcp", "tcp", tcp)
        if self._ssl is not None:
            port = self.node.sip_tls_port
            tls = await loop.create_server(lambda: _SipFlow(self, "tls"), host, port, ssl=self._ssl)
            self.local.tls_port = self._add_listener("sip-tls", "tls", tls)
        log.info("%s: SIP listening on %s", self.node.name, self._listeners)

    def _add_listener(self, name: str, transport: str, server: asyncio.Server) -> int:
        port = int(server.sockets[0].getsockname()[1])
        self._servers.append((name, transport, server))
        self._listeners.append((name, transport, self.node.address, port))
        return port

    @property
    def listeners(self) -> list[tuple[str, str, str, int]]:
        return list(self._listeners)

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, server in self._servers:
            server.close()
        for flow in list(self._flows.values()):
            flow.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_DEADLINE_S)
        for _, _, server in self._servers:
            await asyncio.wait_for(server.wait_closed(), STOP_DEADLINE_S)
        self._servers.clear()
        self.echo.close_all()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self._clock()
        reg = self.core.registrar
        rc = reg.counters
        cc = self.core.calls.counters
        bindings: list[dict[str, object]] = []
        for b in reg.bindings():
            if len(bindings) >= MAX_STATUS_BINDINGS:
                break
            bindings.append(b.as_dict(now))
        return {
            "listeners": [
                {"name": n, "transport": t, "host": h, "port": p} for n, t, h, p in self._listeners
            ],
            "registrations": {
                "current": reg.registered,
                "peak": rc.peak,
                "new": rc.registrations,
                "refreshes": rc.refreshes,
                "unregistrations": rc.unregistrations,
                "expirations": rc.expirations,
                "failures": rc.failures,
                "challenges": rc.challenges,
            },
            "bindings": bindings,
            "calls": {
                "active": self.core.calls.active,
                "attempts": cc.attempts,
                "answered": cc.answered,
                "failed": cc.failed,
                "cancelled": cc.cancelled,
                "echo_calls": cc.echo_calls,
            },
            "echo": {"packets": self.core.calls.echo_packets, "sockets": len(self.echo)},
            "connections": len(self._flows),
            "counters": {
                "connections_accepted": self.connections_accepted,
                "backpressure_pauses": self.backpressure_pauses,
                "connections_opened": self.connections_opened,
                "connect_failures": self.connect_failures,
                "messages_in": self.messages_in,
                "messages_out": self.messages_out,
                "parse_errors": self.parse_errors,
                "keepalives": self.keepalives,
                "options_answered": self.core.counters.options_answered,
            },
        }

    # -- flows -----------------------------------------------------------------------------
    def _flow_up(self, flow: _SipFlow, outbound: bool) -> int:
        flow_id = next(self._ids)
        self._flows[flow_id] = flow
        if outbound:
            self.connections_opened += 1
        else:
            self.connections_accepted += 1
        if flow.peer is not None:
            self._by_remote.setdefault((flow.kind, *flow.peer), flow)
        return flow_id

    def _flow_down(self, flow: _SipFlow) -> None:
        self._flows.pop(flow.id, None)
        for key in [k for k, f in self._by_remote.items() if f is flow]:
            del self._by_remote[key]

    def _on_register_answered(self) -> None:
        """After a fast-path REGISTER: its binding expires after every other one (same grant,
        later `now`), so an armed timer stays right; only arm one if none is."""
        if self._timer is None:
            self._arm_timer()

    def _on_message(self, flow: _SipFlow, message: Request | Response) -> None:
        try:
            outputs = self.core.receive_message(message, flow.id, self._clock())
        except SipParseError as exc:  # a header the core parses only when it needs it
            self.parse_errors += 1
            log.info("flow %d: malformed %s: %d %s", flow.id, message, exc.status_code, exc.reason)
            flow.answer_error(message, exc.status_code, exc.reason)
            return
        self._deliver(outputs)

    # -- outputs ---------------------------------------------------------------------------
    def _deliver(self, outputs: list[SipOutput]) -> None:
        for out in outputs:
            if isinstance(out, OutgoingRequest):
                self._send(out.target, bytes(out.request), out.key)
            elif isinstance(out, OutgoingResponse):
                self._send_response(out)
        self._arm_timer()

    def _send_response(self, out: OutgoingResponse) -> None:
        flow = self._flows.get(out.flow) if out.flow is not None else None
        if flow is not None and not flow.closing:
            flow.write(bytes(out.response))
            return
        via = out.response.top_via  # §18.2.2: the flow is gone, go to received/rport
        if via is None:
            return
        transport = via.transport.lower()
        if transport not in DEFAULT_PORTS:
            return
        port = via.rport or via.port or DEFAULT_PORTS[transport]
        self._send(Target(transport, via.received or via.host, port), bytes(out.response), None)

    def _send(self, target: Target, data: bytes, key: TransactionKey | None) -> None:
        remote = (target.transport, target.host, target.port)
        flow = self._by_remote.get(remote)
        if flow is not None and not flow.closing:
            flow.write(data)
            return
        queue = self._connecting.get(remote)
        if queue is not None:
            queue.append((data, key))
            return
        self._connecting[remote] = [(data, key)]
        self._spawn(self._connect(remote))

    async def _connect(self, remote: RemoteKey) -> None:
        transport, host, port = remote
        loop = asyncio.get_running_loop()
        flow: _SipFlow | None = None
        try:
            if transport == "tls" and self._client_ssl is None:
                raise ConnectionError("no client TLS context to reach a TLS contact")
            _, flow = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _SipFlow(self, transport, outbound=True),
                    host,
                    port,
                    ssl=self._client_ssl if transport == "tls" else None,
                    server_hostname=host if transport == "tls" else None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            log.info("%s: cannot reach %s:%s over %s: %s", self.node.name, host, port, transport, exc)
            self.connect_failures += 1
        queue = self._connecting.pop(remote, [])
        if flow is None:
            now = self._clock()
            for _, key in queue:
                if key is not None:
                    self._deliver(self.core.transport_error(key, now))
            return
        self._by_remote[remote] = flow
        for data, _ in queue:
            flow.write(data)

    def _arm_timer(self) -> None:
        when = self.core.get_timer()
        if self._timer is not None:
            armed = self._timer_when
            if when is not None and armed is not None and armed <= when:
                # Keep the earlier timer: firing early just finds nothing due and re-arms.
                # (A registration refresh moves the earliest expiry later on every REGISTER.)
                return
            self._timer.cancel()
            self._timer = None
        if when is None:
            return
        self._timer_when = when
        delay = max(0.0, when - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._deliver(self.core.handle_timer(self._clock()))

    _timer_when: float | None = None


class _SipFlow(asyncio.Protocol):
    """One TCP/TLS connection (accepted or opened): frame, feed the service, write."""

    def __init__(self, service: UcmSipService, kind: str, *, outbound: bool = False) -> None:
        self.service = service
        self.kind = kind
        self.outbound = outbound
        # A registrar/UAS checks what it uses (RFC 3261 §8.2): the framer validates what every
        # request needs (Via, CSeq, Call-ID, From/To); the core parses, and refuses, the rest.
        # Heads are split on bytes while framing (split_heads) for the REGISTER fast path.
        self.framer = StreamFramer(service.max_message_bytes, validation=Validation.PROXY, split_heads=True)
        self._batch = WriteBatch(self._write_now)  # one transport write per loop iteration
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] | None = None
        self.id = 0
        self.closing = False
        self.reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=PAUSE_READING_BYTES)
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if peer else None
        self.id = self.service._flow_up(self, self.outbound)
        log.debug("flow %d: %s %s up", self.id, self.kind, self.peer)

    def pause_writing(self) -> None:
        """The peer is not taking our answers as fast as it sends requests: read no more."""
        if self.transport is not None and not self.closing and not self.reading_paused:
            self.reading_paused = True
            self.service.backpressure_pauses += 1
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.service._flow_down(self)
        log.debug("flow %d: down (%s)", self.id, exc)

    def data_received(self, data: bytes) -> None:
        service = self.service
        for ev in self.framer.receive_frames(data):
            if self.closing:
                return
            if isinstance(ev, MessageFramed):
                service.messages_in += 1
                # the usual REGISTER is answered from its bytes (fastpath.py); the rest is parsed
                answer = service.core.answer_register(
                    ev.data, ev.head_end, self.id, service._clock(), ev.head
                )
                if answer is not None:
                    self.write(answer)
                    service._on_register_answered()
                    continue
                parsed = self.framer.parse_frame(ev)
                if isinstance(parsed, MessageReceived):
                    service._on_message(self, parsed.message)
                else:
                    self._framing_error(parsed)
            elif isinstance(ev, KeepaliveReceived):
                self.service.keepalives += 1
                if ev.pong_needed:
                    self.write(b"\r\n")  # RFC 5626 §4.4.1: answer a CRLFCRLF ping with CRLF
            elif isinstance(ev, StunReceived):
                continue  # MRA HA STUN keepalives end at Expressway-E, not here
            elif isinstance(ev, FramingError):
                self._framing_error(ev)

    def _framing_error(self, ev: FramingError) -> None:
        """§5 of STYLE: a peer's malformed message becomes a 4xx where one can be built."""
        self.service.parse_errors += 1
        log.info("flow %d: malformed input: %d %s", self.id, ev.status_code, ev.reason)
        if ev.data:
            try:
                msg = parse_message(ev.data, max_message_bytes=self.service.max_message_bytes, strict=False)
            except (SipParseError, ValueError):
                msg = None  # not even the start line and header lines could be read
            if msg is not None:
                self.answer_error(msg, ev.status_code, ev.reason)
        if ev.fatal:
            self.close()

    def answer_error(self, msg: Request | Response, status: int, reason: str) -> None:
        if not isinstance(msg, Request) or msg.method == "ACK":
            return
        try:
            if msg.top_via is not None:
                self.write(bytes(make_response(msg, status, reason)))
        except SipParseError:
            pass  # not even the Via/To/From could be read: nothing to answer to

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closing:
            return
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            log.warning("flow %d: peer not reading, closing", self.id)
            self.closing = True  # once: abort() reports connection_lost only later
            self.transport.abort()
            return
        self.service.messages_out += 1
        self._batch.add(data)

    def flush(self) -> None:
        self._batch.flush()

    def _write_now(self, data: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closing:
            self.flush()
            self.closing = True
            self.transport.close()


@dataclass
class _EchoEntry:
    sock: socket.socket
    task: asyncio.Task[Any]
    transport: asyncio.BaseTransport | None = None
    closed: bool = False


@dataclass
class _EchoSockets:
    """`EchoPorts` for the call core: one UDP socket per echo call on the node's address."""

    host: str
    spawn: Callable[[Any], asyncio.Task[Any]]
    _entries: dict[int, _EchoEntry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, session: EchoSession) -> int:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((self.host, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        task = self.spawn(loop.create_datagram_endpoint(lambda: _EchoProtocol(session), sock=sock))
        entry = _EchoEntry(sock, task)
        self._entries[id(session)] = entry
        task.add_done_callback(lambda t: self._bound(entry, t))
        return int(sock.getsockname()[1])

    def _bound(self, entry: _EchoEntry, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            entry.sock.close()
            return
        entry.transport = task.result()[0]
        if entry.closed:
            entry.transport.close()

    def close(self, session: EchoSession) -> None:
        entry = self._entries.pop(id(session), None)
        if entry is None:
            return
        entry.closed = True
        if entry.transport is not None:
            entry.transport.close()
        elif entry.task.done():
            entry.sock.close()
        # else: _bound closes it once the endpoint exists

    def close_all(self) -> None:
        for entry in list(self._entries.values()):
            entry.closed = True
            if entry.transport is not None:
                entry.transport.close()
            else:
                entry.sock.close()
        self._entries.clear()


class _EchoProtocol(asyncio.DatagramProtocol):
    def __init__(self, session: EchoSession) -> None:
        self.session = session
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop: not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        out = self.session.receive_datagram(data)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

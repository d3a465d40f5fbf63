"""SRTP media for every call of a load run: one ticker for all streams, no task per packet.

`MediaStream` is the sans-IO core of one stream (time is an argument): which packets are due at
`now` (50 pps, 160-byte G.711-like payload, SRTP-protected), and the accounting of what comes
back (SRTP unprotect, payload check, RFC 3550 A.8 jitter via `media_relay.rtp.StreamStats`,
latency from the send stamp). `MediaEngine` is the adapter: one UDP socket per stream (each call
announces its own port in SDP, as a client would) and one ticker coroutine that sends whatever is
due on every stream each 20 ms tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from typing import Any, cast

from media_relay.rtp import RTP_HEADER_BYTES, StreamStats
from media_relay.srtp import CryptoAttribute, Direction, SrtpContext, SrtpError
from mra_client.load.stats import LogHistogram

PTIME_S = 0.02
CLOCK_RATE = 8000
PAYLOAD_BYTES = 160
MAX_BURST = 3
"""Packets a late tick may catch up per stream; beyond that they are skipped and counted."""

_RTP = struct.Struct("!BBHII")
_STAMP = struct.Struct("!Id")  # packet index, send time (perf_counter seconds)
_FILLER = bytes(range(256))[: PAYLOAD_BYTES - _STAMP.size]
_PAYLOAD_TYPE_PCMU = 0


class MediaStream:
    """One RTP stream we send (with our key) and the stream we receive back (with the peer's)."""

    __slots__ = (
        "auth_failures",
        "in_ctx",
        "latency",
        "mismatched",
        "next_index",
        "other_payload",
        "out_ctx",
        "received",
        "remote",
        "sent",
        "skipped",
        "ssrc",
        "start",
        "stats",
        "stop_at",
    )

    def __init__(
        self,
        ours: CryptoAttribute,
        theirs: CryptoAttribute,
        remote: tuple[str, int],
        start: float,
        latency: LogHistogram,
    ) -> None:
        self.out_ctx = SrtpContext.from_crypto(ours, Direction.OUTBOUND)
        self.in_ctx = SrtpContext.from_crypto(theirs, Direction.INBOUND)
        self.remote = remote
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.start = start
        self.stop_at: float | None = None
        self.next_index = 0
        self.sent = 0
        self.received = 0
        self.skipped = 0
        self.mismatched = 0
        self.auth_failures = 0
        self.other_payload = 0
        self.stats = StreamStats(CLOCK_RATE)
        self.latency = latency

    def due(self, now: float) -> list[bytes]:
        """The SRTP packets to send at `now` (the schedule is start + i * 20 ms)."""
        if self.stop_at is not None and now >= self.stop_at:
            return []
        target = int((now - self.start) / PTIME_S + 1e-6) + 1  # 1e-6: float error in the tick
        if target - self.next_index > MAX_BURST:
            self.skipped += target - self.next_index - MAX_BURST
            self.next_index = target - MAX_BURST
        out = []
        while self.next_index < target:
            i = self.next_index
            self.next_index += 1
            # RTP timestamp from the send time, so receive jitter measures the path, not the ticker.
            ts = int(now * CLOCK_RATE) & 0xFFFFFFFF
            header = _RTP.pack(0x80, _PAYLOAD_TYPE_PCMU, i & 0xFFFF, ts, self.ssrc)
            out.append(self.out_ctx.protect(header + _STAMP.pack(i, now) + _FILLER))
            self.sent += 1
        return out

    def receive(self, data: bytes, now: float) -> None:
        try:
            plain = self.in_ctx.unprotect(data)
        except SrtpError:
            self.auth_failures += 1
            return
        if plain[1] & 0x7F != _PAYLOAD_TYPE_PCMU:
            self.other_payload += 1  # e.g. a comfort-noise packet a relay sends to open the path
            return
        body = plain[RTP_HEADER_BYTES:]
        if len(body) != PAYLOAD_BYTES or body[_STAMP.size :] != _FILLER:
            self.mismatched += 1
            return
        _, sent_at = _STAMP.unpack_from(body)
        self.received += 1
        self.stats.update(plain, now)
        self.latency.add((now - sent_at) * 1000.0)

    @property
    def jitter_ms(self) -> float:
        return round(self.stats.jitter_ms, 3)


class _StreamSocket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.stream: MediaStream | None = None
        self.errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport does not subclass asyncio.DatagramTransport: no isinstance here.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        stream = self.stream
        if stream is not None:
            stream.receive(data, time.perf_counter())

    def error_received(self, exc: Exception) -> None:
        self.errors += 1  # e.g. ICMP port unreachable after the far end closed: counted, not fatal


class MediaEngine:
    """Owns the media sockets of a run and the single ticker that feeds all streams."""

    def __init__(self) -> None:
        self._sockets: dict[int, _StreamSocket] = {}
        self._active: dict[int, tuple[MediaStream, _StreamSocket]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ids = 0
        self.socket_errors = 0

    async def open(self, host: str) -> tuple[int, int]:
        """A UDP socket on `host`; returns (handle, port) for the SDP."""
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(_StreamSocket, local_addr=(host, 0))
        self._ids += 1
        self._sockets[self._ids] = proto
        return self._ids, int(transport.get_extra_info("sockname")[1])

    def start(self, handle: int, stream: MediaStream) -> None:
        proto = self._sockets[handle]
        proto.stream = stream
        self._active[handle] = (stream, proto)
        if proto.transport is not None:  # the first packet now: a relay latches on it (spec §7)
            for packet in stream.due(time.perf_counter()):
                proto.transport.sendto(packet, stream.remote)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._tick())

    def stop_sending(self, handle: int) -> None:
        """Stop sending on the stream; keep receiving (what is in flight still counts)."""
        entry = self._active.pop(handle, None)
        if entry is not None:
            entry[0].stop_at = time.perf_counter()

    def close(self, handle: int) -> None:
        self._active.pop(handle, None)
        proto = self._sockets.pop(handle, None)
        if proto is not None:
            self.socket_errors += proto.errors
            if proto.transport is not None:
                proto.transport.close()

    def live_totals(self) -> tuple[int, int]:
        """Packets sent and received so far by the streams of calls still open."""
        sent = received = 0
        for proto in self._sockets.values():
            if proto.stream is not None:
                sent += proto.stream.sent
                received += proto.stream.received
        return sent, received

    @property
    def active_streams(self) -> int:
        return len(self._active)

    async def _tick(self) -> None:
        next_tick = time.perf_counter()
        while self._active:
            now = time.perf_counter()
            for stream, proto in list(self._active.values()):
                transport = proto.transport
                if transport is None:
                    continue
                for packet in stream.due(now):
                    transport.sendto(packet, stream.remote)
            next_tick += PTIME_S
            delay = next_tick - time.perf_counter()
            if delay < -PTIME_S:  # far behind (CPU starved): re-anchor, packets were counted as skipped
                next_tick = time.perf_counter()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    async def aclose(self) -> None:
        for handle in list(self._sockets):
            self.close(handle)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

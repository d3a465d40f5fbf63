"""Loopback integration of the asyncio adapter: real UDP sockets, latching, SRTP transcoding."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

import pytest

from media_relay.events import StreamTimedOut
from media_relay.srtp import Direction, SrtpContext, SrtpTranscoder, generate_crypto
from media_relay.table import LegSpec, PortAllocator
from media_relay.worker import RelayWorker

# Every test here runs on the native fast path and on the pure-Python path.
pytestmark = pytest.mark.usefixtures("relay_path")

HOST = "127.0.0.1"
BATCH = 50


def rtp(seq: int, ssrc: int = 0xABC) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, ssrc) + bytes(160)


class Peer(asyncio.DatagramProtocol):
    """A UDP endpoint that records what it receives and signals when ``want`` packets arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.want = 0
        self.enough: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        if len(self.received) >= self.want and not self.enough.done():
            self.enough.set_result(None)

    def expect(self, total: int) -> asyncio.Future[None]:
        self.want = total
        self.enough = asyncio.get_running_loop().create_future()
        if len(self.received) >= total:
            self.enough.set_result(None)
        return self.enough

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))


async def peer() -> Peer:
    _, proto = await asyncio.get_running_loop().create_datagram_endpoint(Peer, local_addr=(HOST, 0))
    return proto


async def until(predicate: Callable[[], bool]) -> None:
    """Explicit readiness: yield to the loop until ``predicate`` holds (bounded)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def pump(src: Peer, dst: Peer, port: int, packets: list[bytes]) -> None:
    """Send in batches, waiting for each batch to arrive (no sleeps; bounded by the test timeout)."""
    base = len(dst.received)
    for i in range(0, len(packets), BATCH):
        chunk = packets[i : i + BATCH]
        done = dst.expect(base + i + len(chunk))
        for p in chunk:
            src.send(p, port)
        await asyncio.wait_for(done, 5.0)


async def test_relays_both_ways_with_latching() -> None:
    worker = RelayWorker(HOST, allocator=PortAllocator(47000, 47999))
    client, far, probe = await peer(), await peer(), await peer()
    try:
        a_rtp, a_rtcp = await worker.bind_pair()
        b_rtp, _ = await worker.bind_pair()
        assert a_rtcp == a_rtp + 1 and a_rtp % 2 == 0
        worker.add_stream(
            "s1",
            LegSpec.dedicated(a_rtp, latch=True),
            LegSpec.dedicated(b_rtp, latch=False, remote_rtp=(HOST, far.port), remote_rtcp=(HOST, far.port)),
        )
        # The far end speaks first: the client leg has not latched, so nothing may be sent to it.
        done = probe.expect(1)
        far.send(rtp(0), b_rtp)
        probe.send(rtp(0), b_rtp)  # from a wrong source: dropped as unlatched
        # Readiness without sleeping: a packet sent after them on a known path has arrived.
        client_first = far.expect(1)
        client.send(rtp(1), a_rtp)
        await asyncio.wait_for(client_first, 5.0)
        leg_b = worker.table.get_stream("s1").legs[1]
        await until(lambda: leg_b.rtp.not_latched_drops == 1 and leg_b.rtp.unlatched_drops == 1)
        assert not done.done()

        await pump(client, far, a_rtp, [rtp(i) for i in range(2, 302)])
        assert len(far.received) == 301
        assert all(addr == (HOST, b_rtp) for _, addr in far.received)
        assert [d for d, _ in far.received] == [rtp(i) for i in range(1, 302)]

        await pump(far, client, b_rtp, [rtp(i, ssrc=5) for i in range(300)])
        assert len(client.received) == 300
        assert all(addr == (HOST, a_rtp) for _, addr in client.received)

        stats = worker.stats()
        legs = stats["streams"][0]["legs"]
        assert legs[0]["rx_packets"] == 301 and legs[0]["tx_packets"] == 300
        assert legs[0]["rtp"]["lost"] == 0 and legs[0]["rtp"]["expected"] == 301
        assert legs[0]["remote_rtp"] == f"{HOST}:{client.port}"
        assert stats["worker"]["allocator_in_use"] == 2

        worker.remove_stream("s1")
        assert worker.allocator is not None and worker.allocator.in_use == 0
        assert a_rtp not in worker.ports
    finally:
        for p in (client, far, probe):
            assert p.transport is not None
            p.transport.close()
        await worker.close()


async def test_demux_port_and_inactivity_timeout() -> None:
    timeouts: asyncio.Queue[StreamTimedOut] = asyncio.Queue()
    worker = RelayWorker(HOST, allocator=PortAllocator(48000, 48999), on_timeout=timeouts.put_nowait)
    client, c_side = await peer(), await peer()
    try:
        shared_rtp = await worker.bind_port(0)
        shared_rtcp = await worker.bind_port(0)
        a_rtp, _ = await worker.bind_pair()
        worker.add_stream(
            "e1",
            LegSpec.dedicated(a_rtp, latch=True),
            LegSpec.demuxed(shared_rtp, shared_rtcp, (HOST, c_side.port), (HOST, c_side.port + 1)),
            inactivity_timeout_s=0.2,
        )
        first = c_side.expect(1)
        client.send(rtp(1), a_rtp)
        await asyncio.wait_for(first, 5.0)
        assert c_side.received[0][1] == (HOST, shared_rtp)
        await pump(c_side, client, shared_rtp, [rtp(i) for i in range(20)])
        event = await asyncio.wait_for(timeouts.get(), 5.0)
        assert event.stream_id == "e1" and event.idle_s >= 0.2
        assert "e1" not in worker.table
        assert worker.allocator is not None and worker.allocator.in_use == 0
    finally:
        for p in (client, c_side):
            assert p.transport is not None
            p.transport.close()
        await worker.close()


@pytest.mark.parametrize("suite", ["AES_CM_128_HMAC_SHA1_80", "AEAD_AES_128_GCM"])
async def test_transcoding_worker_srtp_outside_plain_inside(suite: str) -> None:
    worker = RelayWorker(HOST, allocator=PortAllocator(49000, 49999), transcoding=True)
    outside, inside = await peer(), await peer()
    try:
        out_rtp, _ = await worker.bind_pair()
        in_rtp, _ = await worker.bind_pair()
        worker.add_stream(
            "c1",
            LegSpec.dedicated(out_rtp, latch=True),
            LegSpec.dedicated(
                in_rtp, latch=False, remote_rtp=(HOST, inside.port), remote_rtcp=(HOST, inside.port)
            ),
        )
        theirs, mine = generate_crypto(1, suite), generate_crypto(1, suite)
        worker.table.set_transcoder(
            "c1", 0, SrtpTranscoder(SrtpContext.from_crypto(theirs, Direction.INBOUND), None)
        )
        worker.table.set_transcoder(
            "c1", 1, SrtpTranscoder(None, SrtpContext.from_crypto(mine, Direction.OUTBOUND))
        )
        sender = SrtpContext.from_crypto(theirs, Direction.OUTBOUND)
        receiver = SrtpContext.from_crypto(mine, Direction.INBOUND)

        forged = bytearray(sender.protect(rtp(0)))
        forged[-1] ^= 1
        outside.send(bytes(forged), out_rtp)  # fails authentication: dropped, does not latch
        await pump(outside, inside, out_rtp, [sender.protect(rtp(i)) for i in range(1, 101)])
        assert [d for d, _ in inside.received] == [rtp(i) for i in range(1, 101)]
        assert worker.table.get_stream("c1").legs[0].rtp.transcode_drops == 1

        await pump(inside, outside, in_rtp, [rtp(i, ssrc=9) for i in range(100)])
        assert [receiver.unprotect(d) for d, _ in outside.received] == [rtp(i, ssrc=9) for i in range(100)]
    finally:
        for p in (outside, inside):
            assert p.transport is not None
            p.transport.close()
        await worker.close()

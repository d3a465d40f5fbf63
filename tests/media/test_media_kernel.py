"""The kernel forwarder (``media_relay/kernel.py``): its eBPF program on ``lo``, packet by packet.

Real datagrams over loopback: what an installed flow forwards arrives at the destination from the
egress socket's address, byte for byte; everything the table must see (strangers, garbage,
oversized datagrams, RTCP without a route, anything after removal) arrives at the relay's own
socket unchanged. The program's RFC 3550 sequence accounting equals ``StreamStats``'s for any
sequence of packets.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_relay import kernel
from media_relay.rtp import StatsState, StreamStats
from tests.media.kernel_tools import KernelRig, require_kernel

Addr = tuple[str, int]


def rtp(seq: int, ts: int = 0, ssrc: int = 0x1234, pt: int = 0, size: int = 172) -> bytes:
    head = struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    return (head + bytes(max(0, size - 12)))[:size]


def rtcp(kind: int = 201, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", 0x80, kind, 1, ssrc)


class Rig(KernelRig):
    """KernelRig with E's forwarder and a second egress/destination pair for RTCP."""

    def __init__(self) -> None:
        super().__init__()
        self.rtcp_egress = self._sock("127.0.0.2")
        self.rtcp_dest = self._sock("127.0.0.3")
        self.kernel: kernel.KernelForwarder = kernel.KernelForwarder.open()

    def install(
        self, *, rtcp_port: bool = False, rtcp_route: bool = True, state: StatsState | None = None
    ) -> bytes:
        n = self.name
        return self.kernel.install(
            n(self.relay),
            n(self.client),
            rtcp_port,
            None if rtcp_port else (n(self.egress), n(self.dest)),
            (n(self.rtcp_egress), n(self.rtcp_dest)) if rtcp_route else None,
            8000,
            StreamStats(8000).get_state() if state is None else state,
        )


@pytest.fixture
def rig() -> Iterator[Rig]:
    require_kernel()
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def empty(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


def test_an_installed_flow_is_rewritten_counted_and_delivered(rig: Rig) -> None:
    key = rig.install()
    for i in range(20):
        rig.send(rtp(100 + i, 160 * i))
        data, src = rig.dest.recvfrom(4096)
        assert data == rtp(100 + i, 160 * i) and src == rig.name(rig.egress)
    rig.send(rtcp())  # RTCP by payload type on the RTP port: the RTCP route
    data, src = rig.rtcp_dest.recvfrom(4096)
    assert data == rtcp() and src == rig.name(rig.rtcp_egress)
    got = rig.kernel.read(key)
    assert got is not None
    rx_p, rx_b, rtp_p, rtp_b, rtcp_p, rtcp_b, seen, state = got
    assert (rx_p, rx_b, rtp_p, rtp_b, rtcp_p, rtcp_b) == (21, 20 * 172 + 8, 20, 20 * 172, 1, 8)
    assert seen is not None and abs(seen - time.monotonic()) < 5.0
    assert state[:2] == (20, 20 * 172) and state[3] == 0x1234  # RTCP is not in the RTP statistics
    assert state[4:9] == (20, 100, 119, 0, 65537)
    assert empty(rig.relay)  # the relay's socket saw nothing


def test_flows_sharing_a_port_keep_it_in_the_programs_port_set(rig: Rig) -> None:
    """The program skips its flow lookup for ports without flows (a bitmap, ``PortSet``): two
    flows on one relay port (E's demux port has one per call) keep the port's bit until the
    last goes, and a re-install does not count twice."""
    n = rig.name
    second = rig._sock("127.0.0.1")
    key = rig.install()
    rig.install()  # the same flow again
    other = rig.kernel.install(
        n(rig.relay),
        n(second),
        False,
        (n(rig.egress), n(rig.dest)),
        None,
        8000,
        StreamStats(8000).get_state(),
    )
    rig.kernel.remove(key)
    second.sendto(rtp(1), n(rig.relay))
    assert rig.dest.recvfrom(4096) == (rtp(1), n(rig.egress))  # the other flow still forwards
    rig.kernel.remove(other)
    second.sendto(rtp(2), n(rig.relay))
    assert rig.relay.recv(4096) == rtp(2)  # no flow, no bit: the relay's socket
    rig.install()
    rig.send(rtp(3))
    assert rig.dest.recvfrom(4096) == (rtp(3), n(rig.egress))


def test_what_the_table_must_see_reaches_the_relay_socket_unchanged(rig: Rig) -> None:
    rig.install(rtcp_route=False)
    stranger = rig._sock("127.0.0.1")
    hostile = [
        (rig.client, b"\x40" + rtp(1)[1:]),  # RTP version 1
        (rig.client, b"\x80\x00\x00"),  # shorter than RTCP's header
        (rig.client, rtp(2, size=11)),  # not RTCP, shorter than RTP's header
        (rig.client, rtp(3, size=1501)),  # over the relay's datagram limit
        (rig.client, rtcp()),  # RTCP with no RTCP route
        (stranger, rtp(4)),  # from an address the flow is not for
        (rig.client, b""),  # empty
    ]
    for src, data in hostile:
        src.sendto(data, rig.name(rig.relay))
        got, addr = rig.relay.recvfrom(4096)
        assert (got, addr) == (data, rig.name(src))
    assert empty(rig.dest) and empty(rig.rtcp_dest)


def test_an_rtcp_port_forwards_rtcp_and_removal_hands_the_port_back(rig: Rig) -> None:
    key = rig.install(rtcp_port=True)
    rig.send(rtcp(200))
    assert rig.rtcp_dest.recvfrom(4096)[0] == rtcp(200)
    rig.send(rtp(7))  # on an RTCP port every packet is RTCP (as the native forwarder)
    assert rig.rtcp_dest.recvfrom(4096)[0] == rtp(7)
    last = rig.kernel.remove(key)
    assert last is not None and last[:6] == (2, 8 + 172, 0, 0, 2, 8 + 172)
    assert last[7][0] == 0  # no RTP statistics on an RTCP port
    assert rig.kernel.read(key) is None and rig.kernel.remove(key) is None
    rig.send(rtcp(200))
    assert rig.relay.recvfrom(4096)[0] == rtcp(200)


def test_only_ipv4_loopback_flows_are_accepted(rig: Rig) -> None:
    with pytest.raises(ValueError, match="loopback"):
        rig.kernel.key(("192.0.2.1", 5000), ("127.0.0.1", 4000))
    with pytest.raises(ValueError, match="loopback"):
        rig.kernel.key(("127.0.0.1", 5000), ("::1", 4000))
    with pytest.raises(ValueError, match="clock rate"):
        rig.kernel.install(
            ("127.0.0.1", 1), ("127.0.0.1", 2), False, None, None, 0, StreamStats(8000).get_state()
        )


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0x1234, 0x1234, 0x1234, 0xBEEF]), st.integers(0, 0xFFFF)),
        min_size=1,
        max_size=60,
    )
)
def test_sequence_accounting_equals_stream_stats(packets: list[tuple[int, int]]) -> None:
    """Wraps, reorders, duplicates, jumps, SSRC changes: the program's A.1 state is StreamStats's
    (arrival times differ, so transit and jitter are compared for sanity only)."""
    require_kernel()
    rig = Rig()
    try:
        key = rig.install()
        stats = StreamStats(8000)
        for ssrc, seq in packets:
            data = rtp(seq, seq * 160, ssrc=ssrc)
            rig.send(data)
            assert rig.dest.recvfrom(4096)[0] == data
            stats.update(data, time.monotonic())
        got = rig.kernel.read(key)
        assert got is not None
        mine, theirs = got[7], stats.get_state()
        assert (mine[:2], mine[3:9]) == (theirs[:2], theirs[3:9])
        assert mine[10] >= 0
    finally:
        rig.close()


def test_read_all_equals_reading_each_flow(rig: Rig) -> None:
    """``read_all`` (BPF_MAP_LOOKUP_BATCH, what a status read uses) returns what ``read`` does."""
    key = rig.install()
    others = [
        rig.kernel.install(
            ("127.0.0.9", 20000 + i),
            ("127.0.0.1", 30000 + i),
            False,
            None,
            None,
            8000,
            StreamStats(8000).get_state(),
        )
        for i in range(300)
    ]
    for i in range(5):
        rig.send(rtp(i))
        rig.dest.recvfrom(4096)
    every = rig.kernel.read_all()
    assert set(every) == {key, *others}
    assert all(every[k] == rig.kernel.read(k) for k in every)
    assert every[key][0] == 5

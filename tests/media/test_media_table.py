"""The sans-IO relay table: allocator, latching, demux, drops, timers, counters (fake clock)."""

from __future__ import annotations

import json
import struct

import pytest

from media_relay.errors import PortsExhaustedError, TranscodeError
from media_relay.events import LegLatched, StreamTimedOut
from media_relay.table import LegSpec, PortAllocator, RelayTable

CLIENT = ("198.51.100.7", 40000)
CLIENT_RTCP = ("198.51.100.7", 40001)
C_RTP = ("127.10.3.1", 36100)
C_RTCP = ("127.10.3.1", 36101)


def rtp(seq: int, ssrc: int = 7) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + bytes(160)


def rtcp() -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, 7)


# -- allocator ------------------------------------------------------------------------------------


def test_allocator_hands_out_even_odd_pairs() -> None:
    alloc = PortAllocator(36001, 36008)  # odd start rounds up; pairs 36002/3, 36004/5, 36006/7
    pairs = [alloc.allocate() for _ in range(3)]
    assert pairs == [(36002, 36003), (36004, 36005), (36006, 36007)]
    assert alloc.capacity == 3 and alloc.in_use == 3
    with pytest.raises(PortsExhaustedError):
        alloc.allocate()


def test_allocator_release_and_reuse_last() -> None:
    alloc = PortAllocator(36002, 59999)
    assert alloc.capacity == 11999
    first, _ = alloc.allocate()
    second, _ = alloc.allocate()
    alloc.release(first)
    # The freed pair goes to the back of the queue: not reused while others are free.
    assert alloc.allocate()[0] == second + 2
    with pytest.raises(ValueError):
        alloc.release(first)
    small = PortAllocator(36002, 36003)
    p, _ = small.allocate()
    small.release(p)
    assert small.allocate() == (36002, 36003)


def test_allocator_rejects_empty_range() -> None:
    with pytest.raises(ValueError):
        PortAllocator(36003, 36003)


# -- E: client leg latches, C leg is demuxed on 2776/2777 --------------------------------------


def e_table(**kw: object) -> RelayTable:
    table = RelayTable(default_inactivity_timeout_s=30.0)
    table.add_stream(
        "call1-audio",
        LegSpec.dedicated(36002, latch=True),
        LegSpec.demuxed(2776, 2777, C_RTP, C_RTCP),
        now=0.0,
        **kw,  # type: ignore[arg-type]
    )
    return table


def test_symmetric_rtp_nothing_sent_to_client_before_it_speaks() -> None:
    table = e_table()
    # C sends first (opens the DMZ firewall); E cannot send to the client yet.
    assert table.receive_datagram(2776, rtp(1), C_RTP, now=0.1) is None
    leg_c = table.get_stream("call1-audio").legs[1]
    assert leg_c.rtp.not_latched_drops == 1
    # The client's first packet latches its address and is relayed to C from the demux port.
    assert table.receive_datagram(36002, rtp(1), CLIENT, now=0.2) == (2776, C_RTP)
    assert table.drain_events() == [LegLatched("call1-audio", 0, False, CLIENT, 0.2)]
    # Now C's media goes to exactly where the client's came from, out of the client-side port.
    assert table.receive_datagram(2776, rtp(2), C_RTP, now=0.3) == (36002, CLIENT)


def test_rtcp_latches_separately_on_the_odd_port() -> None:
    table = e_table()
    assert table.receive_datagram(2777, rtcp(), C_RTCP, now=0.1) is None
    assert table.receive_datagram(36003, rtcp(), CLIENT_RTCP, now=0.2) == (2777, C_RTCP)
    assert table.receive_datagram(2777, rtcp(), C_RTCP, now=0.3) == (36003, CLIENT_RTCP)
    # RTP towards the client is still not latched.
    assert table.receive_datagram(2776, rtp(1), C_RTP, now=0.4) is None


def test_latched_leg_drops_other_sources() -> None:
    table = e_table()
    table.receive_datagram(36002, rtp(1), CLIENT, now=0.1)
    attacker = ("203.0.113.66", 40000)
    assert table.receive_datagram(36002, rtp(2), attacker, now=0.2) is None
    assert table.receive_datagram(36002, rtp(3), (CLIENT[0], 40002), now=0.2) is None
    ep = table.get_stream("call1-audio").legs[0].rtp
    assert ep.unlatched_drops == 2
    assert ep.rx_packets == 1
    assert ep.stats.packets == 1  # dropped packets never reach the loss/jitter estimators


def test_expected_ip_restricts_latching() -> None:
    table = RelayTable()
    table.add_stream(
        "s",
        LegSpec.dedicated(36002, latch=True, expected_ip="198.51.100.7"),
        LegSpec.dedicated(36004, latch=False, remote_rtp=C_RTP, remote_rtcp=C_RTCP),
        now=0.0,
    )
    assert table.receive_datagram(36002, rtp(1), ("203.0.113.1", 5000), now=0.1) is None
    assert table.receive_datagram(36002, rtp(1), CLIENT, now=0.2) == (36004, C_RTP)


def test_relatch_learns_a_new_address() -> None:
    table = e_table()
    table.receive_datagram(36002, rtp(1), CLIENT, now=0.1)
    table.relatch("call1-audio", 0)
    moved = ("198.51.100.7", 41000)
    assert table.receive_datagram(36002, rtp(2), moved, now=0.2) == (2776, C_RTP)
    assert table.receive_datagram(2776, rtp(2), C_RTP, now=0.3) == (36002, moved)


def test_demux_tells_streams_apart_by_c_source_address() -> None:
    table = RelayTable()
    for i in range(3):
        c_addr = ("127.10.3.1", 36100 + 2 * i)
        table.add_stream(
            f"s{i}",
            LegSpec.dedicated(36002 + 2 * i, latch=True),
            LegSpec.demuxed(2776, 2777, c_addr, (c_addr[0], c_addr[1] + 1)),
            now=0.0,
        )
        client = ("198.51.100.9", 50000 + i)
        assert table.receive_datagram(36002 + 2 * i, rtp(1), client, now=0.1) == (2776, c_addr)
    for i in range(3):
        c_addr = ("127.10.3.1", 36100 + 2 * i)
        assert table.receive_datagram(2776, rtp(5), c_addr, now=0.2) == (
            36002 + 2 * i,
            ("198.51.100.9", 50000 + i),
        )
    assert table.receive_datagram(2776, rtp(5), ("127.10.3.1", 9), now=0.3) is None
    assert table.unknown_source_drops == 1
    table.remove_stream("s1")
    assert table.receive_datagram(2776, rtp(6), ("127.10.3.1", 36102), now=0.4) is None
    assert table.unknown_source_drops == 2


def test_duplicate_ports_and_demux_keys_refused() -> None:
    table = e_table()
    with pytest.raises(ValueError):
        table.add_stream("x", LegSpec.dedicated(36002), LegSpec.dedicated(36010), now=0.0)
    with pytest.raises(ValueError):
        table.add_stream(
            "y", LegSpec.dedicated(36010), LegSpec.demuxed(2776, 2777, C_RTP, ("1.2.3.4", 1)), now=0
        )
    with pytest.raises(ValueError):
        table.add_stream("z", LegSpec.dedicated(2776), LegSpec.dedicated(36010), now=0.0)
    with pytest.raises(ValueError):
        table.add_stream("call1-audio", LegSpec.dedicated(36020), LegSpec.dedicated(36022), now=0.0)
    assert len(table) == 1


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x80\x00\x00", "short"),
        (b"\x80\x00" + bytes(8), "RTP shorter than its header"),
        (b"\x40" + bytes(171), "version 1"),
        (b"GET / HTTP/1.1\r\n\r\n", "not RTP"),
        (b"\x80\x00" + bytes(1500), "longer than 1500"),
    ],
)
def test_garbage_dropped_and_counted(data: bytes, why: str) -> None:
    table = e_table()
    assert table.receive_datagram(36002, data, CLIENT, now=0.1) is None, why
    assert table.garbage_drops == 1
    leg = table.get_stream("call1-audio").legs[0]
    assert leg.rtp.garbage_drops == 1
    assert leg.rtp.remote is None  # garbage never latches


def test_unknown_port_counted() -> None:
    table = e_table()
    assert table.receive_datagram(1, rtp(1), CLIENT, now=0.0) is None
    assert table.unknown_port_drops == 1


def test_rtcp_mux_legs() -> None:
    # Client muxes RTP+RTCP on one port; C's side does not: RTCP from the client goes out 2777.
    table = RelayTable()
    table.add_stream(
        "m",
        LegSpec.dedicated(36002, 36002, latch=True),
        LegSpec.demuxed(2776, 2777, C_RTP, C_RTCP),
        now=0.0,
    )
    assert table.receive_datagram(36002, rtp(1), CLIENT, now=0.1) == (2776, C_RTP)
    assert table.receive_datagram(36002, rtcp(), CLIENT, now=0.1) == (2777, C_RTCP)
    assert table.receive_datagram(2777, rtcp(), C_RTCP, now=0.2) == (36002, CLIENT)
    ep = table.get_stream("m").legs[0].rtp
    assert ep.stats.packets == 1  # RTCP is not fed to the RTP estimators


def test_counters_and_snapshot() -> None:
    table = e_table(clock_rate=8000)
    for seq in (1, 2, 4, 5):  # 3 lost
        table.receive_datagram(36002, rtp(seq), CLIENT, now=seq * 0.02)
    for seq in range(1, 4):
        table.receive_datagram(2776, rtp(seq, ssrc=9), C_RTP, now=0.2 + seq * 0.02)
    snap = table.snapshot()
    json.dumps(snap)
    legs = snap["streams"][0]["legs"]
    assert legs[0]["rx_packets"] == 4 and legs[0]["rx_bytes"] == 4 * 172
    assert legs[0]["tx_packets"] == 3 and legs[1]["tx_packets"] == 4
    assert legs[0]["remote_rtp"] == "198.51.100.7:40000"
    assert legs[0]["rtp"]["lost"] == 1 and legs[0]["rtp"]["expected"] == 5
    assert legs[1]["kind"] == "demux"
    totals = snap["totals"]
    assert totals["rx_packets"] == 7 and totals["tx_packets"] == 7
    table.remove_stream("call1-audio")
    assert table.totals()["rx_packets"] == 7  # removed streams' counters are kept in totals
    assert table.totals()["streams"] == 0


def test_inactivity_timeout_with_fake_clock() -> None:
    table = RelayTable(default_inactivity_timeout_s=30.0)
    table.add_stream("a", LegSpec.dedicated(36002), LegSpec.dedicated(36004, latch=False), now=0.0)
    table.add_stream(
        "b",
        LegSpec.dedicated(36006),
        LegSpec.dedicated(36008, latch=False),
        now=10.0,
        inactivity_timeout_s=5.0,
    )
    table.add_stream(
        "forever",
        LegSpec.dedicated(36010),
        LegSpec.dedicated(36012, latch=False),
        now=0.0,
        inactivity_timeout_s=0,
    )
    assert table.get_timer() == 0.0  # a zero timeout is due at once
    table.get_stream("forever").inactivity_timeout_s = None  # no timeout at all
    assert table.handle_timer(0.0) == []
    assert table.get_timer() == 15.0
    table.receive_datagram(36006, rtp(1), CLIENT, now=14.0)  # activity on b
    assert table.handle_timer(15.0) == []
    assert table.get_timer() == 19.0
    assert table.handle_timer(19.0) == [StreamTimedOut("b", 5.0, 19.0)]
    assert "b" not in table
    assert table.get_timer() == 30.0
    table.receive_datagram(36002, rtp(1), CLIENT, now=29.0)  # activity even if dropped at egress (no remote)
    assert table.handle_timer(30.0) == []
    assert table.handle_timer(59.0) == [StreamTimedOut("a", 30.0, 59.0)]
    assert table.get_timer() is None
    assert "forever" in table


def test_set_remote_moves_a_fixed_leg_and_a_demux_key() -> None:
    table = e_table()
    table.receive_datagram(36002, rtp(1), CLIENT, now=0.1)
    new_c = ("127.10.3.1", 36200)
    table.set_remote("call1-audio", 1, new_c, (new_c[0], 36201))
    assert table.receive_datagram(2776, rtp(2), C_RTP, now=0.2) is None
    assert table.receive_datagram(2776, rtp(2), new_c, now=0.2) == (36002, CLIENT)
    assert table.receive_datagram(36002, rtp(3), CLIENT, now=0.3) == (2776, new_c)


class FakeTranscoder:
    def __init__(self) -> None:
        self.seen: list[tuple[bytes, bool]] = []

    def transcode(self, data: bytes, rtcp: bool) -> bytes:
        self.seen.append((data, rtcp))
        if data.endswith(b"BAD"):
            raise TranscodeError("auth")
        return data + b"+T"


def test_transcoder_hook_authenticates_before_latching() -> None:
    table = RelayTable()
    table.add_stream(
        "c",
        LegSpec.dedicated(36002, latch=True),
        LegSpec.dedicated(
            36004, latch=False, remote_rtp=("10.0.0.5", 20000), remote_rtcp=("10.0.0.5", 20001)
        ),
        now=0.0,
    )
    fake = FakeTranscoder()
    table.set_transcoder("c", 0, fake)
    assert table.receive_and_transcode(36002, rtp(1) + b"BAD", CLIENT, now=0.1) is None
    leg = table.get_stream("c").legs[0]
    assert leg.rtp.transcode_drops == 1 and leg.rtp.remote is None
    out = table.receive_and_transcode(36002, rtp(2), CLIENT, now=0.2)
    assert out == (36004, ("10.0.0.5", 20000), rtp(2) + b"+T")
    assert table.receive_and_transcode(36003, rtcp(), CLIENT_RTCP, now=0.2) == (
        36005,
        ("10.0.0.5", 20001),
        rtcp() + b"+T",
    )
    assert [r for _, r in fake.seen] == [False, False, True]
    # The other direction has no transcoder: passed through unchanged.
    assert table.receive_and_transcode(36004, rtp(9), ("10.0.0.5", 20000), now=0.3) == (36002, CLIENT, rtp(9))
    with pytest.raises(ValueError):
        e_table().set_transcoder("call1-audio", 1, fake)

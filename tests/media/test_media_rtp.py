"""RTP/RTCP header parsing and the RFC 3550 A.1 / A.8 estimators."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_relay.rtp import RtcpHeader, RtpHeader, RtpParseError, StreamStats, is_rtcp, is_rtp_or_rtcp


def rtp(seq: int, ts: int = 0, ssrc: int = 0x1234, pt: int = 0, marker: bool = False) -> bytes:
    return struct.pack("!BBHII", 0x80, (marker << 7) | pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + bytes(160)


def test_header_parse_and_serialize() -> None:
    data = rtp(513, ts=0xDEADBEEF, ssrc=42, pt=111, marker=True)
    hdr = RtpHeader.parse(data)
    assert (hdr.version, hdr.payload_type, hdr.marker) == (2, 111, True)
    assert (hdr.sequence_number, hdr.timestamp, hdr.ssrc) == (513, 0xDEADBEEF, 42)
    assert bytes(hdr) == data[:12]


@pytest.mark.parametrize("data", [b"", b"\x80\x00", bytes(12), b"\x40" + bytes(11)])
def test_header_rejects_garbage(data: bytes) -> None:
    with pytest.raises(RtpParseError):
        RtpHeader.parse(data)


def test_rtcp_detection_for_mux() -> None:
    sr = struct.pack("!BBHI", 0x80, 200, 6, 99) + bytes(20)
    assert is_rtcp(sr) and is_rtp_or_rtcp(sr)
    assert RtcpHeader.parse(sr).packet_type == 200
    assert RtcpHeader.parse(sr).ssrc == 99
    assert not is_rtcp(rtp(1, pt=0))
    assert not is_rtcp(rtp(1, pt=96, marker=True))  # byte 224: RTP PT 96 with marker
    assert is_rtcp(struct.pack("!BBHI", 0x81, 211, 1, 1))
    with pytest.raises(RtpParseError):
        RtcpHeader.parse(rtp(1))


def feed(stats: StreamStats, seqs: list[int], ssrc: int = 0x1234) -> None:
    for i, seq in enumerate(seqs):
        stats.update(rtp(seq, ts=seq * 160, ssrc=ssrc), now=i * 0.02)


def test_no_loss_in_order() -> None:
    stats = StreamStats()
    feed(stats, list(range(100, 150)))
    assert (stats.packets, stats.expected, stats.lost) == (50, 50, 0)
    assert stats.bytes == 50 * 172


def test_gaps_counted_as_loss() -> None:
    stats = StreamStats()
    feed(stats, [*range(0, 10), *range(13, 21)])  # 10, 11, 12 missing
    assert stats.expected == 21
    assert stats.lost == 3


def test_reordering_and_duplicates() -> None:
    stats = StreamStats()
    feed(stats, [0, 1, 2, 4, 3, 5, 5, 6])  # 3 late, 5 twice
    assert stats.expected == 7
    assert stats.received == 8
    assert stats.lost == -1  # RFC 3550 A.3: duplicates can make cumulative loss negative
    assert stats.packets == 8


def test_sequence_wrap_at_65535() -> None:
    stats = StreamStats()
    seqs = [65530, 65531, 65532, 65533, 65535, 0, 1, 3, 2, 4]  # 65534 lost, 2/3 swapped
    feed(stats, seqs)
    assert stats.extended_max_seq == 65536 + 4
    assert stats.expected == 11
    assert stats.lost == 1


def test_large_jump_needs_confirmation_then_resyncs() -> None:
    stats = StreamStats()
    feed(stats, [1, 2, 3, 10000, 10001, 10002])
    # 10000 is held back as a possible stray; 10001 confirms the jump and restarts the base.
    assert stats.expected == 2
    assert stats.lost == 0
    assert stats.packets == 6


def test_new_ssrc_restarts_estimators() -> None:
    stats = StreamStats()
    feed(stats, [0, 5], ssrc=1)
    assert stats.lost == 4
    feed(stats, [700, 701], ssrc=2)
    assert (stats.ssrc, stats.expected, stats.lost) == (2, 2, 0)


def test_jitter_zero_for_perfect_pacing() -> None:
    stats = StreamStats(clock_rate=8000)
    for i in range(200):
        stats.update(rtp(i, ts=1000 + i * 160), now=5.0 + i * 0.02)
    assert stats.jitter <= 1
    assert stats.jitter_ms < 0.2


def test_jitter_converges_for_alternating_delay() -> None:
    # Every other packet arrives 10 ms late: |D| = 80 timestamp units each step, J -> 80 (A.8).
    stats = StreamStats(clock_rate=8000)
    for i in range(400):
        late = 0.010 if i % 2 else 0.0
        stats.update(rtp(i, ts=i * 160), now=i * 0.02 + late)
    assert 78 <= stats.jitter <= 81
    assert 9.7 <= stats.jitter_ms <= 10.1


def test_jitter_survives_timestamp_wrap() -> None:
    stats = StreamStats(clock_rate=8000)
    base = 0xFFFFFFFF - 160 * 50
    for i in range(100):
        stats.update(rtp(i, ts=base + i * 160), now=1.0 + i * 0.02)
    assert stats.jitter <= 1


def test_snapshot_is_plain_data() -> None:
    stats = StreamStats(clock_rate=90000)
    feed(stats, [1, 2, 4])
    snap = stats.snapshot()
    assert snap["packets"] == 3
    assert snap["lost"] == 1
    assert snap["ssrc"] == 0x1234


@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=300))
def test_stats_never_crash_and_count_every_packet(seqs: list[int]) -> None:
    stats = StreamStats()
    feed(stats, seqs)
    assert stats.packets == len(seqs)
    assert stats.received <= len(seqs)
    assert stats.expected >= 1

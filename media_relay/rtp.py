"""Minimal RTP/RTCP header parsing and receiver statistics (RFC 3550).

The relay never needs more of a packet than the fixed 12-byte RTP header: it does not touch
payloads (E relays SRTP without decrypting, spec §7). ``StreamStats.update`` is on the per-packet
hot path, so it reads seq/ts/ssrc with one precompiled ``struct`` call and keeps the RFC 3550
A.1 (sequence extension, loss) and A.8 (interarrival jitter) estimators in integer arithmetic.
"""

from __future__ import annotations

import operator
import struct
from dataclasses import dataclass
from typing import cast

RTP_VERSION = 2
RTP_HEADER_BYTES = 12
RTCP_HEADER_BYTES = 8
# RFC 5761 §4: with rtcp-mux, a second byte in 192..223 (RTP PT 64..95 with marker) is RTCP.
# This covers every assigned RTCP packet type (SR 200 .. IDMS 211 and the legacy 192..195).
RTCP_PT_MIN = 192
RTCP_PT_MAX = 223

_SEQ_MOD = 1 << 16
# RFC 3550 A.1 constants.
MAX_DROPOUT = 3000
MAX_MISORDER = 100

_SEQ_TS_SSRC = struct.Struct("!HII").unpack_from

# ``StreamStats.get_state()``: packets, bytes, last_seen, ssrc, received, base_seq, max_seq,
# cycles, bad_seq, transit, jitter16 (the native fast path keeps the same fields, fastpath.py).
StatsState = tuple[int, int, float | None, int | None, int, int, int, int, int, int, int]
# ``StreamStats`` fields in ``StatsState`` order (the order the C fast path uses too).
_STATE_FIELDS = (
    "packets",
    "bytes",
    "last_seen",
    "ssrc",
    "received",
    "_base_seq",
    "_max_seq",
    "_cycles",
    "_bad_seq",
    "_transit",
    "_jitter16",
)
_GET_STATE = operator.attrgetter(*_STATE_FIELDS)
_U32 = 0xFFFFFFFF
_HALF32 = 1 << 31


class RtpParseError(ValueError):
    """A datagram that is not an RTP/RTCP version 2 packet."""


@dataclass(frozen=True, slots=True)
class RtpHeader:
    version: int
    padding: bool
    extension: bool
    csrc_count: int
    marker: bool
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int

    @classmethod
    def parse(cls, data: bytes) -> RtpHeader:
        if len(data) < RTP_HEADER_BYTES:
            raise RtpParseError(f"RTP packet too short ({len(data)} bytes)")
        b0, b1 = data[0], data[1]
        if b0 >> 6 != RTP_VERSION:
            raise RtpParseError(f"RTP version {b0 >> 6}")
        seq, ts, ssrc = _SEQ_TS_SSRC(data, 2)
        return cls(
            version=b0 >> 6,
            padding=bool(b0 & 0x20),
            extension=bool(b0 & 0x10),
            csrc_count=b0 & 0x0F,
            marker=bool(b1 & 0x80),
            payload_type=b1 & 0x7F,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
        )

    def __bytes__(self) -> bytes:
        b0 = (self.version << 6) | (self.padding << 5) | (self.extension << 4) | self.csrc_count
        b1 = (self.marker << 7) | self.payload_type
        return struct.pack("!BBHII", b0, b1, self.sequence_number, self.timestamp, self.ssrc)


@dataclass(frozen=True, slots=True)
class RtcpHeader:
    version: int
    count: int
    packet_type: int
    length_words: int
    ssrc: int

    @classmethod
    def parse(cls, data: bytes) -> RtcpHeader:
        if len(data) < RTCP_HEADER_BYTES:
            raise RtpParseError(f"RTCP packet too short ({len(data)} bytes)")
        if data[0] >> 6 != RTP_VERSION:
            raise RtpParseError(f"RTCP version {data[0] >> 6}")
        if not is_rtcp(data):
            raise RtpParseError(f"not an RTCP packet type ({data[1]})")
        length, ssrc = struct.unpack_from("!HI", data, 2)
        return cls(data[0] >> 6, data[0] & 0x1F, data[1], length, ssrc)


def is_rtp_or_rtcp(data: bytes) -> bool:
    """Version 2 and at least an RTCP header long (the relay's garbage filter)."""
    return len(data) >= RTCP_HEADER_BYTES and data[0] >> 6 == RTP_VERSION


def is_rtcp(data: bytes) -> bool:
    """RFC 5761 §4 demultiplexing of RTCP from RTP on one port."""
    return RTCP_PT_MIN <= data[1] <= RTCP_PT_MAX


class StreamStats:
    """Receiver statistics for one RTP source (RFC 3550 A.1 / A.8), fed one packet at a time.

    Unlike A.1 there is no probation: a relay counts from the first packet it sees. A change of
    SSRC restarts the estimators (a new source, e.g. after a transfer).
    """

    __slots__ = (
        "_bad_seq",
        "_base_seq",
        "_cycles",
        "_jitter16",
        "_max_seq",
        "_transit",
        "bytes",
        "clock_rate",
        "last_seen",
        "packets",
        "received",
        "ssrc",
    )

    def __init__(self, clock_rate: int = 8000) -> None:
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        self.clock_rate = clock_rate
        self.packets = 0  # every RTP packet seen, including duplicates and pre-resync ones
        self.bytes = 0
        self.last_seen: float | None = None
        self.ssrc: int | None = None
        self.received = 0  # packets counted by A.1 since the current base
        self._base_seq = 0
        self._max_seq = 0
        self._cycles = 0
        self._bad_seq = _SEQ_MOD + 1
        self._transit = 0
        self._jitter16 = 0  # jitter * 16, in timestamp units (A.8 integer form)

    def update(self, data: bytes, now: float) -> None:
        """Account one RTP packet (caller has checked it is >= 12 bytes, version 2, not RTCP).

        Hot path: A.1's common case is inlined; rare cases (new SSRC, big jumps) call out.
        """
        seq, ts, ssrc = _SEQ_TS_SSRC(data, 2)
        self.packets += 1
        self.bytes += len(data)
        self.last_seen = now
        transit = int(now * self.clock_rate) - ts
        if ssrc != self.ssrc:
            self._restart(ssrc, seq, transit)
            return
        max_seq = self._max_seq
        udelta = (seq - max_seq) & 0xFFFF
        if udelta < MAX_DROPOUT:
            if seq < max_seq:
                self._cycles += _SEQ_MOD  # wrapped
            self._max_seq = seq
            self.received += 1
        elif udelta <= _SEQ_MOD - MAX_MISORDER:
            if not self._jump(seq):
                return
        else:
            self.received += 1  # duplicate or reordered: counted, max_seq unchanged
        # A.8: transit differences, taken modulo 2**32 so a timestamp wrap is harmless.
        d = ((transit - self._transit + _HALF32) & _U32) - _HALF32
        self._transit = transit
        if d < 0:
            d = -d
        self._jitter16 += d - ((self._jitter16 + 8) >> 4)

    def _restart(self, ssrc: int, seq: int, transit: int) -> None:
        self.ssrc = ssrc
        self._init_seq(seq)
        self._transit = transit
        self._jitter16 = 0

    def _jump(self, seq: int) -> bool:
        # A large jump: accept it only when the next packet confirms it (the peer restarted).
        if seq == self._bad_seq:
            self._init_seq(seq)
            return True
        self._bad_seq = (seq + 1) & 0xFFFF
        return False

    def _init_seq(self, seq: int) -> None:
        self._base_seq = seq
        self._max_seq = seq
        self._bad_seq = _SEQ_MOD + 1
        self._cycles = 0
        self.received = 1

    def get_state(self) -> StatsState:
        """Every field ``update`` reads or writes (the native fast path runs the same estimators
        while it forwards a flow and hands the state back, ``media_relay/fastpath.py``)."""
        return cast(StatsState, _GET_STATE(self))

    def set_state(self, state: StatsState) -> None:
        # One unpacking assignment (the fields of ``_STATE_FIELDS``, in order): several times
        # cheaper than a setattr loop, and the native path folds thousands of these at once.
        (
            self.packets,
            self.bytes,
            self.last_seen,
            self.ssrc,
            self.received,
            self._base_seq,
            self._max_seq,
            self._cycles,
            self._bad_seq,
            self._transit,
            self._jitter16,
        ) = state

    @property
    def extended_max_seq(self) -> int:
        return self._cycles + self._max_seq

    @property
    def expected(self) -> int:
        if self.ssrc is None:
            return 0
        return self.extended_max_seq - self._base_seq + 1

    @property
    def lost(self) -> int:
        """Cumulative lost packets; negative when duplicates outnumber losses (RFC 3550 A.3)."""
        return self.expected - self.received

    @property
    def jitter(self) -> int:
        """Interarrival jitter in timestamp units, as an RTCP report block carries it."""
        return self._jitter16 >> 4

    @property
    def jitter_ms(self) -> float:
        return self._jitter16 / 16 * 1000.0 / self.clock_rate

    def snapshot(self) -> dict[str, int | float | None]:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "ssrc": self.ssrc,
            "expected": self.expected,
            "lost": self.lost,
            "jitter": self.jitter,
            "jitter_ms": round(self.jitter_ms, 3),
            "last_seen": self.last_seen,
        }

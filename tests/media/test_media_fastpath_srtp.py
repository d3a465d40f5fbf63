"""C's transcoding in the native forwarder against the pure-Python table, packet by packet.

A ``CRig`` holds C's stream shape in two tables: the outside leg faces E (not latching, E's
address from SDP, always SRTP), the inside leg faces the far end (latching, pre-latched to its
SDP address; plain RTP or SRTP). One table is fed directly (``receive_and_transcode``) with
pylibsrtp transcoders; the other has native (libsrtp2) transcoders and its established flows in
a ``Forwarder`` fed by real loopback sockets, with the table for whatever the forwarder hands
back, as ``worker.py`` does. After every scenario the bytes each sink received are exactly the
Python table's outputs, and every counter, drop, ``last_seen``, RFC 3550 state and SRTP
authentication-failure count is equal.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_relay import fastpath
from media_relay.srtp import (
    KNOWN_SUITES,
    CryptoAttribute,
    Direction,
    SrtpContext,
    SrtpTranscoder,
    generate_crypto,
)
from media_relay.table import Addr, LegSpec
from tests.media.test_media_fastpath import BACKENDS, TwoTables

HOST = "127.0.0.1"
OUT, IN = 0, 1


def rtp(seq: int, ssrc: int = 0x1234, pt: int = 0, size: int = 172) -> bytes:
    head = struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc)
    return (head + bytes((seq + i) & 0xFF for i in range(max(0, size - 12))))[:size]


def rtcp(kind: int = 201, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", 0x80, kind, 1, ssrc)


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.setblocking(False)
    return sock


def name(sock: socket.socket) -> Addr:
    host, port = sock.getsockname()
    return str(host), int(port)


class Keys:
    """The SDES keys of one stream: the client's and C's outside, the far end's and C's inside."""

    def __init__(self, suite: str, inside: str | None) -> None:
        self.client = generate_crypto(1, suite)
        self.c_out = generate_crypto(1, suite)
        self.far = None if inside is None else generate_crypto(1, inside)
        self.c_in = None if inside is None else generate_crypto(1, inside)

    def transcoders(self, native: bool) -> tuple[SrtpTranscoder, SrtpTranscoder]:
        def ctx(attr: CryptoAttribute | None, d: Direction) -> SrtpContext | None:
            return None if attr is None else SrtpContext.from_crypto(attr, d, native=native)

        return (
            SrtpTranscoder(ctx(self.client, Direction.INBOUND), ctx(self.c_in, Direction.OUTBOUND)),
            SrtpTranscoder(ctx(self.far, Direction.INBOUND), ctx(self.c_out, Direction.OUTBOUND)),
        )


class CRig(TwoTables):
    def __init__(
        self, suite: str = "AES_CM_128_HMAC_SHA1_80", inside: str | None = None, backend: str = "epoll"
    ) -> None:
        assert fastpath.native_srtp(), "media_relay._fastpath is not built with libsrtp2"
        super().__init__(4, backend)
        self.out_rtp, self.out_rtcp, self.in_rtp, self.in_rtcp = self.ports
        self.e, self.e_rtcp = self._new(), self._new()  # E's internal demux ports
        self.far, self.far_rtcp = self._new(), self._new()  # the inside endpoint
        self.stranger = self._new()
        self.keys = Keys(suite, inside)
        # What each sink must receive: the Python table's outputs, in order.
        self.expected: dict[Addr, list[bytes]] = {
            name(s): [] for s in (self.e, self.e_rtcp, self.far, self.far_rtcp)
        }
        self.retired = [[0, 0], [0, 0]]  # auth failures of replaced transcoders, per table and leg
        for table in (self.python, self.native):
            table.add_stream(
                "c1",
                LegSpec.dedicated(
                    self.out_rtp,
                    self.out_rtcp,
                    latch=False,
                    remote_rtp=name(self.e),
                    remote_rtcp=name(self.e_rtcp),
                ),
                LegSpec.dedicated(
                    self.in_rtp,
                    self.in_rtcp,
                    latch=True,
                    expected_ip=HOST,
                    remote_rtp=name(self.far),
                    remote_rtcp=name(self.far_rtcp),
                ),
                now=0.0,
            )
        self.transcoders: list[tuple[SrtpTranscoder, SrtpTranscoder] | None] = [None, None]
        self.set_keys()
        # The peers' own contexts (pylibsrtp, as a client would be).
        k = self.keys
        self.client_tx = SrtpContext.from_crypto(k.client, Direction.OUTBOUND, native=False)
        self.client_rx = SrtpContext.from_crypto(k.c_out, Direction.INBOUND, native=False)
        self.far_tx = (
            None if k.far is None else SrtpContext.from_crypto(k.far, Direction.OUTBOUND, native=False)
        )

    def set_keys(self) -> None:
        """(Re-)install both legs' transcoders, as C does on every answer."""
        for i, (table, native) in enumerate(((self.python, False), (self.native, True))):
            old = self.transcoders[i]
            if old is not None:
                self.retired[i][OUT] += old[OUT].auth_failures
                self.retired[i][IN] += old[IN].auth_failures
            new = self.keys.transcoders(native)
            self.transcoders[i] = new
            table.set_transcoder("c1", OUT, new[OUT])
            table.set_transcoder("c1", IN, new[IN])
        mine = self.transcoders[1]
        assert mine is not None and mine[OUT].native is not None

    def auth_failures(self, i: int) -> list[int]:
        live = self.transcoders[i]
        assert live is not None
        return [self.retired[i][leg] + live[leg].auth_failures for leg in (OUT, IN)]

    def send(self, src: socket.socket, port: int, data: bytes, now: float) -> None:
        out = self.python.receive_and_transcode(port, data, name(src), now)
        if out is not None:
            self.expected[out[1]].append(out[2])
        self.send_native(src, port, data, now, self.native.receive_and_transcode)

    def check(self) -> None:
        """Sinks got exactly the Python outputs; every counter and all receiver state equal."""
        for sink in (self.e, self.e_rtcp, self.far, self.far_rtcp):
            assert self.received(sink) == self.expected[name(sink)]
            self.expected[name(sink)] = []
        assert self.received(self.stranger) == []
        self.flows.flush()
        assert self.native.totals() == self.python.totals()
        assert self.auth_failures(1) == self.auth_failures(0)
        self.check_stream("c1")

    # -- the peers -------------------------------------------------------------------------------

    def from_e(self, seq: int, now: float, ssrc: int = 0xC1) -> bytes:
        packet = self.client_tx.protect(rtp(seq, ssrc))
        self.send(self.e, self.out_rtp, packet, now)
        return packet

    def from_far(self, seq: int, now: float, ssrc: int = 0xFA) -> bytes:
        packet = rtp(seq, ssrc) if self.far_tx is None else self.far_tx.protect(rtp(seq, ssrc))
        self.send(self.far, self.in_rtp, packet, now)
        return packet


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest) -> Iterator[CRig]:
    r = CRig(backend=str(request.param))
    try:
        yield r
    finally:
        r.close()


def establish(rig: CRig, now: float = 1.0) -> float:
    """E sends (outside flows are native at once), the far end answers (its leg latches)."""
    rig.from_e(1, now)
    rig.from_far(1, now + 0.01)
    k = rig.keys
    rig.send(rig.e_rtcp, rig.out_rtcp, rig.client_tx.protect_rtcp(rtcp(ssrc=0xC1)), now + 0.02)
    far_rr = rtcp(ssrc=0xFA)
    if k.far is not None:
        assert rig.far_tx is not None
        far_rr = rig.far_tx.protect_rtcp(far_rr)
    rig.send(rig.far_rtcp, rig.in_rtcp, far_rr, now + 0.03)
    return now + 0.04


# -- scenarios --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suite", "inside"),
    [(s, None) for s in KNOWN_SUITES]
    + [("AES_CM_128_HMAC_SHA1_32", "AEAD_AES_256_GCM"), ("AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80")],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_established_flows_transcode_natively_and_match_python(
    suite: str, inside: str | None, backend: str
) -> None:
    r = CRig(suite, inside, backend)
    try:
        now = establish(r)
        assert len(r.flows) == 4  # outside RTP/RTCP and inside RTP/RTCP
        before = r.forwarder.counters()
        for i in range(2, 150):
            now += 0.02
            r.from_e(i, now)
            r.from_far(i, now + 0.001)
            if i % 40 == 0:
                r.send(r.e_rtcp, r.out_rtcp, r.client_tx.protect_rtcp(rtcp(ssrc=0xC1)), now + 0.002)
        after = r.forwarder.counters()
        assert after["transcoded"] - before["transcoded"] == 2 * 148 + 3
        assert after["to_python"] == before["to_python"]  # nothing of the established flows
        expected_far = list(r.expected[name(r.far)])
        to_e = list(r.expected[name(r.e)])
        r.check()
        # The far end got what the client sent, decrypted (or re-protected with C's inside key);
        # the client can decrypt everything C sent it, in order.
        if inside is None:
            assert expected_far == [rtp(i, 0xC1) for i in range(1, 150)]
        assert [r.client_rx.unprotect(p) for p in to_e] == [rtp(i, 0xFA) for i in range(1, 150)]
    finally:
        r.close()


def test_the_client_decrypts_every_packet_c_protected(rig: CRig) -> None:
    now = establish(rig)
    for i in range(2, 60):
        now += 0.02
        rig.from_far(i, now)
    sent_to_e = list(rig.expected[name(rig.e)])
    rig.check()
    assert [rig.client_rx.unprotect(p) for p in sent_to_e] == [rtp(i, 0xFA) for i in range(1, 60)]


def test_forged_replayed_and_odd_packets_are_dropped_and_counted_the_same(rig: CRig) -> None:
    now = establish(rig)
    good = rig.client_tx.protect(rtp(2, 0xC1))
    forged = bytearray(rig.client_tx.protect(rtp(3, 0xC1)))
    forged[-1] ^= 0x5A
    cases = [
        good,
        good,  # a replay: refused by the replay check (an auth failure)
        bytes(forged),  # a bad tag
        rig.client_tx.protect(rtp(4, 0xC1))[:11],  # shorter than an RTP header: the table's
        b"\x80\x00\x00",  # garbage
        b"\x40" + good[1:],  # version 1
        rig.client_tx.protect(rtp(5, 0xC1, size=1350)),  # long, but the inside is plain: relayed
        rtcp(200, 0xC1),  # RTCP type on the RTP port, but not SRTCP: refused
        rig.client_tx.protect_rtcp(rtcp(202, 0xC1)),  # SRTCP on the RTP port (RFC 5761 types)
    ]
    for data in cases:
        now += 0.01
        rig.send(rig.e, rig.out_rtp, data, now)
    for k in range(30):  # strangers on both legs: counted before any cryptography
        rig.send(rig.stranger, rig.out_rtp, rig.client_tx.protect(rtp(100 + k, 0xC1)), now)
        rig.send(rig.stranger, rig.in_rtp, rtp(100 + k), now)
    # Inside: plain RTP too long for C's outbound SRTP (pylibsrtp's 1356-byte limit): a
    # transcode drop that is not an auth failure; and a duplicate seq (protect refuses reuse).
    rig.send(rig.far, rig.in_rtp, rtp(2, 0xFA, size=1400), now)
    rig.from_far(3, now)
    rig.from_far(3, now + 0.001)
    now += 0.02
    rig.from_e(6, now)  # the stream still works both ways
    rig.from_far(4, now)
    rig.check()
    totals = rig.native.totals()
    # Refused by SRTP: replay, bad tag, RTCP that is not SRTCP, the 11-byte one (in Python: it
    # is handed back before any cryptography, as it is too short for RTP), too long to protect,
    # the repeated seq. Authentication failures: replay, bad tag; inside: the repeated seq.
    assert totals["transcode_drops"] == 6 and rig.forwarder.counters()["transcode_drops"] == 5
    assert totals["unlatched_drops"] == 60 and totals["garbage_drops"] == 2
    assert rig.auth_failures(1) == [2, 1]


def test_the_first_inside_packet_goes_through_python_and_the_srtp_state_continues_in_c() -> None:
    """Far end with SRTP, seq near the wrap: its first packet latches in Python (native
    transcoder, same libsrtp sessions), the rest are native, the rollover happens in C; the
    client decrypts all of them with one receiver, and a replay of the packet Python handled is
    refused by C."""
    r = CRig("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_80")
    try:
        now = 1.0
        r.from_e(1, now)
        first = r.from_far(65530, now)  # latches: through the table
        assert r.native.get_stream("c1").legs[IN].rtp.latched
        n_python = r.forwarder.counters()["to_python"]
        for k in range(1, 20):
            now += 0.02
            r.from_far(65530 + k, now)
        assert r.forwarder.counters()["to_python"] == n_python  # all native after the latch
        r.send(r.far, r.in_rtp, first, now + 0.01)  # replayed into C
        to_e = list(r.expected[name(r.e)])
        r.check()
        assert [r.client_rx.unprotect(p) for p in to_e] == [rtp(65530 + k, 0xFA) for k in range(20)]
        assert r.auth_failures(1)[IN] == 1
    finally:
        r.close()


def test_new_keys_relatch_and_removal_keep_counters_exact(rig: CRig) -> None:
    now = establish(rig)
    for i in range(2, 30):
        now += 0.02
        rig.from_e(i, now)
        rig.from_far(i, now)
    forged = bytearray(rig.client_tx.protect(rtp(30, 0xC1)))
    forged[-1] ^= 1
    rig.send(rig.e, rig.out_rtp, bytes(forged), now)
    old_key_packet = rig.client_tx.protect(rtp(31, 0xC1))
    # A re-INVITE with new keys on both sides: the flows are re-derived with the new transcoders.
    rig.keys = Keys("AEAD_AES_128_GCM", None)
    rig.set_keys()
    rig.client_tx = SrtpContext.from_crypto(rig.keys.client, Direction.OUTBOUND, native=False)
    rig.client_rx = SrtpContext.from_crypto(rig.keys.c_out, Direction.INBOUND, native=False)
    for i in range(31, 60):
        now += 0.02
        rig.from_e(i, now)
        rig.from_far(i, now)
    rig.send(rig.e, rig.out_rtp, old_key_packet, now)  # late, under the old key: refused
    # The far end moves: relatch; its next packet latches again (through Python).
    moved = rig._new()
    for table in (rig.python, rig.native):
        table.relatch("c1", IN)
    for i in range(60, 80):
        now += 0.02
        rig.send(moved, rig.in_rtp, rtp(i, 0xFB), now)
        rig.from_far(i, now)  # the old address: now a stranger
    rig.check()
    assert rig.auth_failures(1) == [2, 0]
    stream = rig.native.get_stream("c1")
    rig.flows.drop_stream(stream)
    assert len(rig.flows) == 0
    rig.native.remove_stream("c1")
    rig.python.remove_stream("c1")
    assert rig.native.totals() == rig.python.totals()


packets = st.lists(
    st.tuples(
        st.sampled_from(["e", "far", "stranger"]),
        st.sampled_from(["out_rtp", "out_rtcp", "in_rtp", "in_rtcp"]),
        st.sampled_from(["good", "good", "replay", "forged", "raw", "rtcp"]),
        st.integers(1, 400),  # seq
        st.integers(0, 1300),  # payload size
    ),
    min_size=1,
    max_size=40,
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=30, deadline=None)
@given(items=packets)
def test_arbitrary_packet_mixes_are_handled_the_same(
    items: list[tuple[str, str, str, int, int]], backend: str
) -> None:
    r = CRig("AES_CM_128_HMAC_SHA1_32", "AEAD_AES_128_GCM", backend)
    try:
        now = establish(r)
        senders = {"e": (r.e, r.client_tx), "far": (r.far, r.far_tx), "stranger": (r.stranger, r.client_tx)}
        sent: list[bytes] = []
        for who, port, kind, seq, size in items:
            now += 0.001
            sock, ctx = senders[who]
            assert ctx is not None
            plain = rtp(seq + 1, 0xAB, size=12 + size)
            if kind == "raw":
                data = plain
            elif kind == "rtcp":
                data = ctx.protect_rtcp(rtcp(ssrc=0xAB))
            elif kind == "replay" and sent:
                data = sent[-1]
            else:
                try:
                    data = ctx.protect(plain)
                except Exception:  # (a repeated seq: the sender's own replay check)
                    data = plain
                if kind == "forged":
                    data = data[:-1] + bytes([data[-1] ^ 0x33])
            sent.append(data)
            r.send(sock, getattr(r, port), data, now)
        r.check()
    finally:
        r.close()

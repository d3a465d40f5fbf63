"""C's kernel SRTP flows (``media_relay/kernel_srtp.py``): its eBPF program on ``lo``.

Real datagrams over loopback. What a flow transcodes arrives at the destination from the egress
socket's address, byte for byte what libsrtp (pylibsrtp, a separate implementation) makes of it:
the plain RTP of an inbound key, the SRTP of an outbound one, both in turn, for both AES-CM
suites, across sequence-number wraps, with CSRCs and header extensions. What the program must
refuse (a bad tag, a replay) is dropped and counted; what it leaves alone (RTCP, another SSRC)
reaches the relay's socket unchanged. Through the whole E/C media path (``test_anchor_path``'s
lab) the established legs go through the kernel and count as the native path counts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable, Iterator

import pylibsrtp
import pytest

from media_relay import kernel, kernel_srtp
from media_relay.bpf import prog_id, tcx_chain
from media_relay.kernel_srtp import SrtpKernel, SrtpSide
from media_relay.rtp import StreamStats
from tests.media import test_anchor_path as anchor
from tests.media.kernel_tools import KernelRig, require_srtp_kernel

Addr = tuple[str, int]
SUITES = list(kernel_srtp.SUITES)
PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
}


def rtp(seq: int, ssrc: int = 0x1234, size: int = 172, csrcs: int = 0, ext_words: int | None = None) -> bytes:
    b0 = 0x80 | csrcs | (0x10 if ext_words is not None else 0)
    head = struct.pack("!BBHII", b0, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc)
    head += b"".join(struct.pack("!I", 0xC0000000 + i) for i in range(csrcs))
    if ext_words is not None:
        head += struct.pack("!HH", 0xBEDE, ext_words) + bytes(range(4 * ext_words))
    return head + bytes((seq + i) & 0xFF for i in range(max(0, size - len(head))))


def session(suite: str, key: bytes, outbound: bool) -> pylibsrtp.Session:
    kind = pylibsrtp.Policy.SSRC_ANY_OUTBOUND if outbound else pylibsrtp.Policy.SSRC_ANY_INBOUND
    return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=kind, srtp_profile=PROFILES[suite]))


class Rig(KernelRig):
    """KernelRig with C's SRTP program."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel: SrtpKernel = SrtpKernel.open()

    def install(self, inbound: SrtpSide | None, outbound: SrtpSide | None, ssrc: int = 0x1234) -> bytes:
        n = self.name
        return self.kernel.install(
            n(self.relay),
            n(self.client),
            (n(self.egress), n(self.dest)),
            ssrc,
            8000,
            StreamStats(8000).get_state(),
            inbound,
            outbound,
        )


@pytest.fixture
def rig() -> Iterator[Rig]:
    require_srtp_kernel()
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def receive(sock: socket.socket) -> tuple[bytes, Addr]:
    data, src = sock.recvfrom(4096)
    return data, (str(src[0]), int(src[1]))


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("mode", ["in", "out", "both"])
def test_transcodes_byte_for_byte_as_libsrtp(rig: Rig, suite: str, mode: str) -> None:
    k_in, k_out = os.urandom(30), os.urandom(30)
    rig.install(
        SrtpSide(suite, k_in) if mode != "out" else None, SrtpSide(suite, k_out) if mode != "in" else None
    )
    client = session(suite, k_in, outbound=True)
    reference = session(suite, k_out, outbound=True)
    # in order, a wrap of the sequence number (ROC 0 -> 1), sizes from an empty payload up
    seqs = [65530 + i for i in range(12)]
    sizes = [12, 13, 27, 28, 29, 172, 200, 1000, 1356, 172, 172, 172]
    for seq, size in zip(seqs, sizes, strict=True):
        plain = rtp(seq, size=size)
        rig.send(client.protect(plain) if mode != "out" else plain)
        got, src = receive(rig.dest)
        assert src == rig.name(rig.egress)
        assert got == (reference.protect(plain) if mode != "in" else plain), (seq, size)
    counters = rig.kernel.read(rig.kernel.key(rig.name(rig.relay), rig.name(rig.client)))
    assert counters is not None
    assert counters.rx_packets == counters.tx_packets == len(seqs)
    assert counters.auth_drops == counters.replay_drops == 0
    side = counters.index[0 if mode != "out" else 1]
    assert side == (1, (65530 + 11) & 0xFFFF, False)  # ROC 1 after the wrap
    assert counters.stats[4] == len(seqs) and counters.stats[7] == 65536  # received, cycles


def test_what_libsrtp_would_not_protect_goes_to_the_relay(rig: Rig) -> None:
    """An RTP packet longer than the native path protects (1,356 bytes) is left to it."""
    suite = SUITES[0]
    rig.install(None, SrtpSide(suite, os.urandom(30)))
    too_long = rtp(1, size=kernel_srtp.MAX_PROTECT + 1)
    rig.send(too_long)
    assert receive(rig.relay)[0] == too_long
    rig.send(rtp(2, size=kernel_srtp.MAX_PROTECT))
    assert len(receive(rig.dest)[0]) == kernel_srtp.MAX_PROTECT + 10


def test_csrcs_and_header_extensions_stay_in_the_clear(rig: Rig) -> None:
    suite = SUITES[0]
    k_in = os.urandom(30)
    rig.install(SrtpSide(suite, k_in), None)
    client = session(suite, k_in, outbound=True)
    for seq, csrcs, ext in ((1, 3, None), (2, 0, 2), (3, 15, 5), (4, 1, 0)):
        plain = rtp(seq, csrcs=csrcs, ext_words=ext)
        rig.send(client.protect(plain))
        assert receive(rig.dest)[0] == plain


def test_refused_packets_are_dropped_and_counted_and_others_go_to_the_relay(rig: Rig) -> None:
    suite = SUITES[0]
    k_in = os.urandom(30)
    key = rig.install(SrtpSide(suite, k_in), None)
    client = session(suite, k_in, outbound=True)
    good = [client.protect(rtp(seq)) for seq in range(10, 14)]
    rig.send(good[0])
    assert receive(rig.dest)[0] == rtp(10)
    forged = bytearray(good[1])
    forged[-1] ^= 1  # the tag
    rig.send(bytes(forged))
    tampered = bytearray(good[1])
    tampered[40] ^= 1  # the payload
    rig.send(bytes(tampered))
    rig.send(good[0])  # a replay
    rig.send(good[1])
    assert receive(rig.dest)[0] == rtp(11)
    counters = rig.kernel.read(key)
    assert counters is not None
    assert (counters.auth_drops, counters.replay_drops, counters.rx_packets) == (2, 1, 2)
    # RTCP, another SSRC, garbage: the relay's socket, unchanged
    others = [
        struct.pack("!BBHI", 0x80, 200, 6, 0x1234) + bytes(20),
        client.protect(rtp(12, ssrc=0x9999)),
        b"\x00" * 40,
        good[2][:20],  # shorter than header + tag
    ]
    for data in others:
        rig.send(data)
        assert receive(rig.relay)[0] == data
    rig.send(good[2])
    assert receive(rig.dest)[0] == rtp(12)
    assert rig.kernel.remove(key) is not None
    rig.send(good[3])  # removed: the relay's socket
    assert receive(rig.relay)[0] == good[3]
    assert rig.kernel.read(key) is None


@pytest.mark.parametrize("last", [100, 32767, 32769, 65535, 65500])
def test_takes_the_index_over_from_libsrtp(rig: Rig, last: int) -> None:
    """libsrtp (the relay's session) has seen a stream up to ``last`` in ROC 3; the kernel flow
    goes on from there: the next packets (across a wrap where there is one) decrypt, and what
    libsrtp already took is a replay."""
    suite = SUITES[1]
    k_in = os.urandom(30)
    ext = 3 * 65536
    rig.install(SrtpSide(suite, k_in, roc=3, highest_seq=last, fresh=False), None)
    sender = _sender_at(suite, k_in, ext + last - 2)
    sent = [sender(ext + last - 2 + i) for i in range(8)]
    rig.send(sent[2])  # libsrtp's last: a replay
    for i in range(3, 8):
        rig.send(sent[i])
        assert receive(rig.dest)[0] == rtp((last - 2 + i) & 0xFFFF)
    counters = rig.kernel.read(rig.kernel.key(rig.name(rig.relay), rig.name(rig.client)))
    assert counters is not None and counters.replay_drops == 1
    assert counters.index[0][:2] == ((ext + last + 5) >> 16, (last + 5) & 0xFFFF)


# Arrival order for the replay window: new highests that move the window by < 64, 64-127 and
# >= 128; late packets 1, 63, 64, 101, 110 and 127 behind (taken), 128 behind (too old), and
# repeats of packets whose bits sit in either word of the window, before and after it moved.
REPLAY_ORDER = [300, 173, 172, 173, 299, 299, 236, 237, 310, 300, 183, 236, 237, 400, 310, 299]
REPLAY_ORDER += [290, 272, 600, 599, 473, 472, 400, 599, 601, 537, 538, 537, 474, 473]


def test_replay_window_is_libsrtps(rig: Rig) -> None:
    """The kernel takes and refuses exactly what libsrtp (pylibsrtp, its default 128-packet
    window) takes and refuses, packet by packet, in an order that exercises both words of the
    window and every way it moves."""
    suite = SUITES[0]
    k_in = os.urandom(30)
    key = rig.install(SrtpSide(suite, k_in), None)
    sender = session(suite, k_in, outbound=True)
    marker = max(REPLAY_ORDER) + 1
    srtp = {seq: sender.protect(rtp(seq)) for seq in range(1, marker + 1)}
    reference = session(suite, k_in, outbound=False)
    taken = []
    for seq in REPLAY_ORDER:
        try:
            reference.unprotect(srtp[seq])
        except pylibsrtp.Error:
            continue
        taken.append(seq)
    assert 0 < len(taken) < len(REPLAY_ORDER)  # the order has both
    for seq in REPLAY_ORDER:
        rig.send(srtp[seq])
    got = [receive(rig.dest)[0] for _ in taken]
    assert got == [rtp(seq) for seq in taken]
    rig.send(srtp[marker])  # the next packet to arrive: nothing refused came before it
    assert receive(rig.dest)[0] == rtp(marker)
    counters = rig.kernel.read(key)
    assert counters is not None
    assert counters.replay_drops == len(REPLAY_ORDER) - len(taken)
    assert counters.rx_packets == len(taken) + 1


def _sender_at(suite: str, key: bytes, first: int) -> Callable[[int], bytes]:
    """SRTP of rtp(index) for packet indexes from ``first`` on: a libsrtp sender walked there."""
    out = session(suite, key, outbound=True)
    index = 0
    while first - index > 16000:  # libsrtp's sender follows the ROC from its sequence numbers
        out.protect(rtp(index & 0xFFFF))
        index += 16000  # the next packet is < 32,768 on: one ROC guess away
    return lambda i: out.protect(rtp(i & 0xFFFF))


async def test_the_whole_path_with_e_and_c_in_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """client -SRTP-> E -SRTP-> C -RTP-> echo and back with ``EDGE_MEDIA_KERNEL=1``: E forwards
    in the kernel, C transcodes there; the echoes come back intact, C's counters are what the
    native path counts, and its relay process transcoded only the first packets."""
    require_srtp_kernel()
    monkeypatch.setenv("EDGE_MEDIA_KERNEL", "1")
    async with anchor.open_lab() as lab:
        assert lab.gateway.worker.kernel_forwarding, lab.gateway.worker.kernel_error
        e_port, sender, receiver = await anchor.call_out(lab, SUITES[0])
        seqs = range(1, 401)
        await anchor.round_trip(lab, e_port, sender, seqs[: anchor.BATCH])
        # the outside leg was installed from SDP, before its first packet: it moves into the
        # kernel once that packet's SSRC is known (the inside one latches with its first)
        for _ in range(200):
            if lab.gateway.snapshot()["worker"]["kernel"]["flows"] == 2:
                break
            await asyncio.sleep(0.01)
        await anchor.round_trip(lab, e_port, sender, seqs[anchor.BATCH :])
        got = lab.client.received
        assert all(src == e_port for _, src in got)
        in_order_once_moved([receiver.unprotect(d) for d, _ in got], seqs)
        in_order_once_moved([d for d, _ in lab.echo.received], seqs)
        snap = lab.gateway.snapshot()
        worker = snap["worker"]
        assert worker["kernel"]["srtp"] and worker["kernel"]["installs"] >= 2, worker
        assert worker["native"]["transcoded"] <= 2 * anchor.BATCH, worker["native"]
        call = snap["calls"]["c-call"][0]
        assert call["outside"]["packets"] == call["inside"]["packets"] == 400
        assert call["outside"]["lost"] == 0 and call["outside"]["srtp_auth_failures"] == 0
        forged = bytearray(sender.protect(anchor.rtp(401)))
        forged[-1] ^= 1
        lab.client.send(bytes(forged), e_port)
        await anchor.round_trip(lab, e_port, sender, range(402, 412))
        call = lab.gateway.snapshot()["calls"]["c-call"][0]
        assert call["outside"]["srtp_auth_failures"] == 1
        assert lab.gateway.snapshot()["totals"]["transcode_drops"] == 1


async def test_a_new_ssrc_moves_into_the_kernel_once_the_old_one_is_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client restarts its stream with another SSRC (no re-INVITE). Its packets reach C's
    relay, which transcodes them; once the kernel flows' SSRC has gone quiet, the next counter
    fold moves both legs' kernel flows to the new SSRC, and the packets after that never reach
    C's process. The echoes stay intact throughout."""
    require_srtp_kernel()
    monkeypatch.setenv("EDGE_MEDIA_KERNEL", "1")
    async with anchor.open_lab() as lab:
        worker = lab.gateway.worker
        assert worker.kernel_forwarding, worker.kernel_error
        e_port, sender, receiver = await anchor.call_out(lab, SUITES[0])

        async def batch(seqs: range, ssrc: int) -> None:
            start = len(lab.client.received)
            done = lab.client.expect(start + len(seqs))
            for seq in seqs:
                lab.client.send(sender.protect(anchor.rtp(seq, ssrc=ssrc)), e_port)
            await asyncio.wait_for(done, anchor.WAIT_S)
            got = [receiver.unprotect(d) for d, _ in lab.client.received[start:]]
            assert sorted(got) == sorted(anchor.rtp(seq, ssrc=ssrc) for seq in seqs)

        async def kernel_flows(want: int) -> None:
            for _ in range(200):
                if lab.gateway.snapshot()["worker"]["kernel"]["flows"] == want:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(lab.gateway.snapshot()["worker"]["kernel"])

        await batch(range(1, 41), 0x1111)
        await kernel_flows(2)
        before = worker.stats()["worker"]["kernel"]["installs"]
        await batch(range(41, 81), 0x2222)  # the old flows: C's process takes these
        # the old SSRC is quiet from now on: the first fold sees no new kernel packets and
        # moves both flows (a second fold for the one a first may have caught mid-count)
        lab.gateway.snapshot()
        lab.gateway.snapshot()
        await kernel_flows(2)
        assert worker.stats()["worker"]["kernel"]["installs"] == before + 2
        transcoded = worker.stats()["worker"]["native"]["transcoded"]
        drops = lab.gateway.snapshot()["totals"]["transcode_drops"]
        await batch(range(81, 281), 0x2222)
        assert worker.stats()["worker"]["native"]["transcoded"] == transcoded
        call = lab.gateway.snapshot()["calls"]["c-call"][0]
        assert call["outside"]["packets"] == call["inside"]["packets"] == 280, call
        assert call["outside"]["srtp_auth_failures"] == 0
        assert lab.gateway.snapshot()["totals"]["transcode_drops"] == drops == 0


def in_order_once_moved(got: list[bytes], seqs: range) -> None:
    """Every packet of ``seqs`` arrived intact; after the first batch, in order. (A leg moves
    into the kernel during the first batch, when its first packet latches it or names its SSRC:
    packets still queued on the relay's socket then may be overtaken by the kernel's, as with
    E's kernel forwarding. Each batch is echoed in full before the next is sent.)"""
    want = [anchor.rtp(s) for s in seqs]
    assert sorted(got) == sorted(want)
    assert got[anchor.BATCH :] == want[anchor.BATCH :]


async def _kernel_flows(lab: anchor.Lab, n: int) -> None:
    """Wait (bounded) until C has ``n`` kernel flows."""
    for _ in range(300):
        if lab.gateway.snapshot()["worker"]["kernel"]["flows"] == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"C never had {n} kernel flows: {lab.gateway.snapshot()['worker']['kernel']}")


async def test_the_index_goes_back_to_libsrtp_when_a_flow_leaves_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client's sequence numbers wrap (ROC 0 -> 1) while its leg is in the kernel; then the
    far end answers again (a re-INVITE), which gives the call new transcoders: every flow leaves
    the kernel at once (no packet has to wake C for that) and is installed anew, its ROC taken
    from libsrtp's session. The kernel must have handed ROC 1 back, or the next packets would
    fail authentication."""
    require_srtp_kernel()
    monkeypatch.setenv("EDGE_MEDIA_KERNEL", "1")
    async with anchor.open_lab() as lab:
        e_port, sender, receiver = await anchor.call_out(lab, SUITES[0])
        first = range(65500, 65500 + anchor.BATCH)
        await anchor.round_trip(lab, e_port, sender, first)
        await _kernel_flows(lab, 2)
        wrap = range(first.stop, 65536 + 40)
        await anchor.round_trip(lab, e_port, sender, wrap)
        installs = lab.gateway.snapshot()["worker"]["kernel"]["installs"]
        lab.gateway.process_answer("c-call", "inside", anchor.plain_sdp(lab.echo.addr))
        await asyncio.sleep(0.05)  # the worker mirrors the change at once, no packet needed
        assert lab.gateway.snapshot()["worker"]["kernel"]["installs"] >= installs + 2
        after = range(wrap.stop, wrap.stop + 100)
        await anchor.round_trip(lab, e_port, sender, after)
        got = lab.client.received
        assert all(src == e_port for _, src in got)
        plain = [receiver.unprotect(data) for data, _ in got]
        everything = range(first.start, after.stop)
        in_order_once_moved(plain, everything)
        in_order_once_moved([d for d, _ in lab.echo.received], everything)
        assert lab.gateway.snapshot()["totals"]["transcode_drops"] == 0


@pytest.mark.parametrize("c_first", [True, False])
def test_e_sits_between_cs_programs_whichever_starts_first(c_first: bool) -> None:
    """One pass through lo's ingress for client -> E -> C -> echo and back needs the chain
    C, E, C: C attaches first and last, and E, started after C, slips in before C's last."""
    require_srtp_kernel()
    ifindex = socket.if_nametoindex("lo")
    opened: list[SrtpKernel | kernel.KernelForwarder] = []
    try:
        for which in ("c", "e") if c_first else ("e", "c"):
            opened.append(SrtpKernel.open() if which == "c" else kernel.KernelForwarder.open())
        ours = {
            prog_id(fd): name
            for k in opened
            for fd, name in (
                [(k._fds["prog_first"], "c"), (k._fds["prog_last"], "c")]
                if isinstance(k, SrtpKernel)
                else [(k._prog_fd, "e")]
            )
        }
        assert [ours[i] for i, _ in tcx_chain(ifindex, 46) if i in ours] == ["c", "e", "c"]
    finally:
        for k in opened:
            k.close()


async def test_kernel_srtp_with_c_on_two_forwarder_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``media_threads = 2`` and kernel SRTP together: the legs move into the kernel from
    whichever shard they started on, and every echo comes back intact. (Packets still queued
    in a shard when their leg moves may be overtaken by the kernel's: the order is only kept
    from then on, as with E's kernel forwarding.)"""
    require_srtp_kernel()
    monkeypatch.setenv("EDGE_MEDIA_KERNEL", "1")
    monkeypatch.setenv(anchor.THREADS_ENV_VAR, "2")
    async with anchor.open_lab() as lab:
        worker = lab.gateway.snapshot()["worker"]
        assert worker["native"]["threads"] == 2, worker
        e_port, sender, receiver = await anchor.call_out(lab, SUITES[1])
        seqs = range(1, 301)
        await anchor.round_trip(lab, e_port, sender, seqs[: anchor.BATCH])
        await _kernel_flows(lab, 2)
        moved = len(lab.client.received)
        await anchor.round_trip(lab, e_port, sender, seqs[anchor.BATCH :])
        got = lab.client.received
        assert all(src == e_port for _, src in got) and moved == anchor.BATCH
        in_order_once_moved([receiver.unprotect(data) for data, _ in got], seqs)
        snap = lab.gateway.snapshot()
        assert snap["worker"]["native"]["transcoded"] <= 2 * anchor.BATCH, snap["worker"]["native"]
        call = snap["calls"]["c-call"][0]
        assert call["outside"]["packets"] == call["inside"]["packets"] == 300
        assert call["outside"]["lost"] == 0 and snap["totals"]["transcode_drops"] == 0


def test_what_the_kernel_cannot_do_is_a_value_error_and_nothing_else_changes(rig: Rig) -> None:
    n = rig.name
    state = StreamStats(8000).get_state()
    good = SrtpSide(SUITES[0], os.urandom(30))
    egress = (n(rig.egress), n(rig.dest))

    def args(
        source: object = n(rig.client), rate: int = 8000, inbound: SrtpSide | None = good
    ) -> tuple[object, ...]:
        return (n(rig.relay), source, egress, 0x1234, rate, state, inbound, None)

    bad = [
        args(inbound=None),  # no key
        args(inbound=SrtpSide("AEAD_AES_128_GCM", bytes(28))),
        args(inbound=SrtpSide(SUITES[0], bytes(29))),  # a short key
        args(inbound=SrtpSide(SUITES[0], bytes(30), roc=1 << 32)),
        args(rate=0),  # clock rate
        args(source=("10.0.0.1", 4000)),  # off loopback
    ]
    for args in bad:
        with pytest.raises(ValueError):
            rig.kernel.install(*args)  # type: ignore[arg-type]
    assert rig.kernel.read_all() == {} and rig.kernel.install_errors == 0
    rig.install(good, None)
    client = session(SUITES[0], good.key_salt, outbound=True)
    rig.send(client.protect(rtp(1)))
    assert receive(rig.dest)[0] == rtp(1)

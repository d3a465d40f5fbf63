"""The native fast path (``media_relay/_fastpath.c``) against the pure-Python table, packet by packet.

A ``Rig`` holds the same E-like stream in two tables: one fed directly (``receive_datagram``), one
whose established flows live in a ``Forwarder`` fed by real loopback sockets (``drain`` with an
explicit clock, then the table for whatever the forwarder hands back, as ``worker.py`` does).
After every scenario every counter, drop, latch, ``last_seen`` and the full RFC 3550 receiver
state (``StreamStats.get_state``) must be equal, and the sinks must have received exactly what
the tables counted as sent.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_relay import fastpath
from media_relay.events import StreamTimedOut
from media_relay.rtp import StreamStats
from media_relay.table import Addr, Endpoint, LegSpec, PortAllocator, RelayTable
from media_relay.worker import RelayWorker
from tests.media.kernel_tools import require_kernel

HOST = "127.0.0.1"


# The forwarder's two ways of reading its sockets (see _uring.h), and io_uring with its send
# helper taking every send (_helper.h; HELPER_ALWAYS, all flows): sends leave from its thread.
BACKENDS = ["epoll", "uring", "helper"]


def _forwarder(backend: str = "epoll", buffers: int = 1024) -> Any:
    assert fastpath.built(), "media_relay._fastpath is not built: pip install -e . (needs gcc, python3-dev)"
    if backend in ("uring", "helper"):
        refusal = fastpath.uring_refusal()
        if refusal is not None:  # e.g. kernel.io_uring_disabled, a seccomp filter: the epoll cases still run
            pytest.skip(f"this kernel refuses io_uring: {refusal}")
    if backend == "helper":
        return fastpath.new_forwarder(uring=True, buffers=buffers, helper=fastpath.HELPER_ALWAYS, share=4)
    return fastpath.new_forwarder(uring=backend == "uring", buffers=buffers)


def rtp(seq: int, ts: int = 0, ssrc: int = 0x1234, pt: int = 0, size: int = 172) -> bytes:
    head = struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    return (head + bytes(max(0, size - 12)))[:size]


def rtcp(kind: int = 201, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", 0x80, kind, 1, ssrc)


def udp(addr: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 0))
    sock.setblocking(False)
    return sock


def name(sock: socket.socket) -> Addr:
    host, port = sock.getsockname()
    return str(host), int(port)


Relayed = tuple[int, Addr, bytes]  # (egress port, destination, datagram), as the worker sends it


class TwoTables:
    """Loopback relay ports and two tables: ``python`` fed directly, ``native`` whose established
    flows live in a ``Forwarder`` fed by the real sockets (``drain`` with an explicit clock, then
    the table for whatever the forwarder hands back, as ``worker.py`` does). ``backend``
    ``uring``: the forwarder reads every socket through io_uring and ``poll`` replaces ``drain``
    (a loopback datagram is in its socket when sendto returns, so the next poll has it)."""

    def __init__(self, relay_ports: int, backend: str = "epoll") -> None:
        self.backend = backend
        self.forwarder = _forwarder(backend)  # first: it may skip (io_uring refused) before any socket exists
        self.socks: list[socket.socket] = []
        self.relay: dict[int, socket.socket] = {}
        self.ports = [self._relay_port() for _ in range(relay_ports)]
        for port, sock in self.relay.items():
            self.forwarder.add_socket(sock.fileno(), port)
        self.python = RelayTable()
        self.native = RelayTable()
        self.native.track_changes = True
        self.flows = fastpath.FlowSync(self.forwarder, self.native, self._fd_of)

    def _relay_port(self) -> int:
        sock = self._new()
        port = name(sock)[1]
        self.relay[port] = sock
        return port

    def _new(self) -> socket.socket:
        sock = udp()
        self.socks.append(sock)
        return sock

    def _fd_of(self, port: int) -> int | None:
        sock = self.relay.get(port)
        return None if sock is None else sock.fileno()

    def send_native(
        self, src: socket.socket, port: int, data: bytes, now: float, relay: Callable[..., Relayed | None]
    ) -> None:
        """The native half of one datagram: the real socket, the forwarder, then ``relay`` (the
        native table's receive method) for what it hands back."""
        if self.native.changed:  # as the worker does before each poll
            self.flows.sync(self.native.take_changed())
        src.sendto(data, (HOST, port))  # loopback: queued at the relay socket on return
        if self.backend in ("uring", "helper"):
            items = self.forwarder.poll(now=now)
            assert self.forwarder.helper_wait(5.0)  # the helper's sends have left too
        else:
            items = [(port, b, a) for b, a in self.forwarder.drain(self.relay[port].fileno(), port, now=now)]
        for at, back, addr in items:
            assert at == port
            out = relay(port, back, addr, now)
            if out is not None:
                self.relay[out[0]].sendto(out[2], out[1])
        if self.native.changed:
            self.flows.sync(self.native.take_changed())

    @staticmethod
    def received(sock: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sock.recv(4096))
            except BlockingIOError:
                return out

    def check_stream(self, sid: str) -> None:
        """Both tables' stream ``sid`` equal: last_seen, every endpoint's state, the snapshot."""
        if sid not in self.python:
            return
        ps, ns = self.python.get_stream(sid), self.native.get_stream(sid)
        assert ns.last_seen == ps.last_seen
        for pe, ne in zip(ps.endpoints(), ns.endpoints(), strict=True):
            assert endpoint_state(ne) == endpoint_state(pe), (ne.local_port, ne.is_rtcp_port)
        assert ns.snapshot() == ps.snapshot()

    def close(self) -> None:
        self.flows.close()
        self.forwarder.close()
        for sock in self.socks:
            sock.close()


class Rig(TwoTables):
    """E's shape: a latching client leg on its own pair, C's leg demuxed on a shared pair."""

    def __init__(self, backend: str = "epoll") -> None:
        super().__init__(5, backend)
        self.client_rtp, self.client_rtcp, self.demux_rtp, self.demux_rtcp, self.spare = self.ports
        # (spare: bound, but no stream uses it)
        self.client = self._new()  # the MRA client (RTP and RTCP from one socket)
        self.c = self._new()  # Expressway-C's outside RTP
        self.c_rtcp = self._new()
        for table in (self.python, self.native):
            self.add(table, "s1", name(self.c), name(self.c_rtcp))

    def add(self, table: RelayTable, stream_id: str, c_rtp: Addr, c_rtcp: Addr) -> None:
        table.add_stream(
            stream_id,
            LegSpec.dedicated(self.client_rtp, self.client_rtcp, latch=True),
            LegSpec.demuxed(self.demux_rtp, self.demux_rtcp, c_rtp, c_rtcp),
            now=0.0,
            clock_rate=8000,
        )

    def send(self, src: socket.socket, port: int, data: bytes, now: float) -> None:
        """One datagram through both tables at the same clock."""
        self.python.receive_datagram(port, data, name(src), now)

        def relay(port: int, data: bytes, addr: Addr, now: float) -> Relayed | None:
            route = self.native.receive_datagram(port, data, addr, now)
            return None if route is None else (route[0], route[1], data)

        self.send_native(src, port, data, now, relay)

    def check(self) -> None:
        """Every counter and all receiver state equal; the sinks got what was counted as sent."""
        self.flows.flush()
        assert self.native.totals() == self.python.totals()
        self.check_stream("s1")


def endpoint_state(ep: Endpoint) -> dict[str, Any]:
    return {
        "rx": (ep.rx_packets, ep.rx_bytes),
        "tx": (ep.tx_packets, ep.tx_bytes),
        "drops": ep.drops(),
        "latched": (ep.latched, ep.remote, ep.route),
        "stats": ep.stats.get_state(),
    }


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(str(request.param))
    try:
        yield r
    finally:
        r.close()


def establish(rig: Rig, now: float = 1.0) -> float:
    """The client latches RTP and RTCP, C answers on both: from here flows are native."""
    rig.send(rig.client, rig.client_rtp, rtp(1, 160), now)
    rig.send(rig.c, rig.demux_rtp, rtp(100, 0, ssrc=0xC), now + 0.01)
    rig.send(rig.client, rig.client_rtcp, rtcp(), now + 0.02)
    rig.send(rig.c_rtcp, rig.demux_rtcp, rtcp(ssrc=0xC), now + 0.03)
    return now + 0.04


# -- scenarios ------------------------------------------------------------------------------------


def test_established_flows_go_native_and_match_python(rig: Rig) -> None:
    now = establish(rig)
    assert len(rig.flows) == 4  # client RTP/RTCP and C RTP/RTCP
    before = rig.forwarder.counters()["forwarded"]
    for i in range(2, 200):
        now += 0.02
        rig.send(rig.client, rig.client_rtp, rtp(i, i * 160), now)
        rig.send(rig.c, rig.demux_rtp, rtp(100 + i, i * 160, ssrc=0xC), now + 0.001)
        if i % 50 == 0:
            rig.send(rig.client, rig.client_rtcp, rtcp(), now + 0.002)
            rig.send(rig.c_rtcp, rig.demux_rtcp, rtcp(ssrc=0xC), now + 0.003)
    assert rig.forwarder.counters()["forwarded"] - before == 2 * 198 + 2 * 3
    rig.check()
    to_c, to_client = rig.received(rig.c), rig.received(rig.client)
    assert len(to_c) == rig.native.get_stream("s1").legs[1].rtp.tx_packets
    assert to_c[-1] == rtp(199, 199 * 160)  # byte-exact, in order
    assert len(to_client) == 2 + 198 + 3  # from C's first packet on (RTP and RTCP: one socket)
    assert len(rig.received(rig.c_rtcp)) == 1 + 3


def test_sequence_wrap_duplicates_reorder_jumps_and_ssrc_change(rig: Rig) -> None:
    now = establish(rig)
    seqs = [65530, 65531, 65533, 65532, 65533, 65535, 0, 1, 1, 3, 2]  # wrap, reorder, duplicates
    seqs += [9000, 20000, 20001, 20002]  # a jump, then a confirmed restart
    seqs += [40000, 20003, 19990]  # an unconfirmed jump, then misordered within 100
    for k, seq in enumerate(seqs):
        now += 0.02 + (k % 5) * 0.003  # uneven arrival: jitter
        rig.send(rig.client, rig.client_rtp, rtp(seq, k * 160 + (k % 3) * 40), now)
    rig.check()  # before the SSRC change restarts the estimators
    for k in range(30):  # a new source (call transfer): the estimators restart
        now += 0.02
        rig.send(rig.client, rig.client_rtp, rtp(500 + k, 0xFFFFFF00 + k * 160, ssrc=0xBEEF), now)
    rig.check()
    stats = rig.native.get_stream("s1").legs[0].rtp.stats
    assert stats.ssrc == 0xBEEF and stats.expected == 30 and stats.lost == 0 and stats.jitter >= 0


def test_hostile_packets_are_dropped_and_counted_the_same(rig: Rig) -> None:
    now = establish(rig)
    stranger = rig._new()
    garbage = [
        b"\x80\x00\x00",  # shorter than an RTCP header
        rtp(7, size=9),  # RTCP-sized, but not an RTCP type: too short for RTP
        rtp(7, size=1501),  # over the relay's maximum
        rtp(7, size=4000),  # longer than the native receive buffer (truncated: still too big)
        b"\x40" + rtp(7)[1:],  # version 1
        b"\x00" * 172,  # version 0
        b"\xc0" + rtp(7)[1:],  # version 3
    ]
    for data in garbage:
        now += 0.01
        rig.send(rig.client, rig.client_rtp, data, now)  # from the latched source itself
        rig.send(rig.c, rig.demux_rtp, data, now)
    for k in range(300):  # a flood from sources that are not the latched ones
        now += 0.0001
        rig.send(stranger, rig.client_rtp, rtp(k), now)
        rig.send(stranger, rig.demux_rtp, rtp(k), now)
        rig.send(stranger, rig.client_rtcp, rtcp(), now)
    for k in range(20):  # a port no stream uses
        rig.send(rig.client, rig.spare, rtp(k), now)
    now += 0.02
    rig.send(rig.client, rig.client_rtp, rtp(2, 320), now)  # the stream still works
    rig.check()
    totals = rig.native.totals()
    assert totals["garbage_drops"] == 2 * len(garbage)
    assert totals["unlatched_drops"] == 600 and totals["unknown_source_drops"] == 300
    assert totals["unknown_port_drops"] == 20
    assert rig.received(stranger) == []


def test_rtcp_by_payload_type_on_the_rtp_port(rig: Rig) -> None:
    now = establish(rig)
    for k in range(10):  # RFC 5761 mux: RTCP types on the RTP port go to the peer's RTCP
        now += 0.01
        rig.send(rig.client, rig.client_rtp, rtcp(200 + k % 5), now)
        rig.send(rig.client, rig.client_rtp, rtp(10 + k, pt=0x80 | 95), now)  # marker + PT 95 = 223
        rig.send(rig.client, rig.client_rtp, rtp(20 + k, pt=0x80 | 63), now)  # 191: RTP
    rig.check()
    assert len(rig.received(rig.c_rtcp)) == 1 + 20


def test_mux_rtcp_without_a_route_goes_to_python(rig: Rig) -> None:
    # Only RTP has latched towards the client: C's RTCP-typed packets on the RTP port have no
    # route yet; the table counts them (not_latched) while RTP stays native.
    rig.send(rig.client, rig.client_rtp, rtp(1), 1.0)
    for k in range(5):
        rig.send(rig.c, rig.demux_rtp, rtp(k, ssrc=0xC), 1.1 + k / 100)
        rig.send(rig.c, rig.demux_rtp, rtcp(ssrc=0xC), 1.1 + k / 100)
    rig.check()
    ep = rig.native.get_stream("s1").legs[1].rtp
    assert ep.not_latched_drops == 5 and ep.tx_packets == 1 and ep.rx_packets == 10


def test_relatch_set_remote_and_removal_keep_counters_exact(rig: Rig) -> None:
    now = establish(rig)
    for k in range(20):
        now += 0.02
        rig.send(rig.client, rig.client_rtp, rtp(2 + k, k * 160), now)
    # The client moves (re-INVITE): relatch; its old address becomes a stranger.
    moved = rig._new()
    for table in (rig.python, rig.native):
        table.relatch("s1", 0)
    for k in range(20):
        now += 0.02
        rig.send(moved, rig.client_rtp, rtp(40 + k, k * 160), now)
        rig.send(rig.client, rig.client_rtp, rtp(90 + k, k * 160), now)
        rig.send(rig.c, rig.demux_rtp, rtp(200 + k, k * 160, ssrc=0xC), now)
    assert rig.native.get_stream("s1").legs[0].rtp.remote == name(moved)
    assert len(rig.received(moved)) == 20
    # C moves: set_remote re-keys the demux leg; the old C address is now unknown.
    c2, c2_rtcp = rig._new(), rig._new()
    for table in (rig.python, rig.native):
        table.set_remote("s1", 1, name(c2), name(c2_rtcp))
    for k in range(20):
        now += 0.02
        rig.send(c2, rig.demux_rtp, rtp(300 + k, k * 160, ssrc=0xD), now)
        rig.send(rig.c, rig.demux_rtp, rtp(400 + k, k * 160, ssrc=0xC), now)
        rig.send(moved, rig.client_rtp, rtp(60 + k, k * 160), now)
    assert len(rig.received(c2)) == 20
    rig.check()
    # Removal folds the native counters in before the table retires them.
    stream = rig.native.get_stream("s1")
    rig.flows.drop_stream(stream)
    assert len(rig.flows) == 0
    assert rig.native.remove_stream("s1") is stream
    rig.python.remove_stream("s1")
    assert rig.native.totals() == rig.python.totals()


def test_counters_fold_lazily_and_the_idle_check_asks_only_for_due_streams(rig: Rig) -> None:
    """Nothing is copied back until someone reads (``flush``); the inactivity check refreshes
    ``last_seen`` of the streams the table would time out, keeps the ones that were active
    natively, and retires an idle one with exact counters (fake clock, default 60 s timeout)."""
    now = establish(rig)
    for i in range(2, 200):  # 4 s of native traffic after the Python-path latch
        now += 0.02
        rig.send(rig.client, rig.client_rtp, rtp(i, i * 160), now)
    stream = rig.native.get_stream("s1")
    assert stream.legs[0].rtp.rx_packets == 1  # (only what the table itself saw: not folded yet)
    assert stream.last_seen < now - 3.9
    assert rig.native.due(1.0 + 60.0 + 5.0) == [stream]  # by the table's own (stale) numbers
    rig.flows.refresh_idle(rig.native.due(61.5 + 5.0), 61.5)  # as the worker's timer does
    assert stream.last_seen == now and len(rig.flows) == 4  # active natively: kept
    assert rig.native.handle_timer(61.5) == [] and rig.python.handle_timer(61.5) == []
    rig.check()
    later = now + 60.0
    rig.flows.refresh_idle(rig.native.due(later + 5.0), later)
    assert len(rig.flows) == 0  # idle: folded and removed before the table retires it
    assert [e.stream_id for e in rig.native.handle_timer(later)] == ["s1"]
    assert [e.stream_id for e in rig.python.handle_timer(later)] == ["s1"]
    assert rig.native.totals() == rig.python.totals() and rig.native.totals()["rx_packets"] == 4 + 198


def test_removing_a_socket_purges_flows_that_use_it(rig: Rig) -> None:
    establish(rig)
    assert len(rig.forwarder) == 4
    # The worker removes flows first (drop_port); the forwarder itself still refuses to keep a
    # flow whose socket is going away (a reused fd number would otherwise send from it).
    assert rig.forwarder.remove_socket(rig.relay[rig.demux_rtp].fileno(), rig.demux_rtp) == 2
    assert len(rig.forwarder) == 2
    rig.flows.drop_port(rig.demux_rtp)
    assert len(rig.flows) == 2


stats_packets = st.lists(
    st.tuples(
        st.integers(-3, 3200) | st.sampled_from([-200, -99, 32768, 65000]),  # seq step
        st.integers(0, 4000),  # ts step
        st.integers(0, 60),  # arrival gap, ms
        st.sampled_from([0x1234, 0x1234, 0x1234, 0x5678]),  # mostly one SSRC
    ),
    min_size=1,
    max_size=60,
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(packets=stats_packets)
def test_receiver_statistics_are_identical_for_any_sequence(
    packets: list[tuple[int, int, int, int]], backend: str
) -> None:
    r = Rig(backend)
    try:
        now = establish(r)
        seq, ts = 1, 160
        for step, ts_step, gap_ms, ssrc in packets:
            seq, ts = (seq + step) & 0xFFFF, (ts + ts_step) & 0xFFFFFFFF
            now += gap_ms / 1000
            r.send(r.client, r.client_rtp, rtp(seq, ts, ssrc), now)
        r.check()
    finally:
        r.close()


datagrams = st.lists(
    st.tuples(
        st.sampled_from(["client", "c", "stranger"]),
        st.sampled_from(["client_rtp", "client_rtcp", "demux_rtp", "demux_rtcp"]),
        st.sampled_from([0x80, 0x80, 0x90, 0xA0, 0x00, 0x40, 0xC0]),  # version 2, padding, others
        st.binary(min_size=0, max_size=40) | st.binary(min_size=1490, max_size=1510),
    ),
    min_size=1,
    max_size=40,
)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(packets=datagrams)
def test_arbitrary_datagrams_are_handled_the_same(
    packets: list[tuple[str, str, int, bytes]], backend: str
) -> None:
    r = Rig(backend)
    try:
        now = establish(r)
        stranger = r._new()
        senders = {"client": r.client, "c": r.c, "stranger": stranger}
        for who, port, first, body in packets:
            now += 0.001
            r.send(senders[who], getattr(r, port), bytes([first]) + body, now)
        r.check()
    finally:
        r.close()


# -- the forwarder's own contract ------------------------------------------------------------------


def test_state_round_trip_and_bad_installs_are_refused() -> None:
    fwd = _forwarder()
    sock = udp()
    try:
        stats = StreamStats(8000)
        stats.update(rtp(5, 800), 1.0)
        key = fwd.install(
            2776, HOST, 5000, False, sock.fileno(), (HOST, 6000), -1, None, 8000, stats.get_state()
        )
        item = fwd.remove(key)
        assert item is not None and item[0] == key and item[1:7] == (0, 0, 0, 0, 0, 0)
        assert item[8] == stats.get_state()
        assert fwd.remove(key) is None
        good = (2776, HOST, 5000, False, sock.fileno(), (HOST, 6000), -1, None, 8000, stats.get_state())
        bad_variants = [
            (0, *good[1:]),  # local port 0
            (2776, "::1", *good[2:]),  # not IPv4
            (2776, "example.org", *good[2:]),
            (*good[:4], -1, (HOST, 6000), *good[6:]),  # a destination without a socket
            (*good[:5], ("10.0.0.1", 70000), *good[6:]),
            (*good[:8], 0, good[9]),  # clock rate
            (*good[:9], (1, 2, 3)),  # state of the wrong shape
            (*good[:9], (*stats.get_state()[:4], 1 << 70, *stats.get_state()[5:])),
        ]
        for args in bad_variants:
            with pytest.raises((ValueError, TypeError, OverflowError)):
                fwd.install(*args)
        assert len(fwd) == 0
        fwd.install(*good)
        with pytest.raises(KeyError):
            fwd.install(*good)
        assert fwd.drain(sock.fileno(), 2776) == []  # nothing queued: nothing returned
        fwd.close()
        with pytest.raises(ValueError):
            fwd.poll()
        with pytest.raises(ValueError):
            fwd.install(*good)
    finally:
        fwd.close()
        sock.close()


def test_many_flows_grow_and_shrink_the_table() -> None:
    fwd = _forwarder()
    sock = udp()
    try:
        state = StreamStats().get_state()
        keys = [
            fwd.install(2000 + i % 7, f"10.0.{i // 250}.{i % 250}", 1000 + i, bool(i & 1), sock.fileno(),
                        (HOST, 9), sock.fileno(), (HOST, 9), 8000, state)
            for i in range(3000)
        ]  # fmt: skip
        assert len(set(keys)) == 3000 and len(fwd) == 3000
        for key in keys[::2]:
            assert fwd.remove(key) is not None
        assert len(fwd) == 1500
        for key in keys[1::2]:  # every survivor is still found after backward-shift deletions
            assert fwd.remove(key) is not None
        assert len(fwd) == 0 and fwd.flush() == []
    finally:
        fwd.close()
        sock.close()


def _poll_until(fwd: Any, want: int, deadline_s: float = 5.0) -> list[tuple[int, bytes, Addr]]:
    """poll() (io_uring: nothing blocks) until ``want`` hand-backs came, bounded in time."""
    got: list[tuple[int, bytes, Addr]] = []
    end = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < end:
        got += fwd.poll()
    return got


def test_uring_outlives_its_receive_buffers_and_keeps_every_socket_in_order() -> None:
    """More datagrams queued than the ring has receive buffers (here 64): receives that ran dry
    end with ENOBUFS and are re-armed; every datagram comes back once, in order per socket."""
    fwd = _forwarder("uring", buffers=64)
    socks = [udp() for _ in range(64)]
    src = udp()
    try:
        assert fwd.counters()["uring"] == 1
        for s in socks:
            fwd.add_socket(s.fileno(), name(s)[1])
        per_socket = 40  # 2,560 in all
        for s in socks:
            for i in range(per_socket):
                src.sendto(rtp(i), name(s))
        got = _poll_until(fwd, per_socket * len(socks))
        assert len(got) == per_socket * len(socks)
        for s in socks:
            seqs = [struct.unpack("!H", data[2:4])[0] for port, data, addr in got if port == name(s)[1]]
            assert seqs == list(range(per_socket))
        assert all(addr == name(src) for _, _, addr in got)
        counters = fwd.counters()
        assert counters["uring_rearms"] > 0 and counters["recv_errors"] == 0
    finally:
        fwd.close()
        for s in (*socks, src):
            s.close()


def test_uring_forgets_a_removed_socket_even_when_its_fd_number_comes_back() -> None:
    """Datagrams a removed socket had queued are dropped with it; a new socket that gets the same
    fd number (and another port) is read as itself from its first datagram."""
    fwd = _forwarder("uring")
    src = udp()
    old = udp()
    try:
        old_port = name(old)[1]
        fwd.add_socket(old.fileno(), old_port)
        src.sendto(rtp(1), name(old))
        assert _poll_until(fwd, 1) == [(old_port, rtp(1), name(src))]
        src.sendto(rtp(2), name(old))  # received by the ring, never polled
        fd = old.fileno()
        assert fwd.remove_socket(fd, old_port) == 0
        old.close()
        new = udp()
        try:
            assert new.fileno() == fd
            fwd.add_socket(new.fileno(), name(new)[1])
            src.sendto(rtp(3), name(new))
            assert _poll_until(fwd, 1) == [(name(new)[1], rtp(3), name(src))]
            assert fwd.poll() == []
            again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the old port is free
            again.bind((HOST, old_port))
            again.close()
        finally:
            fwd.remove_socket(new.fileno(), name(new)[1])
            new.close()
    finally:
        fwd.close()
        src.close()


def test_uring_sockets_sit_in_the_rings_file_table_until_removed() -> None:
    """io_uring requests name a socket by its slot in the ring's registered file table (no file
    lookup per send); a flow relays through table slots, and a removed socket leaves the table
    at once, so closing it frees its port (the table's reference would hold it open)."""
    fwd = _forwarder("uring")
    relay, egress, src, sink = udp(), udp(), udp(), udp()
    try:
        port = name(relay)[1]
        fwd.add_socket(relay.fileno(), port)
        fwd.add_socket(egress.fileno(), name(egress)[1])
        assert fwd.counters()["uring_files"] == 2
        state = StreamStats().get_state()
        fwd.install(port, HOST, name(src)[1], False, egress.fileno(), name(sink), -1, None, 8000, state)
        src.sendto(rtp(7), name(relay))
        end = time.monotonic() + 5
        while fwd.counters()["forwarded"] < 1 and time.monotonic() < end:
            assert fwd.poll() == []
        sink.settimeout(5)
        data, addr = sink.recvfrom(2048)
        assert (data, addr) == (rtp(7), name(egress))
        egress_port = name(egress)[1]
        fwd.remove_socket(egress.fileno(), egress_port)
        assert fwd.counters()["uring_files"] == 1
        egress.close()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # free at once
        again.bind((HOST, egress_port))
        again.close()
    finally:
        fwd.close()
        for s in (relay, egress, src, sink):
            s.close()


def test_uring_removal_cancels_the_receive_it_armed_whatever_port_it_is_told() -> None:
    """remove_socket cancels the socket's receive by the user_data add_socket armed it with (a
    hash lookup in the ring, not a scan of every request), so the port it is given does not
    matter: the socket is let go and its port is free once the caller closes it."""
    fwd = _forwarder("uring")
    socks = [udp() for _ in range(3)]
    try:
        for s in socks:
            fwd.add_socket(s.fileno(), name(s)[1])
        victim = socks[1]
        port = name(victim)[1]
        fwd.remove_socket(victim.fileno(), port + 1 if port < 65535 else port - 1)
        victim.close()
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            again.bind((HOST, port))  # free at once: nothing holds the old socket
        finally:
            again.close()
        src = udp()
        try:  # the others still receive
            for s in (socks[0], socks[2]):
                src.sendto(rtp(1), name(s))
            got = sorted(p for p, _, _ in _poll_until(fwd, 2))
            assert got == sorted([name(socks[0])[1], name(socks[2])[1]])
        finally:
            src.close()
    finally:
        fwd.close()
        for s in socks:
            s.close()


def _big_udp() -> socket.socket:
    sock = udp()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def test_the_elastic_send_helper_takes_half_the_flows_on_a_backlog_and_stops_when_relieved() -> None:
    """A backlog (here 64 flows x 40 datagrams waiting at once) makes an elastic forwarder lend
    the sends of half its flows to the helper; every flow still arrives complete and in order
    (a flow always goes one way while the helper holds any of its datagrams); once the
    forwarder is idle again the helper stops taking sends, and then no send goes to it."""
    _forwarder("uring")  # skips where io_uring is refused
    fwd = fastpath.new_forwarder(uring=True, helper=fastpath.HELPER_ELASTIC)
    relay, egress = _big_udp(), udp()
    srcs = [udp() for _ in range(64)]
    sinks = [_big_udp() for _ in range(64)]
    try:
        port = name(relay)[1]
        fwd.add_socket(relay.fileno(), port)
        fwd.add_socket(egress.fileno(), name(egress)[1])
        state = StreamStats().get_state()
        for src, sink in zip(srcs, sinks, strict=True):
            fwd.install(port, HOST, name(src)[1], False, egress.fileno(), name(sink), -1, None, 8000, state)
        assert fwd.counters()["helper"] == fastpath.HELPER_ELASTIC and fwd.counters()["helper_active"] == 0
        per_flow = 40
        for i in range(per_flow):
            for src in srcs:
                src.sendto(rtp(i), name(relay))
        end = time.monotonic() + 10
        while fwd.counters()["forwarded"] < per_flow * len(srcs) and time.monotonic() < end:
            assert fwd.poll() == []
        assert fwd.helper_wait(5.0)
        counters = fwd.counters()
        assert counters["helper_activations"] == 1 and counters["helper_active"] == 1
        # from the activation on, the sends of about half the flows (a hash picks them)
        assert 0 < counters["helper_queued"] <= 0.75 * per_flow * len(srcs)
        assert counters["helper_sent"] == counters["helper_queued"] and counters["send_errors"] == 0
        for sink in sinks:
            seqs = [struct.unpack("!H", d[2:4])[0] for d in TwoTables.received(sink)]
            assert seqs == list(range(per_flow))
        # idle turns: relieved for 20 windows of 1 ms, the queue empty: the helper stops
        end = time.monotonic() + 5
        while fwd.counters()["helper_active"] and time.monotonic() < end:
            fwd.poll()
            time.sleep(0.001)
        assert fwd.counters()["helper_active"] == 0
        queued = fwd.counters()["helper_queued"]
        srcs[0].sendto(rtp(per_flow), name(relay))
        end = time.monotonic() + 5
        while fwd.counters()["forwarded"] < per_flow * len(srcs) + 1 and time.monotonic() < end:
            fwd.poll()
        assert fwd.counters()["helper_queued"] == queued  # sent by the forwarder itself
    finally:
        fwd.close()
        for s in (relay, egress, *srcs, *sinks):
            s.close()


def test_bad_send_helper_arguments_are_refused() -> None:
    """An unknown helper mode, a share outside 1..4, a helper without io_uring and an absurd
    wait are ValueErrors; nothing is started."""
    _forwarder("uring")  # skips where io_uring is refused
    assert fastpath._fastpath is not None
    forwarder = fastpath._fastpath.Forwarder
    for kwargs in ({"uring": True, "helper": 3}, {"uring": True, "helper": 1, "helper_share": 0},
                   {"uring": True, "helper": 1, "helper_share": 5}, {"helper": 1}):  # fmt: skip
        with pytest.raises(ValueError, match="helper"):
            forwarder(**kwargs)
    fwd = _forwarder("helper")
    try:
        for timeout in (-1.0, 61.0):
            with pytest.raises(ValueError, match="timeout_s"):
                fwd.helper_wait(timeout)
        assert fwd.helper_wait(0.0)  # nothing queued
    finally:
        fwd.close()


def test_removing_a_socket_waits_for_the_sends_the_helper_holds_for_it() -> None:
    """The helper sends from the forwarder's sockets: remove_socket returns only once nothing
    it holds still names that socket, so the caller may close it (and its fd number may be
    reused) without a datagram leaving from the wrong socket or being lost."""
    fwd = _forwarder("helper")
    relay, egress, src, sink = _big_udp(), udp(), udp(), _big_udp()
    try:
        port = name(relay)[1]
        fwd.add_socket(relay.fileno(), port)
        fwd.add_socket(egress.fileno(), name(egress)[1])
        state = StreamStats().get_state()
        fwd.install(port, HOST, name(src)[1], False, egress.fileno(), name(sink), -1, None, 8000, state)
        for i in range(200):
            src.sendto(rtp(i), name(relay))
        end = time.monotonic() + 5
        while fwd.counters()["forwarded"] < 200 and time.monotonic() < end:
            fwd.poll()
        egress_port = name(egress)[1]
        fwd.remove_socket(egress.fileno(), egress_port)
        assert fwd.counters()["helper_sent"] == 200
        egress.close()
        got = TwoTables.received(sink)
        assert [struct.unpack("!H", d[2:4])[0] for d in got] == list(range(200))
    finally:
        fwd.close()
        for s in (relay, egress, src, sink):
            s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_send_the_kernel_refuses_is_counted_and_the_next_one_goes(backend: str) -> None:
    """A flow whose destination the kernel refuses (broadcast without SO_BROADCAST: EACCES)
    counts a send error per datagram (io_uring: from the failed SEND's completion; helper: from
    its failed send); another flow of the same turn is sent."""
    fwd = _forwarder(backend)
    relay, egress, src, sink = udp(), udp(), udp(), udp()
    try:
        port = name(relay)[1]
        fwd.add_socket(relay.fileno(), port)
        state = StreamStats().get_state()
        fwd.install(
            port, HOST, name(src)[1], False, egress.fileno(), ("255.255.255.255", 9), -1, None, 8000, state
        )
        other = udp()
        try:
            fwd.install(port, HOST, name(other)[1], False, egress.fileno(), name(sink), -1, None, 8000, state)
            src.sendto(rtp(1), name(relay))
            other.sendto(rtp(2), name(relay))
            end = time.monotonic() + 5
            while fwd.counters()["forwarded"] < 2 and time.monotonic() < end:
                assert fwd.poll() == []
            assert fwd.helper_wait(5.0)  # helper: its sends (and their errors) are done
            counters = fwd.counters()
            assert counters["forwarded"] == 2 and counters["send_errors"] == 1
            assert sink.recv(2048) == rtp(2)
        finally:
            other.close()
    finally:
        fwd.close()
        for s in (relay, egress, src, sink):
            s.close()


def test_closing_a_uring_forwarder_releases_its_sockets_at_once() -> None:
    """An armed receive holds its socket; closing the ring removes them at once (the kernel
    tears poll-driven requests down synchronously), so a socket the caller closes next frees
    its port at once."""
    fwd = _forwarder("uring")
    sock = udp()
    port = name(sock)[1]
    fwd.add_socket(sock.fileno(), port)
    fwd.close()
    sock.close()
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        again.bind((HOST, port))
    finally:
        again.close()


def test_uring_forwarder_is_not_served_by_a_thread() -> None:
    fwd = _forwarder("uring")
    try:
        with pytest.raises(RuntimeError, match="io_uring"):
            fwd.run(lambda items: None)
    finally:
        fwd.close()


# -- through the worker and the event loop ---------------------------------------------------------


class Peer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        # room for a burst the kernel forwards faster than this loop reads (the default ~270)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.received.append(data)

    @property
    def addr(self) -> Addr:
        assert self.transport is not None
        return name(self.transport.get_extra_info("socket"))

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))


async def until(predicate: Callable[[], bool]) -> None:
    """Explicit readiness: yield to the loop until ``predicate`` holds (bounded)."""
    for _ in range(20_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def _counters(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What a worker snapshot counts (ports, addresses and clocks differ from run to run)."""
    legs = [
        {
            **{k: leg[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "drops", "latched")},
            "rtp": {k: leg["rtp"][k] for k in ("packets", "bytes", "ssrc", "expected", "lost")},
        }
        for stream in snapshot["streams"]
        for leg in stream["legs"]
    ]
    return {"legs": legs, "totals": snapshot["totals"]}


async def _e_scenario(
    native: bool, kernel: bool = False, burst: int = 100
) -> tuple[dict[str, Any], dict[str, int], dict[str, Any]]:
    """E's shapes through a real worker: latching, demux, strangers, garbage, RTCP, relatch.
    ``kernel``: established flows forwarded by ``media_relay.kernel`` (root only). ``burst``:
    the client's first packets, sent before the worker reads any (more than one read takes:
    the flow moves into the kernel while some of them still wait at the socket)."""
    loop = asyncio.get_running_loop()
    worker = RelayWorker(HOST, allocator=PortAllocator(45000, 45999), native=native, kernel_forwarding=kernel)
    assert worker.kernel_forwarding == kernel, worker.kernel_error
    peers = [(await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0)))[1] for _ in range(5)]
    client, c, c_rtcp, stranger, moved = peers
    try:
        demux_rtp, demux_rtcp = await worker.bind_port(0), await worker.bind_port(0)
        a_rtp, a_rtcp = await worker.bind_pair()
        worker.add_stream(
            "e1",
            LegSpec.dedicated(a_rtp, latch=True),
            LegSpec.demuxed(demux_rtp, demux_rtcp, c.addr, c_rtcp.addr),
        )

        def total(key: str) -> int:
            return worker.totals()[key]

        c.send(rtp(1, ssrc=0xC), demux_rtp)  # before the client spoke: not latched
        await until(lambda: total("not_latched_drops") == 1)
        for i in range(burst):
            client.send(rtp(i, i * 160), a_rtp)
        await until(lambda: len(c.received) == burst)
        for i in range(100):
            c.send(rtp(i + 2, i * 160, ssrc=0xC), demux_rtp)
        await until(lambda: len(client.received) == 100)
        for i in range(50):
            stranger.send(rtp(i), a_rtp)
            stranger.send(rtp(i), demux_rtp)
        for i in range(10):
            client.send(b"\x40" + rtp(i)[1:], a_rtp)
        await until(lambda: total("unlatched_drops") == 50 and total("unknown_source_drops") == 50)
        await until(lambda: total("garbage_drops") == 10)
        for _ in range(5):
            client.send(rtcp(), a_rtcp)
        await until(lambda: len(c_rtcp.received) == 5)
        worker.table.relatch("e1", 0)  # the client moved
        for i in range(20):
            moved.send(rtp(200 + i, i * 160), a_rtp)
        await until(lambda: len(c.received) == burst + 20)
        for i in range(20):
            c.send(rtp(300 + i, i * 160, ssrc=0xC), demux_rtp)
        await until(lambda: len(moved.received) == 20)
        info = worker.stats()["worker"]
        assert info["fastpath"] == ("native" if native else "python")
        if kernel:  # every established packet went through the kernel, none through C code
            assert info["kernel"]["installs"] >= 3 and info["native"]["forwarded"] == 0
        elif native:  # C's packets came once both legs had latched: all native. (A burst that
            # arrives before its leg latched goes to the table in one batch, by design.)
            assert info["native"]["forwarded"] >= burst + 20
        snapshot = _counters(worker.stats())
        worker.remove_stream("e1")
        return snapshot, worker.totals(), info
    finally:
        for p in peers:
            assert p.transport is not None
            p.transport.close()
        await worker.close()


async def test_worker_counts_the_same_on_both_paths() -> None:
    assert fastpath.built(), "media_relay._fastpath is not built"
    native, native_retired, _ = await _e_scenario(True)
    python, python_retired, _ = await _e_scenario(False)
    assert native == python
    assert native_retired == python_retired and native_retired["rx_packets"] == 1 + 100 + 100 + 5 + 20 + 20
    assert native_retired["streams"] == 0


async def test_kernel_forwarding_counts_the_same_as_python() -> None:
    """E's scenario with its established flows in the kernel (``media_relay/kernel.py``)."""
    require_kernel()
    kernel, kernel_retired, _ = await _e_scenario(True, kernel=True)
    python, python_retired, _ = await _e_scenario(False)
    assert kernel == python
    assert kernel_retired == python_retired


async def test_kernel_forwarding_counts_a_burst_that_outlasts_the_move_the_same() -> None:
    """400 packets wait at the socket before E reads any: the first read latches the leg and
    its flow moves into the kernel while the rest still wait there (more than one read takes
    them, whatever the backend). The table counts those stragglers after the move; folding the
    kernel's counters back must not drop them."""
    require_kernel()
    kernel, kernel_retired, _ = await _e_scenario(True, kernel=True, burst=400)
    python, python_retired, _ = await _e_scenario(False, burst=400)
    assert kernel == python
    assert kernel_retired == python_retired


async def test_native_traffic_keeps_a_stream_alive_until_it_stops(relay_path: str) -> None:
    """``last_seen`` comes from the forwarder: the inactivity timer must see native packets."""
    loop = asyncio.get_running_loop()
    timeouts: asyncio.Queue[StreamTimedOut] = asyncio.Queue()
    worker = RelayWorker(HOST, allocator=PortAllocator(44000, 44999), on_timeout=timeouts.put_nowait)
    assert worker.path == relay_path
    client = (await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0)))[1]
    far = (await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0)))[1]
    try:
        a, _ = await worker.bind_pair()
        b, _ = await worker.bind_pair()
        worker.add_stream(
            "s",
            LegSpec.dedicated(a, latch=True),
            LegSpec.dedicated(b, latch=False, remote_rtp=far.addr, remote_rtcp=far.addr),
            inactivity_timeout_s=0.3,
        )
        for i in range(16):  # 0.8 s of media, well past the 0.3 s timeout
            client.send(rtp(i, i * 160), a)
            await asyncio.sleep(0.05)
            assert timeouts.empty() and "s" in worker.table
        assert len(far.received) == 16
        event = await asyncio.wait_for(timeouts.get(), 5.0)
        assert event.stream_id == "s" and event.idle_s >= 0.3
        info = worker.stats()["worker"]
        assert info.get("native", {"flows": 0})["flows"] == 0
        assert worker.totals()["rx_packets"] == 16  # retired with the stream, nothing lost
    finally:
        for p in (client, far):
            assert p.transport is not None
            p.transport.close()
        await worker.close()


def test_env_var_forces_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastpath.ENV_VAR, "0")
    assert not fastpath.available()
    monkeypatch.setenv(fastpath.ENV_VAR, "1")
    assert fastpath.available() == fastpath.built()


async def _relays_one_way(worker: RelayWorker) -> None:
    """A two-leg stream on ``worker``: 20 packets from a latching client reach the far end, the
    later ones natively."""
    loop = asyncio.get_running_loop()
    client, far = [(await loop.create_datagram_endpoint(Peer, local_addr=(HOST, 0)))[1] for _ in range(2)]
    try:
        a, _ = await worker.bind_pair()
        b, b_rtcp = await worker.bind_port(0), await worker.bind_port(0)
        far_leg = LegSpec.demuxed(b, b_rtcp, far.addr, far.addr)
        worker.add_stream("s", LegSpec.dedicated(a, latch=True), far_leg)
        for i in range(20):
            client.send(rtp(i), a)
            await until(lambda i=i: len(far.received) == i + 1)  # type: ignore[misc]
        assert [struct.unpack("!H", d[2:4])[0] for d in far.received] == list(range(20))
        assert worker.stats()["worker"]["native"]["forwarded"] >= 10
    finally:
        for p in (client, far):
            assert p.transport is not None
            p.transport.close()


async def test_worker_with_the_send_helper_relays_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """``helper=True`` (C: ``expc.media_send_helper``; ``EDGE_MEDIA_HELPER=1``) gives an io_uring
    worker an elastic send helper; the status says so; off by default."""
    assert fastpath.built(), "media_relay._fastpath is not built"
    _forwarder("uring")  # skips where io_uring is refused
    monkeypatch.delenv(fastpath.URING_ENV_VAR, raising=False)
    monkeypatch.delenv(fastpath.HELPER_ENV_VAR, raising=False)
    worker = RelayWorker(HOST, native=True)
    try:
        assert worker.stats()["worker"]["native"]["helper"] == fastpath.HELPER_OFF
    finally:
        await worker.close()
    monkeypatch.setenv(fastpath.HELPER_ENV_VAR, "1")
    worker = RelayWorker(HOST, allocator=PortAllocator(46000, 46999), native=True)
    try:
        native = worker.stats()["worker"]["native"]
        assert native["backend"] == "io_uring" and native["helper"] == fastpath.HELPER_ELASTIC
        await _relays_one_way(worker)
    finally:
        await worker.close()


async def test_worker_reads_through_io_uring_and_falls_back_to_epoll(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a native worker is on io_uring; where the kernel refuses it (old kernel,
    ``kernel.io_uring_disabled``, a seccomp filter) it says why and relays on epoll; threads
    stay on epoll, and so does ``EDGE_MEDIA_URING=0``."""
    assert fastpath.built(), "media_relay._fastpath is not built"
    monkeypatch.delenv(fastpath.URING_ENV_VAR, raising=False)
    worker = RelayWorker(HOST, native=True)
    try:
        info = worker.stats()["worker"]
        if fastpath.uring_refusal() is None:
            assert info["native"]["backend"] == "io_uring" and "uring_error" not in info
        else:  # this kernel refuses it: the default worker says so and is on epoll
            assert info["native"]["backend"] == "epoll" and "io_uring unavailable" in info["uring_error"]
    finally:
        await worker.close()

    real = fastpath.new_forwarder

    def refused(uring: bool = False, buffers: int = 1024, helper: int = 0, share: int = 2) -> Any:
        if uring:
            raise PermissionError(1, "Operation not permitted")
        return real()

    monkeypatch.setattr(fastpath, "new_forwarder", refused)
    worker = RelayWorker(HOST, allocator=PortAllocator(46000, 46999), native=True)
    try:
        info = worker.stats()["worker"]
        assert info["native"]["backend"] == "epoll"
        error = info["uring_error"]
        assert "io_uring unavailable" in error and "Operation not permitted" in error
        await _relays_one_way(worker)  # and it relays
    finally:
        await worker.close()
    monkeypatch.setattr(fastpath, "new_forwarder", real)

    for kwargs, env in (({"threads": 2}, "1"), ({}, "0")):
        monkeypatch.setenv(fastpath.URING_ENV_VAR, env)
        worker = RelayWorker(HOST, native=True, **kwargs)
        try:
            assert worker.stats()["worker"]["native"]["backend"] == "epoll"
        finally:
            await worker.close()

"""Kernel forwarding of established plain relay flows (E's legs): a TC program on ``lo``.

What rtpengine's kernel module does for its userspace daemon, with eBPF: once the relay table
has latched an endpoint and its peer has a route, ``FlowSync`` may install the flow here instead
of in the native forwarder (``_fastpath.Forwarder``). The program, attached to the loopback
device's ingress with a TCX link (Linux 6.6+), looks every IPv4/UDP packet up by (destination
address and port, source address and port); for an installed flow it runs the same checks as
the native forwarder (size, RTP version, RTCP by payload type or port, a route for the kind),
counts, runs the RFC 3550 A.1/A.8 receiver estimators of ``StreamStats`` on RTP, rewrites the
addresses and ports to those of the egress socket and destination (fixing the IP and UDP
checksums), and lets the packet go on to that destination's socket. The relay's own process
never sees it: no wake-up, no recvmmsg, no sendmmsg, one socket delivery instead of two.

Everything the program does not forward (no flow, a stranger, garbage, fragments, IP options,
RTCP without a route) goes on unchanged to the relay's socket, where the table counts it as
before. Python owns the flows: ``install``/``remove`` and ``read`` (absolute counters and the
receiver state, which ``FlowSync`` folds back as deltas). The link belongs to this process: it
goes away with the file descriptor, so a crashed relay leaves nothing attached.

Scope, by design: IPv4, and only flows whose addresses are all on loopback (127.0.0.0/8, the lab
on one host): a rewritten packet keeps the loopback route it came in with. Needs CAP_BPF and
CAP_NET_ADMIN (root) and TCX; ``KernelForwarder.open`` raises ``KernelUnavailable`` with the
reason otherwise, and the relay stays on the native path. The jitter estimator's arrival time is
the kernel's monotonic clock in microseconds times the clock rate (the userspace paths use the
loop's float seconds), so jitter can differ from theirs by rounding; sequence accounting is
identical. Counters are updated without locks: one flow's packets come from one sender, so
concurrent updates of one flow need that sender on two CPUs at once.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import mmap
import os
import socket
import struct
from typing import Any

from media_relay.bpf import FP, Asm, HashMap, attr, bpf, load, tcx_chain
from media_relay.rtp import StatsState

Addr = tuple[str, int]
# A leg's rewrite: (egress socket's local address, destination).
Egress = tuple[Addr, Addr]
# Absolute counters of one kernel flow: rx packets, rx bytes, tx RTP packets, tx RTP bytes,
# tx RTCP packets, tx RTCP bytes, last seen (monotonic s, or None), receiver state.
KernelCounters = tuple[int, int, int, int, int, int, float | None, StatsState]

ENV_VAR = "EDGE_MEDIA_KERNEL"  # "1": E's relay forwards established flows in the kernel

_BPF_MAP_CREATE, _BPF_LINK_CREATE = 0, 28
_BPF_MAP_TYPE_HASH, _BPF_MAP_TYPE_ARRAY = 1, 2
_BPF_F_MMAPABLE = 1 << 10
_BPF_PROG_TYPE_SCHED_CLS = 3
_BPF_TCX_INGRESS = 46
_TCX_NEXT = -1  # on to the next program of the chain (the last one passes the packet up)
# helpers
_MAP_LOOKUP, _KTIME_NS, _STORE_BYTES, _L3_CSUM, _L4_CSUM, _PULL_DATA = 1, 5, 9, 10, 11, 39
_F_PSEUDO_HDR, _F_MARK_MANGLED_0 = 1 << 4, 1 << 5

MAX_FLOWS = 1 << 16
MIN_DATAGRAM, RTP_HEADER, MAX_DATAGRAM = 8, 12, 1500  # as _fastpath.c
ETH, IP, UDP = 14, 20, 8
PAYLOAD = ETH + IP + UDP  # offset of the datagram in the frame the program sees

# key: daddr, saddr (network order), dport, sport (network order)
_KEY = struct.Struct("!4s4sHH")
# value: see _V_* offsets (addresses and ports in network order, the rest host order)
_VALUE = struct.Struct("=4s4s2s2s4s4s2s2sIIQQQQQQQQQQIIqqqqqqq")
_V_RTP, _V_RTCP, _V_FLAGS, _V_RATE = 0, 12, 24, 28
_V_RX_P, _V_RX_B, _V_TX = 32, 40, 48  # tx: RTP packets, bytes, RTCP packets, bytes
_V_SEEN = 80
_V_ST_P, _V_ST_B, _V_ST_SEEN, _V_HAS_SSRC, _V_SSRC = 88, 96, 104, 112, 116
_V_RECEIVED, _V_BASE, _V_MAX, _V_CYCLES, _V_BAD, _V_TRANSIT, _V_JITTER = 120, 128, 136, 144, 152, 160, 168
_FLAG_RTCP_PORT, _FLAG_RTP_ROUTE, _FLAG_RTCP_ROUTE = 1, 2, 4
# the receiver state block of a flow value, relative offsets (E's at _V_ST_P)
_S_SEEN, _S_HAS_SSRC, _S_SSRC, _S_RECEIVED, _S_BASE, _S_MAX = 16, 24, 28, 32, 40, 48
_S_CYCLES, _S_BAD, _S_TRANSIT, _S_JITTER = 56, 64, 72, 80
STATS_BYTES = 88
assert _VALUE.size == 176

_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class KernelUnavailable(OSError):
    """Kernel forwarding cannot run here (no permission, no TCX, not Linux x86_64)."""


def emit_checked_packet(a: Asm, need: int, fail: str) -> None:
    """r2 = the packet's data, r3 = its end, checked for ``need`` bytes (else ``fail``); r6 is
    the skb. Clobbers r4."""
    a.ldx(4, 2, 6, 76)
    a.ldx(4, 3, 6, 80)
    a.alu("mov", 4, 2)
    a.alu("add", 4, imm=need)
    a.jmp("jgt", fail, 4, 3)


class PortSet:
    """The destination ports a relay program has flows for, as a bitmap its program reads
    before the flow lookup (``emit_flow_lookup``): every packet on ``lo`` passes every relay
    program (E's, C's twice), and most are some other program's, or no relay's at all. A
    one-element BPF array, mapped into this process: adding a port sets its bit in place."""

    SIZE = 65536 // 8

    def __init__(self) -> None:
        self.fd = bpf(
            _BPF_MAP_CREATE,
            attr(struct.pack("<IIIII", _BPF_MAP_TYPE_ARRAY, 4, self.SIZE, 1, _BPF_F_MMAPABLE)),
        )
        try:
            self._bits = mmap.mmap(self.fd, self.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        self._count: dict[int, int] = {}

    def add(self, port: int) -> None:
        """Before a flow on ``port`` is installed."""
        n = self._count.get(port, 0)
        self._count[port] = n + 1
        if n == 0:
            self._bits[port >> 3] |= 1 << (port & 7)

    def discard(self, port: int) -> None:
        """After a flow on ``port`` is removed."""
        n = self._count.get(port, 0)
        if n <= 1:
            self._count.pop(port, None)
            self._bits[port >> 3] &= ~(1 << (port & 7)) & 0xFF
        else:
            self._count[port] = n - 1

    def close(self) -> None:
        if self.fd >= 0:
            self._bits.close()
            os.close(self.fd)
            self.fd = -1


def emit_flow_lookup(a: Asm, map_fd: int, miss: str, ports_fd: int) -> None:
    """The start of a relay program: r6 = the skb (from r1); an IPv4/UDP datagram without IP
    options or fragmentation to a port in ``ports_fd`` (a ``PortSet``), its key (daddr, saddr,
    dport, sport: network order) at fp-16, its flow in ``map_fd`` in r9, now (ns) at fp-24, the
    datagram's length (consistent with the IP and frame lengths, MIN_DATAGRAM..MAX_DATAGRAM) in
    r7, an RTP/RTCP version 2 first byte, and r2 the packet's data checked for PAYLOAD +
    MIN_DATAGRAM bytes; anything else goes to ``miss``. Its labels are ``lookup_*``."""
    r0, r1, r2, r4, r5, r6, r7, r9 = 0, 1, 2, 4, 5, 6, 7, 9
    a.alu("mov", r6, r1)
    emit_checked_packet(a, PAYLOAD + MIN_DATAGRAM, "lookup_pull")
    a.label("lookup_parsed")
    a.ldx(2, r4, r2, 12)  # ethertype
    a.jmp("jne", miss, r4, imm=0x0008)  # htons(ETH_P_IP)
    a.ldx(1, r4, r2, ETH)
    a.jmp("jne", miss, r4, imm=0x45)  # IPv4, no options
    a.ldx(1, r4, r2, ETH + 9)
    a.jmp("jne", miss, r4, imm=17)  # UDP
    a.ldx(2, r4, r2, ETH + 6)
    a.alu("and", r4, imm=0xFF3F)  # MF or a fragment offset
    a.jmp("jne", miss, r4, imm=0)
    a.ldx(2, r4, r2, ETH + IP + 2)  # a port with flows? (the bitmap: no lookup, no call)
    a.be(r4, 16)
    a.alu("mov", r5, r4)
    a.alu("rsh", r5, imm=3)
    a.ld_map_value(r1, ports_fd)
    a.alu("add", r1, r5)
    a.ldx(1, r5, r1, 0)
    a.alu("and", r4, imm=7)
    a.alu("rsh", r5, r4)
    a.alu("and", r5, imm=1)
    a.jmp("jeq", miss, r5, imm=0)
    a.ldx(4, r4, r2, ETH + 16)
    a.stx(4, FP, -16, r4)  # daddr
    a.ldx(4, r4, r2, ETH + 12)
    a.stx(4, FP, -12, r4)  # saddr
    a.ldx(2, r4, r2, ETH + IP + 2)
    a.stx(2, FP, -8, r4)  # dport
    a.ldx(2, r4, r2, ETH + IP)
    a.stx(2, FP, -6, r4)  # sport
    a.ld_map(r1, map_fd)
    a.alu("mov", r2, FP)
    a.alu("add", r2, imm=-16)
    a.call(_MAP_LOOKUP)
    a.jmp("jeq", miss, r0, imm=0)
    a.alu("mov", r9, r0)
    a.call(_KTIME_NS)
    a.stx(8, FP, -24, r0)
    emit_checked_packet(a, PAYLOAD + MIN_DATAGRAM, miss)
    # n = UDP length - 8; the IP total length and the frame must agree with it
    a.ldx(2, r7, r2, ETH + IP + 4)
    a.be(r7, 16)
    a.ldx(2, r4, r2, ETH + 2)
    a.be(r4, 16)
    a.alu("sub", r4, imm=IP)
    a.jmp("jne", miss, r4, r7)
    a.ldx(4, r4, r6, 0)  # skb->len: the frame, from the Ethernet header
    a.alu("sub", r4, imm=ETH + IP)
    a.jmp("jne", miss, r4, r7)
    a.alu("sub", r7, imm=UDP)
    a.jmp("jlt", miss, r7, imm=MIN_DATAGRAM)
    a.jmp("jgt", miss, r7, imm=MAX_DATAGRAM)
    a.ldx(1, r4, r2, PAYLOAD)
    a.alu("and", r4, imm=0xC0)
    a.jmp("jne", miss, r4, imm=0x80)  # RTP/RTCP version 2
    a.jmp("ja", "lookup_done")
    a.label("lookup_pull")  # a short linear part: pull the headers in, once
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=PAYLOAD + RTP_HEADER)
    a.call(_PULL_DATA)
    a.jmp("jne", miss, r0, imm=0)
    emit_checked_packet(a, PAYLOAD + MIN_DATAGRAM, miss)
    a.jmp("ja", "lookup_parsed")
    a.label("lookup_done")


def emit_count(a: Asm, base: int, packets: int, seen: int | None = None) -> None:
    """u64 at base+packets += 1, the next u64 += the datagram's length (r7); now (fp-24) at
    base+seen. Clobbers r1."""
    a.ldx(8, 1, base, packets)
    a.alu("add", 1, imm=1)
    a.stx(8, base, packets, 1)
    a.ldx(8, 1, base, packets + 8)
    a.alu("add", 1, 7)
    a.stx(8, base, packets + 8, 1)
    if seen is not None:
        a.ldx(8, 1, FP, -24)
        a.stx(8, base, seen, 1)


def emit_rewrite(a: Asm, src: int, off: int) -> None:
    """The rewrite's last step: the IP checksum for the new addresses, then the addresses and
    ports themselves (saddr, daddr, sport, dport, network order, at ``src`` + ``off``); the old
    ones are the key at fp-16 (``emit_flow_lookup``), r6 the skb. Clobbers r0-r5."""
    for field, old_off in ((0, -12), (4, -16)):  # saddr, daddr: the IP checksum covers them
        a.alu("mov", 1, 6)
        a.alu("mov", 2, imm=ETH + 10)
        a.ldx(4, 3, FP, old_off)
        a.ldx(4, 4, src, off + field)
        a.alu("mov", 5, imm=4)
        a.call(_L3_CSUM)
    for at, field, size in ((ETH + 12, 0, 8), (ETH + IP, 8, 4)):  # addresses, then ports
        a.alu("mov", 1, 6)
        a.alu("mov", 2, imm=at)
        a.alu("mov", 3, src)
        a.alu("add", 3, imm=off + field)
        a.alu("mov", 4, imm=size)
        a.alu("mov", 5, imm=0)
        a.call(_STORE_BYTES)


def emit_rtp_stats(a: Asm, src: int, at: int, st: int, rate: int, done: str) -> None:
    """RFC 3550 A.1 / A.8 on one RTP packet, as ``_fastpath.c`` ``stats_update``: the RTP header
    at ``src`` + ``at`` (a checked packet or map pointer), r9 the flow value with the receiver
    state at ``st`` (``_S_*`` offsets) and the clock rate (u32) at ``rate``, r7 the datagram's
    length, fp-24 now (ns); uses fp-32 and fp-40, clobbers r0-r5; falls to ``done``. Its labels
    are ``stats_*``, once per program."""
    r0, r1, r2, r3, r4, r5, r9 = 0, 1, 2, 3, 4, 5, 9
    emit_count(a, r9, st, st + _S_SEEN)
    a.ldx(2, r4, src, at + 2)
    a.be(r4, 16)
    a.stx(8, FP, -32, r4)  # seq
    a.ldx(4, r5, src, at + 4)
    a.be(r5, 32)  # ts
    a.alu("div", r1, imm=1000)  # arrival in clock units: now (us) * rate / 1e6
    a.ldx(4, r0, r9, rate)
    a.alu("mul", r1, r0)
    a.alu("div", r1, imm=1_000_000)
    a.alu("sub", r1, r5)
    a.stx(8, FP, -40, r1)  # transit
    a.ldx(4, r3, src, at + 8)
    a.be(r3, 32)  # ssrc
    a.ldx(4, r0, r9, st + _S_HAS_SSRC)
    a.jmp("jeq", "stats_restart", r0, imm=0)
    a.ldx(4, r0, r9, st + _S_SSRC)
    a.jmp("jne", "stats_restart", r0, r3)
    a.ldx(8, r1, r9, st + _S_MAX)
    a.alu("mov", r2, r4)
    a.alu("sub", r2, r1)
    a.alu("and", r2, imm=0xFFFF)  # udelta
    a.jmp("jge", "stats_big", r2, imm=3000)  # MAX_DROPOUT
    a.jmp("jge", "stats_no_wrap", r4, r1)
    a.ldx(8, r0, r9, st + _S_CYCLES)
    a.alu("add", r0, imm=65536)
    a.stx(8, r9, st + _S_CYCLES, r0)
    a.label("stats_no_wrap")
    a.stx(8, r9, st + _S_MAX, r4)
    a.jmp("ja", "stats_received")
    a.label("stats_big")
    a.jmp("jgt", "stats_received", r2, imm=65536 - 100)  # MAX_MISORDER: late, counted
    a.ldx(8, r0, r9, st + _S_BAD)
    a.jmp("jeq", "stats_resync", r0, r4)
    a.alu("add", r4, imm=1)
    a.alu("and", r4, imm=0xFFFF)
    a.stx(8, r9, st + _S_BAD, r4)
    a.jmp("ja", done)
    a.label("stats_resync")

    def init_seq() -> None:  # seq in r4
        a.stx(8, r9, st + _S_BASE, r4)
        a.stx(8, r9, st + _S_MAX, r4)
        a.st(8, r9, st + _S_BAD, 65537)
        a.st(8, r9, st + _S_CYCLES, 0)
        a.st(8, r9, st + _S_RECEIVED, 1)

    init_seq()
    a.jmp("ja", "stats_jitter")
    a.label("stats_received")
    a.ldx(8, r0, r9, st + _S_RECEIVED)
    a.alu("add", r0, imm=1)
    a.stx(8, r9, st + _S_RECEIVED, r0)
    a.label("stats_jitter")
    a.ldx(8, r1, FP, -40)
    a.ldx(8, r0, r9, st + _S_TRANSIT)
    a.stx(8, r9, st + _S_TRANSIT, r1)
    a.alu("sub", r1, r0)
    a.alu("lsh", r1, imm=32)
    a.alu("arsh", r1, imm=32)  # the difference as a signed 32-bit value
    a.jmp("jsge", "stats_positive", r1, imm=0)
    a.alu("neg", r1)
    a.label("stats_positive")
    a.ldx(8, r0, r9, st + _S_JITTER)
    a.alu("mov", r2, r0)
    a.alu("add", r2, imm=8)
    a.alu("arsh", r2, imm=4)
    a.alu("sub", r1, r2)
    a.alu("add", r0, r1)
    a.stx(8, r9, st + _S_JITTER, r0)
    a.jmp("ja", done)
    a.label("stats_restart")
    a.st(4, r9, st + _S_HAS_SSRC, 1)
    a.stx(4, r9, st + _S_SSRC, r3)
    init_seq()
    a.ldx(8, r1, FP, -40)
    a.stx(8, r9, st + _S_TRANSIT, r1)
    a.st(8, r9, st + _S_JITTER, 0)
    a.jmp("ja", done)


def _program(map_fd: int, ports_fd: int) -> bytes:
    """The TC ingress program (see the module docstring). r6 ctx, r7 payload length, r8 kind
    (0 RTP, 1 RTCP), r9 the flow; stack: fp-16 key, fp-24 now (ns), fp-32 seq, fp-40 transit."""
    a = Asm()
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = range(10)

    emit_flow_lookup(a, map_fd, "next", ports_fd)
    # kind: RTCP on an RTCP port, or by payload type (RFC 5761 §4)
    a.alu("mov", r8, imm=1)
    a.ldx(4, r4, r9, _V_FLAGS)
    a.alu("and", r4, imm=_FLAG_RTCP_PORT)
    a.jmp("jne", "kind", r4, imm=0)
    a.ldx(1, r4, r2, PAYLOAD + 1)
    a.jmp("jlt", "rtp", r4, imm=192)
    a.jmp("jgt", "rtp", r4, imm=223)
    a.jmp("ja", "kind")
    a.label("rtp")
    a.alu("mov", r8, imm=0)
    a.jmp("jlt", "next", r7, imm=RTP_HEADER)
    a.label("kind")
    a.ldx(4, r4, r9, _V_FLAGS)
    a.jmp("jeq", "route_rtcp", r8, imm=1)
    a.alu("and", r4, imm=_FLAG_RTP_ROUTE)
    a.jmp("jeq", "next", r4, imm=0)
    a.jmp("ja", "stats")
    a.label("route_rtcp")
    a.alu("and", r4, imm=_FLAG_RTCP_ROUTE)
    a.jmp("jeq", "next", r4, imm=0)
    a.jmp("ja", "count")

    # -- RFC 3550 A.1 / A.8 on RTP, as _fastpath.c stats_update ----------------------------------
    a.label("stats")
    emit_checked_packet(a, PAYLOAD + RTP_HEADER, "next")
    emit_rtp_stats(a, r2, PAYLOAD, _V_ST_P, _V_RATE, "count")

    # -- counters, then the rewrite ---------------------------------------------------------------
    a.label("count")
    emit_count(a, r9, _V_RX_P, _V_SEEN)
    # the tx counters of the kind (RTP at _V_TX, RTCP 16 bytes on); r8 becomes the rewrite's
    # offset in the value
    a.alu("mov", r5, r8)
    a.alu("lsh", r5, imm=4)
    a.alu("mov", r4, r9)
    a.alu("add", r4, r5)
    emit_count(a, r4, _V_TX)
    a.alu("mul", r8, imm=_V_RTCP - _V_RTP)
    a.alu("add", r8, r9)  # r8: the leg's rewrite (saddr, daddr, sport, dport)

    csum_udp = ETH + IP + 6  # the UDP checksum: the pseudo-header's addresses, then the ports
    for field, old_off, size, pseudo in (
        (0, -12, 4, True),  # saddr
        (4, -16, 4, True),  # daddr
        (8, -6, 2, False),  # sport
        (10, -8, 2, False),  # dport
    ):
        a.alu("mov", r1, r6)
        a.alu("mov", r2, imm=csum_udp)
        a.ldx(size, r3, FP, old_off)
        a.ldx(size, r4, r8, field)
        a.alu("mov", r5, imm=size | _F_MARK_MANGLED_0 | (_F_PSEUDO_HDR if pseudo else 0))
        a.call(_L4_CSUM)
    emit_rewrite(a, r8, 0)
    # NEXT, not PASS: C's SRTP program (kernel_srtp.py) may sit after this one and take the
    # rewritten packet on (client -> E -> C in one pass)
    a.alu("mov", r0, imm=_TCX_NEXT)
    a.exit()

    a.label("next")
    a.alu("mov", r0, imm=_TCX_NEXT)
    a.exit()
    return a.code()


def _ip4(host: str) -> bytes:
    addr = ipaddress.ip_address(host)
    if addr.version != 4 or addr not in _LOOPBACK:
        raise ValueError(f"{host}: kernel forwarding is for IPv4 loopback addresses only")
    return addr.packed


SRTP_PROGRAM = "edge_srtp_fwd"  # C's programs (kernel_srtp.py), first and last of the chain
_BPF_F_BEFORE, _BPF_F_ID = 1 << 3, 1 << 5


def _link_attr(prog_fd: int, ifindex: int) -> ctypes.Array[ctypes.c_char]:
    """E's place in the TCX chain: at its end, or, when C's SRTP programs are there already,
    just before the last of them, so that a packet E rewrites to C goes on into C's program
    (kernel_srtp.py attaches first and last; this keeps that order when E starts after C)."""
    try:
        chain = tcx_chain(ifindex, _BPF_TCX_INGRESS)
    except OSError:
        chain = []
    srtp = [prog_id for prog_id, name in chain if name == SRTP_PROGRAM]
    if len(srtp) >= 2:
        return attr(
            struct.pack("<IIIII", prog_fd, ifindex, _BPF_TCX_INGRESS, _BPF_F_BEFORE | _BPF_F_ID, srtp[-1])
        )
    return attr(struct.pack("<IIII", prog_fd, ifindex, _BPF_TCX_INGRESS, 0))


class KernelForwarder:
    """The program, its flow map and the TCX link on ``ifname``'s ingress."""

    def __init__(self, map_fd: int, prog_fd: int, link_fd: int, ports: PortSet) -> None:
        self._map_fd = map_fd
        self._prog_fd = prog_fd
        self._link_fd = link_fd
        self._ports = ports
        self._flows = HashMap(map_fd, _KEY.size, _VALUE.size)
        self.installs = 0
        self.install_errors = 0

    @classmethod
    def open(cls, ifname: str = "lo", max_flows: int = MAX_FLOWS) -> KernelForwarder:
        if os.uname().machine != "x86_64":
            raise KernelUnavailable(errno.ENOSYS, "kernel forwarding: x86_64 Linux only")
        fds: list[int] = []
        ports: PortSet | None = None
        try:
            map_fd = bpf(
                _BPF_MAP_CREATE,
                attr(struct.pack("<IIIII", _BPF_MAP_TYPE_HASH, _KEY.size, _VALUE.size, max_flows, 0)),
            )
            fds.append(map_fd)
            ports = PortSet()
            code = _program(map_fd, ports.fd)
            prog_fd, _ = load(code, _BPF_PROG_TYPE_SCHED_CLS, b"edge_media_fwd")
            fds.append(prog_fd)
            ifindex = socket.if_nametoindex(ifname)
            link_fd = bpf(_BPF_LINK_CREATE, _link_attr(prog_fd, ifindex))
            fds.append(link_fd)
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            if ports is not None:
                ports.close()
            if isinstance(exc, KernelUnavailable):
                raise
            raise KernelUnavailable(exc.errno, f"kernel forwarding on {ifname}: {exc.strerror}") from exc
        return cls(map_fd, prog_fd, link_fd, ports)

    def close(self) -> None:
        for fd in (self._link_fd, self._prog_fd, self._map_fd):
            if fd >= 0:
                os.close(fd)
        self._link_fd = self._prog_fd = self._map_fd = -1
        self._ports.close()

    @property
    def closed(self) -> bool:
        return self._map_fd < 0

    @staticmethod
    def key(local: Addr, src: Addr) -> bytes:
        """The flow's map key: packets to ``local`` from ``src``. Raises ValueError unless both
        are IPv4 loopback addresses."""
        return _KEY.pack(_ip4(local[0]), _ip4(src[0]), local[1], src[1])

    def install(
        self,
        local: Addr,
        src: Addr,
        is_rtcp_port: bool,
        rtp: Egress | None,
        rtcp: Egress | None,
        clock_rate: int,
        state: StatsState,
    ) -> bytes:
        """Forward packets to ``local`` from ``src``: RTP via ``rtp``, RTCP via ``rtcp``
        (``None``: that kind goes to the relay's socket). ``state``: the endpoint's
        ``StreamStats`` state, which the program continues. Returns the key."""
        key = self.key(local, src)
        legs = []
        flags = _FLAG_RTCP_PORT if is_rtcp_port else 0
        for leg, bit in ((rtp, _FLAG_RTP_ROUTE), (rtcp, _FLAG_RTCP_ROUTE)):
            if leg is None:
                legs += [b"\0" * 4, b"\0" * 4, b"\0" * 2, b"\0" * 2]
                continue
            (shost, sport), (dhost, dport) = leg
            legs += [_ip4(shost), _ip4(dhost), struct.pack("!H", sport), struct.pack("!H", dport)]
            flags |= bit
        if not 0 < clock_rate <= 1_000_000:
            raise ValueError(f"clock rate {clock_rate} out of range")
        zero = (0,) * 7  # the counters start at zero
        value = _VALUE.pack(*legs, flags, clock_rate, *zero, *stats_fields(state))
        existed = self.read(key) is not None  # a re-install: its port is counted already
        if not existed:
            self._ports.add(local[1])
        try:
            self._update(key, value)
        except OSError:
            self.install_errors += 1
            if not existed:
                self._ports.discard(local[1])
            raise
        self.installs += 1
        return key

    def read(self, key: bytes) -> KernelCounters | None:
        """The flow's absolute counters and receiver state, or None if it is not installed."""
        raw = self._flows.lookup(key)
        return None if raw is None else _counters(_VALUE.unpack(raw))

    def read_all(self) -> dict[bytes, KernelCounters]:
        """Every installed flow's counters, a few system calls for the whole map (a status read
        of thousands of flows would otherwise cost one each)."""
        return {k: _counters(_VALUE.unpack(v)) for k, v in self._flows.lookup_all(4096).items()}

    def remove(self, key: bytes) -> KernelCounters | None:
        """Stop forwarding the flow; returns its last counters (None if it was not installed)."""
        last = self.read(key)
        self._flows.delete(key)
        if last is None:
            return None
        self._ports.discard(_KEY.unpack(key)[2])
        # Packets may have been counted between the read and the delete: read once more is not
        # possible after it; the window is one packet at most per CPU and only on teardown.
        return last

    def _update(self, key: bytes, value: bytes) -> None:
        self._flows.update(key, value)


def _counters(v: tuple[Any, ...]) -> KernelCounters:
    """A map value, unpacked with ``_VALUE``, as ``KernelCounters``."""
    rx_p, rx_b, tx_rtp_p, tx_rtp_b, tx_rtcp_p, tx_rtcp_b, seen = v[10:17]
    return rx_p, rx_b, tx_rtp_p, tx_rtp_b, tx_rtcp_p, tx_rtcp_b, _seconds(seen), stats_state(v[17:])


def stats_fields(state: StatsState) -> tuple[int, ...]:
    """A ``StreamStats`` state as the receiver-state block of a flow value (``_S_*``; the
    programs continue it): packets, bytes, seen (ns), has SSRC, SSRC, received .. jitter."""
    packets, nbytes, last_seen, ssrc = state[:4]
    return (packets, nbytes, _ns(last_seen), 0 if ssrc is None else 1, ssrc or 0, *state[4:])


def stats_state(fields: tuple[Any, ...]) -> StatsState:
    """``stats_fields`` back: the block (as unpacked) as a ``StreamStats`` state."""
    st_p, st_b, st_seen, has_ssrc, ssrc, *rest = fields
    return (st_p, st_b, _seconds(st_seen), ssrc if has_ssrc else None, *rest)


def _ns(seconds: float | None) -> int:
    return 0 if seconds is None else max(1, int(seconds * 1e9))


def _seconds(ns: int) -> float | None:
    return None if ns == 0 else ns / 1e9


def wanted() -> bool:
    """``EDGE_MEDIA_KERNEL=1`` asks E's relay for kernel forwarding."""
    return os.environ.get(ENV_VAR, "") == "1"

"""C's SRTP legs in the kernel: a TC program on ``lo`` that unprotects and protects RTP.

What rtpengine's kernel module does for SRTP (it decrypts and encrypts in the kernel with the
kernel's crypto API), with eBPF: once a transcoding flow of C's relay has a route and its SSRC
is known (``fastpath.FlowSync``), this program takes the flow's RTP packets off the relay's
socket path, carrying on libsrtp's index for that SSRC (its ROC; the highest sequence number
from the leg's receiver state), and hands the ROC back when the flow leaves. For each packet it:

1. checks it as ``_fastpath.c``'s ``forward`` does (size, RTP version; RTCP, any SSRC but the
   flow's and RTP longer than libsrtp protects go on to the relay's socket unchanged, where
   libsrtp handles them);
2. with an inbound key, estimates the packet index from the rollover counter and the highest
   sequence number seen (libsrtp's ``srtp_rdbx_estimate_index``), refuses replays (libsrtp's
   128-packet window), checks the HMAC-SHA1 tag (``bpf_sha1``, 80 or 32 bits) and decrypts the payload with
   AES-128 counter mode (RFC 3711 §4.1.1: the keystream is AES-ECB of the counter blocks through
   the kernel's ``bpf_crypto_encrypt`` kfunc, XORed in);
3. with an outbound key, estimates the index the same way (libsrtp's sender refuses a repeated
   index too), encrypts, appends the tag;
4. counts, updates the RFC 3550 receiver state (``kernel.emit_rtp_stats``), resizes the packet,
   rewrites addresses and ports to those of the egress socket and destination (the UDP checksum
   becomes 0, "none", which IPv4 allows) and lets it go on to its destination.

A refused packet (authentication, replay) is dropped and counted, as the native forwarder counts
its transcode drops. Suites: AES_CM_128_HMAC_SHA1_80 and _32; the GCM suites stay on the native
path. Session keys come from the SDES master key by the RFC 3711 §4.3 key derivation (key
derivation rate 0), done here in Python.

The chain. A packet from the client reaches C through E's program (``kernel.py``), which
rewrites it to C's port; a packet C protects goes to E's demux port, where E's program must see
it. So this program is attached twice, first and last in the TCX chain of ``lo``: the first copy
takes echo -> C packets before E's program, the last one takes the packets E's program has just
rewritten to C. Either copy does any flow (the map is shared); a packet neither copy matched goes
to the relay's socket, where the native forwarder or Python does the same work. E, started after
C, finds C's copies in the chain and attaches just before the last (``kernel._link_attr``).

Keys live in the kernel as ``bpf_crypto_ctx`` objects (kptrs in the flow's map value, created by a
small ``BPF_PROG_TYPE_SYSCALL`` program); deleting the flow releases them. Needs root, TCX and
the BPF crypto kfuncs (Linux 6.10+); ``SrtpKernel.open`` raises ``KernelUnavailable`` with the
reason otherwise, and C stays on the native path. IPv4 loopback only, as ``kernel.py``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from media_relay import bpf_sha1, btf
from media_relay.bpf import FP, Asm, HashMap, attr, bpf, load
from media_relay.kernel import (
    ETH,
    IP,
    MAX_DATAGRAM,
    PAYLOAD,
    RTP_HEADER,
    SRTP_PROGRAM,
    STATS_BYTES,
    UDP,
    Addr,
    Egress,
    KernelUnavailable,
    PortSet,
    _ip4,
    _seconds,
    emit_checked_packet,
    emit_count,
    emit_flow_lookup,
    emit_rewrite,
    emit_rtp_stats,
    stats_fields,
    stats_state,
)
from media_relay.rtp import StatsState

SUITES = {"AES_CM_128_HMAC_SHA1_80": 10, "AES_CM_128_HMAC_SHA1_32": 4}  # suite -> tag bytes
MAX_PROTECT = 1356  # the longest RTP packet the native path protects (_srtp.c, pylibsrtp's limit)
MAX_FLOWS = 1 << 16
REPLAY_WINDOW = 128  # libsrtp's default (srtp_rdbx_init with 128): two u64 words

_BPF_MAP_CREATE, _BPF_PROG_TEST_RUN, _BPF_BTF_LOAD, _BPF_LINK_CREATE = 0, 10, 18, 28
_BPF_MAP_TYPE_HASH, _BPF_MAP_TYPE_PERCPU_ARRAY = 1, 6
_BPF_PROG_TYPE_SCHED_CLS, _BPF_PROG_TYPE_SYSCALL = 3, 31
_BPF_F_SLEEPABLE = 1 << 4
_BPF_TCX_INGRESS = 46
_BPF_F_BEFORE, _BPF_F_AFTER = 1 << 3, 1 << 4
_TCX_NEXT, _TCX_DROP = -1, 2
# helpers
_MAP_LOOKUP, _STORE_BYTES, _L3_CSUM, _LOAD_BYTES, _CHANGE_TAIL = 1, 9, 10, 26, 38
_KPTR_XCHG, _DYNPTR_FROM_MEM = 194, 197
_KFUNCS = ("bpf_crypto_ctx_create", "bpf_crypto_ctx_release", "bpf_crypto_encrypt")

# -- the flow's map value ------------------------------------------------------------------------
# key: as kernel.py's (daddr, saddr, dport, sport)
_KEY = struct.Struct("!4s4sHH")
_V_CTX = (0, 8)  # kptrs: the inbound (unprotect) and outbound (protect) AES contexts
_V_REWRITE = 16  # saddr, daddr, sport, dport (network order)
_V_RATE, _V_FLAGS, _V_SSRC = 28, 32, 36  # clock rate, _F_* bits, the SSRC (network order)
_V_TAG = (40, 44)  # tag bytes per side
_V_SALT = (48, 64)  # session salt per side, 14 bytes and two zero bytes
_V_HMAC = (80, 120)  # HMAC inner and outer SHA-1 states per side (bpf_sha1.pack_states)
_V_ROC = (160, 184)  # per side: ROC u32, highest sequence number u32, replay window 2 x u64
# (bit i of the low word: the index i behind the highest seen; bit i of the high word: 64 + i)
_V_FRESH = (208, 212)  # per side: 1 until the first packet (no index yet)
_V_COUNT = 216  # rx packets, rx bytes, tx packets, tx bytes, auth drops, replay drops, seen ns
_V_STATS = 272  # the RFC 3550 receiver state, kernel.STATS_BYTES
VALUE_SIZE = _V_STATS + STATS_BYTES
_F_IN, _F_OUT = 1, 2
_HEAD = struct.Struct("=12sII4sII")  # rewrite, rate, flags, ssrc, tags
_SIDE = struct.Struct("=16s")
_STATE = struct.Struct("=IIQQ")

# -- the per-CPU scratch buffer --------------------------------------------------------------------
_MSG = bpf_sha1.SCRATCH_MSG  # the datagram, then (for the HMAC) its ROC and SHA-1 padding
# the verifier bounds header length and payload words separately: room for both maxima
_KS = (_MSG + MAX_DATAGRAM + 8 * ((MAX_DATAGRAM + 7) // 8) + 8 + 15) & ~15  # counter blocks
_MAX_BLOCKS = (MAX_DATAGRAM + 15) // 16  # the keystream the XOR may read: a word past the payload
_VARS = _KS + 16 * _MAX_BLOCKS  # the program's variables (_X_*)
SCRATCH_SIZE = _VARS + 80
assert SCRATCH_SIZE >= bpf_sha1.SCRATCH_SIZE

# -- the key setup program's context: crypto params, flow key, which kptr ---------------------------
_PARAMS = struct.Struct("<14s2s128s256sII")  # struct bpf_crypto_params
_SETUP = struct.Struct(f"<{_PARAMS.size}s12sI")

# stack of the TC program (fp-16 key and fp-24 now: emit_flow_lookup; fp-32/-40: emit_rtp_stats)
_S_ZERO, _S_DYN_SRC, _S_DYN_DST = -48, -64, -80
# The program's variables live in the scratch buffer, not on the stack: the verifier tracks
# what a register spilled to the stack holds, so every path through the index estimate would
# reach the (long) HMAC and AES code with different states and be verified again; a load from
# a map value is just a number, so those paths meet. (Each is bounds-checked where it matters.)
_X_HDR, _X_SEQ, _X_V, _X_DELTA, _X_TAG, _X_TAG2, _X_W0, _X_W1, _X_END, _X_SIZE = (
    _VARS + 8 * i for i in range(10)
)


@dataclass(frozen=True)
class SrtpSide:
    """One direction's SRTP for a kernel flow: the SDES suite and master key||salt, and where the
    index stands (libsrtp's ROC for the SSRC and the highest sequence number seen; ``fresh`` when
    no packet of the SSRC has been through this key yet)."""

    suite: str
    key_salt: bytes
    roc: int = 0
    highest_seq: int = 0
    fresh: bool = True


def session_keys(key_salt: bytes) -> tuple[bytes, bytes, bytes]:
    """RFC 3711 §4.3.1 with the AES-CM PRF and key derivation rate 0: the SRTP session
    encryption key (16 bytes), authentication key (20) and salt (14) from a 30-byte SDES master
    key||salt."""
    if len(key_salt) != 30:
        raise ValueError("AES_CM_128 suites need 30 key||salt bytes")
    master_key, master_salt = key_salt[:16], key_salt[16:]

    def derive(label: int, n: int) -> bytes:
        x = int.from_bytes(master_salt, "big") ^ (label << 48)
        enc = Cipher(algorithms.AES(master_key), modes.CTR((x << 16).to_bytes(16, "big"))).encryptor()
        return enc.update(bytes(n)) + enc.finalize()

    return derive(0, 16), derive(1, 20), derive(2, 14)


# -- the programs --------------------------------------------------------------------------------


def _setup_program(map_fd: int, ids: dict[str, int]) -> bytes:
    """BPF_PROG_TYPE_SYSCALL: create an AES-ECB context from the params at ctx+0 and put it in
    slot ``ctx[_PARAMS.size + 12]`` (0 inbound, 1 outbound) of the flow keyed by the 12 bytes
    before it. Returns 0, the kfunc's negative errno, or -ENOENT without such a flow."""
    a = Asm()
    r0, r1, r2, r3, r6, r7 = 0, 1, 2, 3, 6, 7
    a.alu("mov", r6, r1)
    for off in (0, 4, 8):
        a.ldx(4, r2, r6, _PARAMS.size + off)
        a.stx(4, FP, -16 + off, r2)
    a.ld_map(r1, map_fd)
    a.alu("mov", r2, FP)
    a.alu("add", r2, imm=-16)
    a.call(_MAP_LOOKUP)
    a.jmp("jeq", "noent", r0, imm=0)
    a.alu("mov", r7, r0)
    a.ldx(4, r2, r6, _PARAMS.size + 12)
    a.jmp("jeq", "slot", r2, imm=0)
    a.alu("add", r7, imm=_V_CTX[1])
    a.label("slot")
    a.st(4, FP, -24, 0)
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=_PARAMS.size)
    a.alu("mov", r3, FP)
    a.alu("add", r3, imm=-24)
    a.call_kfunc(ids["bpf_crypto_ctx_create"])
    a.jmp("jeq", "failed", r0, imm=0)
    a.alu("mov", r2, r0)
    a.alu("mov", r1, r7)
    a.call(_KPTR_XCHG)
    a.jmp("jeq", "done", r0, imm=0)
    a.alu("mov", r1, r0)  # the flow's previous context: released
    a.call_kfunc(ids["bpf_crypto_ctx_release"])
    a.label("done")
    a.alu("mov", r0, imm=0)
    a.exit()
    a.label("failed")
    a.ldx(4, r0, FP, -24)
    a.alu("lsh", r0, imm=32)
    a.alu("arsh", r0, imm=32)
    a.exit()
    a.label("noent")
    a.alu("mov", r0, imm=-errno.ENOENT)
    a.exit()
    return a.code()


def _program(map_fd: int, scratch_fd: int, ports_fd: int, ids: dict[str, int]) -> bytes:
    """The TC program (module docstring). r6 skb, r7 the datagram's ingress length, r8 the
    scratch buffer, r9 the flow; the stack per the _S_* offsets, variables at _X_* in the scratch."""
    a = Asm()
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = range(10)
    emit_flow_lookup(a, map_fd, "next", ports_fd)
    # RTCP goes to the relay's socket (libsrtp's SRTCP); so does any SSRC but the flow's
    a.jmp("jlt", "next", r7, imm=RTP_HEADER)
    emit_checked_packet(a, PAYLOAD + RTP_HEADER, "next")
    a.ldx(1, r4, r2, PAYLOAD + 1)
    a.jmp("jlt", "rtp", r4, imm=192)
    a.jmp("jle", "next", r4, imm=223)
    a.label("rtp")
    a.ldx(4, r4, r2, PAYLOAD + 8)
    a.ldx(4, r5, r9, _V_SSRC)
    a.jmp("jne", "next", r4, r5)
    a.ldx(4, r4, r9, _V_FLAGS)  # a missing context (set up after the flow): the relay's socket
    for side, bit in ((0, _F_IN), (1, _F_OUT)):
        a.alu("mov", r5, r4)
        a.alu("and", r5, imm=bit)
        a.jmp("jeq", f"has_ctx{side}", r5, imm=0)
        a.ldx(8, r5, r9, _V_CTX[side])
        a.jmp("jeq", "next", r5, imm=0)
        a.label(f"has_ctx{side}")
    # the scratch buffer, and the datagram in it
    a.st(4, FP, _S_ZERO, 0)
    a.ld_map(r1, scratch_fd)
    a.alu("mov", r2, FP)
    a.alu("add", r2, imm=_S_ZERO)
    a.call(_MAP_LOOKUP)
    a.jmp("jeq", "next", r0, imm=0)
    a.alu("mov", r8, r0)
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=PAYLOAD)
    a.alu("mov", r3, r8)
    a.alu("add", r3, imm=_MSG)
    a.alu("mov", r4, r7)
    a.call(_LOAD_BYTES)
    a.jmp("jne", "next", r0, imm=0)
    # the RTP header's length (CSRCs, extension) must leave a payload before the tag
    a.ldx(1, r1, r8, _MSG)
    a.alu("mov", r2, r1)
    a.alu("and", r2, imm=0x0F)
    a.alu("lsh", r2, imm=2)
    a.alu("add", r2, imm=RTP_HEADER)
    a.alu("and", r1, imm=0x10)
    a.jmp("jeq", "no_ext", r1, imm=0)
    a.alu("mov", r3, r8)
    a.alu("add", r3, r2)  # r2 <= 72
    a.ldx(2, r4, r3, _MSG + 2)
    a.be(r4, 16)
    a.alu("lsh", r4, imm=2)
    a.alu("add", r2, r4)
    a.alu("add", r2, imm=4)
    a.label("no_ext")
    a.stx(8, r8, _X_HDR, r2)
    a.alu("mov", r3, r7)  # the end of the payload: the datagram less an inbound tag
    a.ldx(4, r4, r9, _V_FLAGS)
    a.alu("and", r4, imm=_F_IN)
    a.jmp("jeq", "no_in_tag", r4, imm=0)
    a.ldx(4, r4, r9, _V_TAG[0])
    a.alu("sub", r3, r4)
    a.label("no_in_tag")
    a.jmp("jsgt", "next", r2, r3)
    a.ldx(4, r4, r9, _V_FLAGS)  # longer than libsrtp protects: the native path refuses it
    a.alu("and", r4, imm=_F_OUT)
    a.jmp("jeq", "fits", r4, imm=0)
    a.jmp("jsgt", "next", r3, imm=MAX_PROTECT)
    a.label("fits")
    a.stx(8, r8, _X_END, r3)
    a.ldx(2, r4, r8, _MSG + 2)
    a.be(r4, 16)
    a.stx(8, r8, _X_SEQ, r4)

    def bounded(reg: int, limit: int, fail: str) -> None:
        a.jmp("jgt", fail, reg, imm=limit)

    def index(side: int) -> None:
        """libsrtp's srtp_rdbx_estimate_index and srtp_rdbx_check for this side: the guessed ROC
        to _X_V, the index delta to _X_DELTA; a replay or too old a packet to ``replay``."""
        s = f"s{side}_"
        roc = _V_ROC[side]
        a.ldx(8, r1, r8, _X_SEQ)
        a.ldx(4, r3, r9, roc)  # ROC
        a.ldx(4, r2, r9, roc + 4)  # highest sequence number
        a.ldx(4, r4, r9, _V_FRESH[side])
        a.jmp("jeq", s + "known", r4, imm=0)
        a.stx(8, r8, _X_V, r3)  # a new stream: the index is the sequence number under its ROC
        a.st(8, r8, _X_DELTA, 1)
        a.jmp("ja", s + "done")
        a.label(s + "known")
        a.alu("mov", r4, r1)
        a.alu("sub", r4, r2)  # s - local_seq
        a.jmp("jne", s + "guess", r3, imm=0)
        a.jmp("jgt", s + "guess", r2, imm=1 << 15)  # index > median: srtp_index_guess
        a.stx(8, r8, _X_V, r3)
        a.jmp("ja", s + "delta")
        a.label(s + "guess")
        a.jmp("jge", s + "upper", r2, imm=1 << 15)
        a.jmp("jsle", s + "same", r4, imm=1 << 15)
        a.alu("sub", r3, imm=1)
        a.alu("sub", r4, imm=1 << 16)
        a.jmp("ja", s + "roc")
        a.label(s + "upper")
        a.alu("mov", r5, r2)
        a.alu("sub", r5, imm=1 << 15)
        a.jmp("jle", s + "same", r5, r1)
        a.alu("add", r3, imm=1)
        a.alu("add", r4, imm=1 << 16)
        a.label(s + "roc")
        a.alu32("mov", r3, r3)  # the ROC is a u32: it wraps
        a.label(s + "same")
        a.stx(8, r8, _X_V, r3)
        a.label(s + "delta")
        a.stx(8, r8, _X_DELTA, r4)
        a.jmp("jsgt", s + "done", r4, imm=0)
        a.jmp("jsle", "replay", r4, imm=-REPLAY_WINDOW)
        a.alu("neg", r4)  # how far behind the highest: 0..127
        a.ldx(8, r5, r9, roc + 8)
        a.jmp("jlt", s + "bit", r4, imm=64)
        a.ldx(8, r5, r9, roc + 16)
        a.alu("sub", r4, imm=64)
        a.label(s + "bit")
        a.alu("rsh", r5, r4)
        a.alu("and", r5, imm=1)
        a.jmp("jne", "replay", r5, imm=0)
        a.label(s + "done")

    def commit(side: int) -> None:
        """srtp_rdbx_add_index: the window, the highest sequence number and the ROC move on."""
        s = f"c{side}_"
        roc = _V_ROC[side]
        a.ldx(8, r4, r8, _X_DELTA)
        a.ldx(8, r5, r9, roc + 8)  # the window's low word
        a.ldx(8, r3, r9, roc + 16)  # and its high word
        a.jmp("jsgt", s + "ahead", r4, imm=0)
        a.alu("neg", r4)  # behind the highest: mark it seen
        a.alu("mov", r1, imm=1)
        a.jmp("jlt", s + "low", r4, imm=64)
        a.alu("sub", r4, imm=64)
        a.alu("lsh", r1, r4)
        a.alu("or", r3, r1)
        a.stx(8, r9, roc + 16, r3)
        a.jmp("ja", s + "done")
        a.label(s + "low")
        a.alu("lsh", r1, r4)
        a.alu("or", r5, r1)
        a.stx(8, r9, roc + 8, r5)
        a.jmp("ja", s + "done")
        a.label(s + "ahead")  # a new highest: the 128-bit window moves up by delta
        a.jmp("jge", s + "far", r4, imm=REPLAY_WINDOW)
        a.jmp("jge", s + "mid", r4, imm=64)
        a.alu("lsh", r3, r4)  # 1..63: high = high << d | low >> (64 - d); low <<= d
        a.alu("mov", r2, imm=64)
        a.alu("sub", r2, r4)
        a.alu("mov", r1, r5)
        a.alu("rsh", r1, r2)
        a.alu("or", r3, r1)
        a.alu("lsh", r5, r4)
        a.jmp("ja", s + "set")
        a.label(s + "mid")  # 64..127: high = low << (d - 64); low = 0
        a.alu("sub", r4, imm=64)
        a.alu("mov", r3, r5)
        a.alu("lsh", r3, r4)
        a.alu("mov", r5, imm=0)
        a.jmp("ja", s + "set")
        a.label(s + "far")
        a.alu("mov", r5, imm=0)
        a.alu("mov", r3, imm=0)
        a.label(s + "set")
        a.alu("or", r5, imm=1)
        a.stx(8, r9, roc + 8, r5)
        a.stx(8, r9, roc + 16, r3)
        a.ldx(8, r1, r8, _X_SEQ)
        a.stx(4, r9, roc + 4, r1)
        a.ldx(8, r1, r8, _X_V)
        a.stx(4, r9, roc, r1)
        a.st(4, r9, _V_FRESH[side], 0)
        a.label(s + "done")

    def hmac(side: int, length: int) -> None:
        """HMAC-SHA1 of the datagram's first ``length`` (a register) bytes and the guessed ROC,
        big-endian, appended in the scratch buffer; the digest at SCRATCH_DIGEST."""
        a.alu("mov", r1, r8)
        a.alu("add", r1, length)
        a.ldx(8, r2, r8, _X_V)
        a.be(r2, 32)
        a.stx(4, r1, _MSG, r2)
        a.alu("mov", r1, r8)
        a.alu("mov", r2, length)
        a.alu("add", r2, imm=4)
        a.alu("mov", r3, r9)
        a.alu("add", r3, imm=_V_HMAC[side])
        a.call_local(bpf_sha1.HMAC_LABEL)
        a.jmp("jne", "next", r0, imm=0)

    def keystream_xor(side: int) -> None:
        """AES-CM over the payload (from _X_HDR to _X_END) in the scratch buffer."""
        s = f"k{side}_"
        salt = _V_SALT[side]
        a.ldx(8, r1, r9, salt)
        a.ldx(4, r2, r9, _V_SSRC)
        a.alu("lsh", r2, imm=32)
        a.alu("xor", r1, r2)
        a.stx(8, r8, _X_W0, r1)
        a.ldx(8, r1, r9, salt + 8)
        a.ldx(8, r2, r8, _X_V)
        a.be(r2, 32)
        a.alu("xor", r1, r2)
        a.ldx(2, r2, r8, _MSG + 2)  # the sequence number's bytes as they are
        a.alu("lsh", r2, imm=32)
        a.alu("xor", r1, r2)
        a.stx(8, r8, _X_W1, r1)
        a.ldx(8, r4, r8, _X_END)
        a.ldx(8, r1, r8, _X_HDR)
        a.alu("sub", r4, r1)  # payload bytes
        a.jmp("jeq", s + "end", r4, imm=0)
        bounded(r4, MAX_DATAGRAM, "next")
        a.alu("add", r4, imm=15)
        a.alu("rsh", r4, imm=4)  # blocks
        a.alu("mov", r5, imm=0)
        a.label(s + "ctr")
        a.alu("mov", r1, r5)
        a.alu("lsh", r1, imm=4)
        a.alu("add", r1, r8)
        a.ldx(8, r2, r8, _X_W0)
        a.stx(8, r1, _KS, r2)
        a.alu("mov", r2, r5)
        a.be(r2, 16)
        a.alu("lsh", r2, imm=48)
        a.ldx(8, r3, r8, _X_W1)
        a.alu("xor", r2, r3)
        a.stx(8, r1, _KS + 8, r2)
        a.alu("add", r5, imm=1)
        a.jmp("jlt", s + "ctr", r5, r4)
        # AES-ECB in place over the counter blocks
        a.alu("lsh", r4, imm=4)
        a.stx(8, r8, _X_SIZE, r4)
        for dyn in (_S_DYN_SRC, _S_DYN_DST):
            a.alu("mov", r1, r8)
            a.alu("add", r1, imm=_KS)
            a.ldx(8, r2, r8, _X_SIZE)
            bounded(r2, 16 * _MAX_BLOCKS, "next")
            a.alu("mov", r3, imm=0)
            a.alu("mov", r4, FP)
            a.alu("add", r4, imm=dyn)
            a.call(_DYNPTR_FROM_MEM)
        a.ldx(8, r1, r9, _V_CTX[side])
        a.jmp("jeq", "next", r1, imm=0)
        a.alu("mov", r2, FP)
        a.alu("add", r2, imm=_S_DYN_SRC)
        a.alu("mov", r3, FP)
        a.alu("add", r3, imm=_S_DYN_DST)
        a.alu("mov", r4, imm=0)
        a.call_kfunc(ids["bpf_crypto_encrypt"])
        a.jmp("jne", "next", r0, imm=0)
        # XOR, 8 bytes at a time (the last word runs past the payload: bytes rewritten later)
        a.ldx(8, r4, r8, _X_END)
        a.ldx(8, r3, r8, _X_HDR)
        bounded(r3, MAX_DATAGRAM, "next")
        a.alu("sub", r4, r3)
        a.alu("add", r4, imm=7)
        a.alu("rsh", r4, imm=3)  # words
        bounded(r4, (MAX_DATAGRAM + 7) // 8, "next")
        a.alu("add", r3, r8)  # the payload
        a.alu("mov", r5, imm=0)
        a.label(s + "xor")
        a.alu("mov", r1, r5)
        a.alu("lsh", r1, imm=3)
        a.alu("mov", r2, r1)
        a.alu("add", r1, r3)
        a.alu("add", r2, r8)
        a.ldx(8, r0, r1, _MSG)
        a.ldx(8, r2, r2, _KS)
        a.alu("xor", r0, r2)
        a.stx(8, r1, _MSG, r0)
        a.alu("add", r5, imm=1)
        a.jmp("jlt", s + "xor", r5, r4)
        a.label(s + "end")

    # -- inbound: check, then decrypt ----------------------------------------------------------------
    a.ldx(4, r4, r9, _V_FLAGS)
    a.alu("and", r4, imm=_F_IN)
    a.jmp("jeq", "outbound", r4, imm=0)
    index(0)
    a.ldx(8, r3, r8, _X_END)  # the tag, kept before the HMAC's padding covers it
    bounded(r3, MAX_DATAGRAM, "next")
    a.alu("add", r3, r8)
    a.ldx(8, r1, r3, _MSG)
    a.stx(8, r8, _X_TAG, r1)
    a.ldx(2, r1, r3, _MSG + 8)
    a.stx(8, r8, _X_TAG2, r1)
    a.ldx(8, r3, r8, _X_END)
    bounded(r3, MAX_DATAGRAM, "next")
    hmac(0, r3)
    a.ldx(8, r1, r8, bpf_sha1.SCRATCH_DIGEST)
    a.ldx(8, r2, r8, _X_TAG)
    a.alu("xor", r1, r2)
    a.ldx(4, r3, r9, _V_TAG[0])
    a.jmp("jeq", "tag80", r3, imm=10)
    a.alu("lsh", r1, imm=32)  # a 4-byte tag: the low half (little-endian) only
    a.jmp("jne", "auth", r1, imm=0)
    a.jmp("ja", "authentic")
    a.label("tag80")
    a.jmp("jne", "auth", r1, imm=0)
    a.ldx(2, r1, r8, bpf_sha1.SCRATCH_DIGEST + 8)
    a.ldx(8, r2, r8, _X_TAG2)
    a.jmp("jne", "auth", r1, r2)
    a.label("authentic")
    commit(0)
    keystream_xor(0)

    # -- outbound: encrypt, then the tag -------------------------------------------------------------
    a.label("outbound")
    a.ldx(4, r4, r9, _V_FLAGS)
    a.alu("and", r4, imm=_F_OUT)
    a.jmp("jeq", "send", r4, imm=0)
    index(1)
    commit(1)
    keystream_xor(1)
    a.ldx(8, r3, r8, _X_END)
    bounded(r3, MAX_DATAGRAM, "next")
    hmac(1, r3)
    a.ldx(8, r3, r8, _X_END)
    bounded(r3, MAX_DATAGRAM, "next")
    a.alu("add", r3, r8)
    a.ldx(8, r1, r8, bpf_sha1.SCRATCH_DIGEST)
    a.stx(8, r3, _MSG, r1)
    a.ldx(2, r1, r8, bpf_sha1.SCRATCH_DIGEST + 8)
    a.stx(2, r3, _MSG + 8, r1)  # a 4-byte tag: the bytes past it are not sent
    a.ldx(8, r3, r8, _X_END)
    a.ldx(4, r4, r9, _V_TAG[1])
    a.alu("add", r3, r4)
    a.stx(8, r8, _X_END, r3)

    # -- the datagram out: size, bytes, headers --------------------------------------------------
    a.label("send")
    a.ldx(4, r2, r6, 0)  # skb->len
    a.ldx(8, r3, r8, _X_END)
    a.alu("add", r2, r3)
    a.alu("sub", r2, r7)
    a.alu("mov", r1, r6)
    a.alu("mov", r3, imm=0)
    a.call(_CHANGE_TAIL)
    a.jmp("jne", "drop", r0, imm=0)
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=PAYLOAD)
    a.alu("mov", r3, r8)
    a.alu("add", r3, imm=_MSG)
    a.ldx(8, r4, r8, _X_END)
    bounded(r4, MAX_DATAGRAM + 10, "drop")
    a.jmp("jlt", "drop", r4, imm=RTP_HEADER)
    a.alu("mov", r5, imm=0)
    a.call(_STORE_BYTES)
    # IP total length (and its checksum), UDP length, UDP checksum 0
    a.alu("mov", r3, r7)
    a.alu("add", r3, imm=IP + UDP)
    a.be(r3, 16)
    a.ldx(8, r4, r8, _X_END)
    a.alu("add", r4, imm=IP + UDP)
    a.be(r4, 16)
    a.stx(8, r8, _X_W0, r4)
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=ETH + 10)
    a.alu("mov", r5, imm=2)
    a.call(_L3_CSUM)
    a.ldx(8, r4, r8, _X_END)
    a.alu("add", r4, imm=UDP)
    a.be(r4, 16)
    a.alu("lsh", r4, imm=16)
    a.ldx(8, r1, r8, _X_W0)
    a.alu("or", r1, r4)  # IP total length, then (4 bytes on) UDP length and checksum 0
    a.stx(2, r8, _X_W1, r1)
    a.alu("rsh", r1, imm=16)
    a.stx(4, r8, _X_W1 + 4, r1)
    for off, field, size in ((ETH + 2, _X_W1, 2), (ETH + IP + 4, _X_W1 + 4, 4)):
        a.alu("mov", r1, r6)
        a.alu("mov", r2, imm=off)
        a.alu("mov", r3, r8)
        a.alu("add", r3, imm=field)
        a.alu("mov", r4, imm=size)
        a.alu("mov", r5, imm=0)
        a.call(_STORE_BYTES)
    emit_rewrite(a, r9, _V_REWRITE)
    # counters (as _fastpath.c forward: tx counts the ingress size), then RFC 3550 on the header
    emit_count(a, r9, _V_COUNT, _V_COUNT + 48)  # rx
    emit_count(a, r9, _V_COUNT + 16)  # tx
    emit_rtp_stats(a, r8, _MSG, _V_STATS, _V_RATE, "next")

    a.label("next")
    a.alu("mov", r0, imm=_TCX_NEXT)
    a.exit()
    a.label("auth")
    a.ldx(8, r1, r9, _V_COUNT + 32)
    a.alu("add", r1, imm=1)
    a.stx(8, r9, _V_COUNT + 32, r1)
    a.jmp("ja", "drop")
    a.label("replay")
    a.ldx(8, r1, r9, _V_COUNT + 40)
    a.alu("add", r1, imm=1)
    a.stx(8, r9, _V_COUNT + 40, r1)
    a.label("drop")
    a.alu("mov", r0, imm=_TCX_DROP)
    a.exit()
    bpf_sha1.emit_hmac_sha1(a)
    return a.code()


# -- the Python side -----------------------------------------------------------------------------

_STATS = struct.Struct("=QQQIIqqqqqqq")
_COUNT = struct.Struct("=QQQQQQQ")
assert _STATS.size == STATS_BYTES


@dataclass(frozen=True)
class SrtpCounters:
    """A kernel SRTP flow's absolute counters and state."""

    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    auth_drops: int
    replay_drops: int
    last_seen: float | None
    stats: StatsState
    # per side (inbound, outbound): ROC, highest sequence number, fresh (no packet yet)
    index: tuple[tuple[int, int, bool], tuple[int, int, bool]]


def _decode(raw: bytes) -> SrtpCounters:
    idx = []
    for side in (0, 1):
        roc, seq, _low, _high = _STATE.unpack_from(raw, _V_ROC[side])
        (fresh,) = struct.unpack_from("=I", raw, _V_FRESH[side])
        idx.append((roc, seq, bool(fresh)))
    rx_p, rx_b, tx_p, tx_b, auth, replay, seen = _COUNT.unpack_from(raw, _V_COUNT)
    stats = stats_state(_STATS.unpack_from(raw, _V_STATS))
    return SrtpCounters(rx_p, rx_b, tx_p, tx_b, auth, replay, _seconds(seen), stats, (idx[0], idx[1]))


def _check_side(side: SrtpSide | None) -> None:
    if side is None:
        return
    if side.suite not in SUITES:
        raise ValueError(f"{side.suite}: not a kernel SRTP suite ({', '.join(SUITES)})")
    if not 0 <= side.roc < 1 << 32 or not 0 <= side.highest_seq < 1 << 16:
        raise ValueError("ROC or sequence number out of range")


class SrtpKernel:
    """The program (twice: first and last of ``lo``'s TCX ingress chain), its flow map, the
    per-CPU scratch map and the key setup program."""

    def __init__(self, fds: dict[str, int], ports: PortSet) -> None:
        self._fds = fds
        self._ports = ports
        self._flows = HashMap(fds["map"], _KEY.size, VALUE_SIZE)
        self.installs = 0
        self.install_errors = 0

    @classmethod
    def open(cls, ifname: str = "lo", max_flows: int = MAX_FLOWS) -> SrtpKernel:
        if os.uname().machine != "x86_64":
            raise KernelUnavailable(errno.ENOSYS, "kernel SRTP: x86_64 Linux only")
        fds: dict[str, int] = {}
        ports: PortSet | None = None
        try:
            ids = btf.kfunc_ids(_KFUNCS)
            blob, key_id, value_id = btf.kptr_value_btf("bpf_crypto_ctx", _V_CTX, VALUE_SIZE, _KEY.size)
            fds["btf"] = _load_btf(blob)
            fds["map"] = bpf(
                _BPF_MAP_CREATE,
                attr(
                    struct.pack(
                        "<IIIIIII16sIIII",
                        _BPF_MAP_TYPE_HASH,
                        _KEY.size,
                        VALUE_SIZE,
                        max_flows,
                        0,
                        0,
                        0,
                        b"edge_srtp_flows",
                        0,
                        fds["btf"],
                        key_id,
                        value_id,
                    )
                ),
            )
            fds["scratch"] = bpf(
                _BPF_MAP_CREATE,
                attr(struct.pack("<IIIII", _BPF_MAP_TYPE_PERCPU_ARRAY, 4, SCRATCH_SIZE, 1, 0)),
            )
            setup = _setup_program(fds["map"], ids)
            fds["setup"], _ = load(setup, _BPF_PROG_TYPE_SYSCALL, b"edge_srtp_keys", _BPF_F_SLEEPABLE)
            ports = PortSet()
            code = _program(fds["map"], fds["scratch"], ports.fd, ids)
            ifindex = socket.if_nametoindex(ifname)
            for name, where in (("first", _BPF_F_BEFORE), ("last", _BPF_F_AFTER)):
                fds[f"prog_{name}"], _ = load(code, _BPF_PROG_TYPE_SCHED_CLS, SRTP_PROGRAM.encode())
                fds[f"link_{name}"] = bpf(
                    _BPF_LINK_CREATE,
                    attr(struct.pack("<IIII", fds[f"prog_{name}"], ifindex, _BPF_TCX_INGRESS, where)),
                )
        except (OSError, btf.BtfError) as exc:
            for fd in reversed(list(fds.values())):
                os.close(fd)
            if ports is not None:
                ports.close()
            if isinstance(exc, KernelUnavailable):
                raise
            raise KernelUnavailable(
                exc.errno or errno.EINVAL, f"kernel SRTP on {ifname}: {exc.strerror or exc}"
            ) from exc
        assert ports is not None
        return cls(fds, ports)

    def close(self) -> None:
        for name in ("link_first", "link_last", "prog_first", "prog_last", "setup", "scratch", "map", "btf"):
            fd = self._fds.pop(name, -1)
            if fd >= 0:
                os.close(fd)
        self._ports.close()

    @property
    def closed(self) -> bool:
        return "map" not in self._fds

    @staticmethod
    def key(local: Addr, src: Addr) -> bytes:
        return _KEY.pack(_ip4(local[0]), _ip4(src[0]), local[1], src[1])

    def install(
        self,
        local: Addr,
        src: Addr,
        egress: Egress,
        ssrc: int,
        clock_rate: int,
        state: StatsState,
        inbound: SrtpSide | None,
        outbound: SrtpSide | None,
    ) -> bytes:
        """Transcode RTP packets of ``ssrc`` to ``local`` from ``src``: unprotect with
        ``inbound``, protect with ``outbound`` (at least one), send via ``egress``. ``state``:
        the ingress endpoint's ``StreamStats`` state, which the program continues. Returns the
        key. Raises ValueError for what the kernel cannot do, OSError if the map refuses."""
        if inbound is None and outbound is None:
            raise ValueError("a kernel SRTP flow needs an inbound or an outbound key")
        _check_side(inbound)
        _check_side(outbound)
        if not 0 < clock_rate <= 1_000_000:
            raise ValueError(f"clock rate {clock_rate} out of range")
        key = self.key(local, src)
        (shost, sport), (dhost, dport) = egress
        rewrite = _ip4(shost) + _ip4(dhost) + struct.pack("!HH", sport, dport)
        flags = (_F_IN if inbound else 0) | (_F_OUT if outbound else 0)
        value = bytearray(VALUE_SIZE)
        tags = [SUITES[s.suite] if s else 0 for s in (inbound, outbound)]
        _HEAD.pack_into(value, _V_REWRITE, rewrite, clock_rate, flags, struct.pack("!I", ssrc), *tags)
        keys: list[bytes | None] = []
        for i, s in enumerate((inbound, outbound)):
            if s is None:
                keys.append(None)
                continue
            k_e, k_a, k_s = session_keys(s.key_salt)
            keys.append(k_e)
            value[_V_SALT[i] : _V_SALT[i] + 14] = k_s
            value[_V_HMAC[i] : _V_HMAC[i] + bpf_sha1.STATES_SIZE] = bpf_sha1.pack_states(k_a)
            window = 0 if s.fresh else (1 << 64) - 1  # what libsrtp saw before: all taken as seen
            _STATE.pack_into(value, _V_ROC[i], s.roc, s.highest_seq, window, window)
            struct.pack_into("=I", value, _V_FRESH[i], 1 if s.fresh else 0)
        _STATS.pack_into(value, _V_STATS, *stats_fields(state))
        existed = self.read(key) is not None  # a re-install: its port is counted already
        if not existed:
            self._ports.add(local[1])
        try:
            self._flows.update(key, bytes(value))
            for slot, session_key in enumerate(keys):
                if session_key is not None:
                    self._set_key(key, slot, session_key)
        except OSError:
            self.install_errors += 1
            self._flows.delete(key)
            self._ports.discard(local[1])
            raise
        self.installs += 1
        return key

    def read(self, key: bytes) -> SrtpCounters | None:
        raw = self._flows.lookup(key)
        return None if raw is None else _decode(raw)

    def read_all(self) -> dict[bytes, SrtpCounters]:
        """Every flow's counters, a few system calls for the whole map."""
        return {k: _decode(v) for k, v in self._flows.lookup_all().items()}

    def remove(self, key: bytes) -> SrtpCounters | None:
        """Stop transcoding the flow in the kernel (its keys are released); its last counters."""
        last = self.read(key)
        self._flows.delete(key)
        if last is not None:
            self._ports.discard(_KEY.unpack(key)[2])
        return last

    def _set_key(self, key: bytes, slot: int, k_e: bytes) -> None:
        params = _PARAMS.pack(b"skcipher", b"", b"ecb(aes-generic)", k_e, len(k_e), 0)
        ctx = ctypes.create_string_buffer(_SETUP.pack(params, key, slot), _SETUP.size)
        req = attr(
            struct.pack(
                "<IIIIQQIIIIQQ",
                self._fds["setup"],
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                _SETUP.size,
                0,
                ctypes.addressof(ctx),
                0,
            ),
            80,
        )
        bpf(_BPF_PROG_TEST_RUN, req)
        (ret,) = struct.unpack_from("<i", req, 4)
        if ret != 0:
            raise OSError(-ret, f"creating the flow's AES context: {os.strerror(-ret)}")


def _load_btf(blob: bytes) -> int:
    buf = ctypes.create_string_buffer(blob, len(blob))
    log = ctypes.create_string_buffer(1 << 14)
    try:
        return bpf(
            _BPF_BTF_LOAD,
            attr(struct.pack("<QQIII", ctypes.addressof(buf), ctypes.addressof(log), len(blob), len(log), 1)),
        )
    except OSError as exc:
        raise KernelUnavailable(
            exc.errno, f"loading BTF: {exc.strerror} {log.value.decode(errors='replace')[-300:]}"
        ) from exc

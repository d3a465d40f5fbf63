"""HMAC-SHA1 (RFC 2104 over FIPS 180-4 SHA-1) in eBPF instructions, for SRTP authentication
(RFC 3711, AES_CM_128_HMAC_SHA1_80 and _32) in a TC program.

The kernel offers TC programs no hash: the compression function is emitted here with ``Asm``, 80
rounds unrolled, a..e in registers, the message schedule in a 16-word ring on the stack; BPF has
no rotate, so each new ``a`` is kept doubled in its 64-bit register and its two rotations are one
shift each (see ``emit_sha1_block``). A flow's key is never hashed in the program: Python
computes, once per key, the SHA-1 states after the key^ipad and key^opad blocks
(``hmac_sha1_states``, ``pack_states``), and the flow's map value carries them.

Two subprograms (bpf-to-bpf callees, static: the verifier checks them at each call site in the
caller's context), emitted by ``emit_hmac_sha1`` after the caller's last instruction:

``hmac_sha1`` (the label ``HMAC_LABEL``), called with ``Asm.call_local``:

- r1: a pointer to the scratch buffer: into a writable map value, with at least ``SCRATCH_SIZE``
  bytes of it from r1 on (the value itself, normally: one element of a
  ``BPF_MAP_TYPE_PERCPU_ARRAY``, one buffer per CPU; a TC program runs with bottom halves off
  and does not migrate, so nothing else on that CPU uses the buffer meanwhile). The message is
  at ``SCRATCH_MSG`` in it, put there by the caller (``bpf_skb_load_bytes``; for SRTP: the
  authenticated portion, then the 4-byte big-endian rollover counter right after it).
- r2: the message length in bytes, a scalar, 0 .. ``MAX_MESSAGE`` (1,504: a 1,500-byte datagram
  and the ROC). The callee checks it itself: the caller need not bound it for the verifier.
- r3: a pointer to the key's two states, ``STATES_SIZE`` (40) readable bytes: the inner state
  (5 x u32, host order), then the outer one, as ``pack_states`` lays them out. Any pointer the
  verifier can bound (a map value, normally the flow's; the stack also works). Only read.
- returns r0 = 0 and the 20-byte HMAC-SHA1 (big-endian, ``hmac.digest()``'s bytes) at
  ``SCRATCH_DIGEST`` in the scratch buffer (for _80 the tag is its first 10 bytes, for _32 its
  first 4); or r0 = 1 if r2 > ``MAX_MESSAGE`` (then nothing is computed and the scratch is not
  touched).
- clobbers r1-r5 (as any call); r6-r9 and the caller's stack are preserved (BPF's calling
  convention). In the scratch buffer it overwrites bytes ``SCRATCH_STATE`` .. ``SCRATCH_MSG``
  (the working state, the outer block, the digest) and the bytes from ``SCRATCH_MSG + length``
  on, up to at most ``SCRATCH_SIZE`` (the SHA-1 padding is written in place after the message,
  its first word read-modify-written: the message bytes are left as they were). Nothing at or
  past ``SCRATCH_SIZE`` is touched: a caller may keep its own data there.
- stack: ``hmac_sha1`` has no frame of its own; the block function it calls uses 64 bytes
  (the verifier reports "stack depth <caller>+0+64"). The whole chain must fit in 512 bytes:
  the caller's frame may be up to 448. Call depth: two frames below the caller.
- speed: about 114 ns per 64-byte block on a 3.6 GHz Zen 4 (JIT): the key blocks are
  precomputed, so a message of n bytes costs (n + 8) // 64 + 2 blocks (166 bytes: 4, some
  455 ns).

``sha1_block`` (the label ``BLOCK_LABEL``), the compression function, callable on its own:
r1 = a pointer to the 5-word state (u32, host order), updated in place; r2 = a pointer to the
64-byte block (big-endian words, as SHA-1 reads them). Both must be pointers the verifier can
bound (map values, or the caller's stack). Clobbers r0-r5; preserves r6-r9; returns nothing (r0
is garbage). Stack: 64 bytes (the W ring, at fp-64). 1,957 instructions, no branch.

The loop over the message's blocks is a plain bounded loop, not ``bpf_loop``: it runs as
written, and a ``bpf_loop`` callback would need BTF func_info for every subprogram of the
caller's program. The verifier walks a static subprogram once per call and per loop iteration
(a message of up to ``MAX_MESSAGE`` bytes is up to 24 inner blocks), so one ``hmac_sha1`` call
site costs it about 52,000 processed instructions of its 1,000,000 (the test program's whole
count: 52,202).
"""

from __future__ import annotations

import hashlib
import struct

from media_relay.bpf import FP, Asm

HMAC_LABEL = "hmac_sha1"
BLOCK_LABEL = "sha1_block"

MAX_MESSAGE = 1504  # bytes hashed after the key block: a 1,500-byte SRTP datagram and its 4-byte ROC
DIGEST_SIZE = 20
STATES_SIZE = 40  # inner, then outer state: 10 x u32, host order
BLOCK_STACK = 64  # the W ring of the block function, its whole frame
# the scratch buffer (offsets in the map value r1 points to)
SCRATCH_STATE = 0  # the working state, 5 x u32 host order (20 bytes; 12 more unused)
SCRATCH_DIGEST = 32  # the outer hash's block (inner digest, padding); on return the digest
SCRATCH_MSG = 96  # the message; its padding follows it in place
# Padding writes 8-byte words from the one holding the 0x80 (at or below the message's end) up to
# 72 bytes on: the buffer must reach the last of them for the longest message.
SCRATCH_SIZE = SCRATCH_MSG + MAX_MESSAGE + 72
MAX_BLOCKS = (MAX_MESSAGE + 8) // 64 + 1  # inner blocks of the longest message (24)

_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)
_K = (0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xCA62C1D6)
_M32 = 0xFFFFFFFF

State = tuple[int, int, int, int, int]


# -- pure Python: the per-key states, and the reference the tests hold the program to ---------------


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _M32


def sha1_compress(state: tuple[int, ...], block: bytes) -> State:
    """SHA-1's compression function (FIPS 180-4 §6.1.2): ``state`` (5 words) after ``block`` (64
    bytes)."""
    if len(state) != 5 or len(block) != 64:
        raise ValueError("sha1_compress: a 5-word state and a 64-byte block")
    w = list(struct.unpack(">16I", block))
    for t in range(16, 80):
        w.append(_rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1))
    a, b, c, d, e = state
    for t in range(80):
        if t < 20:
            f = (b & c) | (~b & d)
        elif 40 <= t < 60:
            f = (b & c) | (b & d) | (c & d)
        else:
            f = b ^ c ^ d
        a, b, c, d, e = (_rotl(a, 5) + f + e + _K[t // 20] + w[t]) & _M32, a, _rotl(b, 30), c, d
    s0, s1, s2, s3, s4 = state
    return (s0 + a) & _M32, (s1 + b) & _M32, (s2 + c) & _M32, (s3 + d) & _M32, (s4 + e) & _M32


def hmac_sha1_states(key: bytes) -> tuple[State, State]:
    """The SHA-1 states after the key^ipad block and after the key^opad block (RFC 2104; a key
    longer than 64 bytes is hashed first). HMAC(key, m) = H(opad-state, H(ipad-state, m))."""
    if len(key) > 64:
        key = hashlib.sha1(key).digest()
    key = key.ljust(64, b"\0")
    inner = sha1_compress(_IV, bytes(k ^ 0x36 for k in key))
    outer = sha1_compress(_IV, bytes(k ^ 0x5C for k in key))
    return inner, outer


def pack_states(key: bytes) -> bytes:
    """The ``STATES_SIZE`` bytes ``hmac_sha1`` reads at r3: inner state, outer state, as u32 in
    host (little-endian) order."""
    inner, outer = hmac_sha1_states(key)
    return struct.pack("<10I", *inner, *outer)


# -- the eBPF subprograms ------------------------------------------------------------------------


def _ring(t: int) -> int:
    """The stack slot of W[t] in the 16-word ring."""
    return -BLOCK_STACK + 4 * (t % 16)


def emit_sha1_block(a: Asm, label: str = BLOCK_LABEL) -> None:
    """The compression function as a subprogram at ``label`` (see the module docstring for its
    contract). 80 rounds unrolled, about 2,000 instructions, no branch.

    Registers inside: r1 the state pointer throughout, r2 the block pointer, a..e rotating among
    r3-r7, r0 and r8 temporaries (r9 unused). The W ring is at fp-64 .. fp-1, W[t] at
    fp-64 + 4 * (t % 16), host order.

    BPF has no rotate, and a 32-bit rotation costs shift, shift, or. Instead each new ``a`` is
    kept doubled, ``a | a << 32`` (mov, shift, or; once): then rotl(a, 5) is the low half of
    ``a >> 27`` and rotl(a, 30), when that value has moved on to ``b``, the low half of ``b >> 2``
    (one 64-bit shift each). Everything else reads the registers with 32-bit operations, which
    see only the low halves, and every new ``a`` comes from a 32-bit add, which zero-extends: the
    upper halves never leak into the result. Additions wrap modulo 2**32 in the 32-bit ALU."""
    a.label(label)
    regs = [3, 4, 5, 6, 7]  # a, b, c, d, e
    w, x = 0, 8
    for i, r in enumerate(regs):
        a.ldx(4, r, 1, 4 * i)

    def double(r: int) -> None:  # r = r | r << 32, r zero-extended
        a.alu("mov", x, r)
        a.alu("lsh", x, imm=32)
        a.alu("or", r, x)

    double(regs[0])
    double(regs[1])
    for t in range(80):
        ra, rb, rc, rd, re = regs
        # W[t] into w, and into the ring while later rounds still need it (t + 3 < 80)
        if t < 16:
            a.ldx(4, w, 2, 4 * t)
            a.be(w, 32)
            a.stx(4, FP, _ring(t), w)
        else:  # rotl(W[t-16] ^ W[t-14] ^ W[t-8] ^ W[t-3], 1): the newest word last, off the chain
            a.ldx(4, w, FP, _ring(t - 16))
            a.ldx(4, x, FP, _ring(t - 14))
            a.alu32("xor", w, x)
            a.ldx(4, x, FP, _ring(t - 8))
            a.alu32("xor", w, x)
            a.ldx(4, x, FP, _ring(t - 3))
            a.alu32("xor", w, x)
            a.alu32("mov", x, w)
            a.alu32("lsh", x, imm=1)
            a.alu32("rsh", w, imm=31)
            a.alu32("or", w, x)
            if t < 77:
                a.stx(4, FP, _ring(t), w)
        a.alu32("add", re, w)
        a.alu32("add", re, imm=_K[t // 20])
        # e += f(b, c, d)
        if t < 20:  # Ch = d ^ (b & (c ^ d))
            a.alu32("mov", w, rc)
            a.alu32("xor", w, rd)
            a.alu32("and", w, rb)
            a.alu32("xor", w, rd)
            a.alu32("add", re, w)
        elif 40 <= t < 60:  # Maj = (b & c) + (d & (b ^ c)), the two terms disjoint
            a.alu32("mov", w, rb)
            a.alu32("and", w, rc)
            a.alu32("add", re, w)
            a.alu32("mov", w, rb)
            a.alu32("xor", w, rc)
            a.alu32("and", w, rd)
            a.alu32("add", re, w)
        else:  # parity
            a.alu32("mov", w, rb)
            a.alu32("xor", w, rc)
            a.alu32("xor", w, rd)
            a.alu32("add", re, w)
        # e += rotl(a, 5), last: the one term on the round-to-round chain
        a.alu("mov", w, ra)
        a.alu("rsh", w, imm=27)
        a.alu32("add", re, w)  # re: the new a, zero-extended
        a.alu("rsh", rb, imm=2)  # b (doubled) = rotl(b, 30), in its low half
        if t < 79:
            double(re)
        regs = [re, ra, rb, rc, rd]
    for i, r in enumerate(regs):
        a.ldx(4, w, 1, 4 * i)
        a.alu32("add", w, r)
        a.stx(4, 1, 4 * i, w)
    a.exit()


def emit_hmac_sha1(
    a: Asm, label: str = HMAC_LABEL, block_label: str = BLOCK_LABEL, block: bool = True
) -> None:
    """``hmac_sha1`` at ``label`` (see the module docstring for its contract), followed by the
    block function at ``block_label`` unless ``block`` is false (the caller emits it elsewhere).
    Emit after the caller's own code: a subprogram starts where the previous one's last
    instruction (an exit) ends.

    Inside: r6 the scratch buffer, r8 the states, r9 the padded length (64 .. 1,536: a multiple
    of 64, exactly bounded, so that the verifier can see the loop end), r7 the offset of the
    block in the loop. The loop over blocks is a plain bounded loop: the verifier unrolls it
    (one walk of the block function per possible block), the JIT runs it as written."""
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = range(10)
    a.label(label)
    a.jmp("jgt", f"{label}_too_long", r2, imm=MAX_MESSAGE)
    a.alu("mov", r6, r1)
    a.alu("mov", r8, r3)
    for i in range(5):  # the working state starts as the inner one
        a.ldx(4, r0, r8, 4 * i)
        a.stx(4, r6, SCRATCH_STATE + 4 * i, r0)
    # Padding, in place: keep the message bytes of the 8-byte word holding its end, put 0x80 after
    # them (little-endian: the next higher byte), zero the rest of that word and 8 words more,
    # then the bit length of key block + message, big-endian, in the last 8 bytes of the last
    # block.
    a.alu("mov", r4, r2)
    a.alu("and", r4, imm=-8)
    a.alu("add", r4, r6)  # r4: scratch + (length & ~7)
    a.alu("mov", r5, r2)
    a.alu("and", r5, imm=7)
    a.alu("lsh", r5, imm=3)  # r5: bits of message in that word
    a.ldx(8, r0, r4, SCRATCH_MSG)
    a.alu("mov", r1, imm=1)
    a.alu("lsh", r1, r5)
    a.alu("sub", r1, imm=1)
    a.alu("and", r0, r1)
    a.alu("add", r1, imm=1)
    a.alu("lsh", r1, imm=7)
    a.alu("or", r0, r1)
    a.stx(8, r4, SCRATCH_MSG, r0)
    for k in range(1, 9):
        a.st(8, r4, SCRATCH_MSG + 8 * k, 0)
    a.alu("mov", r9, r2)
    a.alu("add", r9, imm=8)
    a.alu("rsh", r9, imm=6)
    a.alu("add", r9, imm=1)
    a.alu("lsh", r9, imm=6)  # r9: the padded length, blocks * 64
    a.alu("mov", r0, r2)
    a.alu("add", r0, imm=64)
    a.alu("lsh", r0, imm=3)
    a.be(r0, 64)
    a.alu("mov", r4, r6)
    a.alu("add", r4, r9)
    a.stx(8, r4, SCRATCH_MSG - 8, r0)
    # the inner hash: every block
    a.alu("mov", r7, imm=0)
    a.label(f"{label}_inner")
    a.alu("mov", r1, r6)
    a.alu("add", r1, imm=SCRATCH_STATE)
    a.alu("mov", r2, r6)
    a.alu("add", r2, r7)
    a.alu("add", r2, imm=SCRATCH_MSG)
    a.call_local(block_label)
    a.alu("add", r7, imm=64)
    a.jmp("jlt", f"{label}_inner", r7, r9)
    # the outer block: the inner digest (big-endian), 0x80, zeros, the bit length (64 + 20) * 8
    for i in range(5):
        a.ldx(4, r0, r6, SCRATCH_STATE + 4 * i)
        a.be(r0, 32)
        a.stx(4, r6, SCRATCH_DIGEST + 4 * i, r0)
    a.st(4, r6, SCRATCH_DIGEST + 20, 0x80)
    for off in range(24, 56, 8):
        a.st(8, r6, SCRATCH_DIGEST + off, 0)
    a.st(4, r6, SCRATCH_DIGEST + 56, 0)
    a.st(4, r6, SCRATCH_DIGEST + 60, struct.unpack("<i", struct.pack(">I", (64 + DIGEST_SIZE) * 8))[0])
    for i in range(5):  # the working state becomes the outer one
        a.ldx(4, r0, r8, 20 + 4 * i)
        a.stx(4, r6, SCRATCH_STATE + 4 * i, r0)
    a.alu("mov", r1, r6)
    a.alu("add", r1, imm=SCRATCH_STATE)
    a.alu("mov", r2, r6)
    a.alu("add", r2, imm=SCRATCH_DIGEST)
    a.call_local(block_label)
    for i in range(5):  # the digest, big-endian, over the outer block's first 20 bytes
        a.ldx(4, r0, r6, SCRATCH_STATE + 4 * i)
        a.be(r0, 32)
        a.stx(4, r6, SCRATCH_DIGEST + 4 * i, r0)
    a.alu("mov", r0, imm=0)
    a.exit()
    a.label(f"{label}_too_long")
    a.alu("mov", r0, imm=1)
    a.exit()
    if block:
        emit_sha1_block(a, block_label)

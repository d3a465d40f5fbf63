"""HMAC-SHA1 in eBPF (``media_relay/bpf_sha1.py``), held to Python's ``hmac``/``hashlib``.

A sched_cls test program, run with BPF_PROG_TEST_RUN on a made-up frame: 14 bytes of Ethernet
header (zeros; the program does not read them), a 20-byte slot, then the message (the rest of the
frame, 0 .. 1,504 bytes). The program copies the message into the per-CPU scratch buffer, calls
``hmac_sha1`` with the states of the key in an array map, and writes the digest into the slot;
the frame comes back in data_out. Return codes say which step failed (see ``_program``).

Loading needs root (CAP_BPF): without it the kernel tests are skipped and say why; as root a
program the verifier refuses is a failure, with its log. Run this file as a script for timings.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import re
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from media_relay import bpf_sha1
from media_relay.bpf import FP, Asm, attr, bpf, load, load_program

_BPF_MAP_CREATE, _BPF_MAP_UPDATE_ELEM, _BPF_PROG_TEST_RUN, _BPF_BTF_LOAD = 0, 2, 10, 18
_BPF_MAP_TYPE_ARRAY, _BPF_MAP_TYPE_PERCPU_ARRAY = 2, 6
_BPF_PROG_TYPE_SCHED_CLS = 3
_BPF_LOG_STATS = 4
_MAP_LOOKUP, _STORE_BYTES, _LOAD_BYTES = 1, 9, 26

ETH = 14
SLOT = ETH  # the digest goes here
MSG = ETH + bpf_sha1.DIGEST_SIZE  # the message starts here

SRTP_KEY = bytes(range(0x30, 0x30 + 20))  # an SRTP session authentication key is 160 bits
KEYS = [
    SRTP_KEY,
    b"",
    b"key",
    bytes(range(64)),  # exactly one block: used as is
    bytes(range(200, 255)) + b"a longer key than a block, hashed first" * 2,  # > 64 bytes
]


def _program(scratch_fd: int, states_fd: int, with_hmac: bool = True) -> bytes:
    """Return codes: 0 done, 2/3 a map lookup failed, 4 the frame is shorter than 34 bytes or
    the message longer than ``MAX_MESSAGE``, 5 bpf_skb_load_bytes failed, 6 hmac_sha1 refused
    the length, 7 bpf_skb_store_bytes failed. ``with_hmac=False``: the same without the HMAC
    (the cost of the rest, for the timings)."""
    a = Asm()
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9 = range(10)
    a.alu("mov", r6, r1)
    a.st(4, FP, -4, 0)
    for fd, reg, code in ((scratch_fd, r7, 2), (states_fd, r8, 3)):
        a.ld_map(r1, fd)
        a.alu("mov", r2, FP)
        a.alu("add", r2, imm=-4)
        a.call(_MAP_LOOKUP)
        a.alu("mov", reg, r0)
        a.alu("mov", r0, imm=code)
        a.jmp("jeq", "out", reg, imm=0)
    a.ldx(4, r9, r6, 0)  # skb->len
    a.alu("sub", r9, imm=MSG)
    a.alu("mov", r0, imm=4)
    a.jmp("jgt", "out", r9, imm=bpf_sha1.MAX_MESSAGE)  # also a frame under 34 bytes (wrapped)
    a.jmp("jeq", "loaded", r9, imm=0)
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=MSG)
    a.alu("mov", r3, r7)
    a.alu("add", r3, imm=bpf_sha1.SCRATCH_MSG)
    a.alu("mov", r4, r9)
    a.call(_LOAD_BYTES)
    a.alu("mov", r1, r0)
    a.alu("mov", r0, imm=5)
    a.jmp("jne", "out", r1, imm=0)
    a.label("loaded")
    if with_hmac:
        a.alu("mov", r1, r7)
        a.alu("mov", r2, r9)
        a.alu("mov", r3, r8)
        a.call_local(bpf_sha1.HMAC_LABEL)
        a.alu("mov", r1, r0)
        a.alu("mov", r0, imm=6)
        a.jmp("jne", "out", r1, imm=0)
    a.alu("mov", r1, r6)
    a.alu("mov", r2, imm=SLOT)
    a.alu("mov", r3, r7)
    a.alu("add", r3, imm=bpf_sha1.SCRATCH_DIGEST)
    a.alu("mov", r4, imm=bpf_sha1.DIGEST_SIZE)
    a.alu("mov", r5, imm=0)
    a.call(_STORE_BYTES)
    a.alu("mov", r1, r0)
    a.alu("mov", r0, imm=7)
    a.jmp("jne", "out", r1, imm=0)
    a.alu("mov", r0, imm=0)
    a.label("out")
    a.exit()
    if with_hmac:
        bpf_sha1.emit_hmac_sha1(a)
    return a.code()


class Rig:
    """The test program, its scratch map (per CPU) and its states map (one key's)."""

    def __init__(self, with_hmac: bool = True) -> None:
        self.fds: list[int] = []
        try:
            self.scratch_fd = self._map(_BPF_MAP_TYPE_PERCPU_ARRAY, bpf_sha1.SCRATCH_SIZE)
            self.states_fd = self._map(_BPF_MAP_TYPE_ARRAY, bpf_sha1.STATES_SIZE)
            self.prog_fd, self.log = self._load(_program(self.scratch_fd, self.states_fd, with_hmac))
            self.fds.append(self.prog_fd)
        except BaseException:
            self.close()
            raise
        self._out = ctypes.create_string_buffer(4096)

    def _map(self, kind: int, value_size: int) -> int:
        fd = bpf(_BPF_MAP_CREATE, attr(struct.pack("<IIIII", kind, 4, value_size, 1, 0)))
        self.fds.append(fd)
        return fd

    @staticmethod
    def _load(code: bytes) -> tuple[int, str]:
        """(fd, the verifier's statistics); a refusal raises ProgramRefused with its words."""
        return load(code, _BPF_PROG_TYPE_SCHED_CLS, b"test_hmac_sha1", log_level=_BPF_LOG_STATS)

    def set_key(self, key: bytes) -> None:
        k = ctypes.create_string_buffer(struct.pack("<I", 0), 4)
        v = ctypes.create_string_buffer(bpf_sha1.pack_states(key), bpf_sha1.STATES_SIZE)
        req = struct.pack("<I4xQQQ", self.states_fd, ctypes.addressof(k), ctypes.addressof(v), 0)
        bpf(_BPF_MAP_UPDATE_ELEM, attr(req))

    def run(self, msg: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
        """(return code, frame out, mean ns per run) for a frame carrying ``msg``."""
        frame = bytes(ETH) + b"\xee" * bpf_sha1.DIGEST_SIZE + msg
        data = ctypes.create_string_buffer(frame, len(frame))
        req = attr(
            struct.pack(
                "<IIIIQQII",
                self.prog_fd,
                0,
                len(frame),
                len(self._out),
                ctypes.addressof(data),
                ctypes.addressof(self._out),
                repeat,
                0,
            ),
            80,
        )
        bpf(_BPF_PROG_TEST_RUN, req)
        retval, _, size_out = struct.unpack_from("<III", req, 4)
        duration = struct.unpack_from("<I", req, 36)[0]
        return retval, self._out.raw[:size_out], duration

    def digest(self, msg: bytes) -> bytes:
        retval, out, _ = self.run(msg)
        assert retval == 0, f"the program returned {retval}"
        assert len(out) == MSG + len(msg)
        assert out[MSG:] == msg, "the message in the frame changed"
        return out[SLOT:MSG]

    def processed(self) -> int:
        m = re.search(r"processed (\d+) insns", self.log)
        return int(m.group(1)) if m else -1

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root (CAP_BPF)")
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def _message(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed * 7 + (i >> 8) * 29 + 1) & 0xFF for i in range(n))


# -- the assembler's additions -------------------------------------------------------------------------


def _insns(code: bytes) -> list[tuple[int, int, int, int, int]]:
    """(opcode, dst, src, off, imm) of each instruction."""
    out = []
    for i in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack_from("<BBhi", code, i)
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


def test_asm_encodings() -> None:
    a = Asm()
    a.alu32("add", 3, imm=0x8F1BBCDC)  # unsigned in, the same bits out
    a.alu32("xor", 3, 4)
    a.alu32("rsh", 5, imm=31)
    a.call_local("f")
    a.ld_func(2, "f")
    a.call_kfunc(12345)
    a.exit()
    a.label("f")
    a.alu32("mov", 0, imm=0)
    a.exit()
    assert _insns(a.code()) == [
        (0x04, 3, 0, 0, 0x8F1BBCDC - (1 << 32)),  # BPF_ALU | BPF_ADD | BPF_K
        (0xAC, 3, 4, 0, 0),  # BPF_ALU | BPF_XOR | BPF_X
        (0x74, 5, 0, 0, 31),
        (0x85, 0, 1, 0, 4),  # BPF_JMP | BPF_CALL, BPF_PSEUDO_CALL: "f" is insn 3 + 4 + 1
        (0x18, 2, 4, 0, 3),  # ld_imm64, BPF_PSEUDO_FUNC: insn 4 + 3 + 1 ...
        (0x00, 0, 0, 0, 0),  # ... its second half
        (0x85, 0, 2, 0, 12345),  # BPF_PSEUDO_KFUNC_CALL
        (0x95, 0, 0, 0, 0),
        (0xB4, 0, 0, 0, 0),  # "f"
        (0x95, 0, 0, 0, 0),
    ]


def _func_btf(n: int) -> bytes:
    """A BTF blob of ``int`` and an ``int f(void)`` prototype (ids 1, 2) and ``n`` static functions
    of it (ids 3 ..): what a program with callbacks must carry as func_info."""
    strings = b"\0int\0f\0"
    types = struct.pack("<IIII", 1, 1 << 24, 4, (1 << 24) | 32)  # INT "int", signed, 32 bits
    types += struct.pack("<III", 0, 13 << 24, 1)  # FUNC_PROTO, no parameters, returns int
    types += struct.pack("<III", 5, 12 << 24, 2) * n  # FUNC "f", static
    return (
        struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings
    )


def test_ld_func_with_bpf_loop() -> None:
    """A callback address from ``ld_func``, run by bpf_loop (helper 181): the sum of 0..6.
    A callback needs BTF func_info for every subprogram (the verifier says "missing btf
    func_info" otherwise), which is why ``hmac_sha1`` loops without bpf_loop."""
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root (CAP_BPF)")
    a = Asm()
    a.st(8, FP, -8, 0)
    a.alu("mov", 1, imm=7)
    a.ld_func(2, "cb")
    a.alu("mov", 3, FP)
    a.alu("add", 3, imm=-8)
    a.alu("mov", 4, imm=0)
    a.call(181)
    a.ldx(8, 0, FP, -8)
    a.exit()
    a.label("cb")  # (index, ctx): *ctx += index; continue
    a.ldx(8, 0, 2, 0)
    a.alu("add", 0, 1)
    a.stx(8, 2, 0, 0)
    a.alu("mov", 0, imm=0)
    a.exit()
    code = a.code()
    cb = 2 + _insns(code)[2][4] + 1  # where ld_func (insn 2) points: the callback's first insn
    blob = _func_btf(2)
    btf_buf = ctypes.create_string_buffer(blob, len(blob))
    btf_fd = bpf(_BPF_BTF_LOAD, attr(struct.pack("<QQII", ctypes.addressof(btf_buf), 0, len(blob), 0), 32))
    rig = Rig()
    rig.fds.append(btf_fd)
    try:
        insns = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(b"GPL")
        func_info = struct.pack("<IIII", 0, 3, cb, 4)
        fi = ctypes.create_string_buffer(func_info, len(func_info))
        load = struct.pack(
            "<IIQQIIQII16sIIIIQI",
            _BPF_PROG_TYPE_SCHED_CLS,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(lic),
            0,
            0,
            0,
            0,
            0,
            b"test_bpf_loop",
            0,
            0,
            btf_fd,
            8,
            ctypes.addressof(fi),
            2,
        )
        rig.prog_fd = load_program(load)
        rig.fds.append(rig.prog_fd)
        assert rig.run(b"")[0] == 21
    finally:
        rig.close()


# -- the pure-Python half ----------------------------------------------------------------------------


def _sha1_by_compress(data: bytes) -> bytes:
    """SHA-1 of ``data`` from ``sha1_compress`` alone (the padding written out here)."""
    padded = data + b"\x80" + bytes((55 - len(data)) % 64) + struct.pack(">Q", len(data) * 8)
    state: tuple[int, ...] = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)
    for i in range(0, len(padded), 64):
        state = bpf_sha1.sha1_compress(state, padded[i : i + 64])
    return struct.pack(">5I", *state)


@pytest.mark.parametrize("n", [0, 1, 55, 56, 63, 64, 65, 119, 120, 200, 1000])
def test_sha1_compress_is_sha1(n: int) -> None:
    data = _message(n, 3)
    assert _sha1_by_compress(data) == hashlib.sha1(data).digest()


def _hmac_from_states(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA1 from the two states, as the program computes it."""
    inner, outer = bpf_sha1.hmac_sha1_states(key)
    total = 64 + len(msg)
    padded = msg + b"\x80" + bytes((55 - total) % 64) + struct.pack(">Q", total * 8)
    state: tuple[int, ...] = inner
    for i in range(0, len(padded), 64):
        state = bpf_sha1.sha1_compress(state, padded[i : i + 64])
    block = struct.pack(">5I", *state) + b"\x80" + bytes(35) + struct.pack(">Q", (64 + 20) * 8)
    return struct.pack(">5I", *bpf_sha1.sha1_compress(outer, block))


@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"key{len(k)}")
def test_states_give_hmac(key: bytes) -> None:
    for n in (0, 1, 55, 56, 64, 119, 166, 1000):
        msg = _message(n, len(key))
        assert _hmac_from_states(key, msg) == hmac.new(key, msg, hashlib.sha1).digest()


def test_states_of_a_long_key_are_those_of_its_hash() -> None:
    key = KEYS[-1]
    assert len(key) > 64
    assert bpf_sha1.hmac_sha1_states(key) == bpf_sha1.hmac_sha1_states(hashlib.sha1(key).digest())
    assert bpf_sha1.pack_states(key) == struct.pack("<10I", *sum(bpf_sha1.hmac_sha1_states(key), ()))


def test_sha1_compress_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        bpf_sha1.sha1_compress((0,) * 5, bytes(63))
    with pytest.raises(ValueError):
        bpf_sha1.sha1_compress((0,) * 4, bytes(64))


def test_layout() -> None:
    """The scratch buffer holds what the contract says; the padding's last word fits."""
    assert bpf_sha1.SCRATCH_STATE + 20 <= bpf_sha1.SCRATCH_DIGEST
    assert bpf_sha1.SCRATCH_DIGEST + 64 <= bpf_sha1.SCRATCH_MSG
    assert bpf_sha1.MAX_BLOCKS == 24
    longest = bpf_sha1.MAX_MESSAGE
    assert bpf_sha1.SCRATCH_MSG + (longest & ~7) + 72 <= bpf_sha1.SCRATCH_SIZE
    assert bpf_sha1.SCRATCH_MSG + bpf_sha1.MAX_BLOCKS * 64 <= bpf_sha1.SCRATCH_SIZE


# -- the program, against hmac -----------------------------------------------------------------------

LENGTHS = sorted(
    {*range(201), *range(1400, bpf_sha1.MAX_MESSAGE + 1), 55, 56, 63, 64, 119, 120, 183, 184, 166, 1000}
)


def test_hmac_every_length_srtp_key(rig: Rig) -> None:
    rig.set_key(SRTP_KEY)
    for n in LENGTHS:
        msg = _message(n, n)
        assert rig.digest(msg) == hmac.new(SRTP_KEY, msg, hashlib.sha1).digest(), n


@pytest.mark.parametrize("key", KEYS[1:], ids=lambda k: f"key{len(k)}")
def test_hmac_other_keys(rig: Rig, key: bytes) -> None:
    rig.set_key(key)
    for n in (0, 1, 19, 20, 55, 56, 63, 64, 119, 120, 166, 183, 184, 247, 248, 1000, 1499, 1504):
        msg = _message(n, len(key) + n)
        assert rig.digest(msg) == hmac.new(key, msg, hashlib.sha1).digest(), n


def test_hmac_bytes_all_ones_and_zeros(rig: Rig) -> None:
    """Padding keeps the message's bytes whatever they are, and the last word's garbage (a
    longer message before) does not leak into the next hash."""
    rig.set_key(SRTP_KEY)
    for n in (1500, 7, 8, 9, 15, 16, 57, 1504, 0):
        for fill in (b"\xff", b"\x00"):
            msg = fill * n
            assert rig.digest(msg) == hmac.new(SRTP_KEY, msg, hashlib.sha1).digest(), (n, fill)


def test_too_long_is_refused(rig: Rig) -> None:
    retval, _, _ = rig.run(bytes(bpf_sha1.MAX_MESSAGE + 1))
    assert retval == 4  # the test program's own bound; hmac_sha1's is the same (its r0 = 1)


def test_hmac_refuses_a_length_past_its_bound() -> None:
    """hmac_sha1 checks r2 itself: a caller that passes any length verifies and gets r0 = 1."""
    if os.geteuid() != 0:
        pytest.skip("loading eBPF programs needs root (CAP_BPF)")
    rig = Rig()
    try:
        a = Asm()
        # a program whose only job is to call hmac_sha1 with skb->len as the length, unbounded
        a.alu("mov", 6, 1)
        a.st(4, FP, -4, 0)
        for fd, reg in ((rig.scratch_fd, 7), (rig.states_fd, 8)):
            a.ld_map(1, fd)
            a.alu("mov", 2, FP)
            a.alu("add", 2, imm=-4)
            a.call(_MAP_LOOKUP)
            a.alu("mov", reg, 0)
            a.alu("mov", 0, imm=9)
            a.jmp("jeq", "out", reg, imm=0)
        a.alu("mov", 1, 7)
        a.ldx(4, 2, 6, 0)
        a.alu("mov", 3, 8)
        a.call_local(bpf_sha1.HMAC_LABEL)
        a.label("out")
        a.exit()
        bpf_sha1.emit_hmac_sha1(a)
        fd, _ = Rig._load(a.code())
        rig.fds.append(fd)
        rig.prog_fd = fd
        rig.set_key(SRTP_KEY)
        assert rig.run(bytes(bpf_sha1.MAX_MESSAGE - MSG))[0] == 0
        assert rig.run(bytes(bpf_sha1.MAX_MESSAGE - MSG + 1))[0] == 1
    finally:
        rig.close()


def test_verifier_cost(rig: Rig) -> None:
    """One call site of hmac_sha1 stays far from the verifier's 1,000,000 instructions."""
    n = rig.processed()
    assert 0 < n < 200_000, rig.log


# -- timings (python tests/media/test_bpf_sha1.py) ------------------------------------------------------


def _python_ns(fn: Callable[[], object], loops: int = 20_000) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops * 1e9)
    return best


def bench(repeat: int = 100_000, trials: int = 10) -> None:
    """ns per HMAC in the kernel: BPF_PROG_TEST_RUN's mean over ``repeat`` runs, the best of
    ``trials``, less the same program without the HMAC (map lookups, the copy in, the store
    out); and Python's ``hmac`` (OpenSSL) for reference, one-shot and from a keyed copy."""
    rig, base = Rig(), Rig(with_hmac=False)
    try:
        print(rig.log.strip())
        rig.set_key(SRTP_KEY)
        base.set_key(SRTP_KEY)
        for n in (0, 166, 1000, 1504):
            msg = _message(n)
            best = floor = 1 << 32
            for _ in range(trials):
                best = min(best, rig.run(msg, repeat)[2])
                floor = min(floor, base.run(msg, repeat)[2])
            keyed = hmac.HMAC(SRTP_KEY, digestmod=hashlib.sha1)

            def from_copy(keyed: hmac.HMAC = keyed, msg: bytes = msg) -> bytes:
                c = keyed.copy()
                c.update(msg)
                return c.digest()

            def one_shot(msg: bytes = msg) -> bytes:
                return hmac.new(SRTP_KEY, msg, hashlib.sha1).digest()

            py = _python_ns(one_shot)
            py_copy = _python_ns(from_copy)
            blocks = (n + 8) // 64 + 2
            print(
                f"{n:5d} bytes ({blocks} blocks): test run {best} ns, without the HMAC {floor} ns: "
                f"HMAC {best - floor} ns ({(best - floor) / blocks:.0f} ns a block); "
                f"Python hmac.new {py:.0f} ns, HMAC.copy {py_copy:.0f} ns"
            )
    finally:
        rig.close()
        base.close()


if __name__ == "__main__":
    bench()

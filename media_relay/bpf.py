"""A small eBPF assembler and the bpf(2) system call, for the relay's kernel programs.

No clang, no libbpf: programs are written as Python calls that emit instructions (``_Asm``), and
loaded with ``bpf()`` through ctypes. ``kernel.py`` (E's plain forwarder) uses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD = 5
_BPF_PSEUDO_MAP_FD, _BPF_PSEUDO_MAP_VALUE = 1, 2
# src_reg of a BPF_CALL: a bpf-to-bpf call (imm: the callee's relative offset), a kfunc (imm: BTF id);
# src_reg of an ld_imm64: the address of a subprogram (imm: its relative offset), for bpf_loop & co.
_BPF_PSEUDO_CALL, _BPF_PSEUDO_KFUNC_CALL, _BPF_PSEUDO_FUNC = 1, 2, 4


# -- the assembler ------------------------------------------------------------------------

_ALU64, _ALU, _JMP, _LDX, _STX, _ST, _LD = 0x07, 0x04, 0x05, 0x01, 0x03, 0x02, 0x00
_SIZE = {1: 0x10, 2: 0x08, 4: 0x00, 8: 0x18}
_OPS = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50, "lsh": 0x60,
        "rsh": 0x70, "neg": 0x80, "xor": 0xA0, "mov": 0xB0, "arsh": 0xC0}  # fmt: skip
_JOPS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jne": 0x50, "jsgt": 0x60, "jsge": 0x70,
         "jlt": 0xA0, "jle": 0xB0, "jslt": 0xC0, "jsle": 0xD0}  # fmt: skip
FP = 10  # the frame pointer register


class Asm:
    """Instructions with symbolic jump and call targets; ``code()`` resolves them."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, int, int, int | str, int | str]] = []
        self._labels: dict[str, int] = {}

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int | str = 0) -> None:
        self._insns.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        assert name not in self._labels, name
        self._labels[name] = len(self._insns)

    def alu(self, op: str, dst: int, src: int | None = None, imm: int = 0) -> None:
        if src is None:
            self._emit(_ALU64 | _OPS[op], dst, 0, 0, imm)
        else:
            self._emit(_ALU64 | _OPS[op] | 0x08, dst, src)

    def alu32(self, op: str, dst: int, src: int | None = None, imm: int = 0) -> None:
        """The 32-bit ALU class (BPF_ALU) of ``alu``'s ops: the low halves, the result zero-extended
        to 64 bits. ``imm`` may be given as an unsigned 32-bit value (0x8F1BBCDC): same bits."""
        if src is None:
            if imm >= 1 << 31:
                imm -= 1 << 32
            self._emit(_ALU | _OPS[op], dst, 0, 0, imm)
        else:
            self._emit(_ALU | _OPS[op] | 0x08, dst, src)

    def be(self, dst: int, bits: int) -> None:
        """Network to host order (on this little-endian machine): BPF_END | BPF_TO_BE."""
        self._emit(_ALU | 0xD0 | 0x08, dst, 0, 0, bits)

    def ldx(self, size: int, dst: int, src: int, off: int) -> None:
        self._emit(_LDX | 0x60 | _SIZE[size], dst, src, off)

    def stx(self, size: int, dst: int, off: int, src: int) -> None:
        self._emit(_STX | 0x60 | _SIZE[size], dst, src, off)

    def st(self, size: int, dst: int, off: int, imm: int) -> None:
        self._emit(_ST | 0x60 | _SIZE[size], dst, 0, off, imm)

    def ld_map(self, dst: int, map_fd: int) -> None:
        self._emit(_LD | 0x18, dst, _BPF_PSEUDO_MAP_FD, 0, map_fd)
        self._emit(0, 0, 0, 0, 0)

    def ld_map_value(self, dst: int, map_fd: int, off: int = 0) -> None:
        """dst = the address of byte ``off`` of a one-element array map's value (no lookup)."""
        self._emit(_LD | 0x18, dst, _BPF_PSEUDO_MAP_VALUE, 0, map_fd)
        self._emit(0, 0, 0, 0, off)

    def jmp(self, op: str, target: str, dst: int = 0, src: int | None = None, imm: int = 0) -> None:
        if src is None:
            self._emit(_JMP | _JOPS[op], dst, 0, target, imm)
        else:
            self._emit(_JMP | _JOPS[op] | 0x08, dst, src, target)

    def call(self, helper: int) -> None:
        self._emit(_JMP | 0x80, 0, 0, 0, helper)

    def call_local(self, label: str) -> None:
        """A bpf-to-bpf call of the subprogram at ``label`` (BPF_PSEUDO_CALL): r1-r5 are its
        arguments, r0 its result; r1-r5 are clobbered, r6-r9 and the caller's stack survive."""
        self._emit(_JMP | 0x80, 0, _BPF_PSEUDO_CALL, 0, label)

    def call_kfunc(self, btf_id: int) -> None:
        """A kernel function call (BPF_PSEUDO_KFUNC_CALL), named by its BTF id in vmlinux."""
        self._emit(_JMP | 0x80, 0, _BPF_PSEUDO_KFUNC_CALL, 0, btf_id)

    def ld_func(self, dst: int, label: str) -> None:
        """dst = the address of the subprogram at ``label`` (ld_imm64, BPF_PSEUDO_FUNC), for a
        helper's callback argument (bpf_loop's, say)."""
        self._emit(_LD | 0x18, dst, _BPF_PSEUDO_FUNC, 0, label)
        self._emit(0, 0, 0, 0, 0)

    def exit(self) -> None:
        self._emit(_JMP | 0x90)

    def code(self) -> bytes:
        out = bytearray()
        for i, (code, dst, src, off, imm) in enumerate(self._insns):
            if isinstance(off, str):
                off = self._labels[off] - i - 1
            if isinstance(imm, str):  # a call's or ld_func's target, relative as jumps' are
                imm = self._labels[imm] - i - 1
            out += struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
        return bytes(out)


# -- the bpf(2) system call ------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def bpf(cmd: int, req: ctypes.Array[ctypes.c_char]) -> int:
    r = int(_libc.syscall(_SYS_BPF, cmd, req, len(req)))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def attr(data: bytes, size: int = 144) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data.ljust(size, b"\0"), size)


def load_program(data: bytes) -> int:
    """BPF_PROG_LOAD, retried on EAGAIN: the verifier gives up when a signal is pending (a
    SIGCHLD, say), as libbpf's loader also retries."""
    for _ in range(4):
        try:
            return bpf(_BPF_PROG_LOAD, attr(data))
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise
    return bpf(_BPF_PROG_LOAD, attr(data))


_BPF_PROG_GET_FD_BY_ID, _BPF_OBJ_GET_INFO_BY_FD, _BPF_PROG_QUERY = 13, 15, 16
_PROG_INFO_SIZE, _PROG_INFO_NAME = 232, 64  # struct bpf_prog_info, its name[16]


def prog_id(fd: int) -> int:
    """The id of the program behind ``fd``."""
    info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
    bpf(_BPF_OBJ_GET_INFO_BY_FD, attr(struct.pack("<IIQ", fd, _PROG_INFO_SIZE, ctypes.addressof(info))))
    return int(struct.unpack_from("<I", info, 4)[0])


def tcx_chain(ifindex: int, attach_type: int, limit: int = 64) -> list[tuple[int, str]]:
    """(program id, program name) of a TCX chain, in the order its programs run."""
    ids = (ctypes.c_uint32 * limit)()
    req = attr(struct.pack("<IIIIQI", ifindex, attach_type, 0, 0, ctypes.addressof(ids), limit), 64)
    bpf(_BPF_PROG_QUERY, req)
    count = struct.unpack_from("<I", req, 24)[0]
    out = []
    for prog_id in ids[: min(count, limit)]:
        try:
            fd = bpf(_BPF_PROG_GET_FD_BY_ID, attr(struct.pack("<I", prog_id)))
        except OSError:  # detached meanwhile
            continue
        try:
            info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
            req = attr(struct.pack("<IIQ", fd, _PROG_INFO_SIZE, ctypes.addressof(info)))
            bpf(_BPF_OBJ_GET_INFO_BY_FD, req)
            name = info.raw[_PROG_INFO_NAME : _PROG_INFO_NAME + 16].split(b"\0")[0].decode(errors="replace")
        finally:
            os.close(fd)
        out.append((int(prog_id), name))
    return out


class ProgramRefused(OSError):
    """The kernel refused a program; the message ends with the verifier's last words."""


def load(code: bytes, prog_type: int, name: bytes, flags: int = 0, log_level: int = 0) -> tuple[int, str]:
    """Load a program (GPL): (fd, the verifier's log at ``log_level``, 0 for none). A refusal is
    loaded again with a full log and raised as ProgramRefused with its last lines."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")

    def attempt(level: int, log: ctypes.Array[ctypes.c_char] | None) -> int:
        data = struct.pack(
            "<IIQQIIQII16s",
            prog_type,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(lic),
            level if log is not None else 0,
            0 if log is None else len(log),
            0 if log is None else ctypes.addressof(log),
            0,
            flags,
            name,
        )
        return load_program(data)

    first_log = ctypes.create_string_buffer(1 << 16) if log_level else None
    try:
        fd = attempt(log_level, first_log)
        return fd, "" if first_log is None else first_log.value.decode(errors="replace")
    except OSError as first:
        log = ctypes.create_string_buffer(1 << 24)
        try:
            os.close(attempt(1, log))
            detail = ""
        except OSError:
            text = log.value.decode(errors="replace").strip().splitlines()
            detail = ": " + " | ".join(text[-6:])
        raise ProgramRefused(first.errno, f"loading {name.decode()}: {first.strerror}{detail}") from first


_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_DELETE_ELEM, _BPF_MAP_LOOKUP_BATCH = 1, 2, 3, 24


class HashMap:
    """A BPF map's elements from userspace, as raw bytes (one buffer each for key and value)."""

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        self.fd = fd
        self.key_size, self.value_size = key_size, value_size
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)

    def lookup(self, key: bytes) -> bytes | None:
        self._key.raw = key
        req = struct.pack("<I4xQQ", self.fd, ctypes.addressof(self._key), ctypes.addressof(self._value))
        try:
            bpf(_BPF_MAP_LOOKUP_ELEM, attr(req))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return self._value.raw

    def lookup_all(self, chunk: int = 1024) -> dict[bytes, bytes]:
        """Every element, a few system calls for the whole map (BPF_MAP_LOOKUP_BATCH)."""
        out: dict[bytes, bytes] = {}
        ks, vs = self.key_size, self.value_size
        keys = ctypes.create_string_buffer(chunk * ks)
        values = ctypes.create_string_buffer(chunk * vs)
        cursor_in, cursor_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            req = attr(
                struct.pack(
                    "<QQQQIIQQ",
                    0 if first else ctypes.addressof(cursor_in),
                    ctypes.addressof(cursor_out),
                    ctypes.addressof(keys),
                    ctypes.addressof(values),
                    chunk,
                    self.fd,
                    0,
                    0,
                )
            )
            done = False
            try:
                bpf(_BPF_MAP_LOOKUP_BATCH, req)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                done = True
            count = struct.unpack_from("<I", req, 32)[0]
            raw_keys, raw_values = keys.raw, values.raw
            for i in range(count):
                out[raw_keys[i * ks : (i + 1) * ks]] = raw_values[i * vs : (i + 1) * vs]
            if done or count == 0:
                return out
            cursor_in.value = cursor_out.value
            first = False

    def update(self, key: bytes, value: bytes) -> None:
        self._key.raw = key
        self._value.raw = value
        req = struct.pack("<I4xQQQ", self.fd, ctypes.addressof(self._key), ctypes.addressof(self._value), 0)
        bpf(_BPF_MAP_UPDATE_ELEM, attr(req))

    def delete(self, key: bytes) -> bool:
        """Remove an element; False if there was none."""
        self._key.raw = key
        try:
            bpf(_BPF_MAP_DELETE_ELEM, attr(struct.pack("<I4xQ", self.fd, ctypes.addressof(self._key))))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return False
        return True

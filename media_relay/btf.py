"""BTF for the relay's kernel programs: kernel function ids from ``/sys/kernel/btf/vmlinux``, and a
small type blob for maps whose values hold kernel pointers (``__kptr``).

No libbpf: a program that calls a kfunc names it by its BTF id in the running kernel's type
information, which ``kfunc_ids`` reads; a map whose value carries a referenced kernel object (a
``bpf_crypto_ctx``) must be created with BTF that describes where that pointer lives, which
``kptr_value_btf`` builds (RFC-less, but see the kernel's Documentation/bpf/btf.rst).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable

VMLINUX = "/sys/kernel/btf/vmlinux"

_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type off/len, str off/len
_TYPE = struct.Struct("<III")  # name_off, info, size_or_type
_KIND_INT, _KIND_PTR, _KIND_ARRAY, _KIND_STRUCT = 1, 2, 3, 4
_KIND_FUNC, _KIND_TYPE_TAG = 12, 18
# bytes that follow a type record, by kind (vlen-scaled kinds: per member)
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_EXTRA_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BtfError(OSError):
    """The kernel's BTF is missing, unreadable or lacks a wanted function."""


def _names_and_kinds(data: bytes) -> Iterable[tuple[int, int, str]]:
    """(type id, kind, name) of every type in a BTF blob."""
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise BtfError(errno.EINVAL, "not a BTF blob")
    types = memoryview(data)[hdr_len + type_off : hdr_len + type_off + type_len]
    strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
    pos, type_id = 0, 1
    while pos < len(types):
        name_off, info, _ = _TYPE.unpack_from(types, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        pos += _TYPE.size + _EXTRA_FIXED.get(kind, 0) + vlen * _EXTRA_PER_MEMBER.get(kind, 0)
        end = strings.index(b"\0", name_off)
        yield type_id, kind, strings[name_off:end].decode()
        type_id += 1


def kfunc_ids(names: Iterable[str], path: str = VMLINUX) -> dict[str, int]:
    """BTF ids of kernel functions (``BTF_KIND_FUNC``) by name. Raises BtfError naming any that
    this kernel lacks."""
    wanted = set(names)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BtfError(exc.errno, f"{path}: {exc.strerror}") from exc
    found = {name: tid for tid, kind, name in _names_and_kinds(data) if kind == _KIND_FUNC and name in wanted}
    missing = sorted(wanted - found.keys())
    if missing:
        raise BtfError(errno.ENOSYS, f"the kernel has no {', '.join(missing)} (BTF of {path})")
    return found


class _Blob:
    def __init__(self) -> None:
        self.types = bytearray()
        self.strings = bytearray(b"\0")
        self.count = 0

    def name(self, text: str) -> int:
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        self.types += _TYPE.pack(self.name(name) if name else 0, (kind << 24) | vlen, size_or_type)
        self.types += extra
        self.count += 1
        return self.count

    def bytes(self) -> bytes:
        header = _HEADER.pack(
            _MAGIC, 1, 0, _HEADER.size, 0, len(self.types), len(self.types), len(self.strings)
        )
        return header + bytes(self.types) + bytes(self.strings)


def kptr_value_btf(
    struct_name: str, kptr_offsets: Iterable[int], value_size: int, key_size: int
) -> tuple[bytes, int, int]:
    """A BTF blob for a map whose ``key_size``-byte key is opaque and whose ``value_size``-byte
    value holds a referenced kernel pointer to ``struct <struct_name>`` at each offset in
    ``kptr_offsets`` (8-byte aligned), the rest opaque bytes. Returns (blob, key type id, value
    type id). The kernel resolves the struct by name in its own BTF and releases the objects when
    an element goes away."""
    offsets = sorted(kptr_offsets)
    if any(off % 8 or off + 8 > value_size for off in offsets):
        raise ValueError("kptr fields must be 8-byte aligned and inside the value")
    b = _Blob()
    u8 = b.add("unsigned char", _KIND_INT, 0, 1, struct.pack("<I", 8))
    u32 = b.add("unsigned int", _KIND_INT, 0, 4, struct.pack("<I", 32))
    target = b.add(struct_name, _KIND_STRUCT, 0, 0)
    tag = b.add("kptr", _KIND_TYPE_TAG, 0, target)
    ptr = b.add("", _KIND_PTR, 0, tag)
    arrays: dict[int, int] = {}

    def opaque(n: int) -> int:
        if n not in arrays:
            arrays[n] = b.add("", _KIND_ARRAY, 0, 0, struct.pack("<III", u8, u32, n))
        return arrays[n]

    key = opaque(key_size)
    members = bytearray()
    pos, n = 0, 0
    for i, off in enumerate(offsets):
        if off > pos:
            members += struct.pack("<III", b.name(f"pad{i}"), opaque(off - pos), pos * 8)
            n += 1
        members += struct.pack("<III", b.name(f"ptr{i}"), ptr, off * 8)
        n += 1
        pos = off + 8
    if pos < value_size:
        members += struct.pack("<III", b.name("rest"), opaque(value_size - pos), pos * 8)
        n += 1
    value = b.add(struct_name + "_holder", _KIND_STRUCT, n, value_size, bytes(members))
    return b.bytes(), key, value

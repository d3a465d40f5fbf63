"""RFC 5389 STUN codec (sans-IO): header, Binding, address attributes, SOFTWARE,
MESSAGE-INTEGRITY (short-term, HMAC-SHA1) and FINGERPRINT. Unknown attributes are kept as bytes.

Used on SIP flows for RFC 5626 / MRA HA keepalives (shared/spec/MRA.md §5) and for ICE later.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import secrets
import struct
from dataclasses import dataclass, field
from enum import IntEnum

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = struct.pack(">I", MAGIC_COOKIE)
HEADER_LEN = 20
FINGERPRINT_XOR = 0x5354554E


class StunError(ValueError):
    pass


class Method(IntEnum):
    BINDING = 0x001


class Class(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Attr(IntEnum):
    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


def is_stun(data: bytes) -> bool:
    """RFC 5389 §6 / RFC 7983: top two bits zero, magic cookie, length a multiple of 4."""
    return (
        len(data) >= HEADER_LEN
        and data[0] & 0xC0 == 0
        and data[4:8] == _COOKIE_BYTES
        and int.from_bytes(data[2:4], "big") % 4 == 0
    )


def _encode_type(method: int, cls: int) -> int:
    # §6: M11..M7 C1 M6..M4 C0 M3..M0
    return (
        (method & 0x0F80) << 2 | (method & 0x0070) << 1 | (method & 0x000F) | (cls & 2) << 7 | (cls & 1) << 4
    )


def _decode_type(t: int) -> tuple[int, int]:
    method = (t & 0x3E00) >> 2 | (t & 0x00E0) >> 1 | (t & 0x000F)
    cls = (t & 0x0100) >> 7 | (t & 0x0010) >> 4
    return method, cls


@dataclass
class StunMessage:
    method: int
    message_class: int
    transaction_id: bytes = field(default_factory=lambda: secrets.token_bytes(12))
    attributes: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, attr: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr:
                return v
        return None

    def add(self, attr: int, value: bytes) -> None:
        self.attributes.append((attr, value))

    @property
    def software(self) -> str | None:
        v = self.get(Attr.SOFTWARE)
        return v.decode("utf-8") if v is not None else None

    @property
    def xor_mapped_address(self) -> tuple[str, int] | None:
        v = self.get(Attr.XOR_MAPPED_ADDRESS)
        return decode_address(v, self.transaction_id, xor=True) if v is not None else None

    @property
    def mapped_address(self) -> tuple[str, int] | None:
        v = self.get(Attr.MAPPED_ADDRESS)
        return decode_address(v, self.transaction_id, xor=False) if v is not None else None

    def serialize(self, *, integrity_key: bytes | None = None, fingerprint: bool = False) -> bytes:
        """Encode; optionally append MESSAGE-INTEGRITY then FINGERPRINT (§15.4, §15.5 order)."""
        body = b"".join(_attr(t, v) for t, v in self.attributes)
        data = self._header(len(body)) + body
        if integrity_key is not None:
            data = _with_integrity(data, integrity_key)
        if fingerprint:
            data = _with_fingerprint(data)
        return data

    def __bytes__(self) -> bytes:
        return self.serialize()

    def _header(self, length: int) -> bytes:
        if len(self.transaction_id) != 12:
            raise StunError("transaction id must be 12 bytes")
        return struct.pack(">HHI", _encode_type(self.method, self.message_class), length, MAGIC_COOKIE) + (
            self.transaction_id
        )


def _attr(t: int, v: bytes) -> bytes:
    return struct.pack(">HH", t, len(v)) + v + b"\x00" * (-len(v) % 4)


def parse_message(data: bytes) -> StunMessage:
    """Parse a whole STUN message; MESSAGE-INTEGRITY/FINGERPRINT are kept as attributes."""
    if len(data) < HEADER_LEN or data[0] & 0xC0:
        raise StunError("not a STUN message")
    t, length, cookie = struct.unpack(">HHI", data[:8])
    if cookie != MAGIC_COOKIE:
        raise StunError("bad magic cookie")
    if length % 4 or HEADER_LEN + length != len(data):
        raise StunError("bad length")
    method, cls = _decode_type(t)
    msg = StunMessage(method, cls, bytes(data[8:20]), [])
    for at, _start, value in _walk(data):
        msg.attributes.append((at, value))
    return msg


def _walk(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, offset of the attribute header, value) for each attribute."""
    out: list[tuple[int, int, bytes]] = []
    pos = HEADER_LEN
    end = len(data)
    while pos < end:
        if pos + 4 > end:
            raise StunError("truncated attribute header")
        at, alen = struct.unpack(">HH", data[pos : pos + 4])
        vend = pos + 4 + alen
        if vend > end:
            raise StunError("truncated attribute")
        out.append((at, pos, bytes(data[pos + 4 : vend])))
        pos = vend + (-alen % 4)
    return out


def _with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack(">H", length) + data[4:]


def _hmac(data: bytes, key: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha1).digest()


def _with_integrity(data: bytes, key: bytes) -> bytes:
    # §15.4: HMAC over the message with the length field already counting MESSAGE-INTEGRITY.
    adj = _with_length(data, len(data) - HEADER_LEN + 24)
    return adj + _attr(Attr.MESSAGE_INTEGRITY, _hmac(adj, key))


def _crc(data: bytes) -> int:
    return (binascii.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _with_fingerprint(data: bytes) -> bytes:
    adj = _with_length(data, len(data) - HEADER_LEN + 8)
    return adj + _attr(Attr.FINGERPRINT, struct.pack(">I", _crc(adj)))


def verify_fingerprint(data: bytes) -> bool:
    for at, pos, value in _walk(data):
        if at == Attr.FINGERPRINT:
            if pos + 8 != len(data) or len(value) != 4:
                return False
            return int(struct.unpack(">I", value)[0]) == _crc(_with_length(data[:pos], pos - HEADER_LEN + 8))
    return False


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY (short-term credentials: key = SASLprep(password) bytes)."""
    for at, pos, value in _walk(data):
        if at == Attr.MESSAGE_INTEGRITY:
            if len(value) != 20:
                return False
            adj = _with_length(data[:pos], pos - HEADER_LEN + 24)
            return hmac.compare_digest(_hmac(adj, key), value)
    return False


def encode_address(host: str, port: int, transaction_id: bytes, *, xor: bool) -> bytes:
    ip = ipaddress.ip_address(host)
    family = 0x01 if ip.version == 4 else 0x02
    raw = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    return struct.pack(">BBH", 0, family, port) + raw


def decode_address(value: bytes, transaction_id: bytes, *, xor: bool) -> tuple[str, int]:
    if len(value) < 8:
        raise StunError("short address attribute")
    _, family, port = struct.unpack(">BBH", value[:4])
    raw = value[4:]
    if (family, len(raw)) not in ((1, 4), (2, 16)):
        raise StunError("bad address family")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE_BYTES + transaction_id
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    return str(ipaddress.ip_address(raw)), port


def binding_request(*, software: str | None = None, transaction_id: bytes | None = None) -> StunMessage:
    msg = StunMessage(Method.BINDING, Class.REQUEST, transaction_id or secrets.token_bytes(12))
    if software:
        msg.add(Attr.SOFTWARE, software.encode())
    return msg


def binding_success(
    request: StunMessage, addr: tuple[str, int], *, software: str | None = None
) -> StunMessage:
    """A Binding success response reflecting `addr` as XOR-MAPPED-ADDRESS (§7.3.1)."""
    msg = StunMessage(Method.BINDING, Class.SUCCESS, request.transaction_id)
    if software:
        msg.add(Attr.SOFTWARE, software.encode())
    msg.add(Attr.XOR_MAPPED_ADDRESS, encode_address(addr[0], addr[1], request.transaction_id, xor=True))
    return msg

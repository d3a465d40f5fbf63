"""Minimal SDP (RFC 4566) that round-trips byte-exact: only what C's B2BUA rewrites is parsed.

A description is a session section and media sections, each a list of raw lines with their own
line endings. Reading and rewriting c=, m= port/profile, a=crypto, a=rtcp and direction touch
only those lines; every other byte (unknown attributes, odd spacing, LF-only endings, Cisco
``x-cisco-*`` attributes) is written back exactly as received (shared/STYLE.md §6).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from media_relay.errors import MediaError
from media_relay.srtp import CryptoAttribute, SdesError

_LINE = re.compile(r"([^\r\n]*)(\r\n|\n|\r|$)")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


class SdpError(MediaError, ValueError):
    """An SDP body the B2BUA cannot work with (answer 488/400 upstream)."""


@dataclass(frozen=True, slots=True)
class Connection:
    address: str
    addrtype: str = "IP4"
    nettype: str = "IN"

    @classmethod
    def parse(cls, value: str) -> Connection:
        parts = value.split()
        if len(parts) != 3:
            raise SdpError(f"bad c= line {value!r}")
        return cls(parts[2], parts[1], parts[0])

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"

    @classmethod
    def for_address(cls, address: str) -> Connection:
        return cls(address, "IP6" if ":" in address else "IP4")


@dataclass(frozen=True, slots=True)
class RtcpAttribute:
    """``a=rtcp:<port> [IN IP4 <addr>]`` (RFC 3605)."""

    port: int
    connection: Connection | None = None

    @classmethod
    def parse(cls, value: str) -> RtcpAttribute:
        parts = value.split(maxsplit=1)
        if not parts or not parts[0].isdigit() or not 0 < int(parts[0]) <= 65535:
            raise SdpError(f"bad a=rtcp {value!r}")
        return cls(int(parts[0]), Connection.parse(parts[1]) if len(parts) > 1 else None)

    def __str__(self) -> str:
        return str(self.port) if self.connection is None else f"{self.port} {self.connection}"


class _Section:
    def __init__(self, lines: list[str], eols: list[str], default_eol: str) -> None:
        self.lines = lines
        self.eols = eols
        self._eol = default_eol

    def _find(self, prefix: str) -> list[int]:
        return [i for i, line in enumerate(self.lines) if line.startswith(prefix)]

    def _insert_at(self) -> int:
        i = len(self.lines)
        while i > 0 and self.lines[i - 1] == "":
            i -= 1
        return i

    def _insert(self, index: int, line: str) -> None:
        self.lines.insert(index, line)
        self.eols.insert(index, self._eol)
        if index == len(self.lines) - 1 and index > 0 and self.eols[index - 1] == "":
            # The body had no final line ending: keep it that way after the new last line.
            self.eols[index - 1], self.eols[index] = self._eol, ""

    def _delete(self, index: int) -> None:
        del self.lines[index]
        del self.eols[index]

    # attributes

    def attribute_values(self, name: str) -> list[str | None]:
        out: list[str | None] = []
        for line in self.lines:
            if line == f"a={name}":
                out.append(None)
            elif line.startswith(f"a={name}:"):
                out.append(line[len(name) + 3 :])
        return out

    def has_attribute(self, name: str) -> bool:
        return bool(self.attribute_values(name))

    def _attr_indexes(self, name: str) -> list[int]:
        bare, prefix = f"a={name}", f"a={name}:"
        return [i for i, line in enumerate(self.lines) if line == bare or line.startswith(prefix)]

    def set_attribute(self, name: str, value: str | None, present: bool = True) -> None:
        """Replace every ``a=<name>`` with one line (in place of the first), or remove them."""
        line = f"a={name}" if value is None else f"a={name}:{value}"
        self.replace_attributes(name, [line] if present else [])

    def replace_attributes(self, name: str, new_lines: list[str]) -> None:
        indexes = self._attr_indexes(name)
        at = indexes[0] if indexes else self._insert_at()
        for i in reversed(indexes):
            self._delete(i)
        for offset, line in enumerate(new_lines):
            self._insert(at + offset, line)

    # connection

    @property
    def connection(self) -> Connection | None:
        found = self._find("c=")
        return Connection.parse(self.lines[found[0]][2:]) if found else None

    def set_connection(self, address: str | Connection) -> None:
        conn = Connection.for_address(address) if isinstance(address, str) else address
        found = self._find("c=")
        if found:
            self.lines[found[0]] = f"c={conn}"
        else:
            self._insert(self._c_position(), f"c={conn}")

    def _c_position(self) -> int:
        # RFC 4566 §5 order: c= follows i= (media) or i=/u=/e=/p= (session).
        for i, line in enumerate(self.lines):
            if i and line[:2] in ("b=", "t=", "k=", "a=", "r=", "z="):
                return i
        return self._insert_at()

    @property
    def direction(self) -> str | None:
        for line in self.lines:
            if line.startswith("a=") and line[2:] in DIRECTIONS:
                return line[2:]
        return None

    def set_direction(self, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}")
        indexes = [i for i, line in enumerate(self.lines) if line.startswith("a=") and line[2:] in DIRECTIONS]
        if indexes:
            self.lines[indexes[0]] = f"a={direction}"
            for i in reversed(indexes[1:]):
                self._delete(i)
        else:
            self._insert(self._insert_at(), f"a={direction}")


class MediaSection(_Section):
    """One ``m=`` line and the lines up to the next."""

    def __init__(self, lines: list[str], eols: list[str], default_eol: str) -> None:
        super().__init__(lines, eols, default_eol)
        parts = lines[0][2:].split(" ")
        if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
            raise SdpError(f"bad m= line {lines[0]!r}")

    def _m(self) -> list[str]:
        return self.lines[0][2:].split(" ")

    def _set_m(self, index: int, value: str) -> None:
        parts = self._m()
        parts[index] = value
        self.lines[0] = "m=" + " ".join(parts)

    @property
    def media(self) -> str:
        return self._m()[0]

    @property
    def port(self) -> int:
        return int(self._m()[1].split("/")[0])

    def set_port(self, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port}")
        count = self._m()[1].partition("/")
        self._set_m(1, f"{port}{count[1]}{count[2]}")

    @property
    def proto(self) -> str:
        return self._m()[2]

    def set_proto(self, proto: str) -> None:
        """E.g. ``RTP/AVP`` <-> ``RTP/SAVP`` when C offers SRTP outside and plain RTP inside."""
        self._set_m(2, proto)

    @property
    def formats(self) -> list[str]:
        return self._m()[3:]

    @property
    def crypto(self) -> list[CryptoAttribute]:
        """Well-formed ``a=crypto`` lines in order; malformed ones are ignored (RFC 4568 §7.1.2)."""
        out = []
        for value in self.attribute_values("crypto"):
            try:
                out.append(CryptoAttribute.parse(value or ""))
            except SdesError:
                continue
        return out

    def set_crypto(self, attrs: list[CryptoAttribute]) -> None:
        self.replace_attributes("crypto", [a.to_line() for a in attrs])

    @property
    def rtcp(self) -> RtcpAttribute | None:
        values = self.attribute_values("rtcp")
        return RtcpAttribute.parse(values[0] or "") if values else None

    def set_rtcp(self, rtcp: RtcpAttribute | None) -> None:
        self.set_attribute("rtcp", str(rtcp) if rtcp else None, present=rtcp is not None)

    @property
    def rtcp_mux(self) -> bool:
        return self.has_attribute("rtcp-mux")

    def clock_rate(self, fmt: str | None = None) -> int | None:
        """From ``a=rtpmap``; static payload types fall back to RFC 3551 (8000 for audio)."""
        fmt = fmt if fmt is not None else (self.formats[0] if self.formats else None)
        for value in self.attribute_values("rtpmap"):
            pt, _, enc = (value or "").partition(" ")
            if pt == fmt:
                rate = enc.split("/")
                if len(rate) > 1 and rate[1].isdigit():
                    return int(rate[1])
        if fmt is not None and fmt.isdigit() and int(fmt) < 35:
            return 90000 if self.media == "video" else 8000
        return None


class SessionDescription:
    """``parse(bytes)`` / ``bytes(sd)`` round-trip byte-exact; edits touch only their lines."""

    def __init__(self, session: _Section, media: list[MediaSection]) -> None:
        self.session = session
        self.media = media

    @classmethod
    def parse(cls, data: bytes | str) -> SessionDescription:
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        lines: list[str] = []
        eols: list[str] = []
        for m in _LINE.finditer(text):
            if m.start() == len(text) and m.group(0) == "":
                break
            lines.append(m.group(1))
            eols.append(m.group(2))
        if not lines or not lines[0].startswith("v="):
            raise SdpError("SDP must start with v=")
        default_eol = next((e for e in eols if e), "\r\n")
        starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
        session = _Section(lines[: starts[0]], eols[: starts[0]], default_eol)
        media = [MediaSection(lines[a:b], eols[a:b], default_eol) for a, b in itertools.pairwise(starts)]
        return cls(session, media)

    def __bytes__(self) -> bytes:
        return str(self).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        parts: list[str] = []
        for section in (self.session, *self.media):
            for line, eol in zip(section.lines, section.eols, strict=True):
                parts.append(line)
                parts.append(eol)
        return "".join(parts)

    @property
    def connection(self) -> Connection | None:
        return self.session.connection

    def set_connection(self, address: str | Connection) -> None:
        self.session.set_connection(address)

    def media_connection(self, index: int) -> Connection | None:
        """The effective c= of an m= section: its own, else the session's (RFC 4566 §5.7)."""
        return self.media[index].connection or self.session.connection

    def media_remote(self, index: int) -> tuple[tuple[str, int], tuple[str, int]]:
        """Where an m= section receives: ``((addr, rtp port), (addr, rtcp port))``. RTCP goes to
        ``a=rtcp`` (RFC 3605, with its own address if given), the RTP port with ``a=rtcp-mux``
        (RFC 5761), else RTP port + 1 (RFC 3550 §11)."""
        m = self.media[index]
        conn = self.media_connection(index)
        if conn is None:
            raise SdpError(f"m= section {index} has no c= line (RFC 4566 §5.7)")
        rtcp = m.rtcp
        if rtcp is not None:
            rtcp_addr = (rtcp.connection.address if rtcp.connection else conn.address, rtcp.port)
        elif m.rtcp_mux:
            rtcp_addr = (conn.address, m.port)
        else:
            rtcp_addr = (conn.address, m.port + 1)
        return (conn.address, m.port), rtcp_addr

    def set_media_address(self, index: int, address: str) -> None:
        """Point one m= section's connection at ``address``: its own c= if it has one, and the
        session's c= if present or needed (relays move every stream they anchor)."""
        m = self.media[index]
        if m.connection is not None:
            m.set_connection(address)
        if self.session.connection is not None or m.connection is None:
            self.session.set_connection(address)

    @property
    def origin_address(self) -> str | None:
        found = self.session._find("o=")
        if not found:
            return None
        parts = self.session.lines[found[0]].split(" ")
        return parts[5] if len(parts) == 6 else None

    def set_origin_address(self, address: str) -> None:
        found = self.session._find("o=")
        parts = self.session.lines[found[0]].split(" ") if found else []
        if len(parts) != 6:
            raise SdpError("no well-formed o= line")
        parts[4] = "IP6" if ":" in address else "IP4"
        parts[5] = address
        self.session.lines[found[0]] = " ".join(parts)

    def bump_origin_version(self) -> None:
        """A B2BUA must increase o=<sess-version> whenever it changes its SDP (RFC 3264 §8)."""
        found = self.session._find("o=")
        parts = self.session.lines[found[0]].split(" ") if found else []
        if len(parts) != 6 or not parts[2].isdigit():
            raise SdpError("no well-formed o= line")
        parts[2] = str(int(parts[2]) + 1)
        self.session.lines[found[0]] = " ".join(parts)

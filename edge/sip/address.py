"""Structured header values: name-addr / addr-spec (RFC 3261 §20.10/§25.1), Via (§20.42), CSeq (§20.16).

Parsers accept the LWS the grammar allows (RFC 4475 wsinv); `str()` gives the canonical form.
Parameter values are kept raw (quotes included) so unknown parameters such as
`+sip.instance="<urn:uuid:...>"` or `x-cisco-*` survive a parse/serialize cycle untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edge.sip.errors import SipParseError
from edge.sip.headers import Params, is_token, quote, split_quoted
from edge.sip.uri import Uri, split_hostport

MAGIC_COOKIE = "z9hG4bK"
# Methods known to be tokens (RFC 3261 and extensions), so the common ones skip the token check.
METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "PRACK", "SUBSCRIBE", "NOTIFY"}
    | {"PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"}
)
MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5


@dataclass(slots=True)
class NameAddr:
    uri: Uri
    display_name: str | None = None  # decoded (unquoted) display name
    params: Params = field(default_factory=Params)

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        if text.startswith("<"):  # the common `<uri>;params`: no display name to look at
            gt = text.find(">")
            inner = text[1:gt]
            if gt > 1 and inner == inner.strip():
                rest = text[gt + 1 :].strip()
                na = cls.__new__(cls)
                na.uri = Uri.parse(inner)
                na.display_name = None
                if not rest:
                    na.params = Params()
                elif rest[0] == ";":
                    na.params = Params.parse(rest[1:], what="header parameter")
                else:
                    raise SipParseError(400, "Junk after address")
                return na
        s = text.strip()
        display: str | None = None
        if s.startswith('"'):
            end = _quoted_end(s, 0)
            display = _unescape(s[1:end])
            s = s[end + 1 :].lstrip()
            if not s.startswith("<"):
                raise SipParseError(400, "Display name without <URI>")
        lt = s.find("<")
        if lt >= 0:
            if display is None and lt > 0:
                words = s[:lt].split()
                if not all(is_token(w) for w in words):
                    raise SipParseError(400, "Malformed display name")
                display = " ".join(words)
            gt = s.find(">", lt)
            if gt < 0:
                raise SipParseError(400, "Unterminated <URI>")
            inner = s[lt + 1 : gt]
            if not inner or inner != inner.strip():
                raise SipParseError(400, "Whitespace inside <URI>")
            uri = Uri.parse(inner)
            rest = s[gt + 1 :].strip()
        else:
            # addr-spec: the URI ends at the first ';'; it may not contain ',', '?' or ';' (§20).
            uri_text, semi, tail = s.partition(";")
            uri_text = uri_text.strip()
            if not uri_text or any(c in uri_text for c in ",? \t"):
                raise SipParseError(400, "Malformed addr-spec")
            uri = Uri.parse(uri_text)
            rest = ";" + tail if semi else ""
        params = Params()
        if rest:
            if rest[0] != ";":
                raise SipParseError(400, "Junk after address")
            params = Params.parse(rest[1:], what="header parameter")
        return cls(uri, display, params)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        dn = "" if self.display_name is None else quote(self.display_name) + " "
        return f"{dn}<{self.uri}>{self.params}"

    def copy(self) -> NameAddr:
        return NameAddr(self.uri.copy(), self.display_name, self.params.copy())


def split_name_addr(text: str) -> tuple[str, str, str]:
    """A name-addr or addr-spec cut verbatim into (what precedes the URI, the URI, what follows
    it): `"Bob" <sip:b@h;lr>;expires=60` → (`"Bob" <`, `sip:b@h;lr`, `>;expires=60`). For an
    addr-spec the first part is empty and the URI ends at the first ';' (RFC 3261 §20.10).
    Lets a hop rewrite the URI and pass display name and parameters through byte-exact."""
    start = len(text) - len(text.lstrip())
    search_from = _quoted_end(text, start) + 1 if text.startswith('"', start) else start
    lt = text.find("<", search_from)
    if lt >= 0:
        gt = text.find(">", lt)
        if gt < 0:
            raise SipParseError(400, "Unterminated <URI>")
        return text[: lt + 1], text[lt + 1 : gt], text[gt:]
    if search_from > start:
        raise SipParseError(400, "Display name without <URI>")
    semi = text.find(";", start)
    end = semi if semi >= 0 else len(text)
    return "", text[start:end].strip(), text[end:]


def parse_contacts(value: str) -> list[NameAddr] | None:
    """Contact values of one header line; None for the wildcard `*` (REGISTER removal)."""
    if value.strip() == "*":
        return None
    return [NameAddr.parse(p) for p in split_quoted(value, ",")]


def _quoted_end(s: str, start: int) -> int:
    i = start + 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i
        i += 1
    raise SipParseError(400, "Unterminated quoted string")


def _unescape(s: str) -> str:
    if "\\" not in s:
        return s
    out: list[str] = []
    i = 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 1
        out.append(s[i])
        i += 1
    return "".join(out)


_T = r"[A-Za-z0-9\-.!%*_+`'~]+"
_VIA_FAST = re.compile(r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9\-.:]+|\[[0-9A-Fa-f:.]+\](?::[0-9]+)?)\Z")
_VIA_RE = re.compile(
    rf"\s*({_T})\s*/\s*({_T})\s*/\s*({_T})\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:\s*:\s*([0-9]+))?\s*\Z",
    re.ASCII,
)


@dataclass(slots=True)
class Via:
    host: str
    port: int | None = None
    transport: str = "UDP"
    params: Params = field(default_factory=Params)
    protocol: str = "SIP/2.0"

    @classmethod
    def parse(cls, text: str) -> Via:
        head, semi, ptext = text.partition(";")
        fast = _VIA_FAST.match(head)
        if fast is not None:  # "SIP/2.0/TLS host[:port]", as every peer here writes it
            transport, hostport = fast.groups()
            host, port_num = split_hostport(hostport)
            params = Params.parse(ptext, what="Via parameter") if semi else Params()
            via = cls.__new__(cls)
            via.host = host
            via.port = port_num
            via.transport = transport.upper()
            via.params = params
            via.protocol = "SIP/2.0"
            if semi:
                branch = params.get("branch")
                if branch is not None and (branch == MAGIC_COOKIE or branch.startswith('"')):
                    raise SipParseError(400, "Invalid Via branch")
            return via
        m = _VIA_RE.match(head)
        if m is None:
            raise SipParseError(400, "Malformed Via")
        name, version, transport, host, port = m.groups()
        if name.upper() != "SIP" or version != "2.0":
            raise SipParseError(400, "Bad Via protocol")
        _host, port_num = split_hostport(host if port is None else f"{host}:{port}")
        params = Params.parse(ptext, what="Via parameter") if semi else Params()
        branch = params.get("branch")
        if branch is not None and (branch == MAGIC_COOKIE or branch.startswith('"')):
            # RFC 4475 badbranch: a bare magic cookie is not a valid RFC 3261 branch.
            raise SipParseError(400, "Invalid Via branch")
        return cls(host, port_num, transport.upper(), params, f"{name.upper()}/{version}")

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def has_rport(self) -> bool:
        return "rport" in self.params

    @property
    def rport(self) -> int | None:
        v = self.params.get("rport")
        return int(v) if v is not None and v.isdigit() else None

    @property
    def sent_by(self) -> str:
        return self.host.lower() if self.port is None else f"{self.host.lower()}:{self.port}"

    @property
    def is_rfc3261(self) -> bool:
        b = self.branch
        return b is not None and b.startswith(MAGIC_COOKIE)

    def __str__(self) -> str:
        hp = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"{self.protocol}/{self.transport} {hp}{self.params}"

    def copy(self) -> Via:
        return Via(self.host, self.port, self.transport, self.params.copy(), self.protocol)


@dataclass(frozen=True, slots=True)
class CSeq:
    seq: int
    method: str

    @classmethod
    def parse(cls, text: str) -> CSeq:
        parts = text.split()
        if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit():
            raise SipParseError(400, "Malformed CSeq")
        seq = int(parts[0])
        if seq > MAX_CSEQ:
            raise SipParseError(400, "CSeq out of range")
        if parts[1] not in METHODS and not is_token(parts[1]):
            raise SipParseError(400, "Malformed CSeq method")
        return cls(seq, parts[1])

    def __str__(self) -> str:
        return f"{self.seq} {self.method}"

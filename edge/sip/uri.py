"""SIP / SIPS / tel URIs (RFC 3261 §19.1, RFC 3966), with a generic fallback for other schemes.

Components are kept as written (escapes included) so `str(Uri.parse(s)) == s` for canonical input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edge.sip.errors import SipParseError
from edge.sip.headers import SIMPLE_PARAMS, Params

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\Z")
# hostname = *( domainlabel "." ) toplabel [ "." ] (RFC 3261 §25.1), written so that every dot
# is mandatory between labels: the former `(label \.?)+` backtracked exponentially on a long
# label followed by a bad character (`sip:aaaa…a_`), a denial of service from one request line.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?\Z|[0-9.]+\Z", re.ASCII)
_IPV6_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]\Z")
# Characters never legal unescaped anywhere in a SIP URI (RFC 3261 §25.1).
_FORBIDDEN = re.compile(r'[\s<>"{}|\\^`]')

SIP_SCHEMES = frozenset({"sip", "sips"})
# The common shape, sip[s]:[user@]host[:port][;simple params], in one match; user and host
# characters here are a subset of what the general parser accepts, which handles the rest.
_SIP_FAST = re.compile(
    r"([Ss][Ii][Pp][Ss]?):(?:([A-Za-z0-9\-_.!~*'()&=+$,%]+)@)?"
    r"([A-Za-z0-9\-.]+(?::[0-9]{1,5})?)(?:;([^?]*))?\Z"
)


@dataclass(slots=True)
class Uri:
    scheme: str
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int | None = None
    params: Params = field(default_factory=Params)
    headers: str | None = None  # the raw `?h=v&...` part (without '?'), passed through
    opaque: str | None = None  # everything after "scheme:" for non-sip, non-tel schemes

    @classmethod
    def parse(cls, text: str) -> Uri:
        fast = _SIP_FAST.match(text)
        if fast is not None:
            scheme, user, hostport, ptext = fast.groups()
            if ptext is None or SIMPLE_PARAMS.match(ptext):
                host, port = split_hostport(hostport)
                uri = cls.__new__(cls)
                uri.scheme = scheme.lower()
                uri.user = user
                uri.password = None
                uri.host = host
                uri.port = port
                uri.params = Params.split_simple(ptext) if ptext is not None else Params()
                uri.headers = None
                uri.opaque = None
                return uri
        scheme, colon, rest = text.partition(":")
        if not colon or not _SCHEME_RE.match(scheme):
            raise SipParseError(400, "Malformed URI")
        low = scheme.lower()
        if low in SIP_SCHEMES:
            return _parse_sip(low, rest)
        if low == "tel":
            number, _, ptext = rest.partition(";")
            if not number or _FORBIDDEN.search(number):
                raise SipParseError(400, "Malformed tel URI")
            params = Params.parse(ptext, what="URI parameter") if ptext else Params()
            return cls(scheme=low, user=number, params=params)
        if not rest or _FORBIDDEN.search(rest):
            raise SipParseError(400, "Malformed URI")
        return cls(scheme=low, opaque=rest)

    @property
    def is_sip(self) -> bool:
        return self.scheme in SIP_SCHEMES

    @property
    def hostport(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def transport(self) -> str | None:
        t = self.params.get("transport")
        return t.lower() if t else None

    @property
    def lr(self) -> bool:
        return "lr" in self.params

    def copy(self) -> Uri:
        return Uri(
            self.scheme,
            self.user,
            self.password,
            self.host,
            self.port,
            self.params.copy(),
            self.headers,
            self.opaque,
        )

    def __str__(self) -> str:
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "tel":
            return f"tel:{self.user}{self.params}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out += [":", self.password]
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out += [":", str(self.port)]
        out.append(str(self.params))
        if self.headers is not None:
            out += ["?", self.headers]
        return "".join(out)


def _parse_sip(scheme: str, rest: str) -> Uri:
    if _FORBIDDEN.search(rest):
        raise SipParseError(400, "Illegal character in SIP URI")
    user: str | None = None
    password: str | None = None
    # '@' cannot appear unescaped in host, params or headers, so the last one ends the userinfo;
    # the user part itself may legally contain ';', '?', '/' (RFC 4475 intmeth, semiuri).
    at = rest.rfind("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, pw = userinfo.partition(":")
        if colon:
            password = pw
        if not user:
            raise SipParseError(400, "Empty user in SIP URI")
    headers: str | None = None
    q = rest.find("?")
    if q >= 0:
        rest, headers = rest[:q], rest[q + 1 :]
    hostport, semi, ptext = rest.partition(";")
    params = Params.parse(ptext, what="URI parameter") if semi else Params.__new__(Params)
    if not semi:
        params._items = []
    host, port = split_hostport(hostport)
    return Uri(scheme, user, password, host, port, params, headers)


_HOSTPORTS: dict[str, tuple[str, int | None]] = {}
_HOSTPORTS_MAX = 4096  # the same few peers repeat; bounded because the text comes from the network


def split_hostport(hostport: str) -> tuple[str, int | None]:
    """`host[:port]` with IPv6 references; raises SipParseError(400) on anything else."""
    known = _HOSTPORTS.get(hostport)
    if known is not None:
        return known
    result = _split_hostport(hostport)
    if len(_HOSTPORTS) >= _HOSTPORTS_MAX:
        _HOSTPORTS.clear()
    _HOSTPORTS[hostport] = result
    return result


def _split_hostport(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise SipParseError(400, "Malformed IPv6 reference")
        host, tail = hostport[: end + 1], hostport[end + 1 :]
        if not _IPV6_RE.match(host):
            raise SipParseError(400, "Malformed IPv6 reference")
        if not tail:
            return host, None
        if tail[0] != ":":
            raise SipParseError(400, "Malformed host")
        return host, _port(tail[1:])
    host, colon, port_text = hostport.partition(":")
    if not host or not _HOST_RE.match(host):
        raise SipParseError(400, "Malformed host")
    return host, _port(port_text) if colon else None


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise SipParseError(400, "Malformed port")
    return int(text)

"""Byte-level building blocks for the hops' fast path (REGISTER and its answers).

Nearly all of a hop's load is REGISTER refreshes and their 200s, which a proxy forwards after
touching three or four header lines (Via, Max-Forwards, Route, Contact). For those, building a
Message (message.py) costs more than the routing itself. Here a framed head is split into lines
on bytes, each line gets its canonical key (one C-level lookup per line, names validated once),
and the few values a hop reads are cut out and checked with byte patterns that accept a *subset*
of what the full parsers accept. The hops (edge_e/sip.py, edge_c/sip.py) splice the changed lines
in and send bytes.

Contract: when a function here returns None (non-ASCII, folded lines, unknown or malformed header
names, quoted or LWS-separated parameters, comma lists, IPv6, ...), the caller falls back to the
full parser, which produces the same bytes, or the proper error answer. Whatever is accepted
here yields exactly the bytes the full path would: tests/sip/test_sip_fastpath.py checks that
property on generated messages.
"""

from __future__ import annotations

import hashlib
import re

from edge.sip.address import MAGIC_COOKIE, METHODS
from edge.sip.errors import SipParseError
from edge.sip.headers import split_values, wire_key
from edge.sip.message import _SINGLE_VALUED
from edge.sip.uri import split_hostport

try:  # the optional C scans (edge/sip/_scan.c, built by setup.py when a compiler is there)
    from edge.sip import _scan
except ImportError:  # pragma: no cover - depends on the build
    _scan = None  # type: ignore[assignment]

__all__ = [
    "FastVia",
    "Plan",
    "RawHead",
    "get_param",
    "parse_via",
    "rewrite_contact",
    "scan",
    "set_param",
    "split_values",
    "stateless_branch",
]

# A header name as written before ':' (each line of an unfolded head must have one).
_NAMES_RE = re.compile(rb"\r\n([^:\r\n]*):")
_RAW_KEYS: dict[bytes, str] = {}  # name bytes as written → canonical key (valid tokens only)
_RAW_KEYS_MAX = 4096  # names come from the network: keep the memo bounded
_TOKEN = rb"[A-Za-z0-9\-.!%*_+`'~]+"
# A plain parameter list: the subset of headers.SIMPLE_PARAMS without quoted values (no LWS).
_PARAMS = rb"(?:;" + _TOKEN + rb"(?:=[A-Za-z0-9\-.!%*_+`'~\[\]/:&$]+)?)*"
# "SIP/2.0/TLS host[:port];params": address.Via.parse's fast shape, minus IPv6 and quoting.
_VIA_RE = re.compile(rb"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9\-.:]+)(" + _PARAMS + rb")\Z")
# sip[s]:[user@]host[:port][;params]: uri.Uri.parse's fast shape, lower-case scheme, no quoting.
_URI_RE = re.compile(
    rb"(sips?):(?:([A-Za-z0-9\-_.!~*'()&=+$%]+)@)?([A-Za-z0-9\-.]+(?::[0-9]{1,5})?)(" + _PARAMS + rb")\Z"
)
_MAGIC = MAGIC_COOKIE.encode()
# A Request-URI message.validate_proxy lets through: sip, sips or tel (any case), a colon.
_REQUEST_URI = re.compile(rb"(?:[Ss][Ii][Pp][Ss]?|[Tt][Ee][Ll]):")
# CSeq of a REGISTER as address.CSeq.parse reads it (the number is checked against 2**31 - 1)
_CSEQ_REGISTER = re.compile(rb"([0-9]{1,10})[ \t]+REGISTER\Z")
_WSP = b" \t"


class Plan:
    """What one header layout (the names of a head's lines, in order, as written) implies;
    computed once per layout: a client or peer sends the same layout every time."""

    __slots__ = (
        "colons",
        "contacts",
        "content_length",
        "count",
        "first",
        "keys",
        "names",
        "request",
        "single",
        "vias",
    )

    def __init__(self, names: list[bytes], keys: list[str]) -> None:
        self.keys = ["", *keys]  # keys[i]: the key of line i (line 0: the start line)
        self.colons = [0] + [len(n) for n in names]  # where each line's colon is
        self.names = [b""] + [n.rstrip(_WSP) for n in names]  # as Headers keeps them
        self.first: dict[str, int] = {}
        self.count: dict[str, int] = {}
        for i, key in enumerate(self.keys):
            if i:
                self.first.setdefault(key, i)
                self.count[key] = self.count.get(key, 0) + 1
        # no header that must appear once appears twice (message._check_single)
        self.single = all(self.count.get(k, 0) <= 1 for k in _SINGLE_VALUED)
        self.vias = tuple(i for i, k in enumerate(self.keys) if k == "via")
        self.contacts = tuple(i for i, k in enumerate(self.keys) if k == "contact")
        self.content_length = self.first["content-length"] if self.count.get("content-length") == 1 else 0
        # a request a proxy can handle has these (message.validate_proxy); 0: one is missing
        need = ("call-id", "from", "to", "cseq")
        self.request = tuple(self.first.get(k, 0) for k in need) if self.single and self.vias else ()
        if 0 in self.request:
            self.request = ()


_PLANS: dict[bytes, Plan] = {}  # layout (header names as written, joined by ":") → Plan
_PLANS_MAX = 1024  # layouts come from the network: keep the memo bounded


class RawHead:
    """A framed message's head as lines of bytes (`lines[0]`: the start line) with its Plan.
    `data` is the whole message, `head_end` where its CRLFCRLF starts."""

    __slots__ = ("data", "head_end", "lines", "plan")

    def __init__(self, data: bytes, head_end: int, lines: list[bytes], plan: Plan) -> None:
        self.data = data
        self.head_end = head_end
        self.lines = lines
        self.plan = plan

    def value(self, i: int) -> bytes:
        """Headers._value: the text after the colon, LWS stripped."""
        return self.lines[i][self.plan.colons[i] + 1 :].strip(_WSP)

    def first(self, key: str) -> int:
        """Index of the first line with this key, -1 if none."""
        return self.plan.first.get(key, -1)

    def content_length(self) -> int | None:
        """The one Content-Length, if plain (framing._find_content_length reads the same);
        None when absent, repeated or malformed: the framer's own scan decides then."""
        i = self.plan.content_length
        if not i:
            return None
        v = self.lines[i][self.plan.colons[i] + 1 :].strip(_WSP)
        return int(v) if v.isdigit() and len(v) <= 10 else None

    def body_tail(self) -> bytes:
        """The CRLFCRLF ending the head, and the body."""
        return self.data[self.head_end :]

    def without(self, i: int) -> bytes:
        """The message with line i removed, every other byte as received."""
        lines = self.lines
        start = 0
        for j in range(i):
            start += len(lines[j]) + 2
        data = self.data
        return data[:start] + data[start + len(lines[i]) + 2 :]

    def replaced(self, i: int, value: bytes) -> bytes:
        """Line i as Headers writes a changed field: the name as written, ': ', the value."""
        return self.plan.names[i] + b": " + value


def text(value: bytes | None) -> str | None:
    """A raw value (e.g. a Via branch) as the full path's str, None kept."""
    return None if value is None else value.decode()


def scan(data: bytes, head_end: int) -> RawHead | None:
    """Split the head of one framed message (data[:head_end]); None for anything unusual."""
    raw = scan_head(data[:head_end])
    if raw is not None:
        raw.data = data
    return raw


def scan_head(head: bytes) -> RawHead | None:
    """Split a head (start line and header lines, without the CRLFCRLF); None if unusual. The
    result's `data` is empty until the whole message is there (the framer sets it)."""
    split = _scan.split_head(head) if _scan is not None else split_head(head)
    if split is None:
        return None
    lines, layout = split
    plan = _PLANS.get(layout)
    if plan is None:
        names = layout.split(b":") if len(lines) > 1 else []
        keys = [_raw_key(n) for n in names]
        if None in keys:
            return None
        plan = Plan(names, keys)  # type: ignore[arg-type]
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[layout] = plan
    return RawHead(b"", len(head), lines, plan)


def split_head(head: bytes) -> tuple[list[bytes], bytes] | None:
    """The head's lines and its layout: each header line's name as written (before its first
    colon; so none holds one), joined by ':'. None if not ASCII or a header line has no colon.
    _scan.split_head does the same in C."""
    if not head.isascii():
        return None
    names = _NAMES_RE.findall(head)
    lines = head.split(b"\r\n")
    if len(names) != len(lines) - 1:
        return None  # a line without a colon (or a folded one holding none)
    return lines, b":".join(names)


def match_via(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """Transport, host[:port] and parameter text of a plain Via value (_scan.match_via in C)."""
    m = _VIA_RE.match(value)
    return None if m is None else m.groups()  # type: ignore[return-value]


def _raw_key(name: bytes) -> str | None:
    key = _RAW_KEYS.get(name)
    if key is None:
        try:
            key = wire_key(name.decode("ascii"))  # validates the token (folded lines fail here)
        except SipParseError:
            return None
        if len(_RAW_KEYS) < _RAW_KEYS_MAX:
            _RAW_KEYS[name] = key
    return key


def request_line(line: bytes, method: bytes) -> bytes | None:
    """The Request-URI of `<method> <uri> SIP/2.0` with a sip/sips/tel URI, else None."""
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != method or parts[2] != b"SIP/2.0" or not parts[1]:
        return None
    scheme = parts[1].partition(b":")[0].lower()
    if scheme not in (b"sip", b"sips", b"tel") or b":" not in parts[1]:
        return None
    return parts[1]


def status_code(line: bytes) -> int | None:
    """The code of `SIP/2.0 ddd reason` (message._parse_start_line accepts it), else None."""
    if not line.startswith(b"SIP/2.0 ") or len(line) < 12 or line[11] != 0x20:
        return None  # (without " reason" the full path writes the line back with a space added)
    code = line[8:11]
    if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 699:
        return None
    return int(code)


def cseq_method(value: bytes) -> bytes | None:
    """The method of a well-formed CSeq value (address.CSeq.parse's rules), else None."""
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) > 2**31 - 1:
        return None
    if parts[1].decode() not in METHODS:
        return None  # other tokens are fine too, but then the full path decides
    return parts[1]


def max_forwards(value: bytes) -> int | None:
    """Max-Forwards as message._small_int(…, 255) reads it, else None."""
    v = value.strip()
    if not v.isdigit() or len(v) > 3 or int(v) > 255:
        return None
    return int(v)


def _find(low: bytes, tag: bytes) -> tuple[int, int, int]:
    """In a lower-cased plain parameter list, the first parameter named `tag` (b";name"):
    (its start, where its value starts or -1 when bare, its end); start -1 when absent."""
    n = len(low)
    pos = 0
    while True:
        i = low.find(tag, pos)
        if i < 0:
            return -1, -1, -1
        j = i + len(tag)
        if j == n or low[j] == 0x3B:  # ';': bare
            return i, -1, j
        if low[j] == 0x3D:  # '='
            k = low.find(b";", j)
            return i, j + 1, n if k < 0 else k
        pos = j  # a longer name that starts the same (";rportx"): look further


def get_param(ptext: bytes, name: bytes) -> bytes | None:
    """Params.get on a plain parameter list (`;a;b=c`): the first value of that name
    (case-insensitive); None when bare or absent."""
    _, v, end = _find(ptext.lower(), b";" + name)
    return ptext[v:end] if v >= 0 else None


def set_param(ptext: bytes, name: bytes, value: bytes) -> bytes:
    """Params.set: the first parameter of that name gets `value` in place (keeping its
    spelling), else `;name=value` is appended."""
    i, v, end = _find(ptext.lower(), b";" + name)
    if i < 0:
        return ptext + b";" + name + b"=" + value
    if v < 0:
        return ptext[:end] + b"=" + value + ptext[end:]
    return ptext[:v] + value + ptext[end:]


class FastVia:
    """One Via value of the plain shape (address.Via.parse accepts it and yields the same):
    `params` is its parameter text as received (`;branch=…;rport`), `low` that lower-cased."""

    __slots__ = ("branch", "host", "low", "params", "port", "transport")

    def __init__(self, transport: bytes, host: str, port: int | None, params: bytes) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.params = params
        self.low = low = params.lower()
        _, v, end = _find(low, b";branch")
        self.branch = params[v:end] if v >= 0 else None

    @property
    def sent_by(self) -> str:
        return self.host.lower() if self.port is None else f"{self.host.lower()}:{self.port}"

    def param(self, name: bytes) -> bytes | None:
        """Params.get: the first value of that name; None when bare or absent."""
        _, v, end = _find(self.low, b";" + name)
        return self.params[v:end] if v >= 0 else None

    def stamp(self, peer: tuple[str, int], ingress_zone: str | None) -> None:
        """sip_proxy.stamp_top_via: received, rport (RFC 3581) and the ingress zone, set as
        Params.set sets them (in place if present, else appended in that order)."""
        params = self.params
        low = self.low
        if b";received" in low or b";ingress-zone" in low:
            params = set_param(params, b"received", peer[0].encode())
            params = set_param(params, b"rport", str(peer[1]).encode())
            if ingress_zone is not None:
                params = set_param(params, b"ingress-zone", ingress_zone.encode())
        else:  # the usual case: received and the zone are new, rport bare or absent
            tail = b";received=" + peer[0].encode()
            port = str(peer[1]).encode()
            i, v, end = _find(low, b";rport")
            if i < 0:
                params += tail + b";rport=" + port
            elif v < 0:
                params = params[:end] + b"=" + port + params[end:] + tail
            else:
                params = params[:v] + port + params[end:] + tail
            if ingress_zone is not None:
                params += b";ingress-zone=" + ingress_zone.encode()
        self.params = params
        self.low = params.lower()

    def encode(self) -> bytes:
        """str(Via): transport upper-cased, port as a number."""
        hp = self.host if self.port is None else f"{self.host}:{self.port}"
        return b"SIP/2.0/" + self.transport.upper() + b" " + hp.encode() + self.params


def parse_via(value: bytes) -> FastVia | None:
    """A single Via value (no comma list) of the plain shape, else None."""
    shape = _scan.match_via(value) if _scan is not None else match_via(value)
    if shape is None:
        return None
    transport, hostport, params = shape
    try:
        host, port = split_hostport(hostport.decode())
    except SipParseError:
        return None
    via = FastVia(transport, host, port, params)
    if via.branch == _MAGIC:
        return None  # RFC 4475 badbranch: the full parser answers 400
    return via


def rewrite_contact(value: bytes, host: str, port: int, params: list[tuple[bytes, bytes]]) -> bytes | None:
    """C's Contact rewrite (spec §5) of one `<uri>…` value: the URI's host:port replaced and
    `params` set on it as Params.set does; display-less values only, the rest byte-exact."""
    if not value.startswith(b"<"):
        return None
    gt = value.find(b">")
    if gt < 0:
        return None
    m = _URI_RE.match(value, 1, gt)
    if m is None:
        return None
    scheme, user, hostport, uri_params = m.groups()
    try:
        split_hostport(hostport.decode())
    except SipParseError:
        return None
    for name, v in params:
        uri_params = set_param(uri_params, name, v)
    userinfo = user + b"@" if user is not None else b""
    return b"".join((b"<", scheme, b":", userinfo, f"{host}:{port}".encode(), uri_params, value[gt:]))


def stateless_branch(salt: str, branch: str | None, sent_by: str, call_id: str | None) -> str:
    """RFC 3261 §16.11: the same for retransmissions and for the CANCEL/ACK of one INVITE."""
    basis = f"{salt}|{branch}|{sent_by}|{call_id}"
    return "z9hG4bK" + hashlib.blake2b(basis.encode(), digest_size=10).hexdigest()


def register_head(data: bytes, head_end: int, head: RawHead | None = None) -> RawHead | None:
    """A REGISTER whose head passes what message.validate_proxy checks up front (one Call-ID,
    CSeq, From, To each, a CSeq for REGISTER, a sip/sips/tel Request-URI, a Via), else None.
    `head`: the framer's split of it, if any."""
    if not data.startswith(b"REGISTER "):
        return None
    head = head or scan(data, head_end)
    if head is None:
        return None
    parts = head.lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"SIP/2.0" or not _REQUEST_URI.match(parts[1]):
        return None
    plan = head.plan
    if not plan.request:
        return None
    lines = head.lines
    colons = plan.colons
    call_id, from_, to, cseq = plan.request
    for i in (call_id, from_, to):
        if not lines[i][colons[i] + 1 :].strip(_WSP):
            return None
    m = _CSEQ_REGISTER.match(lines[cseq][colons[cseq] + 1 :].strip(_WSP))
    if m is None or int(m.group(1)) > 2**31 - 1:
        return None
    return head


def binding_headers(head: RawHead) -> tuple[str | None, list[str], str | None]:
    """To, every Contact (comma lists split) and Expires, as Headers.get/get_all give them."""
    first = head.plan.first
    to = first.get("to", 0)
    expires = first.get("expires", 0)
    contacts = [head.value(i).decode() for i in head.plan.contacts]
    return (
        head.value(to).decode() if to else None,
        split_values("contact", contacts),
        head.value(expires).decode() if expires else None,
    )

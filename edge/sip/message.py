"""RFC 3261 §7 message codec: `parse_message(bytes)` and `Request`/`Response` with `bytes(msg)`.

Byte-exactness: a parsed message serializes by splicing (headers.py): the start line, every
header line a hop did not change and the body are copied from the received bytes, folded lines
included; only changed or added lines are encoded. On datagrams, bytes beyond Content-Length are
dropped (RFC 3261 §18.3). Bodies are opaque bytes. Content-Length is rewritten on serialize only
when the body was set after parsing (or the message was built locally).

Parsing is lazy: the start line is parsed and the head split into lines with one canonical key
each; values are cut out of their line on first use, and structured values (Via, CSeq, From/To,
Contact, Route, Request-URI) are parsed on first access and cached until that header changes.
How much is checked up front is the `Validation` level: FULL (RFC 4475 behaviour, the default of
`parse_message`), PROXY (what a proxy or registrar needs to handle the message at all, RFC 3261
§16.3: "any other components, well-formed or not, SHOULD be ignored"), or NONE. A malformed value
that is only parsed later raises SipParseError at that point, carrying the response code.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable

from edge.sip.address import MAGIC_COOKIE, METHODS, CSeq, NameAddr, Via, parse_contacts
from edge.sip.errors import SipParseError
from edge.sip.headers import _MISSING, Headers, Origin, is_token, split_quoted, wire_key, wire_keys
from edge.sip.uri import Uri

__all__ = [
    "Message",
    "Request",
    "Response",
    "SipParseError",
    "Validation",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_head",
    "parse_message",
]

SIP_VERSION = "SIP/2.0"
_WSP = " \t"
MAX_MESSAGE_BYTES = 65535
REQUEST_URI_SCHEMES = frozenset({"sip", "sips", "tel"})
_SINGLE_VALUED = ("call-id", "cseq", "from", "to", "max-forwards", "content-length", "content-type")
# Header names, one per physical line of an unfolded head (each line must have a colon).
_NAMES_RE = re.compile(r"\r\n([^:\r\n]*):")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\Z")


class Validation(enum.Enum):
    """How much of a message `parse_message` checks before returning it (see module docstring)."""

    FULL = "full"
    PROXY = "proxy"
    NONE = "none"


_VERSION_RE = re.compile(r"SIP/\d+\.\d+\Z", re.IGNORECASE)
_DATE_RE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"\d{4} \d{2}:\d{2}:\d{2} GMT\Z"
)

REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 429: "Too Many Requests", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}  # fmt: skip


class _RandomPool:
    """Cryptographically random bytes (os.urandom, as `secrets` uses) drawn 4 KiB at a time:
    one syscall per few hundred tags instead of one each. Emptied in a forked child."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def hex(self, n: int) -> str:
        pos = self._pos
        if pos + n > len(self._buf):
            self._buf = os.urandom(4096)
            pos = 0
        self._pos = pos + n
        return self._buf[pos : pos + n].hex()

    def reset(self) -> None:
        self._buf = b""
        self._pos = 0


_RANDOM = _RandomPool()
os.register_at_fork(after_in_child=_RANDOM.reset)


def new_branch() -> str:
    """A fresh RFC 3261 branch with the magic cookie (§8.1.1.7)."""
    return MAGIC_COOKIE + _RANDOM.hex(8)


def new_tag() -> str:
    """A To/From tag: cryptographically random, 48 bits (RFC 3261 §19.3 asks for 32 or more)."""
    return _RANDOM.hex(6)


def new_call_id(host: str | None = None) -> str:
    cid = _RANDOM.hex(12)
    return f"{cid}@{host}" if host else cid


class Message:
    """Common part of requests and responses; see module docstring for byte-exactness rules."""

    __slots__ = ("_body", "_fix_cl", "_origin", "_start", "headers", "version")

    def __init__(
        self, headers: Headers | Iterable[tuple[str, str]] | None, body: bytes, version: str
    ) -> None:
        self.headers = headers if isinstance(headers, Headers) else Headers(headers or ())
        self._body = bytes(body)
        self._fix_cl = True
        self._start: str | None = None  # the start line as received (parsed messages)
        self._origin: Origin | None = None  # the bytes it was parsed from
        self.version = version

    # -- body ---------------------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body = bytes(value)
        self._fix_cl = True

    # -- serialization ------------------------------------------------------------------
    def start_line(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        h = self.headers
        if self._fix_cl:
            want = str(len(self._body))
            if h.get("content-length") != want:
                h.replace("Content-Length", want)
        origin = h._origin
        start = self.start_line()
        if origin is not None and origin is self._origin and start == self._start:
            if not h._edited and not self._fix_cl:
                return origin.raw  # nothing changed: the bytes as received
            if origin.folds:
                offs = origin.offsets()
                return b"".join((origin.raw[: offs[1]], h.encode(), b"\r\n", self._body))
        if h._origin is None or not h._origin.folds:  # see Headers.encode: lossless line texts
            head = "\r\n".join([start, *h._lines, "", ""]) if h._lines else start + "\r\n\r\n"
            return head.encode("utf-8", "surrogateescape") + self._body
        first = (start + "\r\n").encode("utf-8", "surrogateescape")
        return b"".join((first, h.encode(), b"\r\n", self._body))

    def __bytes__(self) -> bytes:
        return self.serialize()

    # -- structured accessors (cached; treat results as read-only) -----------------------
    @property
    def call_id(self) -> str | None:
        return self.headers.get("call-id")

    @property
    def cseq(self) -> CSeq:
        cache = self.headers._cache
        value = cache.get("cseq", _MISSING)
        if value is _MISSING:
            v = self.headers.get("cseq")
            if v is None:
                raise SipParseError(400, "Missing CSeq")
            value = cache["cseq"] = CSeq.parse(v)
        return value  # type: ignore[no-any-return]

    @property
    def vias(self) -> list[Via]:
        return self.headers.cached("via", lambda: [Via.parse(v) for v in self.headers.get_all("via")])

    @property
    def top_via(self) -> Via | None:
        """The first Via, parsed alone (a proxy rarely needs the others)."""
        cache = self.headers._cache
        value = cache.get("via#1", _MISSING)
        if value is _MISSING:
            first = self.headers.first_value("via")
            value = cache["via#1"] = Via.parse(first) if first is not None else None
        return value  # type: ignore[no-any-return]

    def set_top_via(self, via: Via) -> None:
        """Replace the first Via value in place (stamping received/rport, RFC 3581 §4)."""
        self.headers.replace_first_value("Via", str(via))
        self.headers.cache_put("via", via, first=True)

    def push_via(self, via: Via) -> None:
        """A new topmost Via (RFC 3261 §16.6 step 8)."""
        self.headers.prepend("Via", str(via))
        self.headers.cache_put("via", via, first=True)

    def _name_addr(self, key: str) -> NameAddr:
        cache = self.headers._cache
        value = cache.get(key, _MISSING)
        if value is _MISSING:
            v = self.headers.get(key)
            if v is None:
                raise SipParseError(400, f"Missing {key}")
            value = cache[key] = NameAddr.parse(v)
        return value  # type: ignore[no-any-return]

    @property
    def from_(self) -> NameAddr:
        return self._name_addr("from")

    @property
    def to(self) -> NameAddr:
        return self._name_addr("to")

    @property
    def from_tag(self) -> str | None:
        return self.from_.tag

    @property
    def to_tag(self) -> str | None:
        return self.to.tag

    @property
    def contact_is_star(self) -> bool:
        return any(v.strip() == "*" for v in self.headers.get_lines("contact"))

    @property
    def contacts(self) -> list[NameAddr]:
        """Every Contact (all lines, comma lists split); empty for none or for `*`."""

        def build() -> list[NameAddr]:
            out: list[NameAddr] = []
            lines = self.headers.get_lines("contact")
            for line in lines:
                parsed = parse_contacts(line)
                if parsed is None:
                    if len(lines) > 1:
                        raise SipParseError(400, "Contact * mixed with other contacts")
                    return []
                out.extend(parsed)
            return out

        return self.headers.cached("contact", build)

    def _addr_list(self, key: str) -> list[NameAddr]:
        return self.headers.cached(key, lambda: [NameAddr.parse(v) for v in self.headers.get_all(key)])

    @property
    def routes(self) -> list[NameAddr]:
        return self._addr_list("route")

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._addr_list("record-route")

    @property
    def paths(self) -> list[NameAddr]:
        return self._addr_list("path")

    @property
    def max_forwards(self) -> int | None:
        cache = self.headers._cache
        value = cache.get("max-forwards", _MISSING)
        if value is _MISSING:
            value = cache["max-forwards"] = _small_int(self.headers.get("max-forwards"), 255)
        return value  # type: ignore[no-any-return]

    @property
    def content_length(self) -> int | None:
        return _content_length(self.headers)

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")

    @property
    def expires(self) -> int | None:
        return _small_int(self.headers.get("expires"), None)


class Request(Message):
    __slots__ = ("_ruri", "_uri", "method")

    def __init__(
        self,
        method: str,
        uri: str | Uri,
        headers: Headers | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body, version)
        self.method = method
        self._uri = str(uri)
        self._ruri: Uri | None = uri.copy() if isinstance(uri, Uri) else None

    @property
    def uri(self) -> str:
        return self._uri

    @uri.setter
    def uri(self, value: str | Uri) -> None:
        self._uri = str(value)
        self._ruri = None

    @property
    def request_uri(self) -> Uri:
        if self._ruri is None:
            self._ruri = Uri.parse(self._uri)
        return self._ruri

    def start_line(self) -> str:
        return f"{self.method} {self._uri} {self.version}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (self.method, self._uri, self.version, self.headers, self._body) == (
            other.method,
            other._uri,
            other.version,
            other.headers,
            other._body,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Request {self.method} {self._uri} call-id={self.call_id!r}>"

    def copy(self) -> Request:
        r = Request(self.method, self._uri, self.headers.copy(), self._body, self.version)
        r._fix_cl = self._fix_cl
        r._start = self._start
        r._origin = self._origin
        return r


class Response(Message):
    __slots__ = ("reason", "status_code")

    def __init__(
        self,
        status_code: int,
        reason: str | None = None,
        headers: Headers | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body, version)
        self.status_code = status_code
        self.reason = REASON_PHRASES.get(status_code, "Unknown") if reason is None else reason

    def start_line(self) -> str:
        return f"{self.version} {self.status_code} {self.reason}"

    @property
    def is_provisional(self) -> bool:
        return self.status_code < 200

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Response):
            return NotImplemented
        return (self.status_code, self.reason, self.version, self.headers, self._body) == (
            other.status_code,
            other.reason,
            other.version,
            other.headers,
            other._body,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.reason} call-id={self.call_id!r}>"

    def copy(self) -> Response:
        r = Response(self.status_code, self.reason, self.headers.copy(), self._body, self.version)
        r._fix_cl = self._fix_cl
        r._start = self._start
        r._origin = self._origin
        return r


# -- parsing -------------------------------------------------------------------------------


def parse_message(
    data: bytes,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    strict: bool = True,
    validation: Validation | None = None,
) -> Request | Response:
    """Parse one complete message (a datagram, or a stream message already framed).

    `validation` defaults to FULL with `strict=True` (RFC 4475) and NONE with `strict=False`.
    """
    if len(data) > max_message_bytes:
        raise SipParseError(413, "Message too large")
    start = 0
    while data.startswith(b"\r\n", start):  # RFC 3261 §7.5: ignore CRLFs before the start line
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise SipParseError(400, "No end of headers")
    if validation is None:
        validation = Validation.FULL if strict else Validation.NONE
    return parse_framed(data, start, end, validation)


def parse_framed(data: bytes, start: int, end: int, validation: Validation) -> Request | Response:
    """The message whose head is data[start:end] (`end`: the CRLFCRLF); the body follows per
    Content-Length (else runs to the end of `data`)."""
    head = data[start:end]
    ascii_only = head.isascii()
    text = head.decode("ascii" if ascii_only else "utf-8", "surrogateescape")
    phys = text.split("\r\n")
    msg = _parse_start_line(phys[0])  # raises before any header work for a bad start line
    folds: dict[int, int] | None = None
    names = [] if "\r\n " in text or "\r\n\t" in text else _NAMES_RE.findall(text)
    if len(names) == len(phys) - 1 and names:
        keys = wire_keys(names)
        lines = phys[1:]
        src = list(range(1, len(phys)))
    else:  # folded lines (RFC 3261 §7.3.1), or a line without a colon
        keys, lines, src, folds = _split_folded(phys)
    body_start = end + 4
    cl: int | None = None
    if "content-length" in keys:
        if keys.count("content-length") > 1:
            raise SipParseError(400, "Multiple Content-Length")
        line = lines[keys.index("content-length")]
        cl = _content_length_values([line[line.index(":") + 1 :]])
        if len(data) - body_start < cl:
            raise SipParseError(400, "Content-Length larger than message")
        body_end = body_start + cl
    else:
        body_end = len(data)
    raw = data if start == 0 and body_end == len(data) else data[start:body_end]
    origin = Origin(raw, phys, ascii_only, folds)
    msg.headers = Headers._parsed(keys, lines, src, origin)
    msg._origin = origin
    msg._body = raw[body_start - start :] if body_end > body_start else b""
    msg._fix_cl = False
    msg._start = phys[0]
    if validation is Validation.FULL:
        validate(msg)
    elif validation is Validation.PROXY:
        validate_proxy(msg)
    return msg


def _split_folded(phys: list[str]) -> tuple[list[str], list[str], list[int], dict[int, int]]:
    keys: list[str] = []
    lines: list[str] = []
    src: list[int] = []
    folds: dict[int, int] = {}
    for i in range(1, len(phys)):
        line = phys[i]
        if line[:1] in (" ", "\t"):
            if not lines:
                raise SipParseError(400, "Continuation line before any header")
            lines[-1] = lines[-1].rstrip(_WSP) + " " + line.strip(_WSP)
            first = src[-1]
            folds[first] = folds.get(first, 1) + 1
            continue
        colon = line.find(":")
        if colon <= 0:
            raise SipParseError(400, "Malformed header line")
        keys.append(wire_key(line[:colon]))
        lines.append(line)
        src.append(i)
    return keys, lines, src, folds


def parse_head(head: bytes) -> Request | Response:
    """Parse start line and header lines (no trailing blank line); the body is left empty."""
    data = head + b"\r\n\r\n"
    msg = parse_framed(data, 0, len(head), Validation.NONE)
    msg._body = b""
    return msg


def _parse_start_line(line: str) -> Request | Response:
    if line[:4].upper() == "SIP/":
        parts = line.split(" ", 2)
        version = parts[0]
        if not _VERSION_RE.match(version):
            raise SipParseError(400, "Malformed status line")
        if version.upper() != SIP_VERSION:
            raise SipParseError(505, "Version Not Supported")
        code = parts[1] if len(parts) > 1 else ""
        if len(code) != 3 or not code.isascii() or not code.isdigit() or not 100 <= int(code) <= 699:
            raise SipParseError(400, "Malformed status code")
        resp: Response = Response.__new__(Response)  # the caller sets headers and body
        resp.status_code = int(code)
        resp.reason = parts[2] if len(parts) > 2 else ""
        resp.version = version
        return resp
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SipParseError(400, "Malformed request line")
    method, uri, version = parts
    if method not in METHODS and not is_token(method):
        raise SipParseError(400, "Malformed method")
    if version != SIP_VERSION and version.upper() != SIP_VERSION:
        if _VERSION_RE.match(version):
            raise SipParseError(505, "Version Not Supported")
        raise SipParseError(400, "Malformed SIP version")
    req: Request = Request.__new__(Request)  # the caller sets headers and body
    req.method = method
    req._uri = uri
    req._ruri = None
    req.version = version
    return req


def _content_length(headers: Headers) -> int | None:
    values = headers.get_lines("content-length")
    return _content_length_values(values) if values else None


def _content_length_values(values: list[str]) -> int:
    if len(values) > 1:
        raise SipParseError(400, "Multiple Content-Length")
    v = values[0].strip(_WSP)
    if not v.isascii() or not v.isdigit() or len(v) > 10:
        raise SipParseError(400, "Malformed Content-Length")
    return int(v)


def _small_int(value: str | None, maximum: int | None) -> int | None:
    if value is None:
        return None
    v = value.strip()
    if not v.isascii() or not v.isdigit():
        raise SipParseError(400, "Malformed integer header")
    n = int(v)
    if maximum is not None and n > maximum:
        raise SipParseError(400, "Integer header out of range")
    return n


def _check_single(keys: list[str]) -> None:
    if len(set(keys)) == len(keys):
        return  # no header repeats at all (the rule for a client's request)
    for key in _SINGLE_VALUED:
        if keys.count(key) > 1:
            raise SipParseError(400, f"Multiple {key} headers")


def validate_proxy(msg: Request | Response) -> None:
    """What any hop needs before handling a message (RFC 3261 §16.3 step 1, §17 matching):
    a usable start line, one Call-ID/CSeq/From/To each, a CSeq matching the method, the top Via
    and Max-Forwards. Everything else is parsed, and refused, only by the hop that uses it."""
    h = msg.headers
    keys = h.key_list()
    _check_single(keys)
    if isinstance(msg, Request):
        scheme, colon, _ = msg.uri.partition(":")
        if not colon:
            raise SipParseError(400, "Malformed Request-URI")
        if scheme.lower() not in REQUEST_URI_SCHEMES:
            raise SipParseError(416 if _SCHEME_RE.match(scheme) else 400, "Unsupported URI Scheme")
        if "via" not in keys:
            raise SipParseError(400, "Missing Via")
    for key in ("call-id", "from", "to"):
        if not h.get(key):
            raise SipParseError(400, f"Missing {key}")
    cseq = msg.cseq
    if isinstance(msg, Request) and cseq.method != msg.method:
        raise SipParseError(400, "CSeq method does not match request method")
    _ = msg.top_via, msg.max_forwards


def validate(msg: Request | Response) -> None:
    """The checks a proxy/UAS applies before using a message (RFC 3261 §8.2, §16.3; RFC 4475)."""
    h = msg.headers
    keys = h.key_list()
    _check_single(keys)
    if isinstance(msg, Request):
        _validate_request_uri(msg)
        if "via" not in keys:
            raise SipParseError(400, "Missing Via")
    for key in ("call-id", "from", "to"):
        if not h.get(key):
            raise SipParseError(400, f"Missing {key}")
    cseq = msg.cseq
    if isinstance(msg, Request) and cseq.method != msg.method:
        raise SipParseError(400, "CSeq method does not match request method")
    _ = msg.vias, msg.from_, msg.to, msg.contacts, msg.max_forwards
    if "expires" in keys and not ((e := h.get("expires") or "").isascii() and e.isdigit()):
        raise SipParseError(400, "Malformed Expires")
    if "date" in keys and not _DATE_RE.match(h.get("date") or ""):
        raise SipParseError(400, "Malformed Date")


def _validate_request_uri(req: Request) -> None:
    scheme, colon, _ = req.uri.partition(":")
    if not colon:
        raise SipParseError(400, "Malformed Request-URI")
    try:
        uri = req.request_uri
    except SipParseError:
        if scheme.isalnum() and scheme.lower() not in REQUEST_URI_SCHEMES:
            raise SipParseError(416, "Unsupported URI Scheme") from None
        raise
    if uri.scheme not in REQUEST_URI_SCHEMES:
        raise SipParseError(416, "Unsupported URI Scheme")
    if uri.headers is not None:
        raise SipParseError(400, "Headers in Request-URI")


# -- building ------------------------------------------------------------------------------

_RESPONSE_COPIES = frozenset({"via", "from", "call-id", "cseq"})
_SHARED_CACHE = ("via", "via#1", "from", "cseq", "to")  # cached values are treated as read-only


def make_response(
    request: Request, status: int, reason: str | None = None, to_tag: str | None = None
) -> Response:
    """A response to `request` per RFC 3261 §8.2.6: Via/From/To/Call-ID/CSeq copied byte-exact.

    A To tag is added to non-100 responses when the request had none (`to_tag` or a fresh one).
    """
    h = request.headers
    keys = h.key_list()
    picked = [i for i, k in enumerate(keys) if k in _RESPONSE_COPIES or k == "to"]
    if status == 100:
        picked += [i for i, k in enumerate(keys) if k == "timestamp"]
        picked.sort()
    out = h._select(picked)
    cache = h._cache
    if cache:  # the copied lines parse as they did in the request: share what was parsed
        for slot in _SHARED_CACHE:
            if slot in cache:
                out._cache[slot] = cache[slot]
    if status > 100 and "to" in keys and not _has_tag(request):
        i = out.key_list().index("to")
        out._set(i, out._name(i), f"{out._value(i)};tag={to_tag or new_tag()}")
        out._changed("to")
    return Response(status, reason, out)


def _has_tag(request: Request) -> bool:
    try:
        return "tag" in request.to.params
    except SipParseError:  # a To we cannot parse: look for the parameter textually
        value = request.headers.get("to") or ""
        tail = value[value.rfind(">") + 1 :] if ">" in value else value
        return any(p.strip().lower().startswith("tag") for p in split_quoted(tail, ";")[1:])

"""RFC 3261 §7 message codec: `parse_message(bytes)` and `Request`/`Response` with `bytes(msg)`.

Byte-exactness: an unmodified parsed message serializes to the bytes received, except that
folded header lines are unfolded (each fold becomes one space) and, on datagrams, bytes beyond
Content-Length are dropped (RFC 3261 §18.3). Bodies are opaque bytes. Content-Length is rewritten
on serialize only when the body was set after parsing (or the message was built locally).

Parsing is lazy where cheap: header lines are split once; structured values (Via, CSeq, From/To,
Contact, Request-URI) are parsed on first access and cached until the headers change. With
`strict=True` (the default) the headers a proxy needs anyway are validated up front so that a
malformed request becomes a `SipParseError` carrying the response code (400/413/416/505).
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Iterable

from edge.sip.address import MAGIC_COOKIE, CSeq, NameAddr, Via, parse_contacts
from edge.sip.errors import SipParseError
from edge.sip.headers import Field, Headers, header_key, is_token
from edge.sip.uri import Uri

__all__ = [
    "Message",
    "Request",
    "Response",
    "SipParseError",
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


def new_branch() -> str:
    """A fresh RFC 3261 branch with the magic cookie (§8.1.1.7)."""
    return MAGIC_COOKIE + secrets.token_hex(8)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_call_id(host: str | None = None) -> str:
    cid = secrets.token_hex(12)
    return f"{cid}@{host}" if host else cid


class Message:
    """Common part of requests and responses; see module docstring for byte-exactness rules."""

    __slots__ = ("_body", "_fix_cl", "headers", "version")

    def __init__(
        self, headers: Headers | Iterable[tuple[str, str]] | None, body: bytes, version: str
    ) -> None:
        self.headers = headers if isinstance(headers, Headers) else Headers(headers or ())
        self._body = bytes(body)
        self._fix_cl = True
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
        if self._fix_cl:
            want = str(len(self._body))
            if self.headers.get("content-length") != want:
                self.headers.replace("Content-Length", want)
        head = "\r\n".join([self.start_line(), *self.headers.lines(), "", ""])
        return head.encode("utf-8", "surrogateescape") + self._body

    def __bytes__(self) -> bytes:
        return self.serialize()

    # -- structured accessors (cached; treat results as read-only) -----------------------
    @property
    def call_id(self) -> str | None:
        return self.headers.get("call-id")

    @property
    def cseq(self) -> CSeq:
        def build() -> CSeq:
            v = self.headers.get("cseq")
            if v is None:
                raise SipParseError(400, "Missing CSeq")
            return CSeq.parse(v)

        return self.headers.cached("cseq", build)

    @property
    def vias(self) -> list[Via]:
        return self.headers.cached("via", lambda: [Via.parse(v) for v in self.headers.get_all("via")])

    @property
    def top_via(self) -> Via | None:
        vias = self.vias
        return vias[0] if vias else None

    def _name_addr(self, key: str) -> NameAddr:
        def build() -> NameAddr:
            v = self.headers.get(key)
            if v is None:
                raise SipParseError(400, f"Missing {key}")
            return NameAddr.parse(v)

        return self.headers.cached(key, build)

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
        return self.headers.cached("max-forwards", lambda: _small_int(self.headers.get("max-forwards"), 255))

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
        return r


# -- parsing -------------------------------------------------------------------------------


def parse_message(
    data: bytes, *, max_message_bytes: int = MAX_MESSAGE_BYTES, strict: bool = True
) -> Request | Response:
    """Parse one complete message (a datagram, or a stream message already framed)."""
    if len(data) > max_message_bytes:
        raise SipParseError(413, "Message too large")
    start = 0
    while data.startswith(b"\r\n", start):  # RFC 3261 §7.5: ignore CRLFs before the start line
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        raise SipParseError(400, "No end of headers")
    msg = parse_head(data[start:end])
    body_start = end + 4
    cl = _content_length(msg.headers)
    if cl is None:
        msg._body = bytes(data[body_start:])
    else:
        if len(data) - body_start < cl:
            raise SipParseError(400, "Content-Length larger than message")
        msg._body = bytes(data[body_start : body_start + cl])
    if strict:
        validate(msg)
    return msg


def parse_head(head: bytes) -> Request | Response:
    """Parse start line and header lines (no trailing blank line); the body is left empty."""
    text = head.decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    fields: list[Field] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not fields:
                raise SipParseError(400, "Continuation line before any header")
            prev = fields[-1]
            value = (prev.value + " " + line.strip(_WSP)).strip(_WSP)
            fields[-1] = Field(prev.name, prev.key, value, None)
            continue
        colon = line.find(":")
        if colon <= 0:
            raise SipParseError(400, "Malformed header line")
        name = line[:colon].rstrip(_WSP)
        if not is_token(name):
            raise SipParseError(400, "Malformed header name")
        fields.append(Field(name, header_key(name), line[colon + 1 :].strip(_WSP), line))
    msg = _parse_start_line(lines[0])
    msg.headers = Headers._from_fields(fields)
    msg._fix_cl = False
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
        return Response(int(code), parts[2] if len(parts) > 2 else "", None, b"", version)
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise SipParseError(400, "Malformed request line")
    method, uri, version = parts
    if not is_token(method):
        raise SipParseError(400, "Malformed method")
    if version.upper() != SIP_VERSION:
        if _VERSION_RE.match(version):
            raise SipParseError(505, "Version Not Supported")
        raise SipParseError(400, "Malformed SIP version")
    return Request(method, uri, None, b"", version)


def _content_length(headers: Headers) -> int | None:
    values = headers.get_lines("content-length")
    if not values:
        return None
    if len(values) > 1:
        raise SipParseError(400, "Multiple Content-Length")
    v = values[0]
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


def validate(msg: Request | Response) -> None:
    """The checks a proxy/UAS applies before using a message (RFC 3261 §8.2, §16.3; RFC 4475)."""
    h = msg.headers
    counts = Counter(f.key for f in h._items)
    for key in _SINGLE_VALUED:
        if counts[key] > 1:
            raise SipParseError(400, f"Multiple {key} headers")
    if isinstance(msg, Request):
        _validate_request_uri(msg)
        if not counts["via"]:
            raise SipParseError(400, "Missing Via")
    for key in ("call-id", "from", "to"):
        if not counts[key] or not h.get(key):
            raise SipParseError(400, f"Missing {key}")
    cseq = msg.cseq
    if isinstance(msg, Request) and cseq.method != msg.method:
        raise SipParseError(400, "CSeq method does not match request method")
    _ = msg.vias, msg.from_, msg.to, msg.contacts, msg.max_forwards
    if counts["expires"] and not ((e := h.get("expires") or "").isascii() and e.isdigit()):
        raise SipParseError(400, "Malformed Expires")
    if counts["date"] and not _DATE_RE.match(h.get("date") or ""):
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


def make_response(
    request: Request, status: int, reason: str | None = None, to_tag: str | None = None
) -> Response:
    """A response to `request` per RFC 3261 §8.2.6: Via/From/To/Call-ID/CSeq copied byte-exact.

    A To tag is added to non-100 responses when the request had none (`to_tag` or a fresh one).
    """
    out: list[Field] = []
    for f in request.headers.fields():
        if f.key in ("via", "from", "call-id", "cseq"):
            out.append(f)
        elif f.key == "to":
            if status > 100 and "tag" not in request.to.params:
                value = f"{f.value};tag={to_tag or new_tag()}"
                f = Field(f.name, f.key, value, None)
            out.append(f)
        elif f.key == "timestamp" and status == 100:
            out.append(f)
    return Response(status, reason, Headers._from_fields(out))

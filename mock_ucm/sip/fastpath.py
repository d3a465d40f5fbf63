"""The lean REGISTER path of the mock UCM: the usual REGISTER answered straight from its bytes.

Sans-IO. `RegisterFastPath.answer(data, head_end, flow, now)` takes one framed message
(`StreamFramer.receive_frames`) and returns the bytes of the 200 OK, or None when the message is
not the usual shape; the caller then parses it (`parse_frame`) and the general path (PROXY
validation, transaction layer, `Registrar.handle_register`) answers exactly as before. The fast
path answers only what that general path would answer with a 200 OK too, and with the same
bytes but for the fresh To tag:

* a REGISTER whose head `edge.sip.fastpath.scan` splits (ASCII, unfolded, every line a token
  name) and that passes what `validate_proxy` checks (the single-valued headers once,
  Call-ID/From/To non-empty, `CSeq: n REGISTER`, a sip/sips/tel Request-URI, a top Via, a
  Max-Forwards up to 255), no body, a top Via of the plain shape with an RFC 3261 branch, a
  well-formed Expires if present;
* a To without tag whose user is known, one Contact (not `*`, no comma) naming a device of that
  user, and no digest authentication for that user. Everything else (401, 403/404 with
  Warning, 400s, `*`, queries, several contacts) goes the general way.

Over TCP/TLS a non-INVITE server transaction ends with its final response (Timer J is 0 on
reliable transports, RFC 3261 §17.2.2), so skipping the transaction layer changes nothing a peer
can see. The 200 copies the request's Via/From/To/Call-ID/CSeq lines byte-exact (as
`make_response` does), adds the To tag, then `Registrar.ok_headers`, Server, Content-Length.
To and Contact are read with the registrar's own memoized parsers and the binding is updated by
`Registrar.apply`, so both paths decide alike; tests/ucm/test_ucm_sip_fastpath.py checks parity.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.sip.errors import SipParseError
from edge.sip.fastpath import Plan, RawHead, cseq_method, max_forwards, parse_via, request_line, scan
from edge.sip.message import new_tag
from mock_ucm.sip.registrar import DEFAULT_REQUESTED_EXPIRES_S, Registrar, contact_info, to_info

_COPIED = frozenset({"via", "from", "to", "call-id", "cseq"})  # make_response (RFC 3261 §8.2.6.2)
_MAGIC = b"z9hG4bK"
_WSP = b" \t"


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the registrar's lines sit in one header layout (an edge.sip.fastpath.Plan)."""

    copied: tuple[int, ...]  # lines the 200 copies, in order
    to_pos: int  # the To line's place among them
    to: int
    top_via: int
    call_id: int
    from_: int
    cseq: int
    contact: int
    expires: int  # 0: none
    max_forwards: int  # 0: none
    supported: tuple[int, ...]
    paths: tuple[int, ...]


def _layout(plan: Plan) -> _Layout | None:
    """What a layout implies, once per layout; None for layouts the fast path leaves alone: a
    single-valued header twice (message._check_single: the general path's 400), a required one
    missing, no or several Contact lines, two Expires."""
    count = plan.count
    first = plan.first
    if not plan.single or any(k not in first for k in ("via", "call-id", "from", "to", "cseq")):
        return None
    if count.get("contact", 0) != 1 or count.get("expires", 0) > 1:
        return None
    keys = plan.keys
    copied = tuple(i for i, k in enumerate(keys) if i and k in _COPIED)
    return _Layout(
        copied=copied,
        to_pos=copied.index(first["to"]),
        to=first["to"],
        top_via=first["via"],
        call_id=first["call-id"],
        from_=first["from"],
        cseq=first["cseq"],
        contact=first["contact"],
        expires=first.get("expires", 0),
        max_forwards=first.get("max-forwards", 0),
        supported=tuple(i for i, k in enumerate(keys) if k == "supported"),
        paths=tuple(i for i, k in enumerate(keys) if k == "path"),
    )


_LAYOUTS: dict[Plan, _Layout | None] = {}
_LAYOUTS_MAX = 1024  # as edge.sip.fastpath's plans: layouts come from the network
_START_LINES: set[bytes] = set()  # REGISTER request lines seen valid (a client repeats its own)
_START_LINES_MAX = 1024


def _start_line_ok(line: bytes) -> bool:
    if line in _START_LINES:
        return True
    if request_line(line, b"REGISTER") is None:  # what _parse_start_line + validate_proxy check
        return False
    if len(_START_LINES) >= _START_LINES_MAX:
        _START_LINES.clear()
    _START_LINES.add(line)
    return True


class RegisterFastPath:
    """Answers the usual REGISTER from its bytes against the shared `Registrar` (module doc)."""

    def __init__(self, registrar: Registrar, server: str) -> None:
        self.registrar = registrar
        self._trailer = f"Server: {server}\r\nContent-Length: 0\r\n\r\n"

    def answer(
        self, data: bytes, head_end: int, flow: int | None, now: float, head: RawHead | None = None
    ) -> bytes | None:
        """The 200 OK for `data` (one framed message whose head ends at `head_end`, the index of
        its CRLFCRLF; `head`: its head already split, if the framer did), or None: then the
        general path must answer."""
        if len(data) != head_end + 4 or not data.startswith(b"REGISTER "):
            return None  # a body, or another method
        if head is None:
            head = scan(data, head_end)
        if head is None:
            return None
        layout = _LAYOUTS.get(head.plan)
        if layout is None and head.plan not in _LAYOUTS:
            layout = _remember(head.plan)
        if layout is None or not _start_line_ok(head.lines[0]):
            return None
        values = _checked_values(head.lines, head.plan.colons, layout)
        if values is None:
            return None
        to, contact, expires, paths, ar_sk = values
        try:
            t = to_info(to.decode())
            c = contact_info(contact)
        except SipParseError:
            return None  # the general path answers 400 with the parser's reason
        if t.tagged:
            return None  # in-dialog: 481 from call control
        registrar = self.registrar
        user = registrar.find_user(t.user)
        if user is None or not registrar.device_allowed(user, c.device) or registrar.needs_auth(user):
            return None  # 404 / 403 with Warning, or a digest challenge
        if c.expires is not None:
            asked = c.expires
        else:
            asked = int(expires) if expires else DEFAULT_REQUESTED_EXPIRES_S  # §10.2.1.1
        mra_ha = c.ar_sk or ar_sk
        registrar.apply(user, t.aor, c, asked, paths, now, flow, mra_ha)
        # The 200: the copied lines as received, To with a tag as Headers._set writes it
        # ("name: value;tag=…"), then what the registrar adds, Server and Content-Length.
        out = list(map(head.lines.__getitem__, layout.copied))
        out[layout.to_pos] = head.plan.names[layout.to] + b": " + to + b";tag=" + new_tag().encode()
        tail = ""
        for name, text in registrar.ok_headers(user, now, granted=True, mra_ha=mra_ha):
            tail += f"{name}: {text}\r\n"
        tail += self._trailer
        # a stored Contact of another binding may hold UTF-8 (registered the general way)
        return b"SIP/2.0 200 OK\r\n" + b"\r\n".join(out) + b"\r\n" + tail.encode("utf-8", "surrogateescape")


def _remember(plan: Plan) -> _Layout | None:
    layout = _layout(plan)
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    _LAYOUTS[plan] = layout
    return layout


_Values = tuple[bytes, str, bytes, tuple[str, ...], bool]


def _checked_values(lines: list[bytes], colons: list[int], layout: _Layout) -> _Values | None:
    """What validate_proxy checks per message (a Call-ID and From, CSeq "<n> REGISTER", the top
    Via, Max-Forwards) plus Expires and the Contact/Path shapes the fast path takes; then the
    values the registrar reads: To, Contact (stripped as Registrar._contacts strips it),
    Expires, Path values, whether Supported asks for AR_SK. A value is what Headers._value
    gives: the text after the colon, LWS stripped (written out inline: this runs per message)."""
    i = layout.call_id
    if not lines[i][colons[i] + 1 :].strip(_WSP):
        return None
    i = layout.from_
    if not lines[i][colons[i] + 1 :].strip(_WSP):
        return None
    i = layout.cseq
    if cseq_method(lines[i][colons[i] + 1 :].strip(_WSP)) != b"REGISTER":
        return None
    i = layout.top_via
    via = parse_via(lines[i][colons[i] + 1 :].strip(_WSP))  # plain shape; others go the general way
    if via is None or not (via.param(b"branch") or b"").startswith(_MAGIC):
        return None  # else the RFC 2543 transaction key: the general path
    i = layout.max_forwards
    if i and max_forwards(lines[i][colons[i] + 1 :].strip(_WSP)) is None:
        return None
    i = layout.expires
    expires = lines[i][colons[i] + 1 :].strip(_WSP) if i else b""
    if i and not expires.isdigit():
        return None  # the general path's 400
    i = layout.to
    to = lines[i][colons[i] + 1 :].strip(_WSP)
    i = layout.contact
    contact = lines[i][colons[i] + 1 :].decode().strip()
    if not to or "," in contact or contact == "*":
        return None
    paths: tuple[str, ...] = ()
    if layout.paths:
        found: list[str] = []
        for i in layout.paths:
            path = lines[i][colons[i] + 1 :].strip(_WSP)
            if b"," in path:
                return None  # a Path list: get_all's splitting is the parser's business
            if path:
                found.append(path.decode())
        paths = tuple(found)
    ar_sk = False
    for i in layout.supported:
        if b"ar_sk" in lines[i][colons[i] + 1 :].lower():
            ar_sk = True
            break
    return to, contact, expires, paths, ar_sk

"""Codec unit tests: headers API, URIs, addresses, Via, builders, MRA pass-through, round-trips."""

from __future__ import annotations

# ruff: noqa: E501  (wire-format fixtures are kept one header per line)
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.sip import (
    Headers,
    NameAddr,
    Request,
    Response,
    SipParseError,
    Uri,
    Via,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
)
from edge.sip.address import CSeq

MRA_REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS 198.51.100.7:51234;branch=z9hG4bK00aa11;rport\r\n"
    b"Route: <sip:192.0.2.10:5061;transport=tls;zone-id=1;directed;lr>\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@example.com>;tag=abc\r\n"
    b"To: <sip:alice@example.com>\r\n"
    b"Call-ID: 0011-2233@198.51.100.7\r\n"
    b"CSeq: 101 REGISTER\r\n"
    b'Contact: <sip:4f2e@198.51.100.7:51234;transport=tls>;+sip.instance="<urn:uuid:00000000-0000-0000-0000-0000aabbccdd>";'
    b'+u.sip!devicename.ccm.cisco.com="CSFALICE";+u.sip!model.ccm.cisco.com="503";x-cisco-mra-ha=AR_SK;reg-id=1\r\n'
    b"x-cisco-reg-id: 1\r\n"
    b"Supported: replaces,X-cisco-serviceuri , outbound\r\n"
    b"Expires: 3600\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def test_mra_register_markers_pass_byte_exact() -> None:
    m = parse_message(MRA_REGISTER)
    assert bytes(m) == MRA_REGISTER
    (c,) = m.contacts
    assert c.params.get("+sip.instance") == '"<urn:uuid:00000000-0000-0000-0000-0000aabbccdd>"'
    assert c.params.get("+u.sip!devicename.ccm.cisco.com") == '"CSFALICE"'
    assert c.params.get("x-cisco-mra-ha") == "AR_SK"
    assert m.routes[0].uri.params.get("zone-id") == "1" and "directed" in m.routes[0].uri.params
    assert m.top_via is not None and m.top_via.has_rport and m.top_via.rport is None
    # A proxy edits: new top Via, drops top Route; everything else still byte-exact.
    m.headers.prepend("Via", "SIP/2.0/TLS 192.0.2.10:7001;branch=" + new_branch())
    assert m.headers.remove_first("Route") is not None
    out = bytes(m)
    assert out.count(b"Via:") == 2 and b"Route:" not in out
    assert MRA_REGISTER.split(b"\r\n")[8] in out.split(b"\r\n")  # the Contact line untouched


def test_headers_api() -> None:
    h = Headers(
        [("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2"), ("v", "SIP/2.0/UDP c")]
    )
    assert h.get_all("VIA") == [
        "SIP/2.0/UDP a;branch=z9hG4bK1",
        "SIP/2.0/UDP b;branch=z9hG4bK2",
        "SIP/2.0/UDP c",
    ]
    assert h.remove_first("via") == "SIP/2.0/UDP a;branch=z9hG4bK1"
    assert h.get_lines("via") == ["SIP/2.0/UDP b;branch=z9hG4bK2", "SIP/2.0/UDP c"]
    h.add("Contact", '"Doe, John" <sip:j@x;a=b,c>;q=0.5, <sip:k@y>')
    assert h.get_all("m") == ['"Doe, John" <sip:j@x;a=b,c>;q=0.5', "<sip:k@y>"]
    h.add("WWW-Authenticate", 'Digest realm="a", nonce="b"')
    assert h.get_all("www-authenticate") == ['Digest realm="a", nonce="b"']
    h.replace("Contact", "*")
    assert h.get_lines("contact") == ["*"]
    h.prepend("Record-Route", "<sip:p1;lr>")
    assert next(iter(h)) == ("Record-Route", "<sip:p1;lr>")
    assert h.remove("record-route") == 1 and "Record-Route" not in h
    for short, long in [("i", "Call-ID"), ("l", "Content-Length"), ("c", "Content-Type"), ("k", "Supported"),
                        ("o", "Event"), ("u", "Allow-Events"), ("r", "Refer-To"), ("b", "Referred-By"),
                        ("x", "Session-Expires"), ("t", "To"), ("f", "From"), ("s", "Subject")]:  # fmt: skip
        hh = Headers([(short, "v1")])
        assert hh.get(long) == "v1" and hh.get(short.upper()) == "v1"


def test_uri_round_trip_and_fields() -> None:
    cases = [
        "sip:alice@example.com",
        "sips:alice:secret@[2001:db8::1]:5061;transport=tls;lr;maddr=239.255.255.1?subject=hi&x=y",
        "sip:192.0.2.10:5061;transport=tls;zone-id=1;directed;lr",
        "sip:+1-972-555-2222@gw1.example.net;user=phone",
        "tel:+1-201-555-0123;phone-context=example.com",
        "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
    ]
    for text in cases:
        assert str(Uri.parse(text)) == text
    u = Uri.parse(cases[1])
    assert (u.scheme, u.user, u.password, u.host, u.port) == (
        "sips",
        "alice",
        "secret",
        "[2001:db8::1]",
        5061,
    )
    assert list(u.params) == [("transport", "tls"), ("lr", None), ("maddr", "239.255.255.1")]
    assert u.headers == "subject=hi&x=y" and u.lr and u.transport == "tls"
    for bad in ["sip:", "sip:a@", "sip:host:99999", "sip:ho st", "sip:a@[::1", "<sip:x>", "sip:h;;"]:
        try:
            Uri.parse(bad)
        except SipParseError as exc:
            assert exc.status_code == 400
        else:
            raise AssertionError(bad)


def test_name_addr_forms() -> None:
    a = NameAddr.parse('"Alice \\"A\\"" <sip:alice@x.com;transport=tcp>;tag=1;expires=60')
    assert a.display_name == 'Alice "A"' and a.tag == "1" and a.uri.transport == "tcp"
    assert NameAddr.parse(str(a)) == a
    b = NameAddr.parse("sip:bob@x.com;tag=2")
    assert b.display_name is None and b.tag == "2" and "tag" not in b.uri.params
    c = NameAddr.parse("Bob Smith <sip:bob@x.com>")
    assert c.display_name == "Bob Smith"


def test_via_fields_and_round_trip() -> None:
    v = Via.parse(
        "SIP/2.0/TLS [2001:db8::9]:5061;branch=z9hG4bKx;received=192.0.2.1;rport=4000;ingress-zone=Z;lr"
    )
    assert (v.transport, v.host, v.port, v.branch, v.received, v.rport) == (
        "TLS", "[2001:db8::9]", 5061, "z9hG4bKx", "192.0.2.1", 4000,
    )  # fmt: skip
    assert v.sent_by == "[2001:db8::9]:5061" and v.is_rfc3261
    assert Via.parse(str(v)) == v
    assert CSeq.parse("  7   BYE ") == CSeq(7, "BYE")


def test_make_response_copies_per_8_2_6() -> None:
    req = parse_message(MRA_REGISTER)
    assert isinstance(req, Request)
    r = make_response(req, 200, to_tag="t1")
    assert r.headers.get_lines("via") == req.headers.get_lines("via")
    assert r.to_tag == "t1" and r.from_tag == "abc" and r.call_id == req.call_id and r.cseq == req.cseq
    assert r.headers.get("Route") is None and r.headers.get("Contact") is None
    parsed = parse_message(bytes(r))
    assert isinstance(parsed, Response) and parsed.status_code == 200 and parsed.reason == "OK"
    assert parsed.content_length == 0
    trying = make_response(req, 100)
    assert trying.to_tag is None
    assert make_response(req, 486).to_tag  # auto-generated tag


def test_body_change_updates_content_length_and_builders() -> None:
    m = parse_message(MRA_REGISTER)
    m.body = b"hello"
    out = parse_message(bytes(m))
    assert out.body == b"hello" and out.content_length == 5
    assert new_branch().startswith("z9hG4bK") and new_branch() != new_branch()
    assert new_tag() != new_tag() and new_call_id("h").endswith("@h")


def test_built_request_round_trips() -> None:
    req = Request(
        "OPTIONS",
        Uri.parse("sip:bob@example.com"),
        [("Via", f"SIP/2.0/TCP 127.0.0.1:5060;branch={new_branch()}"), ("From", "<sip:a@x>;tag=1"),
         ("To", "<sip:bob@example.com>"), ("Call-ID", new_call_id()), ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70")],
    )  # fmt: skip
    data = bytes(req)
    assert data.endswith(b"Content-Length: 0\r\n\r\n")
    assert parse_message(data) == req


# -- property: parse(serialize(m)) == m ---------------------------------------------------

_tok = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~",
    min_size=1,
    max_size=12,
)
_host = st.from_regex(r"[a-z][a-z0-9]{0,8}(\.[a-z][a-z0-9]{0,8}){0,2}", fullmatch=True)
_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=0, max_size=30).map(
    str.strip
)
_uri = st.builds(
    lambda s, u, h, p: f"{s}:{u + '@' if u else ''}{h}{':' + str(p) if p else ''}",
    st.sampled_from(["sip", "sips"]),
    st.one_of(st.none(), st.text(alphabet="abcdefghijkXYZ0123456789-_.!~*'()&=+$,", min_size=1, max_size=10)),
    _host,
    st.one_of(st.none(), st.integers(1, 65535)),
)


@st.composite
def _messages(draw: st.DrawFn) -> Request | Response:
    headers = [
        (
            "Via",
            f"SIP/2.0/{draw(st.sampled_from(['UDP', 'TCP', 'TLS']))} {draw(_host)};branch=z9hG4bK{draw(_tok)}",
        ),
        ("From", f"<{draw(_uri)}>;tag={draw(_tok)}"),
        ("To", f"<{draw(_uri)}>"),
        ("Call-ID", draw(_tok)),
    ]
    extra = draw(st.lists(st.tuples(_tok.filter(lambda t: t.lower() not in _RESERVED), _value), max_size=6))
    body = draw(st.binary(max_size=200))
    if draw(st.booleans()):
        method = draw(_tok)
        headers.append(("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {method}"))
        return Request(method, draw(_uri), headers + extra, body)
    headers.append(("CSeq", f"{draw(st.integers(0, 2**31 - 1))} {draw(_tok)}"))
    reason = draw(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
    return Response(draw(st.integers(100, 699)), reason.strip() or "X", headers + extra, body)


_RESERVED = {"content-length", "l", "call-id", "i", "cseq", "from", "f", "to", "t", "via", "v", "max-forwards",
             "contact", "m", "expires", "date", "content-type", "c"}  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(_messages())
def test_property_parse_serialize_round_trip(m: Request | Response) -> None:
    data = bytes(m)
    parsed = parse_message(data)
    assert parsed == m
    assert bytes(parsed) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_property_garbage_only_raises_sip_parse_error(data: bytes) -> None:
    try:
        parse_message(b"INVITE sip:a@b SIP/2.0\r\n" + data)
    except SipParseError as exc:
        assert 400 <= exc.status_code < 600

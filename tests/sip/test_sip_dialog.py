"""RFC 3261 §12 dialogs on both sides."""

from __future__ import annotations

import pytest

from edge.sip import Request, Response, Via, make_response, parse_message
from edge.sip.dialog import Dialog, DialogState


def invite() -> Request:
    m = parse_message(
        b"INVITE sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/TLS 198.51.100.7:5061;branch=z9hG4bKinv1\r\n"
        b"Record-Route: <sip:p1.example.com;lr>\r\n"
        b"Max-Forwards: 70\r\n"
        b'From: "Alice" <sip:alice@example.com>;tag=a1\r\n'
        b"To: <sip:bob@example.com>\r\n"
        b"Call-ID: dlg-1\r\n"
        b"CSeq: 10 INVITE\r\n"
        b"Contact: <sip:alice@198.51.100.7:5061;transport=tls>\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert isinstance(m, Request)
    return m


def answer(req: Request, code: int = 200) -> Response:
    r = make_response(req, code, to_tag="b1")
    r.headers.add("Record-Route", "<sip:p2.example.com;lr>, <sip:p1.example.com;lr>")
    r.headers.add("Contact", "<sip:bob@192.0.2.5:5060>")
    return r


def test_uac_dialog_and_in_dialog_requests() -> None:
    req = invite()
    d = Dialog.from_uac(req, answer(req))
    assert (d.call_id, d.local_tag, d.remote_tag) == ("dlg-1", "a1", "b1")
    assert d.route_set == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert d.remote_target == "sip:bob@192.0.2.5:5060" and d.state is DialogState.CONFIRMED
    ack = d.make_request("ACK", via=Via("198.51.100.7", 5061, "TLS"))
    assert (ack.method, ack.uri, ack.cseq.seq, ack.cseq.method) == (
        "ACK",
        "sip:bob@192.0.2.5:5060",
        10,
        "ACK",
    )
    assert ack.top_via is not None and ack.top_via.branch != "z9hG4bKinv1" and ack.top_via.is_rfc3261
    bye = d.make_request("BYE")
    assert bye.cseq.seq == 11 and bye.from_tag == "a1" and bye.to_tag == "b1"
    assert bye.headers.get_lines("Route") == d.route_set
    assert bye.from_.display_name == "Alice"
    parsed = parse_message(bytes(bye), strict=False)
    assert parsed == bye
    d.receive_response(bye, make_response(bye, 200))
    assert d.state.value == DialogState.TERMINATED.value


def test_uas_dialog_cseq_and_target_refresh() -> None:
    req = invite()
    d = Dialog.from_uas(req, answer(req))
    assert (d.local_tag, d.remote_tag, d.remote_seq) == ("b1", "a1", 10)
    assert d.route_set == ["<sip:p1.example.com;lr>"]
    assert d.remote_target == "sip:alice@198.51.100.7:5061;transport=tls"
    reinv = invite()
    reinv.headers.replace("To", "<sip:bob@example.com>;tag=b1")
    reinv.headers.replace("CSeq", "11 INVITE")
    reinv.headers.replace("Contact", "<sip:alice@203.0.113.9:6000>")
    assert d.matches_request(reinv)
    assert d.receive_request(reinv) is None
    assert d.remote_target == "sip:alice@203.0.113.9:6000" and d.remote_seq == 11
    old = reinv.copy()
    old.headers.replace("CSeq", "5 INVITE")
    assert d.receive_request(old) == 500
    bye = d.make_request("BYE")
    assert bye.cseq.seq == 1 and bye.to_tag == "a1" and bye.from_tag == "b1"


def test_early_dialog_confirmed_by_2xx_and_strict_routing() -> None:
    req = invite()
    ringing = answer(req, 180)
    d = Dialog.from_uac(req, ringing)
    assert d.state is DialogState.EARLY
    d.receive_response(req, answer(req, 200))
    assert d.state.value == DialogState.CONFIRMED.value
    d.route_set = ["<sip:strict.example.com>", "<sip:p2.example.com;lr>"]
    bye = d.make_request("BYE")
    assert bye.uri == "sip:strict.example.com"
    assert bye.headers.get_lines("Route") == ["<sip:p2.example.com;lr>", "<sip:bob@192.0.2.5:5060>"]
    with pytest.raises(ValueError):
        Dialog.from_uac(req, make_response(req, 100))

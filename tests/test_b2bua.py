"""Expressway-C's B2BUA core (edge_c.b2bua) with a fake MediaSession, fake peers on both sides
(the client behind E on the zone, Unified CM inside) and a fake clock. Spec §5, §7."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from edge.media_hooks import MediaRejected, Side
from edge.sip.address import Via
from edge.sip.dialog import Dialog
from edge.sip.headers import Headers
from edge.sip.message import Request, Response, make_response, new_branch, new_tag, parse_message
from edge_c.b2bua import B2bua, find_sdp, replace_sdp
from edge_c.b2bua_events import B2buaOutput, CallAnswered, CallEnded, CallStarted, SendToUcm, SendToZone

C = "10.0.0.3"
ZONE_CONTACT = f"<sip:{C}:7001;transport=tls>"
UCM_CONTACT = f"<sip:{C}:5060;transport=tcp>"
E_RR = ["<sip:10.0.0.2:7001;transport=tls;lr>", "<sip:f1@203.0.113.1:5061;transport=tls;lr;x-e-flow>"]
CLIENT_CONTACT = "<sip:1001@198.51.100.7:51000;transport=tls>"
UCM_PEER_CONTACT = "<sip:1002@10.0.0.20:5060;transport=tcp>"
SDP_A = (
    b"v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/SAVP 0\r\n"
)
SDP_B = b"v=0\r\no=- 2 2 IN IP4 10.0.0.20\r\ns=-\r\nc=IN IP4 10.0.0.20\r\nt=0 0\r\nm=audio 5000 RTP/AVP 0\r\n"
T0 = 1000.0


class FakeMedia:
    """Records every call and tags the SDP it returns so tests can see what went through it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str | None, bytes]] = []
        self.reject: dict[str, MediaRejected] = {}  # "offer" / "answer" → raise this

    def _do(self, op: str, call: str, ingress: Side, sdp: bytes) -> bytes:
        self.log.append((op, call, ingress, sdp))
        if op in self.reject:
            raise self.reject[op]
        return sdp + f"a=b2b:{op}:{ingress}\r\n".encode()

    def process_offer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        return self._do("offer", call, ingress, sdp)

    def process_answer(self, call: str, ingress: Side, sdp: bytes) -> bytes:
        return self._do("answer", call, ingress, sdp)

    def end_call(self, call: str) -> None:
        self.log.append(("end", call, None, b""))

    def snapshot(self) -> dict[str, Any]:
        return {}

    def ops(self) -> list[tuple[str, str | None]]:
        return [(op, side) for op, _, side, _ in self.log]


def wire(msg: Request | Response) -> Any:
    """What the peer really receives: serialize and parse again."""
    return parse_message(bytes(msg))


def text_request(method: str, uri: str, headers: list[str], body: bytes = b"") -> Request:
    head = f"{method} {uri} SIP/2.0\r\n" + "".join(h + "\r\n" for h in headers)
    head += f"Content-Length: {len(body)}\r\n\r\n"
    msg = parse_message(head.encode() + body)
    assert isinstance(msg, Request)
    return msg


def client_invite(
    body: bytes = SDP_A, ctype: str = "application/sdp", extra: tuple[str, ...] = ()
) -> Request:
    """An INVITE from the client as edge_c/sip.py hands it over: E's Via stamped, routes popped."""
    return text_request(
        "INVITE",
        "sip:1002@example.com",
        [
            f"Via: SIP/2.0/TLS 10.0.0.2:7001;branch={new_branch()};received=10.0.0.2;rport=40000;"
            "ingress-zone=CollaborationEdgeZone",
            "Via: SIP/2.0/TLS 198.51.100.7:51000;branch=z9hG4bKc1;received=198.51.100.7;rport=51000",
            *(f"Record-Route: {rr}" for rr in E_RR),
            "Max-Forwards: 13",
            'From: "Alice A" <sip:1001@example.com>;tag=ca1',
            "To: <sip:1002@example.com>",
            f"Call-ID: client-call-{new_tag()}",
            "CSeq: 101 INVITE",
            f'Contact: {CLIENT_CONTACT};+sip.instance="<urn:uuid:1>";x-cisco-mra-ha=AR_SK',
            "Supported: replaces,X-cisco-srtp-fallback",
            "Allow: INVITE, ACK, BYE, CANCEL, UPDATE, INFO, REFER, NOTIFY",
            "x-cisco-remotecc:  weird   spacing ",
            'P-Asserted-Identity: "Alice" <sip:1001@example.com>',
            "Session-Expires: 1800;refresher=uac",
            "User-Agent: Cisco-CSF",
            "Call-Info: <urn:x-cisco-remotecc:callinfo>;x-cisco-video-traffic-class=DESKTOP",
            "Authorization: Digest username=alice",
            "Proxy-Authorization: Digest username=alice",
            *extra,
            *([f"Content-Type: {ctype}"] if body else []),
        ],
        body,
    )


def ucm_invite(body: bytes = SDP_B) -> Request:
    """An INVITE from UCM to the client, Request-URI already restored from orig-hostport."""
    return text_request(
        "INVITE",
        "sip:1001@198.51.100.7:51000;transport=tls",
        [
            f"Via: SIP/2.0/TCP 10.0.0.20:5060;branch={new_branch()};received=10.0.0.20;rport=5060",
            "Max-Forwards: 69",
            'From: "Bob B" <sip:1002@10.0.0.20>;tag=ub1',
            "To: <sip:1001@example.com>",
            f"Call-ID: ucm-call-{new_tag()}@10.0.0.20",
            "CSeq: 101 INVITE",
            f"Contact: {UCM_PEER_CONTACT}",
            "Alert-Info: <file://Bellcore-dr2/>",
            "Remote-Party-ID: <sip:1002@10.0.0.20>;party=calling",
            *(["Content-Type: application/sdp"] if body else []),
        ],
        body,
    )


@dataclass
class Peer:
    """A far-end UA that receives the B2BUA's leg B INVITE and answers it."""

    contact: str
    host: str
    record_route: list[str] = field(default_factory=list)
    tag: str = field(default_factory=new_tag)
    dialog: Dialog | None = None

    def answer(self, req: Request, code: int, body: bytes = b"", ctype: str = "application/sdp") -> Response:
        resp = make_response(req, code, to_tag=self.tag)
        for rr in self.record_route:
            resp.headers.add("Record-Route", rr)
        if 100 < code < 300 and req.method == "INVITE":
            resp.headers.add("Contact", self.contact)
            self.dialog = Dialog.from_uas(req, resp)
        if body:
            resp.headers.add("Content-Type", ctype)
            resp.body = body
        return wire(resp)  # type: ignore[no-any-return]

    def request(self, method: str, body: bytes = b"", ctype: str | None = None) -> Request:
        assert self.dialog is not None
        req = self.dialog.make_request(
            method, via=Via(self.host, 5060, "TCP"), contact=self.contact, body=body, content_type=ctype
        )
        req.headers.remove("Route")  # E / edge_c.sip pop their own routes before C's B2BUA
        return wire(req)  # type: ignore[no-any-return]


@dataclass
class Env:
    b2b: B2bua
    media: FakeMedia
    now: float = T0

    def feed(self, side: Side, msg: Request | Response, flow: str | None = None) -> list[B2buaOutput]:
        if side == "outside":
            return self.b2b.receive_from_zone(msg, flow or "z1", self.now)
        return self.b2b.receive_from_ucm(msg, flow or "u1", self.now)

    def tick(self, seconds: float) -> list[B2buaOutput]:
        self.now += seconds
        due = self.b2b.get_timer()
        return self.b2b.handle_timer(self.now) if due is not None and due <= self.now else []


@pytest.fixture
def env() -> Env:
    media = FakeMedia()
    return Env(B2bua(C, zone_contact=ZONE_CONTACT, ucm_contact=UCM_CONTACT, media=media), media)


def to_side(outs: list[B2buaOutput], side: Side) -> list[Any]:
    kind = SendToZone if side == "outside" else SendToUcm
    return [wire(o.message) for o in outs if isinstance(o, kind)]


def one(outs: list[B2buaOutput], side: Side, what: str | int) -> Any:
    msgs = [
        m
        for m in to_side(outs, side)
        if (isinstance(m, Request) and m.method == what)
        or (isinstance(m, Response) and m.status_code == what)
    ]
    assert len(msgs) == 1, (what, outs)
    return msgs[0]


def other(side: Side) -> Side:
    return "inside" if side == "outside" else "outside"


def ack_for(invite: Request, ok: Response, host: str) -> tuple[Dialog, Request]:
    dialog = Dialog.from_uac(invite, ok)
    ack = dialog.make_request("ACK", via=Via(host, 5061, "TLS"))
    ack.headers.remove("Route")
    return dialog, wire(ack)


@dataclass
class Call:
    a_side: Side
    a_invite: Request
    b_invite: Request
    peer: Peer
    a_dialog: Dialog | None = None  # the caller's view of leg A
    a_ok: Response | None = None


def start(env: Env, a_side: Side, body: bytes | None = None) -> tuple[Call, list[B2buaOutput]]:
    if a_side == "outside":
        inv = client_invite(SDP_A if body is None else body)
        peer = Peer(UCM_PEER_CONTACT, "10.0.0.20")
    else:
        inv = ucm_invite(SDP_B if body is None else body)
        peer = Peer(CLIENT_CONTACT, "198.51.100.7", record_route=[E_RR[1], E_RR[0]])
    outs = env.feed(a_side, inv)
    b_invite = one(outs, other(a_side), "INVITE")
    return Call(a_side, inv, b_invite, peer), outs


def answer(env: Env, call: Call, sdp: bytes = SDP_B) -> list[B2buaOutput]:
    b = other(call.a_side)
    env.feed(b, call.peer.answer(call.b_invite, 100))
    outs = env.feed(b, call.peer.answer(call.b_invite, 180))
    assert one(outs, call.a_side, 180).to_tag
    outs = env.feed(b, call.peer.answer(call.b_invite, 200, sdp))
    call.a_ok = one(outs, call.a_side, 200)
    call.a_dialog, ack = ack_for(call.a_invite, call.a_ok, "198.51.100.7")
    return outs + env.feed(call.a_side, ack)


def a_request(call: Call, method: str, body: bytes = b"", ctype: str | None = None) -> Request:
    assert call.a_dialog is not None
    req = call.a_dialog.make_request(method, via=Via("10.0.0.2", 7001, "TLS"), body=body, content_type=ctype)
    req.headers.remove("Route")
    return wire(req)  # type: ignore[no-any-return]


def assert_empty(b2b: B2bua) -> None:
    assert len(b2b) == 0
    assert len(b2b.layer) == 0
    assert not (b2b._by_tag or b2b._by_invite or b2b._clients or b2b._server_where)
    assert b2b.status()["counts"]["active"] == 0


# -- basic calls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("a_side", ["outside", "inside"])
@pytest.mark.parametrize("bye_from", ["a", "b"])
def test_call_setup_and_bye(env: Env, a_side: Side, bye_from: str) -> None:
    b_side = other(a_side)
    call, outs = start(env, a_side)
    trying = one(outs, a_side, 100)
    assert trying.to_tag is None
    started = [o for o in outs if isinstance(o, CallStarted)]
    assert len(started) == 1 and started[0].ingress == a_side
    b_inv = call.b_invite
    assert b_inv.call_id != call.a_invite.call_id
    assert b_inv.from_tag != call.a_invite.from_tag
    assert [str(v.host) for v in b_inv.vias] == [C]
    assert b_inv.uri == call.a_invite.uri  # to UCM: leg A's R-URI; to the zone: the one the caller gave
    assert b_inv.headers.get("contact") == (UCM_CONTACT if b_side == "inside" else ZONE_CONTACT)
    assert "record-route" not in b_inv.headers
    assert b_inv.max_forwards == call.a_invite.max_forwards
    assert env.media.ops() == [("offer", a_side)]
    assert b_inv.body.endswith(f"a=b2b:offer:{a_side}\r\n".encode())

    outs = answer(env, call)
    ok = call.a_ok
    assert ok is not None and ok.headers.get("contact") == (
        ZONE_CONTACT if a_side == "outside" else UCM_CONTACT
    )
    assert ok.call_id == call.a_invite.call_id and ok.cseq == call.a_invite.cseq
    assert ok.headers.get_all("record-route") == call.a_invite.headers.get_all("record-route")
    assert ok.body.endswith(f"a=b2b:answer:{b_side}\r\n".encode())
    assert any(isinstance(o, CallAnswered) for o in outs)
    ack = one(outs, b_side, "ACK")
    assert ack.call_id == b_inv.call_id and ack.to_tag == call.peer.tag and str(ack.cseq) == "1 ACK"
    if b_side == "outside":  # E's record-routes make the zone leg's route set, E's internal entry first
        assert ack.headers.get_all("route") == E_RR
        assert ack.uri == "sip:1001@198.51.100.7:51000;transport=tls"
    else:
        assert ack.uri == "sip:1002@10.0.0.20:5060;transport=tcp"
    status = env.b2b.status()
    legs = status["active"][0]["legs"]
    assert status["active"][0]["state"] == "confirmed"
    assert {leg["call_id"] for leg in legs} == {call.a_invite.call_id, b_inv.call_id}
    assert [leg["side"] for leg in legs] == [a_side, b_side]

    if bye_from == "a":
        outs = env.feed(a_side, a_request(call, "BYE"))
        assert one(outs, a_side, 200).cseq.method == "BYE"
        bye = one(outs, b_side, "BYE")
        assert bye.call_id == b_inv.call_id and bye.from_tag == b_inv.from_tag
        assert env.b2b.owns(call.peer.answer(bye, 200))
        assert env.feed(b_side, call.peer.answer(bye, 200)) == []
    else:
        outs = env.feed(b_side, call.peer.request("BYE"))
        assert one(outs, b_side, 200).cseq.method == "BYE"
        bye = one(outs, a_side, "BYE")
        assert bye.call_id == call.a_invite.call_id and bye.to_tag == call.a_invite.from_tag
    ended = [o for o in outs if isinstance(o, CallEnded)]
    assert len(ended) == 1 and ended[0].call_id == started[0].call_id
    assert env.media.ops()[-1] == ("end", None)
    env.tick(40)
    assert_empty(env.b2b)
    counts = env.b2b.status()["counts"]
    assert (counts["attempts"], counts["answered"], counts["ended"], counts["failed"]) == (1, 1, 1, 0)


def test_headers_copied_and_removed(env: Env) -> None:
    call, _ = start(env, "outside")
    b_lines = bytes(call.b_invite).decode().split("\r\n")
    a_lines = bytes(call.a_invite).decode().split("\r\n")
    for name in (
        "x-cisco-remotecc",
        "P-Asserted-Identity",
        "Supported",
        "Allow",
        "Session-Expires",
        "User-Agent",
    ):
        line = next(x for x in a_lines if x.lower().startswith(name.lower() + ":"))
        assert line in b_lines  # byte-exact
    assert "x-cisco-remotecc:  weird   spacing " in b_lines
    assert next(x for x in a_lines if x.startswith("Call-Info")) in b_lines
    for gone in ("authorization", "proxy-authorization", "record-route"):
        assert gone not in call.b_invite.headers
    assert (call.b_invite.headers.get("from") or "").startswith('"Alice A" <sip:1001@example.com>;tag=')
    assert call.b_invite.headers.get("to") == "<sip:1002@example.com>"
    assert str(call.b_invite.cseq) == "1 INVITE"
    # and in the other direction, UCM's Alert-Info / Remote-Party-ID reach the client
    media2 = FakeMedia()
    env2 = Env(B2bua(C, zone_contact=ZONE_CONTACT, ucm_contact=UCM_CONTACT, media=media2), media2)
    call2, _ = start(env2, "inside")
    assert call2.b_invite.headers.get("alert-info") == "<file://Bellcore-dr2/>"
    assert call2.b_invite.headers.get("remote-party-id") == "<sip:1002@10.0.0.20>;party=calling"
    assert call2.b_invite.from_.display_name == "Bob B"


def test_early_media_183(env: Env) -> None:
    call, _ = start(env, "outside")
    outs = env.feed("inside", call.peer.answer(call.b_invite, 183, SDP_B))
    early = one(outs, "outside", 183)
    assert early.body == SDP_B + b"a=b2b:answer:inside\r\n"
    assert early.headers.get("contact") == ZONE_CONTACT
    assert env.media.ops() == [("offer", "outside"), ("answer", "inside")]
    outs = env.feed("inside", call.peer.answer(call.b_invite, 200, SDP_B))
    assert one(outs, "outside", 200).to_tag == early.to_tag  # one To tag per dialog on leg A


def test_late_offer(env: Env) -> None:
    call, _ = start(env, "outside", body=b"")
    assert call.b_invite.body == b"" and "content-type" not in call.b_invite.headers
    assert env.media.ops() == []
    outs = env.feed("inside", call.peer.answer(call.b_invite, 200, SDP_B))
    ok = one(outs, "outside", 200)
    assert ok.body == SDP_B + b"a=b2b:offer:inside\r\n"
    assert to_side(outs, "inside") == []  # leg B's ACK waits for leg A's
    dialog = Dialog.from_uac(call.a_invite, ok)
    ack = dialog.make_request(
        "ACK", via=Via("10.0.0.2", 7001, "TLS"), body=SDP_A, content_type="application/sdp"
    )
    outs = env.feed("outside", wire(ack))
    b_ack = one(outs, "inside", "ACK")
    assert b_ack.body == SDP_A + b"a=b2b:answer:outside\r\n"
    assert b_ack.headers.get("content-type") == "application/sdp"
    assert env.media.ops() == [("offer", "inside"), ("answer", "outside")]


# -- CANCEL and failures ---------------------------------------------------------------------------


def cancel_of(invite: Request) -> Request:
    h = Headers()
    for v in invite.headers.get_lines("via"):
        h.add("Via", v)
    h.add("Max-Forwards", "70")
    for name in ("From", "To", "Call-ID"):
        h.add(name, invite.headers.get(name) or "")
    h.add("CSeq", f"{invite.cseq.seq} CANCEL")
    return wire(Request("CANCEL", invite.uri, h))  # type: ignore[no-any-return]


def test_cancel_before_answer(env: Env) -> None:
    call, _ = start(env, "outside")
    env.feed("inside", call.peer.answer(call.b_invite, 180))
    cancel = cancel_of(call.a_invite)
    assert env.b2b.owns(cancel)
    outs = env.feed("outside", cancel)
    ok = one(outs, "outside", 200)
    assert ok.cseq.method == "CANCEL"
    b_cancel = one(outs, "inside", "CANCEL")
    assert b_cancel.vias[0].branch == call.b_invite.vias[0].branch  # RFC 3261 §9.1
    assert str(b_cancel.cseq) == "1 CANCEL" and b_cancel.call_id == call.b_invite.call_id
    assert env.feed("inside", wire(make_response(b_cancel, 200))) == []
    outs = env.feed("inside", call.peer.answer(call.b_invite, 487))
    b_ack = one(outs, "inside", "ACK")
    assert b_ack.vias[0].branch == call.b_invite.vias[0].branch  # §17.1.1.3
    assert one(outs, "outside", 487).cseq.method == "INVITE"
    assert [o.reason for o in outs if isinstance(o, CallEnded)] == ["cancelled"]
    env.tick(40)
    assert_empty(env.b2b)
    assert env.b2b.counters.cancelled == 1 and env.b2b.counters.failed == 1


def test_cancel_waits_for_a_provisional(env: Env) -> None:
    call, _ = start(env, "outside")
    outs = env.feed("outside", cancel_of(call.a_invite))
    assert to_side(outs, "inside") == []  # §9.1: no CANCEL before a provisional
    outs = env.feed("inside", call.peer.answer(call.b_invite, 100))
    assert one(outs, "inside", "CANCEL")


def test_200_crossing_cancel(env: Env) -> None:
    call, _ = start(env, "outside")
    env.feed("inside", call.peer.answer(call.b_invite, 180))
    env.feed("outside", cancel_of(call.a_invite))
    outs = env.feed("inside", call.peer.answer(call.b_invite, 200, SDP_B))
    ack, bye = one(outs, "inside", "ACK"), one(outs, "inside", "BYE")
    assert ack.to_tag == bye.to_tag == call.peer.tag
    assert one(outs, "outside", 487)
    assert not [m for m in to_side(outs, "outside") if isinstance(m, Response) and m.status_code == 200]
    env.feed("inside", call.peer.answer(bye, 200))
    env.tick(40)
    assert_empty(env.b2b)


def test_error_relayed_and_leg_b_acked(env: Env) -> None:
    call, _ = start(env, "outside")
    busy = call.peer.answer(call.b_invite, 486)
    busy.headers.add("X-Cisco-Reason", "busy")
    outs = env.feed("inside", wire(busy))
    b_ack = one(outs, "inside", "ACK")
    assert b_ack.to_tag == call.peer.tag and b_ack.vias[0].branch == call.b_invite.vias[0].branch
    a_err = one(outs, "outside", 486)
    assert a_err.reason == "Busy Here" and a_err.headers.get("x-cisco-reason") == "busy"
    assert "contact" not in a_err.headers
    a_ack = ack_for_error(call.a_invite, a_err)
    assert env.b2b.owns(a_ack)
    assert env.feed("outside", a_ack) == []
    env.tick(40)
    assert_empty(env.b2b)
    assert env.media.ops() == [("offer", "outside"), ("end", None)]


def ack_for_error(invite: Request, resp: Response) -> Request:
    h = Headers()
    h.add("Via", invite.headers.get_lines("via")[0])
    for name in ("From", "Call-ID"):
        h.add(name, invite.headers.get(name) or "")
    h.add("To", resp.headers.get("to") or "")
    h.add("CSeq", f"{invite.cseq.seq} ACK")
    return wire(Request("ACK", invite.uri, h))  # type: ignore[no-any-return]


def test_timer_b_gives_408(env: Env) -> None:
    start(env, "outside")
    assert env.b2b.get_timer() == pytest.approx(T0 + 32)
    assert env.tick(31) == []
    outs = env.tick(2)
    err = one(outs, "outside", 408)
    assert err.to_tag is not None
    assert any(isinstance(o, CallEnded) for o in outs)
    env.tick(40)
    assert_empty(env.b2b)


def test_no_ack_from_leg_a(env: Env) -> None:
    call, _ = start(env, "outside")
    env.feed("inside", call.peer.answer(call.b_invite, 200, SDP_B))
    outs = env.tick(33)
    assert one(outs, "inside", "ACK") and one(outs, "inside", "BYE")
    assert one(outs, "outside", "BYE")
    assert any(isinstance(o, CallEnded) and o.reason == "no ACK" for o in outs)


@pytest.mark.parametrize("where", ["offer", "answer"])
def test_media_rejected_488(env: Env, where: str) -> None:
    env.media.reject[where] = MediaRejected("no common crypto suite")
    call_outs = env.feed("outside", client_invite())
    if where == "offer":
        err = one(call_outs, "outside", 488)
        assert err.headers.get("warning") == '399 expc "no common crypto suite"'
        assert to_side(call_outs, "inside") == []
    else:
        b_inv = one(call_outs, "inside", "INVITE")
        peer = Peer(UCM_PEER_CONTACT, "10.0.0.20")
        outs = env.feed("inside", peer.answer(b_inv, 200, SDP_B))
        err = one(outs, "outside", 488)
        assert "no common crypto suite" in (err.headers.get("warning") or "")
        assert one(outs, "inside", "ACK") and one(outs, "inside", "BYE")
        call_outs = outs
    assert any(isinstance(o, CallEnded) for o in call_outs)
    assert env.b2b.counters.media_rejected == 1


def test_call_limit(env: Env) -> None:
    b2b = B2bua(C, zone_contact=ZONE_CONTACT, ucm_contact=UCM_CONTACT, media=env.media, max_calls=1)
    b2b.receive_from_zone(client_invite(), "z1", T0)
    err = one(b2b.receive_from_zone(client_invite(), "z1", T0), "outside", 503)
    assert "call limit" in (err.headers.get("warning") or "")


# -- in-dialog traffic -----------------------------------------------------------------------------


@pytest.mark.parametrize("from_side", ["a", "b"])
def test_reinvite_with_new_sdp(env: Env, from_side: str) -> None:
    call, _ = start(env, "outside")
    answer(env, call)
    new_sdp = SDP_A.replace(b"4000", b"4100")
    src: Side = "outside" if from_side == "a" else "inside"
    dst = other(src)
    if from_side == "a":
        req = a_request(call, "INVITE", new_sdp, "application/sdp")
    else:
        req = call.peer.request("INVITE", new_sdp, "application/sdp")
    outs = env.feed(src, req)
    fwd = one(outs, dst, "INVITE")
    assert fwd.body == new_sdp + f"a=b2b:offer:{src}\r\n".encode()
    assert str(fwd.cseq) == ("2 INVITE" if from_side == "a" else "1 INVITE")
    assert fwd.call_id != req.call_id
    if dst == "outside":
        assert fwd.headers.get_all("route") == E_RR
    # the other leg answers
    if dst == "inside":
        resp = wire(make_response(fwd, 200))
        resp.headers.add("Contact", UCM_PEER_CONTACT)
    else:
        resp = make_response(fwd, 200)
        resp.headers.add("Contact", CLIENT_CONTACT)
    resp.headers.add("Content-Type", "application/sdp")
    resp.body = SDP_B
    outs = env.feed(dst, wire(resp))
    back = one(outs, src, 200)
    assert back.cseq == req.cseq and back.headers.get_lines("via") == req.headers.get_lines("via")
    assert back.body == SDP_B + f"a=b2b:answer:{dst}\r\n".encode()
    # ACK relayed
    ack = Request("ACK", req.uri, Headers())
    ack.headers.add("Via", f"SIP/2.0/TLS 10.0.0.9:5061;branch={new_branch()}")
    for name in ("From", "To", "Call-ID"):
        ack.headers.add(name, req.headers.get(name) or "")
    ack.headers.add("CSeq", f"{req.cseq.seq} ACK")
    outs = env.feed(src, wire(ack))
    assert str(one(outs, dst, "ACK").cseq) == str(fwd.cseq).replace("INVITE", "ACK")


def test_reinvite_media_rejected_keeps_call(env: Env) -> None:
    call, _ = start(env, "outside")
    answer(env, call)
    env.media.reject["offer"] = MediaRejected("ports exhausted", 503)
    req = a_request(call, "INVITE", SDP_A, "application/sdp")
    outs = env.feed("outside", req)
    err = one(outs, "outside", 503)
    assert err.cseq == req.cseq and "ports exhausted" in (err.headers.get("warning") or "")
    assert to_side(outs, "inside") == [] and not any(isinstance(o, CallEnded) for o in outs)
    assert env.b2b.status()["active"][0]["state"] == "confirmed"


def test_send_failed_gives_503(env: Env) -> None:
    call, _ = start(env, "inside")
    outs = env.b2b.send_failed(call.b_invite, env.now)
    assert one(outs, "inside", 503).cseq.method == "INVITE"
    assert any(isinstance(o, CallEnded) for o in outs)


def test_glare_491(env: Env) -> None:
    call, _ = start(env, "outside")
    answer(env, call)
    env.feed("outside", a_request(call, "INVITE", SDP_A, "application/sdp"))
    outs = env.feed("inside", call.peer.request("INVITE", SDP_B, "application/sdp"))
    assert one(outs, "inside", 491)


@pytest.mark.parametrize(
    ("method", "ctype", "body"),
    [
        ("INFO", "application/media_control+xml", b"<media_control><picture_fast_update/></media_control>"),
        ("REFER", None, b""),
        ("NOTIFY", "message/sipfrag", b"SIP/2.0 200 OK\r\n"),
    ],
)
def test_in_dialog_relay(env: Env, method: str, ctype: str | None, body: bytes) -> None:
    call, _ = start(env, "outside")
    answer(env, call)
    req = a_request(call, method, body, ctype)
    if method == "REFER":
        req.headers.add("Refer-To", "<sip:1003@example.com>")
        req = wire(req)
    if method == "NOTIFY":
        req.headers.add("Event", "refer")
        req.headers.add("Subscription-State", "active;expires=60")
        req = wire(req)
    assert env.b2b.owns(req)
    outs = env.feed("outside", req)
    fwd = one(outs, "inside", method)
    assert fwd.body == body and fwd.call_id == call.b_invite.call_id
    assert fwd.from_tag == call.b_invite.from_tag and fwd.to_tag == call.peer.tag
    assert fwd.uri == "sip:1002@10.0.0.20:5060;transport=tcp"
    if method == "REFER":
        assert fwd.headers.get("refer-to") == "<sip:1003@example.com>"
    resp = make_response(fwd, 202 if method == "REFER" else 200)
    resp.headers.add("X-Extra", "kept")
    outs = env.feed("inside", wire(resp))
    back = one(outs, "outside", 202 if method == "REFER" else 200)
    assert back.cseq == req.cseq and back.headers.get_lines("via") == req.headers.get_lines("via")
    assert back.headers.get("x-extra") == "kept"
    assert env.media.ops() == [("offer", "outside"), ("answer", "inside")]


def test_unknown_dialog_gets_481(env: Env) -> None:
    bye = text_request(
        "BYE",
        f"sip:{C}",
        [
            "Via: SIP/2.0/TLS 10.0.0.2:7001;branch=z9hG4bKzz",
            "From: <sip:a@x>;tag=1",
            "To: <sip:b@x>;tag=2",
            "Call-ID: nope",
            "CSeq: 1 BYE",
        ],
    )
    assert not env.b2b.owns(bye)
    assert one(env.feed("outside", bye), "outside", 481)
    assert not env.b2b.owns(wire(make_response(bye, 200)))


# -- bodies ----------------------------------------------------------------------------------------

XML = b'<?xml version="1.0"?>\r\n<x-cisco-remotecc-request><bulkupdate/></x-cisco-remotecc-request>'
MULTIPART = (
    b"--uniqueBoundary\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Disposition: session;handling=required\r\n\r\n" + SDP_A + b"\r\n"
    b"--uniqueBoundary\r\n"
    b"Content-Type: application/x-cisco-remotecc-request+xml\r\n"
    b"Content-Disposition: session;handling=optional\r\n\r\n" + XML + b"\r\n"
    b"--uniqueBoundary--\r\n"
)


def test_multipart_sdp_rewritten_rest_byte_exact(env: Env) -> None:
    ctype = 'multipart/mixed;boundary="uniqueBoundary"'
    outs = env.feed("outside", client_invite(MULTIPART, ctype))
    b_inv = one(outs, "inside", "INVITE")
    assert b_inv.headers.get("content-type") == ctype
    assert b_inv.body == MULTIPART.replace(SDP_A, SDP_A + b"a=b2b:offer:outside\r\n")
    assert env.media.log[0][3] == SDP_A


def test_sdp_helpers() -> None:
    assert find_sdp("application/SDP; charset=x", b"v=0\r\n") == b"v=0\r\n"
    assert find_sdp("text/plain", b"v=0\r\n") is None
    assert (
        find_sdp("multipart/mixed;boundary=b", b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--") is None
    )
    body = (
        b"preamble\r\n--b\r\n\r\nno headers\r\n"
        b"--b\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--b--\r\nepi"
    )
    assert find_sdp("multipart/mixed; boundary=b", body) == b"v=0"
    assert replace_sdp("multipart/mixed; boundary=b", body, b"v=1") == body.replace(b"v=0", b"v=1")
    assert replace_sdp("text/plain", b"x", b"y") == b"x"


# -- memory ------------------------------------------------------------------------------------------


def test_thousand_calls_leave_an_empty_table(env: Env) -> None:
    for i in range(1000):
        a_side: Side = "outside" if i % 2 else "inside"
        call, _ = start(env, a_side)
        answer(env, call)
        if i % 3:
            outs = env.feed(a_side, a_request(call, "BYE"))
            bye = one(outs, other(a_side), "BYE")
            env.feed(other(a_side), call.peer.answer(bye, 200))
        else:
            outs = env.feed(other(a_side), call.peer.request("BYE"))
            bye = one(outs, a_side, "BYE")
            env.feed(a_side, wire(make_response(bye, 200)))
        env.now += 0.01
    assert env.b2b.status()["counts"]["ended"] == 1000
    env.tick(40)
    assert_empty(env.b2b)
    assert not env.b2b._heap or env.b2b.get_timer() is None
    assert env.b2b.counters.answered == 1000

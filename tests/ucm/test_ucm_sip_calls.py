"""The mock UCM SIP core (B2BUA + echo) with in-memory peers and a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edge.config import LabConfig
from edge.sip.message import Request, Response, make_response, parse_message
from media_relay.sdp import SessionDescription
from media_relay.srtp import Direction, SrtpContext
from mock_ucm.sip.calls import LocalNode
from mock_ucm.sip.core import UcmSipCore
from mock_ucm.sip.events import OutgoingRequest, OutgoingResponse, SipOutput, Target
from tests.ucm.conftest import T0
from tests.ucm.sip_helpers import (
    SDP_AVP,
    SDP_DTLS,
    SDP_SAVP,
    FakeEchoPorts,
    build,
    cancel_for,
    in_dialog,
    invite,
    mra_contact,
    register,
    reverse_in_dialog,
)

C = Target("tcp", "127.10.3.10", 5060)
A_FLOW, B_FLOW, C_FLOW = 1, 2, 3
A_CONTACT = "<sip:1001@127.10.3.10:5060;transport=tcp>"


@dataclass
class Env:
    core: UcmSipCore
    ports: FakeEchoPorts

    def feed(self, msg: Request | Response, flow: int, now: float = T0) -> list[SipOutput]:
        return self.core.receive_message(parse_message(bytes(msg)), flow, now)  # as over the wire


@pytest.fixture
def env(config: LabConfig) -> Env:
    node = config.ucm[0]
    ports = FakeEchoPorts()
    core = UcmSipCore(config, node, LocalNode(node.name, node.address, "example.com"), echo_ports=ports)
    return Env(core, ports)


def responses(outs: list[SipOutput], flow: int | None = None) -> list[Response]:
    return [o.response for o in outs if isinstance(o, OutgoingResponse) and (flow is None or o.flow == flow)]


def requests(outs: list[SipOutput]) -> list[OutgoingRequest]:
    return [o for o in outs if isinstance(o, OutgoingRequest)]


def register_bob(env: Env, *, path: str | None = None) -> None:
    extra = [("Path", path)] if path else []
    contact = mra_contact("1002", C.host, C.port, "CSFBOB")
    [resp] = responses(env.feed(register("1002", contact, extra=extra), B_FLOW))
    assert resp.status_code == 200


def start_call(env: Env, body: bytes = SDP_AVP) -> tuple[Request, OutgoingRequest]:
    a_inv = invite("1001", "1002", A_CONTACT, body=body)
    outs = env.feed(a_inv, A_FLOW)
    assert [r.status_code for r in responses(outs, A_FLOW)] == [100]
    [b_out] = requests(outs)
    return a_inv, b_out


def test_call_relays_invite_180_200_ack_bye(env: Env) -> None:
    register_bob(env)
    a_inv, b_out = start_call(env)
    b_inv = b_out.request
    assert b_out.target == C and b_out.key is not None
    # The new INVITE goes to the stored Contact URI, byte-exact, on a new dialog; SDP untouched.
    assert b_inv.uri == "sip:1002@127.10.3.10:5060;transport=tcp;orig-hostport=198.51.100.7:51000"
    assert b_inv.body == SDP_AVP and b_inv.call_id != a_inv.call_id
    assert b_inv.headers.get("x-cisco-test") == "passthrough"
    assert b_inv.from_.display_name == "Caller 1001" and b_inv.from_.uri.user == "1001"

    ringing = make_response(b_inv, 180, to_tag="bobtag")
    ringing.headers.add("Contact", "<sip:1002@127.10.3.10:5060;transport=tcp>")
    [a_180] = responses(env.feed(ringing, C_FLOW), A_FLOW)
    assert a_180.status_code == 180 and a_180.to_tag

    ok = make_response(b_inv, 200, to_tag="bobtag")
    ok.headers.add("Contact", "<sip:1002@127.10.3.10:5060;transport=tcp>")
    ok.headers.add("Content-Type", "application/sdp")
    ok.body = b"v=0\r\nanswer\r\n"
    [a_200] = responses(env.feed(ok, C_FLOW), A_FLOW)
    assert a_200.status_code == 200 and a_200.body == ok.body and a_200.to_tag == a_180.to_tag
    assert a_200.contacts and env.core.calls.active == 1

    [ack] = requests(env.feed(in_dialog("ACK", a_inv, a_200, 1), A_FLOW))
    assert ack.request.method == "ACK" and ack.key is None and ack.target == C
    assert ack.request.call_id == b_inv.call_id and ack.request.cseq.seq == b_inv.cseq.seq

    # BYE from the callee goes to the caller's Contact; the caller's 200 is relayed back.
    bye = reverse_in_dialog("BYE", b_inv, ok, 2)
    [a_bye] = requests(env.feed(bye, C_FLOW))
    assert a_bye.request.method == "BYE" and a_bye.request.call_id == a_inv.call_id
    assert a_bye.target == C and env.core.calls.active == 0
    [bye_ok] = responses(env.feed(make_response(a_bye.request, 200), A_FLOW), C_FLOW)
    assert bye_ok.status_code == 200 and bye_ok.call_id == bye.call_id


def test_reinvite_and_info_relayed_in_dialog(env: Env) -> None:
    register_bob(env)
    a_inv, b_out = start_call(env)
    ok = make_response(b_out.request, 200, to_tag="bobtag")
    ok.headers.add("Contact", "<sip:1002@127.10.3.10:5060;transport=tcp>")
    [a_200] = responses(env.feed(ok, C_FLOW), A_FLOW)
    env.feed(in_dialog("ACK", a_inv, a_200, 1), A_FLOW)

    reinv = in_dialog("INVITE", a_inv, a_200, 2, body=b"v=0\r\nhold\r\n")
    [b_re] = requests(env.feed(reinv, A_FLOW))
    assert b_re.request.method == "INVITE" and b_re.request.body == b"v=0\r\nhold\r\n"
    assert b_re.request.to_tag == "bobtag" and b_re.request.cseq.seq == b_out.request.cseq.seq + 1
    re_ok = make_response(b_re.request, 200)
    re_ok.headers.add("Contact", "<sip:1002@127.10.3.10:5060;transport=tcp>")
    [a_re_ok] = [r for r in responses(env.feed(re_ok, C_FLOW), A_FLOW) if r.status_code == 200]
    assert a_re_ok.cseq.seq == 2
    [b_ack] = requests(env.feed(in_dialog("ACK", reinv, a_re_ok, 2), A_FLOW))
    assert b_ack.request.cseq.seq == b_re.request.cseq.seq

    info = in_dialog("INFO", a_inv, a_200, 3)
    [b_info] = requests(env.feed(info, A_FLOW))
    [info_ok] = responses(env.feed(make_response(b_info.request, 200), C_FLOW), A_FLOW)
    assert info_ok.status_code == 200 and info_ok.cseq.method == "INFO"


def test_cancel_before_answer_gives_487(env: Env) -> None:
    register_bob(env)
    a_inv, b_out = start_call(env)
    outs = env.feed(cancel_for(a_inv), A_FLOW)
    codes = sorted((r.cseq.method, r.status_code) for r in responses(outs, A_FLOW))
    assert codes == [("CANCEL", 200), ("INVITE", 487)]
    [b_cancel] = requests(outs)
    assert b_cancel.request.method == "CANCEL" and b_cancel.request.top_via == b_out.request.top_via
    # The callee's 487 is ACKed by the client transaction and ends the call.
    [ack] = requests(env.feed(make_response(b_out.request, 487, to_tag="bobtag"), C_FLOW))
    assert ack.request.method == "ACK" and ack.target == C
    assert env.core.calls.active == 0 and env.core.calls.counters.cancelled == 1


def test_answer_crossing_cancel_is_acked_and_hung_up(env: Env) -> None:
    register_bob(env)
    a_inv, b_out = start_call(env)
    env.feed(cancel_for(a_inv), A_FLOW)
    ok = make_response(b_out.request, 200, to_tag="bobtag")
    ok.headers.add("Contact", "<sip:1002@127.10.3.10:5060;transport=tcp>")
    outs = env.feed(ok, C_FLOW)
    assert [o.request.method for o in requests(outs)] == ["ACK", "BYE"]
    assert responses(outs, A_FLOW) == []


@pytest.mark.parametrize(("dialled", "status"), [("7777", 404), ("1002", 480)])
def test_unknown_and_unregistered(env: Env, dialled: str, status: int) -> None:
    outs = env.feed(invite("1001", dialled, A_CONTACT), A_FLOW)
    assert [r.status_code for r in responses(outs, A_FLOW)] == [100, status]
    assert requests(outs) == [] and env.core.calls.active == 0


def test_callee_timeout_gives_408(env: Env) -> None:
    register_bob(env)
    start_call(env)
    deadline = env.core.get_timer()
    assert deadline is not None and deadline == pytest.approx(T0 + 32)
    [r] = responses(env.core.handle_timer(T0 + 32), A_FLOW)
    assert r.status_code == 408


def test_transport_error_gives_503(env: Env) -> None:
    register_bob(env)
    _, b_out = start_call(env)
    assert b_out.key is not None
    [r] = responses(env.core.transport_error(b_out.key, T0), A_FLOW)
    assert r.status_code == 503


def test_callee_rejection_relayed(env: Env) -> None:
    register_bob(env)
    _, b_out = start_call(env)
    outs = env.feed(make_response(b_out.request, 486, to_tag="x"), C_FLOW)
    assert [r.status_code for r in responses(outs, A_FLOW)] == [486]
    assert [o.request.method for o in requests(outs)] == ["ACK"]


def test_path_mode_routes_via_path(env: Env) -> None:
    path = "<sip:127.10.3.10:5070;transport=tcp;lr>"
    register_bob(env, path=path)
    _, b_out = start_call(env)
    assert b_out.target == Target("tcp", "127.10.3.10", 5070)
    assert b_out.request.headers.get_all("route") == [path]


def test_echo_plain_rtp_answer_and_bye_closes_socket(env: Env) -> None:
    a_inv = invite("1001", "9999", A_CONTACT)
    outs = env.feed(a_inv, A_FLOW)
    ok = responses(outs, A_FLOW)[-1]
    assert ok.status_code == 200 and ok.headers.get("content-type") == "application/sdp"
    sdp = SessionDescription.parse(ok.body)
    [port] = env.ports.open_sessions
    assert sdp.media[0].port == port and sdp.media[0].proto == "RTP/AVP"
    assert sdp.media[0].formats == ["0", "101"] and sdp.connection is not None
    assert sdp.connection.address == env.core.local.host
    session = env.ports.open_sessions[port]
    rtp = bytes([0x80, 0x00]) + b"\x00\x01" + b"\x00" * 8 + b"payload"
    assert session.receive_datagram(rtp) == rtp
    [bye_ok] = responses(env.feed(in_dialog("BYE", a_inv, ok, 2), A_FLOW), A_FLOW)
    assert bye_ok.status_code == 200
    assert env.ports.closed == [port] and env.core.calls.echo_packets == 1


def test_echo_srtp_answered_with_own_crypto_and_video_refused(env: Env) -> None:
    ok = responses(env.feed(invite("1001", "9999", A_CONTACT, body=SDP_SAVP), A_FLOW), A_FLOW)[-1]
    assert ok.status_code == 200
    sdp = SessionDescription.parse(ok.body)
    audio, video = sdp.media
    assert audio.proto == "RTP/SAVP" and len(audio.crypto) == 1
    assert audio.crypto[0].suite == "AES_CM_128_HMAC_SHA1_80" and audio.crypto[0].tag == 1
    assert video.port == 0


def test_echo_refuses_dtls_with_488(env: Env) -> None:
    outs = env.feed(invite("1001", "9999", A_CONTACT, body=SDP_DTLS), A_FLOW)
    assert responses(outs, A_FLOW)[-1].status_code == 488 and env.ports.open_sessions == {}


def test_echo_delayed_offer_gets_an_offer(env: Env) -> None:
    ok = responses(env.feed(invite("1001", "9999", A_CONTACT, body=b""), A_FLOW), A_FLOW)[-1]
    assert ok.status_code == 200 and SessionDescription.parse(ok.body).media[0].formats == ["0", "8", "101"]


def test_options_and_unknown_in_dialog(env: Env) -> None:
    opt = build("OPTIONS", "sip:127.10.3.20:5060", from_="<sip:expc>;tag=1", to="<sip:127.10.3.20>")
    [r] = responses(env.feed(opt, C_FLOW))
    assert r.status_code == 200 and "INVITE" in (r.headers.get("allow") or "")
    bye = build("BYE", "sip:x@127.10.3.20", from_="<sip:a>;tag=1", to="<sip:b>;tag=nope")
    [r] = responses(env.feed(bye, C_FLOW))
    assert r.status_code == 481
    msg = build("PUBLISH", "sip:1002@example.com", from_="<sip:a>;tag=1", to="<sip:b>")
    [r] = responses(env.feed(msg, C_FLOW))
    assert r.status_code == 405


def test_ucm_pings_a_binding_at_its_contact(env: Env) -> None:
    register_bob(env)
    [binding] = env.core.registrar.bindings_for("bob")
    [out] = requests(env.core.request_binding(binding, "OPTIONS", T0))
    assert out.target == C and out.request.uri == binding.uri
    env.feed(make_response(out.request, 200), C_FLOW)
    assert env.core.counters.own_answered == 1


def test_registration_expiry_through_core_timer(env: Env) -> None:
    register_bob(env)
    assert env.core.get_timer() == T0 + 120
    env.core.handle_timer(T0 + 120)
    assert env.core.registrar.registered == 0
    outs = env.feed(invite("1001", "1002", A_CONTACT), A_FLOW, T0 + 121)
    assert responses(outs, A_FLOW)[-1].status_code == 480


def test_echo_srtp_round_trip_reprotects_with_answer_key(env: Env) -> None:
    ok = responses(env.feed(invite("1001", "9999", A_CONTACT, body=SDP_SAVP), A_FLOW), A_FLOW)[-1]
    answer_crypto = SessionDescription.parse(ok.body).media[0].crypto[0]
    offer_crypto = SessionDescription.parse(SDP_SAVP).media[0].crypto[0]
    [session] = env.ports.open_sessions.values()
    client_tx = SrtpContext.from_crypto(offer_crypto, Direction.OUTBOUND)
    client_rx = SrtpContext.from_crypto(answer_crypto, Direction.INBOUND)
    rtp = bytes([0x80, 0x00, 0, 1]) + b"\x00\x00\x00\xa0" + b"\x12\x34\x56\x78" + bytes(range(160))
    echoed = session.receive_datagram(client_tx.protect(rtp))
    assert echoed is not None and client_rx.unprotect(echoed) == rtp
    assert session.receive_datagram(b"\x80\x00garbage-not-srtp") is None and session.dropped == 1

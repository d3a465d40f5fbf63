"""RFC 3261 §17 transaction machines and the transaction table, driven by a fake clock."""

from __future__ import annotations

import pytest

from edge.sip import Request, Response, make_response, parse_message
from edge.sip.events import (
    RequestReceived,
    RequestToSend,
    ResponseReceived,
    ResponseToSend,
    TransactionEvent,
    TransactionKey,
    TransactionTerminated,
    TransactionTimedOut,
    TransportErrorOccurred,
)
from edge.sip.transaction import (
    INVITE_CLIENT,
    INVITE_SERVER,
    NON_INVITE_CLIENT,
    NON_INVITE_SERVER,
    InviteClientTransaction,
    InviteServerTransaction,
    NonInviteClientTransaction,
    NonInviteServerTransaction,
    State,
    TimerConfig,
    TransactionStateError,
    client_key,
    server_key,
)
from edge.sip.transaction_layer import TransactionLayer

T = TimerConfig()


def request(method: str = "INVITE", branch: str = "z9hG4bKabc", host: str = "192.0.2.1:5060") -> Request:
    data = (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host};branch={branch}\r\n"
        "Route: <sip:proxy.example.com;lr>\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>\r\n"
        "Call-ID: txn-1\r\n"
        f"CSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    m = parse_message(data)
    assert isinstance(m, Request)
    return m


def resp(req: Request, code: int, tag: str = "b1") -> Response:
    return make_response(req, code, to_tag=tag)


AnyTxn = (
    InviteClientTransaction
    | NonInviteClientTransaction
    | InviteServerTransaction
    | NonInviteServerTransaction
)


def run_timers(txn: AnyTxn, until: float = 1e9) -> list[tuple[float, TransactionEvent]]:
    out: list[tuple[float, TransactionEvent]] = []
    for _ in range(1000):
        t = txn.get_timer()
        if t is None or t > until:
            break
        out += [(t, e) for e in txn.handle_timer(t)]
    return out


def retransmit_times(log: list[tuple[float, TransactionEvent]]) -> list[float]:
    return [t for t, e in log if isinstance(e, RequestToSend | ResponseToSend) and e.retransmission]


def test_state_tables_are_closed() -> None:
    for table in (INVITE_CLIENT, NON_INVITE_CLIENT, INVITE_SERVER, NON_INVITE_SERVER):
        for targets in table.values():
            assert targets <= set(table)
        assert table[State.TERMINATED] == frozenset()


def test_invite_client_timer_a_doubles_and_timer_b_times_out() -> None:
    req = request()
    txn = InviteClientTransaction(client_key(req), req, reliable=False, timers=T)
    assert txn.start(0.0) == [RequestToSend(txn.key, req)]
    log = run_timers(txn)
    assert retransmit_times(log) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert [e for _, e in log[-2:]] == [TransactionTimedOut(txn.key, "B"), TransactionTerminated(txn.key)]
    assert log[-1][0] == 32.0 and txn.terminated


def test_invite_client_non_2xx_acks_and_absorbs_retransmits() -> None:
    req = request()
    txn = InviteClientTransaction(client_key(req), req, reliable=False, timers=T)
    txn.start(0.0)
    ringing = resp(req, 180)
    assert txn.receive_response(ringing, 0.2) == [ResponseReceived(txn.key, ringing)]
    assert txn.state is State.PROCEEDING and txn.get_timer() is None  # A and B stopped
    busy = resp(req, 486)
    ev = txn.receive_response(busy, 1.0)
    ack = ev[0]
    assert isinstance(ack, RequestToSend) and ev[1] == ResponseReceived(txn.key, busy)
    a = ack.request
    assert (a.method, a.uri, a.cseq.seq, a.cseq.method) == ("ACK", req.uri, 1, "ACK")
    assert a.to_tag == "b1" and a.top_via is not None and a.top_via.branch == "z9hG4bKabc"
    assert a.headers.get("Route") == "<sip:proxy.example.com;lr>" and len(a.vias) == 1
    again = txn.receive_response(busy, 2.0)
    assert len(again) == 1 and isinstance(again[0], RequestToSend) and again[0].retransmission
    assert txn.get_timer() == 33.0  # Timer D = 32 s
    assert [e for _, e in run_timers(txn)] == [TransactionTerminated(txn.key)]


def test_invite_client_reliable_has_no_timer_a_and_no_timer_d() -> None:
    req = request()
    txn = InviteClientTransaction(client_key(req), req, reliable=True, timers=T)
    txn.start(0.0)
    assert txn.get_timer() == 32.0  # only B
    ev = txn.receive_response(resp(req, 503), 1.0)
    assert isinstance(ev[0], RequestToSend) and ev[-1] == TransactionTerminated(txn.key)


def test_invite_client_2xx_accepted_then_timer_m() -> None:
    req = request()
    txn = InviteClientTransaction(client_key(req), req, reliable=False, timers=T)
    txn.start(0.0)
    ok = resp(req, 200)
    assert txn.receive_response(ok, 1.0) == [ResponseReceived(txn.key, ok)]
    assert txn.state is State.ACCEPTED
    ok2 = resp(req, 200, tag="fork2")
    assert txn.receive_response(ok2, 2.0) == [ResponseReceived(txn.key, ok2)]  # RFC 6026: forked 2xx pass up
    assert run_timers(txn) == [(33.0, TransactionTerminated(txn.key))]


def test_invite_client_timer_c_optional() -> None:
    req = request()
    txn = InviteClientTransaction(client_key(req), req, reliable=True, timers=TimerConfig(timer_c_s=180.0))
    txn.start(0.0)
    txn.receive_response(resp(req, 180), 1.0)
    assert run_timers(txn) == [(181.0, TransactionTimedOut(txn.key, "C"))]
    assert txn.state is State.PROCEEDING


def test_non_invite_client_timer_e_caps_at_t2_and_timer_f() -> None:
    req = request("OPTIONS")
    txn = NonInviteClientTransaction(client_key(req), req, reliable=False, timers=T)
    txn.start(0.0)
    log = run_timers(txn)
    assert retransmit_times(log) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert [e for _, e in log[-2:]] == [TransactionTimedOut(txn.key, "F"), TransactionTerminated(txn.key)]


def test_non_invite_client_proceeding_uses_t2_then_timer_k() -> None:
    req = request("REGISTER")
    txn = NonInviteClientTransaction(client_key(req), req, reliable=False, timers=T)
    txn.start(0.0)
    txn.receive_response(resp(req, 100), 0.1)
    log = run_timers(txn, until=9.0)
    assert retransmit_times(log) == [0.5, 4.5, 8.5]
    ok = resp(req, 200)
    assert txn.receive_response(ok, 9.0) == [ResponseReceived(txn.key, ok)]
    assert txn.receive_response(ok, 9.5) == []  # absorbed in Completed
    assert run_timers(txn) == [(14.0, TransactionTerminated(txn.key))]  # K = T4


def test_non_invite_client_reliable() -> None:
    req = request("BYE")
    txn = NonInviteClientTransaction(client_key(req), req, reliable=True, timers=T)
    txn.start(0.0)
    assert txn.get_timer() == 32.0
    ok = resp(req, 200)
    assert txn.receive_response(ok, 1.0) == [ResponseReceived(txn.key, ok), TransactionTerminated(txn.key)]


def test_invite_server_timer_g_and_h() -> None:
    req = request()
    txn = InviteServerTransaction(server_key(req), req, reliable=False, timers=T)
    ev = txn.start(0.0)
    assert ev[0] == RequestReceived(txn.key, req)
    assert isinstance(ev[1], ResponseToSend) and ev[1].response.status_code == 100
    again = txn.receive_request(req, 0.3)
    assert isinstance(again[0], ResponseToSend) and again[0].response.status_code == 100
    final = resp(req, 486)
    txn.send_response(final, 1.0)
    assert txn.state is State.COMPLETED
    rq = txn.receive_request(req, 1.2)
    assert isinstance(rq[0], ResponseToSend) and rq[0].response is final
    log = run_timers(txn)
    assert retransmit_times(log) == [1.5, 2.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5, 32.5]
    assert [e for _, e in log[-2:]] == [TransactionTimedOut(txn.key, "H"), TransactionTerminated(txn.key)]


def test_invite_server_ack_confirms_then_timer_i() -> None:
    req = request()
    txn = InviteServerTransaction(server_key(req), req, reliable=False, timers=T)
    txn.start(0.0, send_100_trying=False)
    txn.send_response(resp(req, 404), 0.0)
    assert txn.receive_request(request("ACK"), 0.7) == []
    assert txn.state is State.CONFIRMED
    assert txn.receive_request(request("ACK"), 0.8) == []  # absorbed
    assert run_timers(txn) == [(5.7, TransactionTerminated(txn.key))]


def test_invite_server_reliable_and_2xx() -> None:
    req = request()
    txn = InviteServerTransaction(server_key(req), req, reliable=True, timers=T)
    txn.start(0.0)
    txn.send_response(resp(req, 480), 0.0)
    assert txn.get_timer() == 32.0  # H only, no G
    assert txn.receive_request(request("ACK"), 1.0) == [TransactionTerminated(txn.key)]
    txn2 = InviteServerTransaction(server_key(req), req, reliable=False, timers=T)
    txn2.start(0.0)
    ok = resp(req, 200)
    txn2.send_response(ok, 1.0)
    assert txn2.state is State.ACCEPTED
    assert txn2.receive_request(req, 1.5) == []  # retransmitted INVITE absorbed
    assert txn2.send_response(ok, 2.0) == [ResponseToSend(txn2.key, ok, retransmission=True)]
    assert run_timers(txn2) == [(33.0, TransactionTerminated(txn2.key))]  # Timer L
    with pytest.raises(TransactionStateError):
        txn2.send_response(resp(req, 500), 40.0)


def test_non_invite_server() -> None:
    req = request("OPTIONS")
    txn = NonInviteServerTransaction(server_key(req), req, reliable=False, timers=T)
    assert txn.start(0.0) == [RequestReceived(txn.key, req)]
    assert txn.receive_request(req, 0.1) == []  # Trying: discard
    prov = resp(req, 183)
    txn.send_response(prov, 0.2)
    assert txn.receive_request(req, 0.3) == [ResponseToSend(txn.key, prov, retransmission=True)]
    ok = resp(req, 200)
    txn.send_response(ok, 0.4)
    assert txn.receive_request(req, 0.5) == [ResponseToSend(txn.key, ok, retransmission=True)]
    assert run_timers(txn) == [(32.4, TransactionTerminated(txn.key))]  # Timer J
    rel = NonInviteServerTransaction(server_key(req), req, reliable=True, timers=T)
    rel.start(0.0)
    assert rel.send_response(ok, 0.0) == [ResponseToSend(rel.key, ok), TransactionTerminated(rel.key)]
    with pytest.raises(TransactionStateError):
        rel.send_response(ok, 1.0)


def test_transport_error() -> None:
    req = request("OPTIONS")
    txn = NonInviteClientTransaction(client_key(req), req, reliable=True, timers=T)
    txn.start(0.0)
    assert txn.transport_error(0.1) == [TransportErrorOccurred(txn.key), TransactionTerminated(txn.key)]


# -- the table ------------------------------------------------------------------------------


def test_layer_client_matching_and_stray_responses() -> None:
    layer = TransactionLayer()
    req = request("OPTIONS", branch="z9hG4bKc1")
    (sent,) = layer.send_request(req, 0.0, reliable=False)
    assert isinstance(sent, RequestToSend)
    ok = resp(req, 200)
    assert layer.receive_response(ok, 0.1) == [ResponseReceived(sent.key, ok)]
    stray = resp(request("OPTIONS", branch="z9hG4bKother"), 200)
    assert layer.receive_response(stray, 0.2) == [ResponseReceived(None, stray)]
    assert layer.get_timer() == 5.1  # Timer K
    assert layer.handle_timer(5.1) == [TransactionTerminated(sent.key)]
    assert len(layer) == 0 and layer.get_timer() is None


def test_layer_server_matching_ack_cancel_and_sent_by() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", branch="z9hG4bKs1")
    ev = layer.receive_request(inv, 0.0, reliable=False)
    key = TransactionKey("z9hG4bKs1", "192.0.2.1:5060", "INVITE")
    assert ev[0] == RequestReceived(key, inv) and isinstance(ev[1], ResponseToSend)
    assert isinstance(layer.receive_request(inv, 0.1, reliable=False)[0], ResponseToSend)  # 100 again
    cancel = request("CANCEL", branch="z9hG4bKs1")
    (cev,) = layer.receive_request(cancel, 0.2, reliable=False)
    assert isinstance(cev, RequestReceived) and cev.cancelled == key
    layer.send_response(make_response(cancel, 200), 0.2)
    layer.send_response(resp(inv, 487), 0.3)
    assert layer.receive_request(request("ACK", branch="z9hG4bKs1"), 0.4, reliable=False) == []
    assert layer.servers[key].state is State.CONFIRMED
    ack2xx = request("ACK", branch="z9hG4bKnew")
    assert layer.receive_request(ack2xx, 0.5, reliable=False) == [RequestReceived(None, ack2xx)]
    other = request("INVITE", branch="z9hG4bKs1", host="192.0.2.99:5060")  # same branch, other sent-by
    assert isinstance(layer.receive_request(other, 0.6, reliable=False)[0], RequestReceived)
    assert len(layer.servers) == 3


def test_layer_multiplexes_timers() -> None:
    layer = TransactionLayer(send_100_trying=False)
    a = request("OPTIONS", branch="z9hG4bKa")
    b = request("OPTIONS", branch="z9hG4bKb")
    layer.send_request(a, 0.0, reliable=False)
    layer.send_request(b, 0.2, reliable=True)
    assert layer.get_timer() == 0.5
    seen: list[tuple[float, TransactionEvent]] = []
    for _ in range(100):
        t = layer.get_timer()
        if t is None:
            break
        seen += [(t, e) for e in layer.handle_timer(t)]
    timeouts = [(t, e.key.branch) for t, e in seen if isinstance(e, TransactionTimedOut)]
    assert timeouts == [(32.0, "z9hG4bKa"), (32.2, "z9hG4bKb")]
    assert len(layer) == 0
    with pytest.raises(ValueError):
        layer.send_request(request("ACK"), 0.0, reliable=True)

"""Call control of the mock Unified CM: a B2BUA (RFC 3261 §6 "back-to-back user agent").

Leg A is the caller's dialog (we are its UAS), leg B the callee's (we are its UAC), with its own
Call-ID, tags and CSeq space. Provisional and final responses to the INVITE are relayed A ← B;
ACK, BYE, re-INVITE, UPDATE, INFO, REFER, NOTIFY, SUBSCRIBE and MESSAGE in a dialog are relayed
to the other leg and their answers relayed back. SDP and other bodies pass through untouched
(Expressway-C does media, spec §7), as do headers that carry no dialog or hop state (spec §5).

The echo number (spec §9) is answered here with an SDP pointing at an echo socket that the
adapter opens through the `EchoPorts` interface. Sans-IO: messages go out through `SipIo`.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from edge.sip.address import NameAddr, Via
from edge.sip.dialog import TARGET_REFRESH, Dialog
from edge.sip.errors import SipParseError
from edge.sip.events import TransactionKey
from edge.sip.headers import Headers, Params
from edge.sip.message import Request, Response, make_response, new_branch, new_call_id, new_tag
from edge.sip.uri import Uri
from mock_ucm.sip.echo import EchoNotAcceptable, EchoSession, plan_echo
from mock_ucm.sip.events import Target
from mock_ucm.sip.registrar import Registrar

log = logging.getLogger(__name__)

SDP = "application/sdp"
# Headers that describe this hop, this dialog or this transaction: rebuilt per leg, never copied.
_LEG_HEADERS = frozenset(
    {
        "via", "route", "record-route", "from", "to", "call-id", "cseq", "contact", "max-forwards",
        "content-length", "authorization", "proxy-authorization", "www-authenticate",
        "proxy-authenticate", "path", "server", "user-agent",
    }
)  # fmt: skip


class CallState(Enum):
    PROCEEDING = "proceeding"  # INVITE sent to the callee, nothing relayed back yet
    EARLY = "early"  # a provisional response relayed
    CONFIRMED = "confirmed"  # 2xx relayed (or the echo answered)
    CANCELLING = "cancelling"  # the caller cancelled; waiting for the callee's final answer
    TERMINATED = "terminated"


CALL_TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.PROCEEDING: frozenset(
        {CallState.EARLY, CallState.CONFIRMED, CallState.CANCELLING, CallState.TERMINATED}
    ),
    CallState.EARLY: frozenset({CallState.CONFIRMED, CallState.CANCELLING, CallState.TERMINATED}),
    CallState.CONFIRMED: frozenset({CallState.TERMINATED}),
    CallState.CANCELLING: frozenset({CallState.TERMINATED}),
    CallState.TERMINATED: frozenset(),
}


class SipIo(Protocol):
    """What call control needs from the layer below (the core's transaction layer)."""

    def send_request(self, request: Request, target: Target, now: float) -> TransactionKey: ...

    def send_ack(self, request: Request, target: Target) -> None: ...

    def respond(self, key: TransactionKey, response: Response, now: float) -> None: ...


class EchoPorts(Protocol):
    """Opens a UDP echo socket for a session on the node's address; returns its port."""

    def open(self, session: EchoSession) -> int: ...

    def close(self, session: EchoSession) -> None: ...


@dataclass
class LocalNode:
    """This UCM node as it appears in Via and Contact (ports known once the listeners bind)."""

    name: str
    host: str
    domain: str
    tcp_port: int = 5060
    tls_port: int = 5061

    def port_for(self, transport: str) -> int:
        return self.tls_port if transport == "tls" else self.tcp_port

    def via(self, transport: str) -> Via:
        params = Params([("branch", new_branch())])
        return Via(self.host, self.port_for(transport), transport.upper(), params)

    def contact(self, user: str, transport: str) -> str:
        return f"<sip:{user}@{self.host}:{self.port_for(transport)};transport={transport}>"


@dataclass
class Leg:
    invite: Request  # A: the INVITE received; B: the INVITE sent
    key: TransactionKey  # its server (A) or client (B) transaction
    tag: str  # our tag on this leg
    transport: str
    contact: str  # our Contact towards this leg
    target: Target | None = None
    dialog: Dialog | None = None
    pending_ack: bool = False  # a 2xx to an INVITE on this leg awaits the ACK relayed from the other


@dataclass
class Call:
    id: int
    a: Leg
    b: Leg | None = None
    echo: EchoSession | None = None
    state: CallState = CallState.PROCEEDING

    def goto(self, new: CallState) -> None:
        if new is not self.state and new not in CALL_TRANSITIONS[self.state]:
            raise ValueError(f"call {self.id}: {self.state.name} -> {new.name}")
        self.state = new

    def leg(self, side: str) -> Leg | None:
        return self.a if side == "a" else self.b

    @property
    def live(self) -> bool:
        return self.state is not CallState.TERMINATED


@dataclass
class _Relay:
    """An in-dialog request relayed to the other leg, waiting for its answer."""

    call: Call
    server_key: TransactionKey
    incoming: Request
    outgoing: Request
    to_side: str


@dataclass
class CallCounters:
    attempts: int = 0
    answered: int = 0
    failed: int = 0
    cancelled: int = 0
    echo_calls: int = 0
    echo_packets_closed: int = 0  # packets echoed by calls that have ended


@dataclass
class CallControl:
    registrar: Registrar
    local: LocalNode
    io: SipIo
    echo_ports: EchoPorts
    echo_number: str = "9999"
    counters: CallCounters = field(default_factory=CallCounters)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._calls: dict[int, Call] = {}
        self._by_a_invite: dict[TransactionKey, Call] = {}
        self._by_b_invite: dict[TransactionKey, Call] = {}
        self._by_dialog: dict[tuple[str, str], tuple[Call, str]] = {}  # (Call-ID, our tag) -> side
        self._relays: dict[TransactionKey, _Relay] = {}

    # -- views -----------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._calls)

    def calls(self) -> list[Call]:
        return list(self._calls.values())

    @property
    def echo_packets(self) -> int:
        live = sum(c.echo.packets for c in self._calls.values() if c.echo is not None)
        return self.counters.echo_packets_closed + live

    # -- new calls -------------------------------------------------------------------------
    def handle_invite(self, key: TransactionKey, invite: Request, now: float) -> None:
        self.counters.attempts += 1
        via = invite.top_via
        transport = "tls" if via is not None and via.transport == "TLS" else "tcp"
        dialled = (invite.request_uri.user or "").split(";", 1)[0]
        leg = Leg(invite, key, new_tag(), transport, self.local.contact(dialled, transport))
        call = Call(next(self._ids), leg)
        if invite.max_forwards == 0:
            self._fail(call, 483, now)
        elif dialled == self.echo_number:
            self._answer_echo(call, now)
        elif (callee := self.registrar.find_user(dialled)) is None:
            self._fail(call, 404, now)
        elif not (bindings := self.registrar.bindings_for(callee)):
            self._fail(call, 480, now)
        else:
            self._calls[call.id] = call
            self._by_a_invite[key] = call
            self._call_binding(call, bindings[0].uri, bindings[0].paths, now)

    def _call_binding(self, call: Call, uri: str, paths: tuple[str, ...], now: float) -> None:
        a = call.a.invite
        try:
            hop = NameAddr.parse(paths[0]).uri if paths else Uri.parse(uri)
            target = Target.from_uri(hop)
        except SipParseError:
            self._fail(call, 480, now)
            return
        caller = a.from_.copy()
        caller_user = caller.uri.user or "anonymous"
        caller.uri = Uri("sip", caller_user, host=self.local.host)
        caller.params = Params([("tag", new_tag())])
        callee_uri = Uri.parse(uri)
        h = Headers()
        h.add("Via", str(self.local.via(target.transport)))
        h.add("Max-Forwards", str(max(0, (a.max_forwards or 70) - 1)))
        for p in paths:  # RFC 3327 §5.3: the registered Path becomes a preloaded Route
            h.add("Route", p)
        h.add("From", str(caller))
        h.add("To", f"<sip:{callee_uri.user or ''}@{self.local.domain}>")
        h.add("Call-ID", new_call_id(self.local.host))
        h.add("CSeq", "101 INVITE")
        contact = self.local.contact(caller_user, target.transport)
        h.add("Contact", contact)
        _copy_end_to_end(a.headers, h)
        b_invite = Request("INVITE", uri, h, a.body)
        b_tag = caller.params.get("tag") or ""
        key = self.io.send_request(b_invite, target, now)
        call.b = Leg(b_invite, key, b_tag, target.transport, contact, target)
        self._by_b_invite[key] = call

    def _answer_echo(self, call: Call, now: float) -> None:
        try:
            plan = plan_echo(call.a.invite.body)
        except EchoNotAcceptable as exc:
            log.info("echo call %s: 488 (%s)", call.id, exc)
            self._fail(call, 488, now)
            return
        session = plan.session()
        port = self.echo_ports.open(session)
        call.echo = session
        self.counters.echo_calls += 1
        self.counters.answered += 1
        self._calls[call.id] = call
        self._by_a_invite[call.a.key] = call
        resp = self._reply(call.a, 200, now, body=plan.render(self.local.host, port), content_type=SDP)
        self._open_a_dialog(call, resp)
        call.goto(CallState.CONFIRMED)

    def _fail(self, call: Call, status: int, now: float) -> None:
        self.counters.failed += 1
        self._reply(call.a, status, now, contact=False)
        self._finish(call)

    # -- CANCEL and ACK --------------------------------------------------------------------
    def handle_cancel(self, invite_key: TransactionKey, now: float) -> None:
        call = self._by_a_invite.get(invite_key)
        if call is None or call.state not in (CallState.PROCEEDING, CallState.EARLY) or call.b is None:
            return  # already answered: the CANCEL has no effect (RFC 3261 §9.2)
        self.counters.cancelled += 1
        assert call.b.target is not None
        self.io.send_request(make_cancel(call.b.invite), call.b.target, now)
        self._reply(call.a, 487, now, contact=False)
        call.goto(CallState.CANCELLING)

    def handle_ack(self, ack: Request, now: float) -> None:
        found = self._by_dialog.get((ack.call_id or "", ack.to_tag or ""))
        if found is None:
            return
        call, side = found
        other = call.b if side == "a" else call.a
        if other is None or other.dialog is None or not other.pending_ack:
            return
        other.pending_ack = False
        self._send_in_dialog(other, "ACK", ack, now)

    # -- responses from the callee leg -----------------------------------------------------
    def handle_response(self, key: TransactionKey, response: Response, now: float) -> None:
        if (call := self._by_b_invite.get(key)) is not None:
            self._on_invite_response(call, response, now)
        elif (relay := self._relays.get(key)) is not None:
            self._on_relay_response(key, relay, response, now)

    def handle_failure(self, key: TransactionKey, status: int, now: float) -> None:
        """Timer B/F (408) or a transport error (503) on one of our client transactions."""
        if (call := self._by_b_invite.pop(key, None)) is not None:
            if call.state in (CallState.PROCEEDING, CallState.EARLY):
                self._fail(call, status, now)
            else:
                self._finish(call)
        elif (relay := self._relays.pop(key, None)) is not None:
            # A BYE the far end never answered still ends the call for the sender.
            code = 200 if relay.incoming.method == "BYE" else status
            self.io.respond(relay.server_key, make_response(relay.incoming, code), now)

    def _on_invite_response(self, call: Call, resp: Response, now: float) -> None:
        b = call.b
        assert b is not None
        code = resp.status_code
        if code == 100:
            return
        if call.state is CallState.CANCELLING:
            if 200 <= code < 300:  # the answer crossed the CANCEL: ACK it, then hang up (§15)
                self._ack_and_bye(b, resp, now)
            if code >= 200:
                self._finish(call)
            return
        if code >= 300:
            self.counters.failed += 1
            self._reply(call.a, code, now, resp.reason, body=resp.body, source=resp, contact=False)
            self._finish(call)
            return
        if resp.to_tag and resp.contacts:
            b.dialog = Dialog.from_uac(b.invite, resp)
            self._by_dialog[(b.dialog.call_id, b.tag)] = (call, "b")
        out = self._reply(call.a, code, now, resp.reason, body=resp.body, source=resp)
        self._open_a_dialog(call, out)
        if code < 200:
            call.goto(CallState.EARLY)
            return
        if b.dialog is None:  # a 2xx without Contact: nothing to ACK towards
            log.warning("call %s: 2xx without Contact from the callee", call.id)
        b.pending_ack = True
        self.counters.answered += 1
        call.goto(CallState.CONFIRMED)

    def _on_relay_response(self, key: TransactionKey, relay: _Relay, resp: Response, now: float) -> None:
        code = resp.status_code
        if code == 100:
            return
        leg = relay.call.leg(relay.to_side)
        if leg is not None and leg.dialog is not None:
            leg.dialog.receive_response(relay.outgoing, resp)
        back = relay.call.a if relay.to_side == "b" else relay.call.b
        out = make_response(relay.incoming, code, resp.reason)
        method = relay.incoming.method
        if back is not None and method in TARGET_REFRESH and code < 300:
            out.headers.add("Contact", back.contact)
        _copy_end_to_end(resp.headers, out.headers)
        out.body = resp.body
        self.io.respond(relay.server_key, out, now)
        if code >= 200:
            self._relays.pop(key, None)
            if method == "INVITE" and code < 300 and leg is not None:
                leg.pending_ack = True

    # -- in-dialog requests ----------------------------------------------------------------
    def handle_in_dialog(self, key: TransactionKey, request: Request, now: float) -> bool:
        """Relay a request in one of our dialogs; False if it matches none (caller answers 481)."""
        found = self._by_dialog.get((request.call_id or "", request.to_tag or ""))
        if found is None:
            return False
        call, side = found
        leg = call.leg(side)
        if leg is None or leg.dialog is None:
            return False
        error = leg.dialog.receive_request(request)
        if error is not None:
            self.io.respond(key, make_response(request, error), now)
            return True
        if call.echo is not None:
            self._echo_in_dialog(call, key, request, now)
            return True
        other = call.b if side == "a" else call.a
        if other is None or other.dialog is None:
            self.io.respond(key, make_response(request, 481), now)
            return True
        sent, out_key = self._send_in_dialog(other, request.method, request, now)
        if out_key is not None:
            self._relays[out_key] = _Relay(call, key, request, sent, "b" if side == "a" else "a")
        if request.method == "BYE":
            self._finish(call)
        return True

    def _send_in_dialog(
        self, leg: Leg, method: str, incoming: Request, now: float
    ) -> tuple[Request, TransactionKey | None]:
        assert leg.dialog is not None
        target = dialog_target(leg.dialog)
        contact = leg.contact if method in TARGET_REFRESH else None
        mf = incoming.max_forwards
        out = leg.dialog.make_request(
            method,
            via=self.local.via(target.transport),
            contact=contact,
            body=incoming.body,
            max_forwards=70 if mf is None else max(0, mf - 1),
        )
        _copy_end_to_end(incoming.headers, out.headers)
        if method == "ACK":
            self.io.send_ack(out, target)
            return out, None
        return out, self.io.send_request(out, target, now)

    def _echo_in_dialog(self, call: Call, key: TransactionKey, request: Request, now: float) -> None:
        """The echo is a UAS: BYE ends it, a re-INVITE gets a fresh answer, the rest 200."""
        if request.method == "BYE":
            self.io.respond(key, make_response(request, 200), now)
            self._finish(call)
            return
        if request.method != "INVITE":
            self.io.respond(key, make_response(request, 200), now)
            return
        try:
            plan = plan_echo(request.body)
        except EchoNotAcceptable:
            self.io.respond(key, make_response(request, 488), now)
            return
        if call.echo is not None:
            self._close_echo(call.echo)
        call.echo = plan.session()
        port = self.echo_ports.open(call.echo)
        resp = make_response(request, 200)
        resp.headers.add("Contact", call.a.contact)
        resp.headers.add("Content-Type", SDP)
        resp.body = plan.render(self.local.host, port)
        self.io.respond(key, resp, now)

    # -- helpers ---------------------------------------------------------------------------
    def _reply(
        self,
        leg: Leg,
        status: int,
        now: float,
        reason: str | None = None,
        *,
        body: bytes = b"",
        content_type: str | None = None,
        source: Response | None = None,
        contact: bool = True,
    ) -> Response:
        """A response on leg A's INVITE, with our tag and Contact; `source`'s headers relayed."""
        resp = make_response(leg.invite, status, reason, to_tag=leg.tag)
        if 100 < status < 300:  # RFC 3261 §12.1.1: the dialog's route set comes from Record-Route
            for rr in leg.invite.headers.get_lines("record-route"):
                resp.headers.add("Record-Route", rr)
        if contact and status < 300:
            resp.headers.add("Contact", leg.contact)
        if source is not None:
            _copy_end_to_end(source.headers, resp.headers)
        if content_type is not None:
            resp.headers.replace("Content-Type", content_type)
        if body:
            resp.body = body
        self.io.respond(leg.key, resp, now)
        return resp

    def _open_a_dialog(self, call: Call, sent: Response) -> None:
        if call.a.dialog is not None or not call.a.invite.contacts:
            return
        call.a.dialog = Dialog.from_uas(call.a.invite, sent)
        self._by_dialog[(call.a.dialog.call_id, call.a.tag)] = (call, "a")

    def _ack_and_bye(self, b: Leg, resp: Response, now: float) -> None:
        try:
            dialog = Dialog.from_uac(b.invite, resp)
        except (SipParseError, ValueError):
            return
        b.dialog = dialog
        target = dialog_target(dialog)
        self.io.send_ack(dialog.make_request("ACK", via=self.local.via(target.transport)), target)
        self.io.send_request(dialog.make_request("BYE", via=self.local.via(target.transport)), target, now)

    def _finish(self, call: Call) -> None:
        if call.state is not CallState.TERMINATED:
            call.goto(CallState.TERMINATED)
        self._calls.pop(call.id, None)
        self._by_a_invite.pop(call.a.key, None)
        for leg in (call.a, call.b):
            if leg is not None and leg.dialog is not None:
                self._by_dialog.pop((leg.dialog.call_id, leg.tag), None)
        if call.b is not None:
            self._by_b_invite.pop(call.b.key, None)
        if call.echo is not None:
            self._close_echo(call.echo)
            call.echo = None

    def _close_echo(self, session: EchoSession) -> None:
        self.counters.echo_packets_closed += session.packets
        self.echo_ports.close(session)


def dialog_target(dialog: Dialog) -> Target:
    """Where an in-dialog request goes: the first route if any (loose routing), else the target."""
    if dialog.route_set:
        return Target.from_uri(NameAddr.parse(dialog.route_set[0]).uri)
    return Target.from_uri(Uri.parse(dialog.remote_target))


def make_cancel(invite: Request) -> Request:
    """RFC 3261 §9.1: same Request-URI, Call-ID, From, To, Route and top Via; CSeq method CANCEL."""
    h = Headers()
    h.add("Via", invite.headers.get_all("via")[0])
    for r in invite.headers.get_all("route"):
        h.add("Route", r)
    h.add("Max-Forwards", "70")
    for name in ("from", "to", "call-id"):
        h.add(name.title(), invite.headers.get(name) or "")
    h.add("CSeq", f"{invite.cseq.seq} CANCEL")
    return Request("CANCEL", invite.uri, h)


def _copy_end_to_end(src: Headers, dst: Headers) -> None:
    """Copy every header that is not leg state, byte-exact (Cisco x-cisco-*, Supported, Allow...)."""
    present = {f.key for f in dst.fields()}
    for f in src.fields():
        if f.key not in _LEG_HEADERS and f.key not in present:
            dst.add(f.name, f.value)

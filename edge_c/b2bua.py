"""Expressway-C's back-to-back user agent for MRA calls, sans-IO (spec §5, §7).

Spec §5: "C is a B2BUA for every MRA call (INVITE/ACK/BYE/CANCEL/re-INVITE/UPDATE/INFO/REFER/
SUBSCRIBE/NOTIFY pass). It rewrites SDP on both legs so media flows client ↔ E ↔ C ↔ far end."

Leg A is the dialog the initial INVITE came in on (we are its UAS), leg B the one we open on the
other side (we are its UAC) with its own Call-ID, tags, CSeq space, Contact and route set. The
"outside" side is the traversal zone from Expressway-E, the "inside" side Unified CM
(`edge.media_hooks.Side`). Every SDP crossing goes through the `MediaSession`; headers that carry
no hop, dialog or transaction state pass byte-exact (spec §5: x-cisco-*, unknown headers,
multipart bodies).

RFC 3261 §17 transactions run in one `TransactionLayer` over reliable transports (TLS zone,
TCP/TLS to UCM): no retransmission timers; Timer B/F (64·T1 = 32 s) answer 408 on leg A.
Call-level deadlines (ACK wait, CANCEL guard, linger after the end) share one heap.

No asyncio, no sockets: inputs take `now`, outputs are `edge_c.b2bua_events` values.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from edge.media_hooks import MediaRejected, MediaSession, Side
from edge.sip.address import Via
from edge.sip.dialog import TARGET_REFRESH, Dialog
from edge.sip.errors import SipParseError
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
from edge.sip.headers import Field, Headers, split_quoted, unquote
from edge.sip.message import Request, Response, make_response, new_branch, new_call_id, new_tag
from edge.sip.transaction import TimerConfig, TransactionStateError, client_key, server_key
from edge.sip.transaction_layer import TransactionLayer
from edge_c.b2bua_events import (
    B2buaOutput,
    CallAnswered,
    CallEnded,
    CallStarted,
    SendToUcm,
    SendToZone,
)

log = logging.getLogger(__name__)

__all__ = ["B2bua", "CallState", "find_sdp", "replace_sdp"]

# Headers describing this hop, this dialog or this transaction: rebuilt per leg, never copied.
# Everything else (x-cisco-*, P-Asserted-Identity, Supported, Allow, Session-Expires, User-Agent,
# Call-Info, Alert-Info, Privacy, Remote-Party-ID, Content-Type...) passes byte-exact (spec §5).
_LEG_HEADERS = frozenset(
    {
        "via", "route", "record-route", "contact", "call-id", "cseq", "from", "to",
        "content-length", "max-forwards", "authorization", "www-authenticate",
        "authentication-info", "rack",
    }
)  # fmt: skip
_OFFER_ANSWER = frozenset({"INVITE", "UPDATE"})  # RFC 3264 / RFC 3311 carriers we rewrite
OUTSIDE: Side = "outside"
INSIDE: Side = "inside"


class CallState(Enum):
    CALLING = "calling"  # leg B INVITE sent, nothing relayed to leg A yet
    EARLY = "early"  # a provisional relayed to leg A
    ANSWERED = "answered"  # 2xx relayed to leg A, waiting for its ACK
    CONFIRMED = "confirmed"
    CANCELLING = "cancelling"  # leg B cancelled; waiting for its final answer
    TERMINATED = "terminated"  # ended; lingers to absorb stragglers, then forgotten


CALL_TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    CallState.CALLING: frozenset(
        {CallState.EARLY, CallState.ANSWERED, CallState.CANCELLING, CallState.TERMINATED}
    ),
    CallState.EARLY: frozenset({CallState.ANSWERED, CallState.CANCELLING, CallState.TERMINATED}),
    CallState.ANSWERED: frozenset({CallState.CONFIRMED, CallState.TERMINATED}),
    CallState.CONFIRMED: frozenset({CallState.TERMINATED}),
    CallState.CANCELLING: frozenset({CallState.TERMINATED}),
    CallState.TERMINATED: frozenset(),
}


@dataclass(eq=False)
class Leg:
    role: Literal["a", "b"]
    side: Side
    call_id: str
    local_tag: str
    contact: str  # our Contact on this leg
    invite: Request  # A: the INVITE received; B: the INVITE sent
    invite_key: TransactionKey  # its server (A) or client (B) transaction
    flow: str | None  # the flow id this leg last used (hint for the caller)
    dialog: Dialog | None = None
    provisional: bool = False  # B: a provisional arrived, so CANCEL may be sent (§9.1)
    final: bool = False  # a final response to the initial INVITE was sent (A) / received (B)
    answered: bool = False  # ... and it was a 2xx
    pending_ack: bool = False  # a 2xx to an INVITE on this leg awaits the ACK from the other leg
    last_ack: Request | None = None  # resent when the far end retransmits its 2xx


@dataclass(eq=False)
class Call:
    key: str
    a: Leg
    since: float
    late_offer: bool  # the initial INVITE had no SDP (offer in 2xx, answer in ACK)
    b: Leg | None = None
    state: CallState = CallState.CALLING
    media: bool = False  # the MediaSession knows this call (end_call needed)
    answered_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    cancel_status: int = 487  # what leg A gets once leg B's INVITE ends after our CANCEL
    cancel_pending: bool = False  # CANCEL wanted before leg B sent any provisional
    ack_answer: bool = False  # the next ACK carries the SDP answer (late offer)
    reinvite: _Relay | None = None  # an INVITE relayed and not finally answered (glare → 491)
    deadlines: dict[str, float] = field(default_factory=dict)
    client_keys: set[TransactionKey] = field(default_factory=set)

    def goto(self, new: CallState) -> None:
        if new is not self.state and new not in CALL_TRANSITIONS[self.state]:
            raise ValueError(f"call {self.key}: {self.state.name} -> {new.name}")
        self.state = new


@dataclass(eq=False)
class _Relay:
    """An in-dialog request relayed from `src` to `dst`, waiting for its answer."""

    call: Call
    server_key: TransactionKey
    incoming: Request
    outgoing: Request
    src: Leg
    dst: Leg
    offer_in_request: bool
    provisional: bool = False
    done: bool = False


@dataclass(eq=False)
class _ClientTxn:
    call: Call
    leg: Leg
    purpose: Literal["invite", "relay", "own"]
    relay: _Relay | None = None


@dataclass
class B2buaCounters:
    attempts: int = 0
    answered: int = 0
    failed: int = 0  # ended without being answered
    ended: int = 0  # every call that left the active table
    cancelled: int = 0
    media_rejected: int = 0
    rejected_limit: int = 0


class B2bua:
    """The B2BUA core. See the module docstring; `owns()` tells the proxy path what is ours."""

    def __init__(
        self,
        local_address: str,
        *,
        zone_contact: str,
        ucm_contact: str,
        media: MediaSession,
        agent: str = "expc",
        timers: TimerConfig | None = None,
        max_calls: int = 1000,
        via_for: Callable[[Side], Via] | None = None,
    ) -> None:
        self.local_address = local_address
        self.contacts: dict[Side, str] = {OUTSIDE: _name_addr(zone_contact), INSIDE: _name_addr(ucm_contact)}
        self.media = media
        self.agent = agent
        self.timers = timers or TimerConfig()
        self.max_calls = max_calls
        self._via_for = via_for
        self.layer = TransactionLayer(self.timers)
        self.counters = B2buaCounters()
        self._ids = itertools.count(1)
        self._calls: dict[str, Call] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._active = 0
        self._by_tag: dict[tuple[str, str], tuple[Call, Leg]] = {}  # (Call-ID, our tag)
        self._by_invite: dict[TransactionKey, Call | _Relay] = {}  # INVITE server txns, for CANCEL
        self._clients: dict[TransactionKey, _ClientTxn] = {}
        self._server_where: dict[TransactionKey, tuple[Side, str | None]] = {}
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._out: list[B2buaOutput] = []

    @property
    def long_timer_s(self) -> float:
        return 64 * self.timers.t1_s  # Timer B/F/H/L value: 32 s by default

    def __len__(self) -> int:
        """Calls in the table, the lingering ended ones included."""
        return len(self._calls)

    # -- inputs ------------------------------------------------------------------------------
    def receive_from_zone(
        self, msg: Request | Response, flow_id: str | None, now: float
    ) -> list[B2buaOutput]:
        return self._receive(msg, OUTSIDE, flow_id, now)

    def receive_from_ucm(self, msg: Request | Response, flow_id: str | None, now: float) -> list[B2buaOutput]:
        return self._receive(msg, INSIDE, flow_id, now)

    def owns(self, msg: Request | Response) -> bool:
        """True for an initial INVITE, and for requests/responses of dialogs and transactions we
        own: a CANCEL of an INVITE we serve, an ACK or in-dialog request to one of our tags, a
        response to one of our requests. Everything else belongs to the proxy path."""
        try:
            if isinstance(msg, Response):
                if client_key(msg) in self._clients:
                    return True
                return (msg.call_id or "", msg.from_tag or "") in self._by_tag
            if msg.method == "INVITE" and msg.to_tag is None:
                return True
            if msg.method == "CANCEL":
                k = server_key(msg)
                return TransactionKey(k.branch, k.sent_by, "INVITE") in self._by_invite
            return (msg.call_id or "", msg.to_tag or "") in self._by_tag
        except SipParseError:
            return False

    def send_failed(self, message: Request, now: float) -> list[B2buaOutput]:
        """The caller could not deliver one of our requests (no zone flow, UCM down): its client
        transaction fails as on a transport error (RFC 3261 §17.1.4) → 503 towards leg A."""
        if message.method != "ACK":
            self._process(self.layer.transport_error(client_key(message), now), now)
        return self._flush()

    def get_timer(self) -> float | None:
        times = [t for t in (self.layer.get_timer(), self._next_deadline()) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[B2buaOutput]:
        self._process(self.layer.handle_timer(now), now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, key, name = heapq.heappop(heap)
            call = self._calls.get(key)
            if call is None or call.deadlines.get(name) != when:
                continue
            del call.deadlines[name]
            if name == "ack":
                log.info("call %s: no ACK within %.0f s", call.key, self.long_timer_s)
                self._teardown(call, "no ACK", now)
            elif name == "cancel":
                self._on_cancel_guard(call, now)
            else:
                self._forget(call, now)
        return self._flush()

    def status(self) -> dict[str, Any]:
        active = [self._call_status(c) for c in self._calls.values() if c.state is not CallState.TERMINATED]
        return {
            "active": active,
            "counts": {
                "active": self._active,
                "table": len(self._calls),
                "limit": self.max_calls,
                "transactions": len(self.layer),
                **vars(self.counters),
            },
        }

    # -- dispatch ----------------------------------------------------------------------------
    def _receive(
        self, msg: Request | Response, side: Side, flow: str | None, now: float
    ) -> list[B2buaOutput]:
        try:
            if isinstance(msg, Response):
                self._process(self.layer.receive_response(msg, now), now, flow)
            else:
                if msg.method != "ACK":  # an ACK for a 2xx creates no transaction
                    self._server_where.setdefault(server_key(msg), (side, flow))
                self._process(self.layer.receive_request(msg, now, reliable=True), now, flow, side)
        except SipParseError as exc:  # a header parsed lazily was malformed
            log.info("%s from %s: %s", msg, side, exc)
            if isinstance(msg, Request) and msg.method != "ACK":
                self._emit(side, flow, make_response(msg, exc.status_code, exc.reason))
        return self._flush()

    def _flush(self) -> list[B2buaOutput]:
        out, self._out = self._out, []
        return out

    def _emit(self, side: Side, hint: str | None, msg: Request | Response) -> None:
        self._out.append(SendToZone(msg, hint) if side == OUTSIDE else SendToUcm(msg, hint))

    def _process(
        self, events: list[TransactionEvent], now: float, flow: str | None = None, side: Side = OUTSIDE
    ) -> None:
        # Wire output first (a 100 Trying precedes what the TU does), then the TU, then forget.
        for ev in events:
            if isinstance(ev, RequestToSend):
                txn = self._clients.get(ev.key)
                if txn is not None:
                    self._emit(txn.leg.side, txn.leg.flow, ev.request)
            elif isinstance(ev, ResponseToSend):
                where = self._server_where.get(ev.key)
                if where is not None:
                    self._emit(where[0], where[1], ev.response)
        for ev in events:
            if isinstance(ev, RequestReceived):
                self._on_request(ev, side, flow, now)
            elif isinstance(ev, ResponseReceived):
                self._on_response(ev.key, ev.response, flow, now)
            elif isinstance(ev, TransactionTimedOut):
                self._on_failure(ev.key, ev.timer, 408, now)
            elif isinstance(ev, TransportErrorOccurred):
                self._on_failure(ev.key, "transport", 503, now)
        for ev in events:
            if isinstance(ev, TransactionTerminated):
                self._server_where.pop(ev.key, None)
                txn = self._clients.pop(ev.key, None)
                if txn is not None:
                    txn.call.client_keys.discard(ev.key)

    def _on_request(self, ev: RequestReceived, side: Side, flow: str | None, now: float) -> None:
        req = ev.request
        try:
            if ev.key is None:
                self._on_ack(req, now)
            elif req.method == "CANCEL":
                self._on_cancel(ev.key, req, ev.cancelled, now)
            elif req.method == "INVITE" and req.to_tag is None:
                self._on_invite(ev.key, req, side, flow, now)
            else:
                self._on_in_dialog(ev.key, req, flow, now)
        except SipParseError as exc:
            if ev.key is not None:
                self._respond(ev.key, make_response(req, exc.status_code, exc.reason), now)

    # -- the initial INVITE --------------------------------------------------------------------
    def _on_invite(self, key: TransactionKey, req: Request, side: Side, flow: str | None, now: float) -> None:
        self.counters.attempts += 1
        if self._active >= self.max_calls:
            self.counters.rejected_limit += 1
            self._respond(key, self._error(req, 503, "call limit reached"), now)
            return
        if not req.contacts:
            self._respond(key, self._error(req, 400, "INVITE without Contact"), now)
            return
        a = Leg("a", side, req.call_id or "", new_tag(), self.contacts[side], req, key, flow)
        sdp = find_sdp(req.content_type, req.body)
        call = Call(f"{self.agent}-{next(self._ids)}", a, now, late_offer=sdp is None)
        self._calls[call.key] = call
        self._active += 1
        self._by_tag[(a.call_id, a.local_tag)] = (call, a)
        self._by_invite[key] = call
        self._out.append(CallStarted(call.key, side, str(req.from_.uri), str(req.to.uri)))
        log.info("call %s: INVITE from %s (Call-ID %s)", call.key, side, a.call_id)
        body = req.body
        if sdp is not None:
            try:
                call.media = True
                body = replace_sdp(req.content_type, body, self.media.process_offer(call.key, side, sdp))
            except MediaRejected as exc:
                self.counters.media_rejected += 1
                self._reply_a(call, exc.status, now, warning=exc.reason)
                self._finish(call, f"media rejected: {exc.reason}", now)
                return
        self._send_b_invite(call, body, now)

    def _send_b_invite(self, call: Call, body: bytes, now: float) -> None:
        src = call.a.invite
        side = _other_side(call.a.side)
        tag = new_tag()
        call_id = new_call_id(self.local_address)
        h = Headers()
        h.add("Via", str(self._via(side)))
        h.add("Max-Forwards", str(70 if src.max_forwards is None else src.max_forwards))
        # Route entries the caller left after popping its own are a preloaded route set for leg B
        # (e.g. the edge route it adds for a Path-registered client).
        for route in src.headers.get_all("route"):
            h.add("Route", route)
        from_ = src.from_.copy()
        from_.params.set("tag", tag)
        h.add("From", str(from_))
        h.add("To", src.headers.get("to") or "")
        h.add("Call-ID", call_id)
        h.add("CSeq", "1 INVITE")
        h.add("Contact", self.contacts[side])
        invite = Request("INVITE", src.uri, _with_end_to_end(h, src.headers), body)
        key = client_key(invite)
        b = Leg("b", side, call_id, tag, self.contacts[side], invite, key, None)
        call.b = b
        self._by_tag[(call_id, tag)] = (call, b)
        self._send_request(call, b, invite, now, "invite")

    # -- responses -----------------------------------------------------------------------------
    def _on_response(self, key: TransactionKey | None, resp: Response, flow: str | None, now: float) -> None:
        txn = self._clients.get(key) if key is not None else None
        if txn is None:
            self._on_stray_response(resp, now)
            return
        if flow is not None:
            txn.leg.flow = flow
        if txn.purpose == "invite":
            self._on_invite_response(txn.call, txn.leg, resp, now)
        elif txn.relay is not None:
            self._on_relay_response(txn.relay, resp, now)

    def _on_invite_response(self, call: Call, b: Leg, resp: Response, now: float) -> None:
        code = resp.status_code
        if code < 200:
            b.provisional = True
            if call.cancel_pending:
                call.cancel_pending = False
                self._send_cancel(call, b, b.invite, now)
        if code == 100:
            return
        if code >= 200 and not b.final:
            b.final, b.answered = True, code < 300
        if call.state in (CallState.CANCELLING, CallState.TERMINATED):
            if 200 <= code < 300:  # the answer crossed our CANCEL/BYE: ACK it, then hang up (§15)
                self._ack_and_bye(call, b, resp, now)
            if code >= 200 and call.state is CallState.CANCELLING:
                self._reply_a(call, call.cancel_status, now)
                self._finish(call, "cancelled" if call.cancel_status == 487 else f"{call.cancel_status}", now)
            return
        if code >= 300:
            self._reply_a(call, code, now, resp.reason, source=resp)
            self._finish(call, f"{code} {resp.reason}", now)
            return
        if code >= 200 and call.state in (CallState.ANSWERED, CallState.CONFIRMED):
            self._on_extra_2xx(call, b, resp, now)
            return
        if resp.to_tag and resp.contacts:
            b.dialog = _refresh(b.dialog, Dialog.from_uac(b.invite, resp))
        body = resp.body
        sdp = find_sdp(resp.content_type, body)
        if sdp is not None:
            try:
                call.media = True
                if call.late_offer:
                    new = self.media.process_offer(call.key, b.side, sdp)
                    call.ack_answer = code < 300
                else:
                    new = self.media.process_answer(call.key, b.side, sdp)
                body = replace_sdp(resp.content_type, body, new)
            except MediaRejected as exc:
                self.counters.media_rejected += 1
                b.pending_ack = code >= 200
                self._reply_a(call, exc.status, now, warning=exc.reason)
                self._teardown(call, f"media rejected: {exc.reason}", now)
                return
        out = self._a_response(call, code, resp.reason, resp, body)
        self._respond(call.a.invite_key, out, now)
        if call.a.invite.contacts:
            call.a.dialog = _refresh(call.a.dialog, Dialog.from_uas(call.a.invite, out))
        if code < 200:
            if call.state is CallState.CALLING:
                call.goto(CallState.EARLY)
            return
        call.a.final = call.a.answered = True
        b.pending_ack = True
        call.goto(CallState.ANSWERED)
        call.answered_at = now
        self.counters.answered += 1
        self._arm(call, "ack", now + self.long_timer_s)
        self._out.append(CallAnswered(call.key))

    def _on_extra_2xx(self, call: Call, b: Leg, resp: Response, now: float) -> None:
        """A retransmitted 2xx (ACK again, or relay again while A has not ACKed) or a 2xx from
        another fork (ACK and BYE it: one dialog per call, RFC 3261 §13.2.2.4)."""
        if b.dialog is not None and resp.to_tag != b.dialog.remote_tag:
            self._ack_and_bye(call, b, resp, now, keep=False)
        elif b.last_ack is not None:
            self._emit(b.side, b.flow, b.last_ack)

    def _on_stray_response(self, resp: Response, now: float) -> None:
        """No client transaction: a 2xx retransmission after Timer M, or a late answer."""
        found = self._by_tag.get((resp.call_id or "", resp.from_tag or ""))
        if found is None or resp.cseq.method != "INVITE" or not 200 <= resp.status_code < 300:
            return
        leg = found[1]
        if leg.last_ack is not None and leg.dialog is not None and resp.to_tag == leg.dialog.remote_tag:
            self._emit(leg.side, leg.flow, leg.last_ack)

    def _on_failure(self, key: TransactionKey, timer: str, status: int, now: float) -> None:
        txn = self._clients.get(key)
        if txn is None:
            return
        call = txn.call
        if txn.purpose == "invite":
            if timer == "C":  # proxy Timer C (§16.6): give up ringing, CANCEL leg B, 408 on A
                if call.state in (CallState.CALLING, CallState.EARLY):
                    self._cancel_b(call, 408, now)
                return
            if call.state in (CallState.CALLING, CallState.EARLY, CallState.CANCELLING):
                code = call.cancel_status if call.state is CallState.CANCELLING else status
                self._reply_a(call, code, now, warning=None if code == 487 else f"leg B: timer {timer}")
                self._finish(call, f"{code} (timer {timer})", now)
        elif txn.relay is not None and not txn.relay.done:
            relay = txn.relay
            self._finish_relay(relay)
            self._respond(relay.server_key, make_response(relay.incoming, status), now)

    # -- CANCEL and ACK ------------------------------------------------------------------------
    def _on_cancel(
        self, key: TransactionKey, req: Request, cancelled: TransactionKey | None, now: float
    ) -> None:
        target = self._by_invite.get(cancelled) if cancelled is not None else None
        self._respond(key, make_response(req, 200 if target is not None else 481), now)
        if isinstance(target, Call):
            if target.state in (CallState.CALLING, CallState.EARLY):
                self.counters.cancelled += 1
                self._cancel_b(target, 487, now)
        elif isinstance(target, _Relay) and not target.done and target.provisional:
            self._send_cancel(target.call, target.dst, target.outgoing, now)

    def _cancel_b(self, call: Call, status: int, now: float) -> None:
        b = call.b
        call.cancel_status = status
        call.goto(CallState.CANCELLING)
        self._arm(call, "cancel", now + self.long_timer_s)
        if b is None or b.final:
            return
        if b.provisional:
            self._send_cancel(call, b, b.invite, now)
        else:
            call.cancel_pending = True  # §9.1: no CANCEL before a provisional response

    def _send_cancel(self, call: Call, leg: Leg, invite: Request, now: float) -> None:
        """RFC 3261 §9.1: same Request-URI, Call-ID, From, To, Route and top Via (so the same
        branch) as the INVITE; CSeq number of the INVITE with method CANCEL."""
        h = Headers()
        h.add("Via", invite.headers.get_all("via")[0])
        h.add("Max-Forwards", "70")
        for r in invite.headers.get_all("route"):
            h.add("Route", r)
        for name in ("From", "To", "Call-ID"):
            h.add(name, invite.headers.get(name) or "")
        h.add("CSeq", f"{invite.cseq.seq} CANCEL")
        self._send_request(call, leg, Request("CANCEL", invite.uri, h), now, "own")

    def _on_cancel_guard(self, call: Call, now: float) -> None:
        """Leg B never ended its INVITE after our CANCEL: answer leg A ourselves."""
        if call.state is CallState.CANCELLING:
            self._reply_a(call, call.cancel_status, now)
            self._finish(call, "cancel not answered", now)

    def _on_ack(self, ack: Request, now: float) -> None:
        found = self._by_tag.get((ack.call_id or "", ack.to_tag or ""))
        if found is None:
            return
        call, leg = found
        other = self._other(call, leg)
        if other is None or other.dialog is None or not other.pending_ack:
            return
        body = b""
        sdp = find_sdp(ack.content_type, ack.body)
        if sdp is not None and call.ack_answer:
            try:
                body = replace_sdp(
                    ack.content_type, ack.body, self.media.process_answer(call.key, leg.side, sdp)
                )
            except MediaRejected as exc:
                self.counters.media_rejected += 1
                self._teardown(call, f"media rejected: {exc.reason}", now)
                return
        call.ack_answer = False
        self._send_ack(other, ack, body)
        if call.state is CallState.ANSWERED:
            call.goto(CallState.CONFIRMED)
        if not (call.a.pending_ack or (call.b is not None and call.b.pending_ack)):
            call.deadlines.pop("ack", None)

    def _send_ack(self, leg: Leg, incoming: Request | None, body: bytes = b"") -> None:
        """ACK for a 2xx (§13.2.2.4): in the dialog, outside any transaction."""
        assert leg.dialog is not None
        leg.pending_ack = False
        mf = incoming.max_forwards if incoming is not None else None
        ack = leg.dialog.make_request("ACK", via=self._via(leg.side), body=body, max_forwards=mf or 70)
        if incoming is not None:
            hdrs = incoming.headers if body else _without(incoming.headers, "content-type")
            ack.headers = _with_end_to_end(ack.headers, hdrs)
        leg.last_ack = ack
        self._emit(leg.side, leg.flow, ack)

    # -- in-dialog requests --------------------------------------------------------------------
    def _on_in_dialog(self, key: TransactionKey, req: Request, flow: str | None, now: float) -> None:
        found = self._by_tag.get((req.call_id or "", req.to_tag or ""))
        if found is None or found[1].dialog is None:
            self._respond(key, make_response(req, 481), now)
            return
        call, leg = found
        assert leg.dialog is not None
        if flow is not None:
            leg.flow = flow
        if call.state is CallState.TERMINATED:  # e.g. a BYE crossing ours
            self._respond(key, make_response(req, 200 if req.method == "BYE" else 481), now)
            return
        error = leg.dialog.receive_request(req)
        if error is not None:
            self._respond(key, make_response(req, error), now)
            return
        if req.method == "BYE":
            self._respond(key, make_response(req, 200), now)
            self._teardown(call, f"BYE from {leg.side}", now, skip=leg)
            return
        other = self._other(call, leg)
        if other is None or other.dialog is None:
            self._respond(key, make_response(req, 481), now)
            return
        if req.method == "INVITE" and (call.state is not CallState.CONFIRMED or call.reinvite is not None):
            self._respond(key, make_response(req, 491), now)  # RFC 3261 §14.2 glare
            return
        self._relay(call, leg, other, key, req, now)

    def _relay(self, call: Call, src: Leg, dst: Leg, key: TransactionKey, req: Request, now: float) -> None:
        assert dst.dialog is not None
        body = req.body
        sdp = find_sdp(req.content_type, body) if req.method in _OFFER_ANSWER else None
        if sdp is not None:
            try:
                call.media = True
                body = replace_sdp(req.content_type, body, self.media.process_offer(call.key, src.side, sdp))
            except MediaRejected as exc:  # RFC 3261 §14.2: the dialog survives a failed re-INVITE
                self.counters.media_rejected += 1
                self._respond(key, self._error(req, exc.status, exc.reason), now)
                return
        mf = req.max_forwards
        out = dst.dialog.make_request(
            req.method,
            via=self._via(dst.side),
            contact=dst.contact if req.method in TARGET_REFRESH else None,
            body=body,
            max_forwards=70 if mf is None else mf,
        )
        out.headers = _with_end_to_end(out.headers, req.headers)
        if req.method == "PRACK" and (rack := req.headers.get("rack")) is not None:
            # RFC 3262 §7.2: RAck names the INVITE's CSeq, which differs per leg.
            parts = rack.split()
            if len(parts) == 3:
                out.headers.add("RAck", f"{parts[0]} {dst.invite.cseq.seq} {parts[2]}")
        relay = _Relay(call, key, req, out, src, dst, offer_in_request=sdp is not None)
        if req.method == "INVITE":
            call.reinvite = relay
            self._by_invite[key] = relay
        self._send_request(call, dst, out, now, "relay", relay)

    def _on_relay_response(self, relay: _Relay, resp: Response, now: float) -> None:
        code = resp.status_code
        if code < 200:
            relay.provisional = True
        if code == 100 or relay.done:
            return
        call, src, dst = relay.call, relay.src, relay.dst
        method = relay.incoming.method
        if dst.dialog is not None:
            dst.dialog.receive_response(relay.outgoing, resp)
        body = resp.body
        sdp = find_sdp(resp.content_type, body) if method in _OFFER_ANSWER and code < 300 else None
        if sdp is not None:
            try:
                if relay.offer_in_request:
                    new = self.media.process_answer(call.key, dst.side, sdp)
                else:  # re-INVITE without SDP: the offer is in the 2xx, the answer in the ACK
                    new = self.media.process_offer(call.key, dst.side, sdp)
                    call.ack_answer = method == "INVITE" and code >= 200
                call.media = True
                body = replace_sdp(resp.content_type, body, new)
            except MediaRejected as exc:
                self.counters.media_rejected += 1
                dst.pending_ack = method == "INVITE" and code >= 200
                self._finish_relay(relay)
                self._respond(relay.server_key, self._error(relay.incoming, exc.status, exc.reason), now)
                self._teardown(call, f"media rejected: {exc.reason}", now)
                return
        out = make_response(relay.incoming, code, resp.reason)
        if method in TARGET_REFRESH and code < 300:
            out.headers.add("Contact", src.contact)
        out.headers = _with_end_to_end(out.headers, resp.headers)
        out.body = body
        if code >= 200:
            self._finish_relay(relay)
        self._respond(relay.server_key, out, now)
        if code >= 200 and method == "INVITE" and code < 300:
            dst.pending_ack = True
            self._arm(call, "ack", now + self.long_timer_s)
        if code in (408, 481) and call.state is not CallState.TERMINATED:
            self._teardown(call, f"{code} on the {dst.side} leg", now)  # §12.2.1.2: dialog gone

    def _finish_relay(self, relay: _Relay) -> None:
        relay.done = True
        if relay.call.reinvite is relay:
            relay.call.reinvite = None
        self._by_invite.pop(relay.server_key, None)

    # -- ending ----------------------------------------------------------------------------------
    def _teardown(self, call: Call, reason: str, now: float, skip: Leg | None = None) -> None:
        """End both legs as their state requires: CANCEL or ACK+BYE leg B, error or BYE leg A."""
        if call.state is CallState.TERMINATED:
            return
        b = call.b
        if b is not None and b is not skip:
            if not b.final:
                if call.state is not CallState.CANCELLING:
                    self._cancel_b(call, 487, now)
            elif b.answered:
                self._hang_up(call, b, now)
        a = call.a
        if a is not skip:
            if not a.final:
                self._reply_a(call, 487, now)
            elif a.answered:
                self._hang_up(call, a, now)
        if call.reinvite is not None:
            relay = call.reinvite
            self._finish_relay(relay)
            self._respond(relay.server_key, make_response(relay.incoming, 487), now)
        self._finish(call, reason, now)

    def _hang_up(self, call: Call, leg: Leg, now: float) -> None:
        if leg.dialog is None:
            return
        if leg.pending_ack:  # §13.2.2.4: every 2xx is ACKed, even one we hang up at once
            self._send_ack(leg, None)
        bye = leg.dialog.make_request("BYE", via=self._via(leg.side))
        self._send_request(call, leg, bye, now, "own")

    def _ack_and_bye(self, call: Call, leg: Leg, resp: Response, now: float, *, keep: bool = True) -> None:
        try:
            dialog = Dialog.from_uac(leg.invite, resp)
        except (SipParseError, ValueError):
            return
        temp = Leg(
            leg.role, leg.side, leg.call_id, leg.local_tag, leg.contact, leg.invite, leg.invite_key, leg.flow
        )
        temp.dialog, temp.pending_ack = dialog, True
        if keep:
            leg.dialog = dialog
        self._send_ack(temp, None)
        bye = dialog.make_request("BYE", via=self._via(leg.side))
        self._send_request(call, temp, bye, now, "own")
        if keep:
            leg.last_ack = temp.last_ack

    def _finish(self, call: Call, reason: str, now: float) -> None:
        if call.state is CallState.TERMINATED:
            return
        call.goto(CallState.TERMINATED)
        call.ended_at, call.end_reason = now, reason
        self._active -= 1
        self.counters.ended += 1
        if call.answered_at is None:
            self.counters.failed += 1
        if call.media:
            self.media.end_call(call.key)
        log.info("call %s ended: %s", call.key, reason)
        self._out.append(CallEnded(call.key, reason))
        call.deadlines.clear()
        self._arm(call, "linger", now + self.long_timer_s)
        self._ended[call.key] = None
        while len(self._ended) > self.max_calls:  # bounded even under a flood of short calls
            oldest = next(iter(self._ended))
            self._forget(self._calls[oldest], now)

    def _forget(self, call: Call, now: float) -> None:
        self._calls.pop(call.key, None)
        self._ended.pop(call.key, None)
        call.deadlines.clear()
        for leg in (call.a, call.b):
            if leg is not None:
                self._by_tag.pop((leg.call_id, leg.local_tag), None)
        self._by_invite.pop(call.a.invite_key, None)
        for key in list(call.client_keys):  # a peer that never answered: drop its transaction
            self._process(self.layer.transport_error(key, now), now)

    # -- helpers ---------------------------------------------------------------------------------
    def _via(self, side: Side) -> Via:
        via = (
            self._via_for(side)
            if self._via_for is not None
            else Via(self.local_address, None, "TLS" if side == OUTSIDE else "TCP")
        ).copy()
        via.params.set("branch", new_branch())
        return via

    def _other(self, call: Call, leg: Leg) -> Leg | None:
        return call.b if leg is call.a else call.a

    def _send_request(
        self,
        call: Call,
        leg: Leg,
        request: Request,
        now: float,
        purpose: Literal["invite", "relay", "own"],
        relay: _Relay | None = None,
    ) -> None:
        key = client_key(request)
        self._clients[key] = _ClientTxn(call, leg, purpose, relay)
        call.client_keys.add(key)
        self._process(self.layer.send_request(request, now, reliable=True), now)

    def _respond(self, key: TransactionKey, resp: Response, now: float) -> None:
        try:
            self._process(self.layer.send_response(resp, now), now)
        except (KeyError, TransactionStateError) as exc:  # the transaction ended meanwhile
            log.debug("dropping %s: %s", resp, exc)

    def _error(self, req: Request, status: int, warning: str) -> Response:
        resp = make_response(req, status)
        resp.headers.add("Warning", f'399 {self.agent} "{warning}"')
        return resp

    def _a_response(
        self, call: Call, code: int, reason: str | None, source: Response | None, body: bytes
    ) -> Response:
        """A response on leg A's INVITE with our one tag for leg A, its Record-Route echoed
        (§12.1.1: E's two entries give the client its route set) and our Contact."""
        a = call.a
        resp = make_response(a.invite, code, reason, to_tag=a.local_tag)
        if code < 300:
            for rr in a.invite.headers.get_lines("record-route"):
                resp.headers.add("Record-Route", rr)
            resp.headers.add("Contact", a.contact)
        if source is not None:
            resp.headers = _with_end_to_end(resp.headers, source.headers)
        resp.body = body
        return resp

    def _reply_a(
        self,
        call: Call,
        code: int,
        now: float,
        reason: str | None = None,
        *,
        warning: str | None = None,
        source: Response | None = None,
    ) -> None:
        a = call.a
        if a.final:
            return
        a.final = True
        resp = self._a_response(call, code, reason, source, source.body if source is not None else b"")
        if warning:
            resp.headers.add("Warning", f'399 {self.agent} "{warning}"')
        self._respond(a.invite_key, resp, now)

    def _arm(self, call: Call, name: str, when: float) -> None:
        call.deadlines[name] = when
        heapq.heappush(self._heap, (when, next(self._seq), call.key, name))

    def _next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            when, _, key, name = heap[0]
            call = self._calls.get(key)
            if call is not None and call.deadlines.get(name) == when:
                return when
            heapq.heappop(heap)
        return None

    def _call_status(self, call: Call) -> dict[str, Any]:
        legs = []
        for leg in (call.a, call.b):
            if leg is None:
                continue
            legs.append(
                {
                    "leg": leg.role,
                    "side": leg.side,
                    "call_id": leg.call_id,
                    "local_tag": leg.local_tag,
                    "remote_tag": leg.dialog.remote_tag
                    if leg.dialog
                    else (leg.invite.from_tag if leg.role == "a" else None),
                    "state": leg.dialog.state.value if leg.dialog else "none",
                    "flow": leg.flow,
                }
            )
        return {
            "call": call.key,
            "state": call.state.value,
            "since": call.since,
            "answered_at": call.answered_at,
            "legs": legs,
        }


# -- bodies ----------------------------------------------------------------------------------------


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _sdp_span(content_type: str | None, body: bytes) -> tuple[int, int] | None:
    if not body:
        return None
    mtype = _media_type(content_type)
    if mtype == "application/sdp":
        return 0, len(body)
    if mtype.startswith("multipart/") and content_type is not None:
        for param in split_quoted(content_type, ";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "boundary" and value.strip():
                return _multipart_sdp_span(body, unquote(value.strip()).encode("utf-8", "surrogateescape"))
    return None


def _multipart_sdp_span(body: bytes, boundary: bytes) -> tuple[int, int] | None:
    """The content of the first application/sdp part (RFC 2046 §5.1.1 delimiters)."""
    delim = b"--" + boundary
    starts = [0] if body.startswith(delim) else []
    i = body.find(b"\r\n" + delim)
    while i >= 0:
        starts.append(i + 2)
        i = body.find(b"\r\n" + delim, i + 2)
    for this, nxt in itertools.pairwise(starts):
        if body.startswith(b"--", this + len(delim)):
            break  # the close delimiter
        line_end = body.find(b"\r\n", this)
        if line_end < 0 or line_end + 2 > nxt - 2:
            continue
        part_start, part_end = line_end + 2, nxt - 2
        if body.startswith(b"\r\n", part_start):
            headers, content_start = b"", part_start + 2
        else:
            head_end = body.find(b"\r\n\r\n", part_start, part_end)
            if head_end < 0:
                continue
            headers, content_start = body[part_start:head_end], head_end + 4
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if (
                name.strip().lower() == b"content-type"
                and _media_type(value.decode("latin-1")) == "application/sdp"
            ):
                return content_start, part_end
    return None


def find_sdp(content_type: str | None, body: bytes) -> bytes | None:
    """The SDP of a body: the whole of an application/sdp body, or the application/sdp part of a
    multipart one (Cisco phones send multipart/mixed, spec §5); None if there is none."""
    span = _sdp_span(content_type, body)
    return None if span is None else body[span[0] : span[1]]


def replace_sdp(content_type: str | None, body: bytes, sdp: bytes) -> bytes:
    """`body` with its SDP replaced; every other byte (other parts, delimiters) kept."""
    span = _sdp_span(content_type, body)
    if span is None:
        return body
    return body[: span[0]] + sdp + body[span[1] :]


# -- headers -----------------------------------------------------------------------------------------


def _with_end_to_end(dst: Headers, src: Headers) -> Headers:
    """`dst` plus every header of `src` that is not leg state, byte-exact (raw lines kept);
    a header already in `dst` is not copied again."""
    present = {f.key for f in dst.fields()}
    copied: list[Field] = [
        f
        for f in src.fields()
        if f.key not in _LEG_HEADERS and not f.key.startswith("proxy-") and f.key not in present
    ]
    return Headers._from_fields([*dst.fields(), *copied])


def _without(headers: Headers, name: str) -> Headers:
    out = headers.copy()
    out.remove(name)
    return out


def _refresh(old: Dialog | None, new: Dialog) -> Dialog:
    """A dialog re-derived from a later response keeps the CSeq space already used."""
    if old is not None and old.remote_tag == new.remote_tag:
        new.local_seq = max(new.local_seq, old.local_seq)
        if old.remote_seq is not None:
            new.remote_seq = max(old.remote_seq, new.remote_seq or 0)
    return new


def _other_side(side: Side) -> Side:
    return INSIDE if side == OUTSIDE else OUTSIDE


def _name_addr(contact: str) -> str:
    text = contact.strip()
    return text if text.startswith(("<", '"')) else f"<{text}>"

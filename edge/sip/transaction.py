"""The four RFC 3261 §17 transaction state machines, sans-IO with injected time.

Each machine is an Enum of states plus a table of legal transitions; `_goto` refuses anything
else. Timers are absolute deadlines in a dict; `get_timer()` gives the earliest, `handle_timer(now)`
fires the due ones. Reliable transports have no retransmission timers and Timers D/I/J/K are zero
(the machine terminates at once). INVITE 2xx handling follows RFC 6026 (Accepted state, Timers L/M).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from edge.sip.address import Via
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
from edge.sip.headers import Field, Headers
from edge.sip.message import Request, Response, make_response


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """RFC 3261 Table 4 values. `timer_c_s` (proxy INVITE, §16.6) is off when None."""

    t1_s: float = 0.5
    t2_s: float = 4.0
    t4_s: float = 5.0
    timer_c_s: float | None = None


class TransactionStateError(RuntimeError):
    """A transition the state table does not allow (a TU bug, not a peer error)."""


class State(Enum):
    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    ACCEPTED = "accepted"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


S = State
_T = S.TERMINATED

INVITE_CLIENT: dict[State, frozenset[State]] = {
    S.CALLING: frozenset({S.PROCEEDING, S.ACCEPTED, S.COMPLETED, _T}),
    S.PROCEEDING: frozenset({S.ACCEPTED, S.COMPLETED, _T}),
    S.ACCEPTED: frozenset({_T}),
    S.COMPLETED: frozenset({_T}),
    _T: frozenset(),
}
NON_INVITE_CLIENT: dict[State, frozenset[State]] = {
    S.TRYING: frozenset({S.PROCEEDING, S.COMPLETED, _T}),
    S.PROCEEDING: frozenset({S.COMPLETED, _T}),
    S.COMPLETED: frozenset({_T}),
    _T: frozenset(),
}
INVITE_SERVER: dict[State, frozenset[State]] = {
    S.PROCEEDING: frozenset({S.ACCEPTED, S.COMPLETED, _T}),
    S.ACCEPTED: frozenset({_T}),
    S.COMPLETED: frozenset({S.CONFIRMED, _T}),
    S.CONFIRMED: frozenset({_T}),
    _T: frozenset(),
}
NON_INVITE_SERVER: dict[State, frozenset[State]] = {
    S.TRYING: frozenset({S.PROCEEDING, S.COMPLETED, _T}),
    S.PROCEEDING: frozenset({S.COMPLETED, _T}),
    S.COMPLETED: frozenset({_T}),
    _T: frozenset(),
}


class Transaction:
    TABLE: dict[State, frozenset[State]]
    INITIAL: State

    def __init__(self, key: TransactionKey, request: Request, *, reliable: bool, timers: TimerConfig) -> None:
        self.key = key
        self.request = request
        self.reliable = reliable
        self.timers = timers
        self.state = self.INITIAL
        self._deadlines: dict[str, float] = {}
        self._intervals: dict[str, float] = {}

    @property
    def terminated(self) -> bool:
        return self.state is S.TERMINATED

    def _goto(self, new: State) -> None:
        if new not in self.TABLE[self.state]:
            raise TransactionStateError(f"{type(self).__name__}: {self.state.name} -> {new.name}")
        self.state = new

    def _terminate(self, out: list[TransactionEvent]) -> None:
        self._goto(S.TERMINATED)
        self._deadlines.clear()
        out.append(TransactionTerminated(self.key))

    def _start(self, name: str, now: float, interval: float) -> None:
        self._intervals[name] = interval
        self._deadlines[name] = now + interval

    def _stop(self, *names: str) -> None:
        for n in names:
            self._deadlines.pop(n, None)

    def get_timer(self) -> float | None:
        return min(self._deadlines.values()) if self._deadlines else None

    def handle_timer(self, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        while self._deadlines and not self.terminated:
            name, when = min(self._deadlines.items(), key=lambda kv: kv[1])
            if when > now:
                break
            del self._deadlines[name]
            getattr(self, f"_on_timer_{name}")(when, out)
        return out

    def transport_error(self, now: float) -> list[TransactionEvent]:
        """The transport reported a failure sending for this transaction (§17.1.4, §17.2.4)."""
        if self.terminated:
            return []
        out: list[TransactionEvent] = [TransportErrorOccurred(self.key)]
        self._terminate(out)
        return out

    def _timeout(self, timer: str, out: list[TransactionEvent]) -> None:
        out.append(TransactionTimedOut(self.key, timer))
        self._terminate(out)


# -- client transactions -------------------------------------------------------------------


class InviteClientTransaction(Transaction):
    """RFC 3261 §17.1.1 (Figure 5) with the RFC 6026 Accepted state."""

    TABLE = INVITE_CLIENT
    INITIAL = S.CALLING

    def start(self, now: float) -> list[TransactionEvent]:
        t1 = self.timers.t1_s
        if not self.reliable:
            self._start("A", now, t1)
        self._start("B", now, 64 * t1)
        return [RequestToSend(self.key, self.request)]

    def _on_timer_A(self, when: float, out: list[TransactionEvent]) -> None:
        # Timer A doubles without the T2 cap (§17.1.1.2), unlike Timer E.
        self._start("A", when, 2 * self._intervals["A"])
        out.append(RequestToSend(self.key, self.request, retransmission=True))

    def _on_timer_B(self, when: float, out: list[TransactionEvent]) -> None:
        self._timeout("B", out)

    def _on_timer_C(self, when: float, out: list[TransactionEvent]) -> None:
        # Proxy Timer C (§16.6 step 11): the TU should CANCEL; the transaction itself goes on.
        out.append(TransactionTimedOut(self.key, "C"))

    def _on_timer_D(self, when: float, out: list[TransactionEvent]) -> None:
        self._terminate(out)

    def _on_timer_M(self, when: float, out: list[TransactionEvent]) -> None:
        self._terminate(out)

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        code = response.status_code
        st = self.state
        if st in (S.CALLING, S.PROCEEDING):
            self._stop("A", "B")
            if code < 200:
                if st is S.CALLING:
                    self._goto(S.PROCEEDING)
                if self.timers.timer_c_s is not None:
                    self._start("C", now, self.timers.timer_c_s)
                out.append(ResponseReceived(self.key, response))
            elif code < 300:
                self._stop("C")
                self._goto(S.ACCEPTED)
                self._start("M", now, 64 * self.timers.t1_s)
                out.append(ResponseReceived(self.key, response))
            else:
                self._stop("C")
                self._goto(S.COMPLETED)
                out.append(RequestToSend(self.key, self.make_ack(response)))
                out.append(ResponseReceived(self.key, response))
                self._wait_or_terminate("D", now, 32.0, out)
        elif st is S.ACCEPTED and 200 <= code < 300:
            out.append(ResponseReceived(self.key, response))  # RFC 6026 §7.2: pass 2xx up
        elif st is S.COMPLETED and code >= 300:
            out.append(RequestToSend(self.key, self.make_ack(response), retransmission=True))
        return out

    def _wait_or_terminate(self, name: str, now: float, interval: float, out: list[TransactionEvent]) -> None:
        if self.reliable:
            self._terminate(out)
        else:
            self._start(name, now, interval)

    def make_ack(self, response: Response) -> Request:
        """ACK for a non-2xx final response (§17.1.1.3): same branch, To from the response."""
        req = self.request
        fields: list[Field] = []
        top_via_done = False
        for f in req.headers.fields():
            if f.key == "via" and not top_via_done:
                fields.append(Field(f.name, f.key, req.headers.get_all("via")[0], None))
                top_via_done = True
            elif f.key in ("from", "call-id", "route", "max-forwards"):
                fields.append(f)
        to = response.headers.get("to") or req.headers.get("to") or ""
        fields.append(Field("To", "to", to, None))
        fields.append(Field("CSeq", "cseq", f"{req.cseq.seq} ACK", None))
        return Request("ACK", req.uri, Headers._from_fields(fields))


class NonInviteClientTransaction(Transaction):
    """RFC 3261 §17.1.2 (Figure 6)."""

    TABLE = NON_INVITE_CLIENT
    INITIAL = S.TRYING

    def start(self, now: float) -> list[TransactionEvent]:
        if not self.reliable:
            self._start("E", now, self.timers.t1_s)
        self._start("F", now, 64 * self.timers.t1_s)
        return [RequestToSend(self.key, self.request)]

    def _on_timer_E(self, when: float, out: list[TransactionEvent]) -> None:
        t2 = self.timers.t2_s
        nxt = t2 if self.state is S.PROCEEDING else min(2 * self._intervals["E"], t2)
        self._start("E", when, nxt)
        out.append(RequestToSend(self.key, self.request, retransmission=True))

    def _on_timer_F(self, when: float, out: list[TransactionEvent]) -> None:
        self._timeout("F", out)

    def _on_timer_K(self, when: float, out: list[TransactionEvent]) -> None:
        self._terminate(out)

    def receive_response(self, response: Response, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        if self.state not in (S.TRYING, S.PROCEEDING):
            return out  # Completed: absorb retransmitted finals
        out.append(ResponseReceived(self.key, response))
        if response.status_code < 200:
            if self.state is S.TRYING:
                self._goto(S.PROCEEDING)
            return out
        self._stop("E", "F")
        self._goto(S.COMPLETED)
        if self.reliable:
            self._terminate(out)
        else:
            self._start("K", now, self.timers.t4_s)
        return out


# -- server transactions -------------------------------------------------------------------


class ServerTransaction(Transaction):
    last_response: Response | None = None

    def _send(self, response: Response, out: list[TransactionEvent], retransmission: bool = False) -> None:
        out.append(ResponseToSend(self.key, response, retransmission))


class InviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.1 (Figure 7) with the RFC 6026 Accepted state."""

    TABLE = INVITE_SERVER
    INITIAL = S.PROCEEDING

    def start(self, now: float, *, send_100_trying: bool = True) -> list[TransactionEvent]:
        out: list[TransactionEvent] = [RequestReceived(self.key, self.request)]
        if send_100_trying:
            # §17.2.1: answer 100 at once so the client stops retransmitting the INVITE.
            self.last_response = make_response(self.request, 100)
            self._send(self.last_response, out)
        return out

    def receive_request(self, request: Request, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        if request.method == "ACK":
            if self.state is S.COMPLETED:
                self._stop("G", "H")
                self._goto(S.CONFIRMED)
                if self.reliable:
                    self._terminate(out)
                else:
                    self._start("I", now, self.timers.t4_s)
            elif self.state is S.ACCEPTED:
                out.append(RequestReceived(None, request))  # RFC 6026 §8.7: ACK for 2xx goes to the TU
            return out
        if self.state in (S.PROCEEDING, S.COMPLETED) and self.last_response is not None:
            self._send(self.last_response, out, retransmission=True)
        return out  # Accepted/Confirmed: absorb the retransmitted INVITE

    def send_response(self, response: Response, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        code = response.status_code
        if self.state is S.ACCEPTED and 200 <= code < 300:
            self._send(response, out, retransmission=True)  # TU retransmits its 2xx itself
            return out
        if self.state is not S.PROCEEDING:
            raise TransactionStateError(f"cannot send {code} in {self.state.name}")
        self.last_response = response
        self._send(response, out)
        if code < 200:
            return out
        t1 = self.timers.t1_s
        if code < 300:
            self._goto(S.ACCEPTED)
            self._start("L", now, 64 * t1)
        else:
            self._goto(S.COMPLETED)
            if not self.reliable:
                self._start("G", now, t1)
            self._start("H", now, 64 * t1)
        return out

    def _on_timer_G(self, when: float, out: list[TransactionEvent]) -> None:
        self._start("G", when, min(2 * self._intervals["G"], self.timers.t2_s))
        assert self.last_response is not None
        self._send(self.last_response, out, retransmission=True)

    def _on_timer_H(self, when: float, out: list[TransactionEvent]) -> None:
        self._timeout("H", out)

    def _on_timer_I(self, when: float, out: list[TransactionEvent]) -> None:
        self._terminate(out)

    def _on_timer_L(self, when: float, out: list[TransactionEvent]) -> None:
        self._terminate(out)


class NonInviteServerTransaction(ServerTransaction):
    """RFC 3261 §17.2.2 (Figure 8)."""

    TABLE = NON_INVITE_SERVER
    INITIAL = S.TRYING

    def start(self, now: float) -> list[TransactionEvent]:
        return [RequestReceived(self.key, self.request)]

    def receive_request(self, request: Request, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        if self.state is not S.TRYING and self.last_response is not None:
            self._send(self.last_response, out, retransmission=True)
        return out  # Trying: the retransmission is discarded

    def send_response(self, response: Response, now: float) -> list[TransactionEvent]:
        out: list[TransactionEvent] = []
        if self.state not in (S.TRYING, S.PROCEEDING):
            raise TransactionStateError(f"cannot send {response.status_code} in {self.state.name}")
        self.last_response = response
        self._send(response, out)
        if response.status_code < 200:
            if self.state is S.TRYING:
                self._goto(S.PROCEEDING)
            return out
        self._goto(S.COMPLETED)
        if self.reliable:
            self._terminate(out)
        else:
            self._start("J", now, 64 * self.timers.t1_s)
        return out

    def _on_timer_J(self, when: float, out: list[TransactionEvent]) -> None:
        self._terminate(out)


def server_key(request: Request) -> TransactionKey:
    """§17.2.3 matching key; ACK maps onto its INVITE. RFC 2543 peers (no magic cookie) fall
    back to the §17.2.3 legacy fields folded into the branch slot."""
    via: Via | None = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    if via is not None and via.is_rfc3261:
        return TransactionKey(via.branch or "", via.sent_by, method)
    cseq = request.cseq
    legacy = "|".join(
        [request.uri, request.from_tag or "", request.call_id or "", str(cseq.seq), str(via) if via else ""]
    )
    return TransactionKey("2543:" + legacy, via.sent_by if via else "", method)


def client_key(message: Request | Response) -> TransactionKey:
    """§17.1.3: top Via branch plus CSeq method."""
    via = message.top_via
    return TransactionKey((via.branch if via else None) or "", "", message.cseq.method)

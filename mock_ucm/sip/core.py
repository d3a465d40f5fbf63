"""The mock UCM's SIP core: edge.sip transactions in front of the registrar and call control.

Sans-IO: fed parsed messages with the id of the flow (connection) they arrived on and `now`;
returns `OutgoingRequest` / `OutgoingResponse` for the adapter. One timer (`get_timer()` /
`handle_timer(now)`) covers transaction timers (B/F: 32 s → 408 to the caller, H, L, M) and
registration expiry. TCP and TLS are reliable, so no retransmission timers run (RFC 3261 §17).
The usual REGISTER can instead be answered from its bytes (`answer_register`, fastpath.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from edge.config import LabConfig, UcmNode
from edge.sip.address import NameAddr
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
from edge.sip.fastpath import RawHead
from edge.sip.headers import Headers
from edge.sip.message import Request, Response, make_response, new_call_id, new_tag
from edge.sip.transaction import TransactionStateError, client_key, server_key
from edge.sip.transaction_layer import TransactionLayer
from edge.sip.uri import Uri
from mock_ucm.sip.calls import CallControl, EchoPorts, LocalNode
from mock_ucm.sip.events import OutgoingRequest, OutgoingResponse, SipOutput, Target
from mock_ucm.sip.fastpath import RegisterFastPath
from mock_ucm.sip.registrar import Binding, Registrar

log = logging.getLogger(__name__)

SERVER = "Cisco-CUCM14.0"
ALLOW = "INVITE, OPTIONS, INFO, BYE, CANCEL, ACK, PRACK, UPDATE, REFER, SUBSCRIBE, NOTIFY, REGISTER"
_UAS_METHODS = frozenset({"REGISTER", "OPTIONS", "INVITE"})

__all__ = ["LocalNode", "SipCoreCounters", "UcmSipCore"]


@dataclass
class SipCoreCounters:
    requests_in: int = 0
    responses_in: int = 0
    options_answered: int = 0
    not_found_481: int = 0
    method_not_allowed: int = 0
    stray_responses: int = 0
    own_requests: int = 0
    own_answered: int = 0
    own_failed: int = 0
    last_own_status: dict[str, int] = field(default_factory=dict)  # Call-ID -> final status (bounded)


class UcmSipCore:
    """Registrar + B2BUA of one UCM node behind one transaction layer."""

    def __init__(
        self,
        config: LabConfig,
        node: UcmNode,
        local: LocalNode,
        *,
        echo_ports: EchoPorts,
        digest_secret: bytes | None = None,
    ) -> None:
        self.local = local
        self.layer = TransactionLayer()
        self.registrar = Registrar(
            config.all_users(), domain=config.lab.domain, node_name=node.name, digest_secret=digest_secret
        )
        self.calls = CallControl(self.registrar, local, self, echo_ports, echo_number=config.echo_number)
        self.fast = RegisterFastPath(self.registrar, SERVER)
        self.counters = SipCoreCounters()
        self._out: list[SipOutput] = []
        self._server_flows: dict[TransactionKey, int | None] = {}
        self._client_targets: dict[TransactionKey, Target] = {}
        self._own: set[TransactionKey] = set()

    # -- input -----------------------------------------------------------------------------
    def receive_message(self, message: Request | Response, flow: int | None, now: float) -> list[SipOutput]:
        if isinstance(message, Response):
            self.counters.responses_in += 1
            self._process(self.layer.receive_response(message, now), now)
        else:
            self.counters.requests_in += 1
            key = server_key(message)
            self._server_flows.setdefault(key, flow)
            self._process(self.layer.receive_request(message, now, reliable=True), now, flow)
        return self._flush()

    def answer_register(
        self, data: bytes, head_end: int, flow: int | None, now: float, head: RawHead | None = None
    ) -> bytes | None:
        """The lean path (fastpath.py): the 200 OK to the usual REGISTER, as bytes to send on
        `flow`, straight from the framed message (`head`: its head as the framer split it, if it
        did); None if it must be parsed and given to `receive_message` (which answers
        everything, this included, the general way)."""
        out = self.fast.answer(data, head_end, flow, now, head)
        if out is not None:
            self.counters.requests_in += 1
        return out

    def transport_error(self, key: TransactionKey, now: float) -> list[SipOutput]:
        """The adapter could not deliver a request of client transaction `key`."""
        self._process(self.layer.transport_error(key, now), now)
        return self._flush()

    def get_timer(self) -> float | None:
        timers = [t for t in (self.layer.get_timer(), self.registrar.get_timer()) if t is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> list[SipOutput]:
        expired = self.registrar.handle_timer(now)
        for b in expired:
            log.debug("registration of %s (%s) expired", b.username, b.device)
        if expired:  # one line, not one per binding: 10,000 can expire together under load
            log.info("%d registrations expired (%d left)", len(expired), self.registrar.registered)
        self._process(self.layer.handle_timer(now), now)
        return self._flush()

    def request_binding(
        self,
        binding: Binding,
        method: str,
        now: float,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> list[SipOutput]:
        """An out-of-dialog request from UCM to a registered device (OPTIONS, NOTIFY): to its
        Contact URI, or via its Path as a preloaded Route (RFC 3327 §5)."""
        hop = NameAddr.parse(binding.paths[0]).uri if binding.paths else Uri.parse(binding.uri)
        target = Target.from_uri(hop)
        h = Headers()
        h.add("Via", str(self.local.via(target.transport)))
        h.add("Max-Forwards", "70")
        for p in binding.paths:
            h.add("Route", p)
        h.add("From", f"<sip:{self.local.host}>;tag={new_tag()}")
        h.add("To", f"<{binding.aor}>")
        h.add("Call-ID", new_call_id(self.local.host))
        h.add("CSeq", f"101 {method}")
        for name, value in headers:
            h.add(name, value)
        request = Request(method, binding.uri, h, body)
        self._own.add(self.send_request(request, target, now))
        self.counters.own_requests += 1
        return self._flush()

    # -- SipIo (used by call control) -----------------------------------------------------
    def send_request(self, request: Request, target: Target, now: float) -> TransactionKey:
        key = client_key(request)
        self._client_targets[key] = target
        self._process(self.layer.send_request(request, now, reliable=True), now)
        return key

    def send_ack(self, request: Request, target: Target) -> None:
        self._out.append(OutgoingRequest(request, target, None))

    def respond(self, key: TransactionKey, response: Response, now: float) -> None:
        if "server" not in response.headers:
            response.headers.add("Server", SERVER)
        try:
            self._process(self.layer.send_response(response, now), now)
        except (KeyError, TransactionStateError) as exc:  # the transaction ended meanwhile
            log.debug("dropping %s: %s", response, exc)

    # -- dispatch --------------------------------------------------------------------------
    def _flush(self) -> list[SipOutput]:
        out, self._out = self._out, []
        return out

    def _process(self, events: list[TransactionEvent], now: float, flow: int | None = None) -> None:
        # Wire output of a batch first (a 100 Trying precedes whatever the TU answers), then the
        # TU's events, then forgetting terminated transactions (the TU may still need them).
        for ev in events:
            if isinstance(ev, RequestToSend):
                target = self._client_targets.get(ev.key)
                if target is not None:
                    self._out.append(OutgoingRequest(ev.request, target, ev.key))
            elif isinstance(ev, ResponseToSend):
                self._out.append(OutgoingResponse(ev.response, self._server_flows.get(ev.key)))
        for ev in events:
            if isinstance(ev, RequestReceived):
                self._on_request(ev, flow, now)
            elif isinstance(ev, ResponseReceived):
                self._on_response(ev.key, ev.response, now)
            elif isinstance(ev, TransactionTimedOut | TransportErrorOccurred):
                self._on_failure(ev.key, 408 if isinstance(ev, TransactionTimedOut) else 503, now)
        for ev in events:
            if isinstance(ev, TransactionTerminated):
                self._server_flows.pop(ev.key, None)
                self._client_targets.pop(ev.key, None)
                self._own.discard(ev.key)

    def _on_request(self, ev: RequestReceived, flow: int | None, now: float) -> None:
        req = ev.request
        if ev.key is None:
            self.calls.handle_ack(req, now)
            return
        key = ev.key
        try:
            self._dispatch_request(key, req, flow, now, ev.cancelled)
        except SipParseError as exc:  # a header we only parse lazily was malformed
            self.respond(key, make_response(req, exc.status_code, exc.reason), now)

    def _dispatch_request(
        self,
        key: TransactionKey,
        req: Request,
        flow: int | None,
        now: float,
        cancelled: TransactionKey | None,
    ) -> None:
        method = req.method
        if method == "CANCEL":  # RFC 3261 §9.2: 200 if it matches a live INVITE, else 481
            self.respond(key, make_response(req, 481 if cancelled is None else 200), now)
            if cancelled is not None:
                self.calls.handle_cancel(cancelled, now)
        elif req.to_tag is not None:
            if not self.calls.handle_in_dialog(key, req, now):
                self.counters.not_found_481 += 1
                self.respond(key, make_response(req, 481), now)
        elif method == "REGISTER":
            self.respond(key, self.registrar.handle_register(req, now, flow=flow), now)
        elif method == "OPTIONS":
            self.counters.options_answered += 1
            self.respond(key, self._options_ok(req), now)
        elif method == "INVITE":
            self.calls.handle_invite(key, req, now)
        else:
            self.counters.method_not_allowed += 1
            resp = make_response(req, 405)
            resp.headers.add("Allow", ALLOW)
            self.respond(key, resp, now)

    def _options_ok(self, req: Request) -> Response:
        resp = make_response(req, 200)
        resp.headers.add("Allow", ALLOW)
        resp.headers.add("Accept", "application/sdp")
        resp.headers.add("Supported", "replaces, timer, X-cisco-supports-AR_SK")
        return resp

    def _on_response(self, key: TransactionKey | None, resp: Response, now: float) -> None:
        if key is None:
            self.counters.stray_responses += 1
        elif key in self._own:
            if resp.status_code >= 200:
                self._own_result(resp.call_id or "", resp.status_code)
        else:
            self.calls.handle_response(key, resp, now)

    def _on_failure(self, key: TransactionKey, status: int, now: float) -> None:
        if key in self._own:
            self._own_result("", status)
        elif key in self._client_targets:
            self.calls.handle_failure(key, status, now)

    def _own_result(self, call_id: str, status: int) -> None:
        if status < 300:
            self.counters.own_answered += 1
        else:
            self.counters.own_failed += 1
        results = self.counters.last_own_status
        if len(results) >= 100:
            results.pop(next(iter(results)))
        results[call_id] = status

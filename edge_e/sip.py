"""Expressway-E's SIP: clients on TLS 5061, Expressway-C on the traversal zone (TLS 7001).

E is a transaction-stateless proxy (RFC 3261 §16.11) between the two. Requests from clients go
to C over the zone connection C opened (E never dials C); requests from C go to the client's
own flow. Responses follow the Via stack. E record-routes dialog-forming requests twice (one
entry per interface, RFC 5658) and keeps the client's flow in its outside entry, so in-dialog
requests find the client's TLS connection again. It stamps `received`, `rport` and
`ingress-zone` on the client's Via (spec §5), answers the client's STUN keepalives only while
E→C→UCM is alive, and counts MRA registrations (`edge_e.registrations`). Plain REGISTERs and
C's answers to them take a byte-level fast path (`edge_e.sip_fast`).

C authenticates the zone's SIP connection with a digest REGISTER against E's local
authentication database, after E checked C's certificate SAN.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any

from edge.media_hooks import MediaRejected, MediaSession, PassthroughMedia, Side
from edge.pki import peer_has_san
from edge.sip.address import Via
from edge.sip.auth import DigestCredentials, DigestVerdict, DigestVerifier
from edge.sip.errors import SipParseError
from edge.sip.headers import Params
from edge.sip.message import Request, Response, Validation, make_response
from edge.sip.uri import Uri
from edge.sip_flow import SipFlow
from edge.sip_proxy import (
    decrement_max_forwards,
    error_response,
    is_dialog_forming,
    pop_own_routes,
    pop_via,
    push_via,
    stamp_top_via,
    stateless_branch,
    top_via,
)
from edge.stun import Class, Method, StunError, binding_success
from edge.stun import parse_message as parse_stun
from edge_e.registrations import RegistrationTable
from edge_e.sip_fast import EdgeRegisterFastPath
from traversal.zone import ChannelStatus

log = logging.getLogger(__name__)

FLOW_PARAM = "x-edge-flow"
ZONE_PARAM = "x-edge-zc"
CLIENT_PARAM = "x-edge-cf"
"""On E's own Via towards C: the client flow the request came in on, so the response finds it
without parsing the client's Via (RFC 3261 §16.11: a stateless proxy keeps such state in Via)."""
PATH_STATE_HEADER = "X-Edge-Path-State"
"""C reports on its keepalive OPTIONS whether it reaches Unified CM (for STUN answers)."""


class SdpTracker:
    """Which side made the pending SDP offer of each call (E is stateless for SIP, but media
    anchoring needs the offer/answer state): Call-ID → offering side; established calls."""

    def __init__(self, media: MediaSession) -> None:
        self.media = media
        self.offer_side: dict[str, Side | None] = {}
        self.established: set[str] = set()
        self.rejected = 0

    def on_request(self, req: Request, ingress: Side) -> Response | None:
        """Rewrite the SDP of a request in place; a response to send back if media refuses it."""
        call = req.call_id or ""
        if req.method == "BYE":
            self.end(call)
            return None
        body = _sdp_body(req)
        if body is None:
            return None
        try:
            if req.method in ("INVITE", "UPDATE"):
                new = self.media.process_offer(call, ingress, body)
                self.offer_side[call] = ingress
            elif req.method in ("ACK", "PRACK") and self.offer_side.get(call) not in (None, ingress):
                new = self.media.process_answer(call, ingress, body)
                self.offer_side[call] = None
            else:
                return None
        except MediaRejected as exc:
            self.rejected += 1
            if req.method == "ACK":
                return None
            return error_response(req, exc.status, "Not Acceptable Here", exc.reason)
        _set_body(req, new)
        return None

    def on_response(self, resp: Response, ingress: Side) -> None:
        call = resp.call_id or ""
        method = resp.cseq.method
        if method not in ("INVITE", "UPDATE"):
            return
        code = resp.status_code
        if method == "INVITE" and code >= 300 and call not in self.established:
            self.end(call)
            return
        if method == "INVITE" and 200 <= code < 300:
            self.established.add(call)
        body = _sdp_body(resp)
        if body is None or code < 101 or code >= 300:
            return
        pending = self.offer_side.get(call)
        try:
            if pending is not None and pending != ingress:
                new = self.media.process_answer(call, ingress, body)
                if code >= 200:
                    self.offer_side[call] = None
            elif pending is None:  # late offer: the offer comes in the 2xx, the answer in the ACK
                new = self.media.process_offer(call, ingress, body)
                self.offer_side[call] = ingress
            else:
                return
        except MediaRejected as exc:
            self.rejected += 1
            log.warning("media refused the SDP of %s: %s", call, exc.reason)
            return
        _set_body(resp, new)

    def end(self, call: str) -> None:
        self.media.end_call(call)
        self.offer_side.pop(call, None)
        self.established.discard(call)


def _sdp_body(msg: Request | Response) -> bytes | None:
    ctype = (msg.content_type or "").split(";", 1)[0].strip().lower()
    return msg.body if ctype == "application/sdp" and msg.body else None


def _set_body(msg: Request | Response, body: bytes) -> None:
    msg.body = body
    msg.headers.replace("Content-Length", str(len(body)))


class EdgeSip:
    def __init__(
        self,
        *,
        name: str,
        external_address: str,
        internal_address: str,
        client_port: int,
        zone_port: int,
        zone_name: str,
        zone_id: str,
        credentials: dict[str, str],
        verify_subject_name: str,
        maintenance: Callable[[], bool],
        keepalive_timeout_s: float,
        media: MediaSession | None = None,
    ) -> None:
        self.name = name
        self.external_address = external_address
        self.internal_address = internal_address
        self.client_port = client_port
        self.zone_port = zone_port
        self.zone_name = zone_name
        self.zone_id = zone_id
        self.credentials = credentials
        self.verify_subject_name = verify_subject_name
        self.maintenance = maintenance
        self.keepalive_timeout_s = keepalive_timeout_s
        self.salt = secrets.token_hex(4)
        self.verifier = DigestVerifier("traversal", secrets.token_bytes(16))
        self.clients: dict[str, SipFlow] = {}
        self.clients_by_addr: dict[tuple[str, int], SipFlow] = {}
        self.zone_flows: dict[str, SipFlow] = {}
        self.zone_status = ChannelStatus(
            "sip", "expc", state="failed", reason="no connection from Expressway-C"
        )
        self.registrations = RegistrationTable()
        self.sdp = SdpTracker(media or PassthroughMedia())
        self.counters: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self.fast = EdgeRegisterFastPath(self, CLIENT_PARAM)  # plain REGISTERs, on bytes

    # -- bookkeeping ----------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _is_own(self, uri: Uri) -> bool:
        return self._is_own_hostport(uri.host, uri.port)

    def _is_own_hostport(self, host: str, port: int | None) -> bool:
        if host == self.internal_address and port in (None, self.zone_port):
            return True
        return host == self.external_address and port in (None, self.client_port)

    def live_zone_flow(self) -> SipFlow | None:
        for flow in self.zone_flows.values():
            if flow.is_open:
                return flow
        return None

    def path_alive(self) -> bool:
        """E→C→UCM alive: an authenticated zone flow with a fresh keepalive saying UCM is up."""
        now = time.monotonic()
        for flow in self.zone_flows.values():
            if not flow.is_open:
                continue
            seen = float(flow.context.get("keepalive_at", 0.0))
            if now - seen <= self.keepalive_timeout_s and flow.context.get("ucm") == "up":
                return True
        return False

    # -- listeners ------------------------------------------------------------------------

    async def start(
        self, client_ctx: ssl.SSLContext, zone_ctx: ssl.SSLContext
    ) -> list[tuple[str, str, str, int]]:
        loop = asyncio.get_running_loop()
        client_server = await loop.create_server(
            lambda: SipFlow(
                on_message=self._client_message,
                on_closed=self._client_closed,
                on_stun=self._client_stun,
                on_connected=self._client_connected,
                on_frame=self.fast.client_frame,
                name="sip-client",
                validation=Validation.PROXY,  # RFC 3261 §16.3: check what E uses, pass the rest
            ),
            self.external_address,
            self.client_port,
            ssl=client_ctx,
            reuse_address=True,
        )
        zone_server = await loop.create_server(
            lambda: SipFlow(
                on_message=self._zone_message,
                on_closed=self._zone_closed,
                on_connected=self._zone_connected,
                on_frame=self.fast.zone_frame,
                name="sip-zone",
                strict=False,
            ),
            self.internal_address,
            self.zone_port,
            ssl=zone_ctx,
            reuse_address=True,
        )
        self._servers = [client_server, zone_server]
        return [
            ("sip", "tls", self.external_address, self.client_port),
            ("traversal-sip", "tls", self.internal_address, self.zone_port),
        ]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for flow in [*self.clients.values(), *self.zone_flows.values()]:
            flow.close("Expressway-E shutting down")
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)
            except TimeoutError:
                pass

    # -- client side ----------------------------------------------------------------------

    def _client_connected(self, flow: SipFlow) -> None:
        self.clients[flow.flow_id] = flow
        self.clients_by_addr[flow.peer] = flow

    def _client_closed(self, flow: SipFlow, reason: str) -> None:
        self.clients.pop(flow.flow_id, None)
        if self.clients_by_addr.get(flow.peer) is flow:
            del self.clients_by_addr[flow.peer]

    def _client_stun(self, flow: SipFlow, data: bytes) -> None:
        """MRA HA keepalive (spec §5): answer only while the whole path to UCM is alive."""
        try:
            msg = parse_stun(data)
        except StunError:
            self._count("stun_malformed")
            return
        if msg.method != Method.BINDING or msg.message_class != Class.REQUEST:
            return
        if not self.path_alive():
            self._count("stun_unanswered")
            return
        self._count("stun_answered")
        flow.write(binding_success(msg, flow.peer).serialize(fingerprint=True))

    def _client_message(self, flow: SipFlow, msg: Request | Response) -> None:
        if isinstance(msg, Response):
            self._client_response(flow, msg)
            return
        req = msg
        self._count(f"in_{req.method.lower()}" if req.method in ("REGISTER", "INVITE") else "in_other")
        if self.maintenance() and req.method in ("REGISTER", "INVITE") and req.to_tag is None:
            self._reply(flow, req, 503, "Service Unavailable", "maintenance mode")
            return
        if not decrement_max_forwards(req):
            self._reply(flow, req, 483, "Too Many Hops")
            return
        try:
            stamp_top_via(req, flow.peer, ingress_zone=self.zone_name)
            routes = [r.uri for r in req.routes]
            own = pop_own_routes(req, self._is_own)
        except SipParseError as exc:
            self._reply(flow, req, exc.status_code, exc.reason)
            return
        zone_param = routes[0].params.get("zone-id") if routes and not own else None
        if zone_param is not None and zone_param != self.zone_id:
            self._reply(flow, req, 404, "Not Found", f"no traversal zone with zone-id {zone_param}")
            return
        zone = self.live_zone_flow()
        if zone is None:
            self._count("zone_down")
            self._reply(flow, req, 503, "Service Unavailable", "traversal zone to Expressway-C is down")
            return
        refusal = self.sdp.on_request(req, "outside")
        if refusal is not None:
            flow.send(refusal)
            return
        if is_dialog_forming(req):
            # RFC 5658 double record-route: the entry facing the client carries its flow.
            req.headers.prepend(
                "Record-Route",
                f"<sip:{flow.flow_id}@{self.external_address}:{self.client_port};"
                f"transport=tls;lr;{FLOW_PARAM}>",
            )
            req.headers.prepend(
                "Record-Route", f"<sip:{self.internal_address}:{self.zone_port};transport=tls;lr>"
            )
        via = Via(
            self.internal_address,
            self.zone_port,
            "TLS",
            Params(
                [("branch", stateless_branch(req, self.salt)), (CLIENT_PARAM, flow.flow_id), ("rport", None)]
            ),
        )
        push_via(req, via)
        zone.send(req)

    def _client_response(self, flow: SipFlow, resp: Response) -> None:
        """A client answering a request C sent: pop our Via, return it on the zone flow."""
        via = pop_via(resp)
        if via is None or not self._is_own_hostport(via.host, via.port):
            self._count("stray_response")
            return
        zone_id = via.params.get(ZONE_PARAM)
        zone = self.zone_flows.get(zone_id or "") or self.live_zone_flow()
        if zone is None:
            self._count("zone_down")
            return
        self.sdp.on_response(resp, "outside")
        zone.send(resp)

    def _reply(
        self, flow: SipFlow, req: Request, status: int, reason: str, warning: str | None = None
    ) -> None:
        self._count(f"reply_{status}")
        if req.method == "ACK":
            return
        # The client's Via may carry our stamps already; a response copies Via as it stands.
        flow.send(error_response(req, status, reason, warning, agent=self.name))

    # -- zone side ------------------------------------------------------------------------

    def _zone_connected(self, flow: SipFlow) -> None:
        flow.context["authenticated"] = False
        if flow.ssl_object is None or not peer_has_san(flow.ssl_object, self.verify_subject_name):
            reason = f"TLS verify subject name {self.verify_subject_name!r} not in the client certificate SAN"
            flow.context["reject"] = reason
            self._zone_reject(reason)

    def _zone_reject(self, reason: str) -> None:
        self._count("zone_rejected")
        log.warning("sip zone: rejected Expressway-C: %s", reason)
        if not self.live_zone_flow():
            self.zone_status.set("failed", f"Expressway-C rejected: {reason}")

    def _zone_closed(self, flow: SipFlow, reason: str) -> None:
        if self.zone_flows.pop(flow.flow_id, None) is not None and not self.live_zone_flow():
            self.zone_status.set("failed", f"link from Expressway-C lost: {reason}")
            log.warning("sip zone: link from Expressway-C lost: %s", reason)

    def _zone_message(self, flow: SipFlow, msg: Request | Response) -> None:
        if not flow.context.get("authenticated"):
            self._zone_handshake(flow, msg)
            return
        if isinstance(msg, Response):
            self._zone_response(msg)
            return
        req = msg
        path_state = req.headers.get(PATH_STATE_HEADER) if req.method == "OPTIONS" else None
        # C's keepalive names E by its FQDN (the zone peer address), so the header marks it too.
        if (
            req.method == "OPTIONS"
            and req.request_uri.user is None
            and (path_state is not None or self._is_own(req.request_uri))
        ):
            flow.context["keepalive_at"] = time.monotonic()
            flow.context["ucm"] = (path_state or "down").lower()
            flow.send(make_response(req, 200, "OK"))
            return
        self._zone_request(flow, req)

    def _zone_handshake(self, flow: SipFlow, msg: Request | Response) -> None:
        """C's digest REGISTER on the zone connection (E's local authentication database)."""
        if isinstance(msg, Response):
            return
        if "reject" in flow.context:
            flow.send(error_response(msg, 403, "Forbidden", flow.context["reject"], agent=self.name))
            flow.close("rejected")
            return
        if msg.method != "REGISTER":
            flow.send(
                error_response(msg, 403, "Forbidden", "traversal zone not authenticated", agent=self.name)
            )
            return
        now = time.time()
        auth = msg.headers.get("Authorization")
        if auth is None:
            resp = make_response(msg, 401, "Unauthorized")
            resp.headers.add("WWW-Authenticate", self.verifier.challenge(now).to_header())
            flow.send(resp)
            return
        try:
            username = DigestCredentials.parse(auth).username
        except ValueError:
            username = ""
        password = self.credentials.get(username)
        verdict = (
            self.verifier.verify(auth, "REGISTER", now, password=password)
            if password is not None
            else DigestVerdict.BAD_RESPONSE
        )
        if verdict == DigestVerdict.STALE:
            resp = make_response(msg, 401, "Unauthorized")
            resp.headers.add("WWW-Authenticate", self.verifier.challenge(now, stale=True).to_header())
            flow.send(resp)
            return
        if verdict != DigestVerdict.OK:
            self._zone_reject("authentication failed")
            flow.send(error_response(msg, 403, "Forbidden", "authentication failed", agent=self.name))
            flow.close("authentication failed")
            return
        flow.context["authenticated"] = True
        flow.context["keepalive_at"] = time.monotonic()
        flow.context["ucm"] = (msg.headers.get(PATH_STATE_HEADER) or "down").lower()
        self.zone_flows[flow.flow_id] = flow
        if self.zone_status.connects:
            self.zone_status.reconnects += 1
        self.zone_status.connects += 1
        self.zone_status.set("active", "")
        log.info("sip zone: Expressway-C authenticated from %s:%d", *flow.peer)
        ok = make_response(msg, 200, "OK")
        ok.headers.add("Expires", "3600")
        flow.send(ok)

    def _zone_request(self, zflow: SipFlow, req: Request) -> None:
        """A request from C towards a client: find the client's flow."""
        if not decrement_max_forwards(req):
            zflow.send(error_response(req, 483, "Too Many Hops", agent=self.name))
            return
        try:
            stamp_top_via(req, zflow.peer)
            popped = pop_own_routes(req, self._is_own)
        except SipParseError as exc:
            zflow.send(error_response(req, exc.status_code, exc.reason, agent=self.name))
            return
        target: SipFlow | None = None
        for uri in popped:
            if FLOW_PARAM in uri.params and uri.user:
                target = self.clients.get(uri.user)
        if target is None:
            ruri = req.request_uri
            port = ruri.port or 5061
            target = self.clients_by_addr.get((ruri.host, port))
        if target is None or not target.is_open:
            if req.method != "ACK":
                zflow.send(
                    error_response(
                        req, 480, "Temporarily Unavailable", "client flow not connected", agent=self.name
                    )
                )
            self._count("client_gone")
            return
        refusal = self.sdp.on_request(req, "inside")
        if refusal is not None:
            zflow.send(refusal)
            return
        if is_dialog_forming(req):
            req.headers.prepend(
                "Record-Route", f"<sip:{self.internal_address}:{self.zone_port};transport=tls;lr>"
            )
            req.headers.prepend(
                "Record-Route",
                f"<sip:{target.flow_id}@{self.external_address}:{self.client_port};"
                f"transport=tls;lr;{FLOW_PARAM}>",
            )
        via = Via(
            self.external_address,
            self.client_port,
            "TLS",
            Params(
                [("branch", stateless_branch(req, self.salt)), (ZONE_PARAM, zflow.flow_id), ("rport", None)]
            ),
        )
        push_via(req, via)
        target.send(req)

    def _zone_response(self, resp: Response) -> None:
        """C answering a client's request: pop our Via, which names the client flow."""
        via = pop_via(resp)
        if via is None or not self._is_own_hostport(via.host, via.port):
            self._count("stray_response")
            return
        flow_id = via.params.get(CLIENT_PARAM)
        flow = self.clients.get(flow_id) if flow_id is not None else None
        if flow is None:  # no token (or its flow is gone): the address E stamped on the client's Via
            client_via = top_via(resp)
            if client_via is None:
                return
            addr = (client_via.received or client_via.host, client_via.rport or client_via.port or 5061)
            flow = self.clients_by_addr.get(addr)
        if flow is None or not flow.is_open:
            self._count("client_gone")
            return
        if resp.cseq.method == "REGISTER" and 200 <= resp.status_code < 300:
            self._track_registration(resp)
        self.sdp.on_response(resp, "inside")
        flow.send(resp)

    def _track_registration(self, resp: Response) -> None:
        h = resp.headers
        self.registrations.track(h.get("to"), h.get_all("contact"), h.get("expires"), time.monotonic())

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "registrations": self.registrations.current(now),
            "registrations_peak": self.registrations.peak,
            "client_flows": len(self.clients),
            "zone_flows": len([f for f in self.zone_flows.values() if f.is_open]),
            "path_alive": self.path_alive(),
            "counters": dict(self.counters),
            "media_calls": len(self.sdp.offer_side),
        }

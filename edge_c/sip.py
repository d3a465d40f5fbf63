"""Expressway-C's SIP: the zone connection to each E (TLS 7001) and the way to Unified CM.

C dials each E's traversal SIP port (`edge_c.sip_zone`: digest REGISTER, OPTIONS keepalives that
tell E whether C reaches Unified CM, spec §5). Requests from the zone go to the user's UCM node
(TCP 5060 or TLS 5061), with the Contact rewritten to C and the client's address kept in
`orig-hostport` (or a `Path` header, RFC 3327, when that setting is on); requests from UCM go
back over the zone to the client. Max-Forwards is capped at the zone's hop limit (15; 483
beyond). Plain REGISTERs and their answers take a byte-level fast path (`edge_c.sip_fast`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from edge.config import LabConfig, UcmNode
from edge.media_hooks import MediaSession, PassthroughMedia, Side
from edge.sip.address import NameAddr, Via, split_name_addr
from edge.sip.errors import SipParseError
from edge.sip.headers import Params
from edge.sip.message import Request, Response, make_response, new_branch, new_call_id, new_tag
from edge.sip.uri import Uri
from edge.sip_flow import SipFlow, host_port
from edge.sip_proxy import (
    decrement_max_forwards,
    error_response,
    is_dialog_forming,
    nth_via,
    pop_own_routes,
    pop_via,
    push_via,
    stamp_top_via,
    stateless_branch,
)
from edge_c.b2bua import B2bua
from edge_c.b2bua_events import B2buaOutput, CallAnswered, CallEnded, CallStarted, SendToUcm, SendToZone
from edge_c.sip_fast import ExpcRegisterFastPath
from edge_c.sip_zone import ZoneSipConnection

log = logging.getLogger(__name__)

FLOW_PARAM = "x-c-flow"


class ExpcSip:
    def __init__(
        self,
        config: LabConfig,
        *,
        ucm_health: Callable[[], bool],
        maintenance: Callable[[], bool],
        media: MediaSession | None = None,
    ) -> None:
        self.config = config
        self.settings = config.expc
        self.address = config.expc.address
        self.maintenance = maintenance
        self.ucm_health = ucm_health
        self.salt = secrets.token_hex(4)
        self.zone_conns: dict[str, ZoneSipConnection] = {}  # flow id → connection
        self.ucm_flows: dict[str, SipFlow] = {}  # flow id → flow (both directions)
        self.ucm_out: dict[str, SipFlow] = {}  # node name → outbound flow
        self.ucm_down: dict[str, str] = {}  # node name → reason
        self.client_edge: dict[tuple[str, int], str] = {}  # client addr → zone flow id
        self.counters: dict[str, int] = {}
        self._servers: list[asyncio.Server] = []
        self._ucm_ctx: ssl.SSLContext | None = None
        self._connecting: dict[str, asyncio.Future[SipFlow]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ucm_port = (
            config.expc.sip_tls_port if config.expc.ucm_transport == "tls" else config.expc.sip_tcp_port
        )
        self.media: MediaSession = media or PassthroughMedia()
        transport = config.expc.ucm_transport
        # Spec §5: C is a B2BUA for every MRA call; everything else stays on the proxy path.
        self.b2bua = B2bua(
            self.address,
            zone_contact=f"<sip:{self.address}:{config.expc.sip_tls_port};transport=tls>",
            ucm_contact=f"<sip:{self.address}:{self.ucm_port};transport={transport}>",
            media=self.media,
            agent=config.expc.name,
            max_calls=5000,
            via_for=self._via_for,
        )
        self._b2bua_timer: asyncio.TimerHandle | None = None
        self.calls_active = 0
        self.calls_peak = 0
        self.fast = ExpcRegisterFastPath(self, FLOW_PARAM)  # plain REGISTERs, on bytes

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- listeners towards UCM ------------------------------------------------------------

    async def start(
        self, ucm_server_ctx: ssl.SSLContext, ucm_client_ctx: ssl.SSLContext
    ) -> list[tuple[str, str, str, int]]:
        self._ucm_ctx = ucm_client_ctx
        loop = asyncio.get_running_loop()
        tcp = await loop.create_server(
            self._ucm_flow_factory, self.address, self.settings.sip_tcp_port, reuse_address=True
        )
        tls = await loop.create_server(
            self._ucm_flow_factory,
            self.address,
            self.settings.sip_tls_port,
            ssl=ucm_server_ctx,
            reuse_address=True,
        )
        self._servers = [tcp, tls]
        return [
            ("sip-ucm", "tcp", self.address, self.settings.sip_tcp_port),
            ("sip-ucm-tls", "tls", self.address, self.settings.sip_tls_port),
        ]

    def _ucm_flow_factory(self) -> SipFlow:
        return SipFlow(
            on_message=self._ucm_message,
            on_closed=self._ucm_closed,
            on_connected=self._ucm_connected,
            on_frame=self.fast.ucm_frame,
            name="sip-ucm",
            strict=False,
        )

    def _ucm_connected(self, flow: SipFlow) -> None:
        self.ucm_flows[flow.flow_id] = flow

    def _ucm_closed(self, flow: SipFlow, reason: str) -> None:
        self.ucm_flows.pop(flow.flow_id, None)
        for name, out in list(self.ucm_out.items()):
            if out is flow:
                del self.ucm_out[name]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.zone_conns.values()):
            conn.close("Expressway-C shutting down")
        for flow in list(self.ucm_flows.values()):
            flow.close("Expressway-C shutting down")

    # -- routing --------------------------------------------------------------------------

    def _is_own(self, uri: Uri) -> bool:
        return uri.host == self.address

    def _live_ucm(self) -> list[UcmNode]:
        nodes = self.config.ucm
        if not self.ucm_down:
            return nodes
        return [n for n in nodes if n.name not in self.ucm_down] or list(nodes)

    def _pick_ucm(self, req: Request) -> UcmNode:
        live = self._live_ucm()
        if len(live) == 1:
            return live[0]  # nothing to choose: no need to parse Route or Request-URI
        for candidate in (req.headers.get_all("Route")[:1], [req.uri]):
            for text in candidate:
                try:
                    uri = (
                        NameAddr.parse(text).uri
                        if candidate is not None and text.startswith("<")
                        else Uri.parse(text)
                    )
                except SipParseError:
                    continue
                for n in live:
                    if uri.host in (n.fqdn, n.address):
                        return n
        return live[0]

    async def _ucm_flow(self, node: UcmNode) -> SipFlow:
        flow = self.ucm_out.get(node.name)
        if flow is not None and flow.is_open:
            return flow
        pending = self._connecting.get(node.name)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[SipFlow] = asyncio.get_running_loop().create_future()
        self._connecting[node.name] = fut
        try:
            tls = self.settings.ucm_transport == "tls"
            port = node.sip_tls_port if tls else node.sip_tcp_port
            loop = asyncio.get_running_loop()
            _, new_flow = await asyncio.wait_for(
                loop.create_connection(
                    self._ucm_flow_factory,
                    node.address,
                    port,
                    ssl=self._ucm_ctx if tls else None,
                    server_hostname=node.fqdn if tls else None,
                    local_addr=(self.address, 0),
                ),
                3.0,
            )
            self.ucm_out[node.name] = new_flow
            self.ucm_down.pop(node.name, None)
            fut.set_result(new_flow)
            return new_flow
        except BaseException as exc:
            self.ucm_down[node.name] = str(exc) or type(exc).__name__
            if not fut.done():
                fut.set_exception(ConnectionError(f"{node.name}: {exc}"))
                fut.exception()
            raise
        finally:
            self._connecting.pop(node.name, None)

    # -- the B2BUA ------------------------------------------------------------------------

    def _via_for(self, side: Side) -> Via:
        if side == "outside":
            return Via(self.address, self.settings.sip_tls_port, "TLS")
        return Via(self.address, self.ucm_port, self.settings.ucm_transport.upper())

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _run(self, outs: list[B2buaOutput]) -> None:
        for out in outs:
            if isinstance(out, SendToZone):
                self._b2bua_to_zone(out)
            elif isinstance(out, SendToUcm):
                self._b2bua_to_ucm(out)
            elif isinstance(out, CallStarted):
                self._count("calls_started")
                self.calls_active += 1
                self.calls_peak = max(self.calls_peak, self.calls_active)
            elif isinstance(out, CallAnswered):
                self._count("calls_answered")
            elif isinstance(out, CallEnded):
                self._count("calls_ended")
                self.calls_active = max(0, self.calls_active - 1)
        self._arm_b2bua_timer()

    def _arm_b2bua_timer(self) -> None:
        if self._b2bua_timer is not None:
            self._b2bua_timer.cancel()
            self._b2bua_timer = None
        deadline = self.b2bua.get_timer()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._b2bua_timer = loop.call_at(deadline, self._b2bua_timer_fired)

    def _b2bua_timer_fired(self) -> None:
        self._b2bua_timer = None
        self._run(self.b2bua.handle_timer(self._now()))

    def _send_failed(self, msg: Request | Response) -> None:
        if isinstance(msg, Request):
            self._run(self.b2bua.send_failed(msg, self._now()))

    def _b2bua_to_zone(self, out: SendToZone) -> None:
        conn = self.zone_conns.get(out.flow_hint or "")
        if conn is None or not conn.flow.is_open:
            msg = out.message
            zone_id = None
            if isinstance(msg, Request):
                uri = msg.request_uri
                zone_id = self.client_edge.get((uri.host, uri.port or 5061))
            conn = self.zone_conns.get(zone_id or "") or next(
                (c for c in self.zone_conns.values() if c.flow.is_open), None
            )
        if conn is None or not conn.flow.send(out.message):
            self._count("zone_down")
            self._send_failed(out.message)

    def _b2bua_to_ucm(self, out: SendToUcm) -> None:
        flow = self.ucm_flows.get(out.node_hint or "")
        if flow is not None and flow.send(out.message):
            return
        msg = out.message
        if not isinstance(msg, Request):
            self._count("ucm_flow_gone")
            return

        async def connect_and_send() -> None:
            try:
                target = await self._ucm_flow(self._pick_ucm(msg))
            except (OSError, TimeoutError, ConnectionError):
                target = None
            if target is None or not target.send(msg):
                self._count("ucm_unreachable")
                self._send_failed(msg)

        self._spawn(connect_and_send())

    # -- from the zone --------------------------------------------------------------------

    def _zone_message(self, conn: ZoneSipConnection, msg: Request | Response) -> None:
        if isinstance(msg, Response):
            if self.b2bua.owns(msg):
                self._run(self.b2bua.receive_from_zone(msg, conn.flow.flow_id, self._now()))
                return
            self._zone_response(msg)
            return
        req = msg
        flow = conn.flow
        if not decrement_max_forwards(req, cap=self.settings.zone.max_hops):
            self._count("reply_483")
            flow.send(error_response(req, 483, "Too Many Hops", agent=self.settings.name))
            return
        if self.maintenance() and req.method in ("REGISTER", "INVITE") and req.to_tag is None:
            flow.send(
                error_response(req, 503, "Service Unavailable", "maintenance mode", agent=self.settings.name)
            )
            return
        try:
            stamp_top_via(req, flow.peer, ingress_zone=self.settings.zone.name)
            pop_own_routes(req, self._is_own)
            client_via = nth_via(req, 1) or nth_via(req, 0)
            assert client_via is not None  # the top Via was just stamped
            client_addr = (
                client_via.received or client_via.host,
                client_via.rport or client_via.port or 5061,
            )
            if req.method == "REGISTER":
                # REGISTER never belongs to a dialog (RFC 3261 §10), so never to the B2BUA.
                self.client_edge[client_addr] = flow.flow_id
                self._count("register")
            elif self.b2bua.owns(req):
                self._run(self.b2bua.receive_from_zone(req, flow.flow_id, self._now()))
                return
            self._rewrite_contacts(req, client_addr)
        except SipParseError as exc:
            flow.send(error_response(req, exc.status_code, exc.reason, agent=self.settings.name))
            return
        node = self._pick_ucm(req)
        ucm = self.ucm_out.get(node.name)
        if ucm is not None and ucm.is_open:
            self._forward_to_ucm(req, flow, node, ucm)  # the usual case: no task per request
        else:
            self._spawn(self._to_ucm(req, flow))

    def _rewrite_contacts(self, req: Request, client_addr: tuple[str, int]) -> None:
        """Spec §5: Contact host:port → C with orig-hostport, or a Path header in Path mode."""
        transport = self.settings.ucm_transport
        if req.method == "REGISTER" and self.settings.sip_path_headers:
            req.headers.prepend(
                "Path",
                f"<sip:{self.address}:{self.ucm_port};transport={transport};lr;"
                f"orig-hostport={client_addr[0]}:{client_addr[1]}>",
            )
            return
        if "Contact" not in req.headers or req.contact_is_star:
            return
        # Only the URI is rewritten; display name and header parameters (the MRA markers,
        # +sip.instance, x-cisco-*) pass through verbatim (spec §5).
        rewritten = []
        for value in req.headers.get_all("Contact"):
            before, uri_text, after = split_name_addr(value)
            uri = Uri.parse(uri_text)
            uri.host = self.address
            uri.port = self.ucm_port
            uri.params.set("transport", transport)
            uri.params.set("orig-hostport", f"{client_addr[0]}:{client_addr[1]}")
            rewritten.append(f"{before}{uri}{after}" if before else f"<{uri}>{after}")
        req.headers.remove("Contact")
        for value in rewritten:
            req.headers.add("Contact", value)

    async def _to_ucm(self, req: Request, zflow: SipFlow) -> None:
        node = self._pick_ucm(req)
        flow: SipFlow | None = None
        try:
            flow = await self._ucm_flow(node)
        except (OSError, TimeoutError, ConnectionError) as exc:
            # Spec §4/§5: fail over to another node of the cluster when one is down.
            others = [n for n in self.config.ucm if n.name != node.name and n.name not in self.ucm_down]
            for other in others:
                with contextlib.suppress(OSError, TimeoutError, ConnectionError):
                    flow = await self._ucm_flow(other)
                    node = other
                    break
            if flow is None:
                self._count("ucm_unreachable")
                if req.method != "ACK":
                    zflow.send(
                        error_response(
                            req,
                            503,
                            "Service Unavailable",
                            f"Unified CM unreachable: {exc}",
                            agent=self.settings.name,
                        )
                    )
                return
        self._forward_to_ucm(req, zflow, node, flow)

    def _forward_to_ucm(self, req: Request, zflow: SipFlow, node: UcmNode, flow: SipFlow) -> None:
        if is_dialog_forming(req):
            req.headers.prepend(
                "Record-Route", f"<sip:{self.address}:{self.settings.sip_tls_port};transport=tls;lr>"
            )
            req.headers.prepend(
                "Record-Route",
                f"<sip:{self.address}:{self.ucm_port};transport={self.settings.ucm_transport};lr>",
            )
        via = Via(
            self.address,
            self.ucm_port,
            self.settings.ucm_transport.upper(),
            Params(
                [
                    ("branch", stateless_branch(req, self.salt)),
                    ("egress-zone", f"CE{self.settings.ucm_transport}-{node.name}"),
                    (FLOW_PARAM, zflow.flow_id),
                    ("rport", None),
                ]
            ),
        )
        push_via(req, via)
        flow.send(req)

    def _zone_response(self, resp: Response) -> None:
        via = pop_via(resp)
        if via is None or via.host != self.address:
            self._count("stray_response")
            return
        flow = self.ucm_flows.get(via.params.get(FLOW_PARAM) or "")
        if flow is None or not flow.is_open:
            self._count("ucm_flow_gone")
            return
        flow.send(resp)

    # -- from UCM -------------------------------------------------------------------------

    def _ucm_message(self, flow: SipFlow, msg: Request | Response) -> None:
        if isinstance(msg, Response):
            if msg.cseq.method != "REGISTER" and self.b2bua.owns(msg):  # B2BUA sends no REGISTER
                self._run(self.b2bua.receive_from_ucm(msg, flow.flow_id, self._now()))
                return
            via = pop_via(msg)
            if via is None or via.host != self.address:
                self._count("stray_response")
                return
            if FLOW_PARAM not in via.params and msg.cseq.method == "OPTIONS":
                self._count("ucm_keepalive_ok")  # our own 30 s keepalive (spec §5)
                return
            conn = self.zone_conns.get(via.params.get(FLOW_PARAM) or "")
            if conn is None or not conn.flow.is_open:
                self._count("zone_flow_gone")
                return
            conn.flow.send(msg)
            return
        req = msg
        if req.method == "OPTIONS" and req.request_uri.user is None and self._is_own(req.request_uri):
            flow.send(make_response(req, 200, "OK"))
            return
        if not decrement_max_forwards(req):
            flow.send(error_response(req, 483, "Too Many Hops", agent=self.settings.name))
            return
        try:
            stamp_top_via(req, flow.peer)
            popped = pop_own_routes(req, self._is_own)
        except SipParseError as exc:
            flow.send(error_response(req, exc.status_code, exc.reason, agent=self.settings.name))
            return
        orig = req.request_uri.params.get("orig-hostport")
        if orig is None:
            for uri in popped:
                orig = uri.params.get("orig-hostport") or orig
            if orig is not None:
                req.headers.prepend("Route", self._edge_route(orig))
        else:
            uri = req.request_uri.copy()
            host, port = host_port(orig)
            uri.host, uri.port = host, port
            uri.params.remove("orig-hostport")
            uri.params.set("transport", "tls")
            req.uri = uri
        if self.b2bua.owns(req):
            self._run(self.b2bua.receive_from_ucm(req, flow.flow_id, self._now()))
            return
        client_addr = host_port(orig) if orig else None
        zone_id = self.client_edge.get((client_addr[0], client_addr[1] or 5061)) if client_addr else None
        conn = self.zone_conns.get(zone_id or "") or next(
            (c for c in self.zone_conns.values() if c.flow.is_open), None
        )
        if conn is None:
            self._count("zone_down")
            if req.method != "ACK":
                flow.send(
                    error_response(
                        req, 503, "Service Unavailable", "traversal zone down", agent=self.settings.name
                    )
                )
            return
        if is_dialog_forming(req):
            req.headers.prepend(
                "Record-Route",
                f"<sip:{self.address}:{self.ucm_port};transport={self.settings.ucm_transport};lr>",
            )
            req.headers.prepend(
                "Record-Route", f"<sip:{self.address}:{self.settings.sip_tls_port};transport=tls;lr>"
            )
        via = Via(
            self.address,
            self.settings.sip_tls_port,
            "TLS",
            Params(
                [
                    ("branch", stateless_branch(req, self.salt)),
                    ("egress-zone", self.settings.zone.name),
                    (FLOW_PARAM, flow.flow_id),
                    ("rport", None),
                ]
            ),
        )
        push_via(req, via)
        conn.flow.send(req)

    def _edge_route(self, orig: str) -> str:
        edge = self.config.expe[0]
        return (
            f"<sip:{edge.internal_address}:{edge.traversal_sip_port};transport=tls;lr;orig-hostport={orig}>"
        )

    # -- UCM keepalive --------------------------------------------------------------------

    async def ucm_keepalive(self, interval_s: float) -> None:
        """OPTIONS to every UCM node every 30 s (spec §5); a node that does not answer is down."""
        while True:
            for node in self.config.ucm:
                await self._ping_ucm(node)
            await asyncio.sleep(interval_s)

    async def _ping_ucm(self, node: UcmNode) -> None:
        try:
            flow = await self._ucm_flow(node)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.ucm_down[node.name] = str(exc) or type(exc).__name__
            return
        req = Request("OPTIONS", f"sip:{node.address}:{node.sip_tcp_port}", [], b"")
        via = Via(
            self.address,
            self.ucm_port,
            self.settings.ucm_transport.upper(),
            Params([("branch", new_branch()), ("rport", None)]),
        )
        req.headers.add("Via", str(via))
        req.headers.add("Max-Forwards", "70")
        req.headers.add("From", f"<sip:{self.address}>;tag={new_tag()}")
        req.headers.add("To", f"<sip:{node.address}>")
        req.headers.add("Call-ID", new_call_id(self.address))
        req.headers.add("CSeq", "1 OPTIONS")
        req.headers.add("Content-Length", "0")
        flow.send(req)

    def _calls_status(self) -> dict[str, Any]:
        b2bua = self.b2bua.status()
        return {
            "current": self.calls_active,
            "peak": self.calls_peak,
            "legs": b2bua["active"][:100],  # bounded: status pages page through at most this
            "counts": b2bua["counts"],
        }

    def status(self) -> dict[str, Any]:
        return {
            "zone_connections": [
                {"peer": c.peer_name, "flow": c.flow.flow_id, "rtt_ms": c.last_rtt_ms}
                for c in self.zone_conns.values()
                if c.flow.is_open
            ],
            "ucm_connections": {name: f.flow_id for name, f in self.ucm_out.items() if f.is_open},
            "ucm_down": dict(self.ucm_down),
            "counters": dict(self.counters),
            "calls": self._calls_status(),
            "media": self.media.snapshot(),
        }

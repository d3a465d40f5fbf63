"""Expressway-C's end of the SIP traversal zone: one TLS connection to each E (TLS 7001).

C dials each E's traversal SIP port (E never dials C), authenticates with a digest REGISTER
against E's local authentication database and keeps the connection alive with OPTIONS that also
tell E whether C reaches Unified CM: E answers clients' STUN keepalives only then (spec §5).
`ZoneConnector` is the `traversal.client` connector that does this for one E peer; the
connections it makes carry `ExpcSip`'s traffic (its `_zone_message` and fast path).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from edge.sip.address import Via
from edge.sip.auth import compute_authorization
from edge.sip.headers import Params
from edge.sip.message import Request, Response, new_branch, new_call_id, new_tag
from edge.sip_flow import SipFlow
from traversal.channel import LinkRejectedError

if TYPE_CHECKING:
    from edge_c.sip import ExpcSip

PATH_STATE_HEADER = "X-Edge-Path-State"
"""On C's REGISTER and keepalive OPTIONS to E: whether C reaches Unified CM ("up" / "down")."""


class ZoneSipConnection:
    """One authenticated SIP connection from C to one E peer (a traversal zone channel)."""

    def __init__(self, flow: SipFlow, peer_name: str) -> None:
        self.flow = flow
        self.peer_name = peer_name
        self._pending: dict[str, asyncio.Future[Response]] = {}
        self.keepalive_task: asyncio.Task[None] | None = None
        self.last_rtt_ms: float | None = None

    async def wait_closed(self) -> str:
        return await self.flow.wait_closed()

    def close(self, reason: str) -> None:
        if self.keepalive_task is not None:
            self.keepalive_task.cancel()
        self.flow.close(reason)

    def expect(self, call_id: str) -> asyncio.Future[Response]:
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        return fut

    def settle(self, resp: Response) -> bool:
        fut = self._pending.pop(resp.call_id or "", None)
        if fut is None or fut.done():
            return False
        fut.set_result(resp)
        return True


class ZoneConnector:
    """Dials one E peer for `ExpcSip`; each call (a `ChannelSupervisor` connect attempt) returns
    an authenticated `ZoneSipConnection` whose keepalive task is running."""

    def __init__(
        self,
        sip: ExpcSip,
        peer_name: str,
        resolve: Callable[[], Awaitable[tuple[str, int, str]]],
        ssl_context: ssl.SSLContext,
        *,
        username: str,
        password: str,
        timeout_s: float,
        keepalive_interval_s: float,
        keepalive_timeout_s: float,
    ) -> None:
        self._sip = sip
        self.peer_name = peer_name
        self._resolve = resolve
        self._ssl_context = ssl_context
        self._username = username
        self._password = password
        self._timeout_s = timeout_s
        self._keepalive_interval_s = keepalive_interval_s
        self._keepalive_timeout_s = keepalive_timeout_s

    async def __call__(self) -> ZoneSipConnection:
        sip = self._sip
        host, port, server_name = await self._resolve()
        loop = asyncio.get_running_loop()
        conn_box: list[ZoneSipConnection] = []

        def on_message(flow: SipFlow, msg: Request | Response) -> None:
            conn = conn_box[0] if conn_box else None
            if conn is None:
                return
            if isinstance(msg, Response) and conn.settle(msg):
                return
            sip._zone_message(conn, msg)

        def on_closed(flow: SipFlow, reason: str) -> None:
            if conn_box:
                sip.zone_conns.pop(flow.flow_id, None)

        flow_factory = lambda: SipFlow(  # noqa: E731
            on_message=on_message,
            on_closed=on_closed,
            on_frame=sip.fast.zone_frame,
            name="sip-zone",
            strict=False,
        )
        _, flow = await asyncio.wait_for(
            loop.create_connection(
                flow_factory,
                host,
                port,
                ssl=self._ssl_context,
                server_hostname=server_name,
                local_addr=(sip.address, 0),
            ),
            self._timeout_s,
        )
        conn = ZoneSipConnection(flow, self.peer_name)
        conn_box.append(conn)
        try:
            await asyncio.wait_for(self._authenticate(conn, server_name), self._timeout_s)
        except BaseException:
            flow.close("zone authentication did not complete")
            raise
        sip.zone_conns[flow.flow_id] = conn
        conn.keepalive_task = asyncio.ensure_future(self._keepalive(conn, server_name))
        return conn

    def _request(self, method: str, server_name: str, username: str) -> Request:
        address = self._sip.address
        uri = f"sip:{server_name}"
        req = Request(method, uri, [], b"")
        via = Via(address, None, "TLS", Params([("branch", new_branch())]))
        req.headers.add("Via", str(via))
        req.headers.add("Max-Forwards", "70")
        req.headers.add("From", f"<sip:{username}@{server_name}>;tag={new_tag()}")
        req.headers.add("To", f"<sip:{username}@{server_name}>")
        req.headers.add("Call-ID", new_call_id(address))
        req.headers.add("CSeq", f"1 {method}")
        req.headers.add("Contact", f"<sip:{username}@{address};transport=tls>")
        req.headers.add(PATH_STATE_HEADER, "up" if self._sip.ucm_health() else "down")
        req.headers.add("Content-Length", "0")
        return req

    async def _authenticate(self, conn: ZoneSipConnection, server_name: str) -> None:
        username, password = self._username, self._password
        req = self._request("REGISTER", server_name, username)
        fut = conn.expect(req.call_id or "")
        conn.flow.send(req)
        resp = await fut
        if resp.status_code == 401:
            challenge = resp.headers.get("WWW-Authenticate") or ""
            retry = req.copy()
            retry.headers.replace("CSeq", "2 REGISTER")
            via = Via(self._sip.address, None, "TLS", Params([("branch", new_branch())]))
            retry.headers.replace("Via", str(via))
            retry.headers.replace(
                "Authorization", compute_authorization(challenge, "REGISTER", req.uri, username, password)
            )
            fut = conn.expect(retry.call_id or "")
            conn.flow.send(retry)
            resp = await fut
        if resp.status_code != 200:
            warning = resp.headers.get("Warning") or ""
            reason = warning.split('"')[1] if warning.count('"') >= 2 else f"{resp.status_code} {resp.reason}"
            raise LinkRejectedError(reason)

    async def _keepalive(self, conn: ZoneSipConnection, server_name: str) -> None:
        interval_s, timeout_s = self._keepalive_interval_s, self._keepalive_timeout_s
        username = self._sip.settings.zone.username
        try:
            while conn.flow.is_open:
                await asyncio.sleep(interval_s)
                req = self._request("OPTIONS", server_name, username)
                fut = conn.expect(req.call_id or "")
                sent = time.monotonic()
                conn.flow.send(req)
                try:
                    await asyncio.wait_for(fut, timeout_s)
                except TimeoutError:
                    conn.flow.close("keepalive timeout")
                    return
                conn.last_rtt_ms = round((time.monotonic() - sent) * 1000, 2)
        except asyncio.CancelledError:
            pass

"""Expressway-E's HTTPS listener on 8443 (spec §4).

E authenticates nobody and holds no policy: it checks the URL shape and that credentials
(Basic/Bearer for get_edge_config, an X-Auth cookie or Bearer token for the descriptor lane)
are present, then pushes the request down the HTTPS tunnel that C opened. Everything else —
credentials, cookies, the allow list — is decided on C. Tunnel down: 502 Next Hop Connection
Failed, at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from edge.mra_paths import BadPath, DescriptorPath, EdgeConfigPath, EdgeSsoPath, classify
from traversal.http_tunnel import HOP_BY_HOP, HeadReader, TunnelProtocolError, TunnelRequest, TunnelResponse

log = logging.getLogger(__name__)

SERVER_HEADER = "CE_C ECS"
_SMALL_BODY_BYTES = 64 * 1024  # request bodies up to this size go down the tunnel with the head


class TunnelUnavailable(Exception):
    pass


def plain(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    resp = web.Response(status=status, text=text + "\n", content_type="text/plain")
    resp.headers["Server"] = SERVER_HEADER
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


def _has_x_auth(request: web.Request) -> bool:
    # A scan of the raw header: aiohttp's `request.cookies` builds Morsels for every cookie.
    for header in request.headers.getall("Cookie", ()):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == "X-Auth" and value:
                return True
    return False


def _has_bearer(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    return auth[:7].lower() == "bearer " and len(auth) > 7


def _has_basic(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    return auth[:6].lower() == "basic " and len(auth) > 6


class EdgeHttps:
    """The aiohttp application of E:8443."""

    def __init__(
        self,
        edge_name: str,
        open_tunnel_stream: Callable[..., Awaitable[Any]],
        *,
        max_body_bytes: int,
        counters: dict[str, int],
        maintenance: Callable[[], bool] = lambda: False,
        response_timeout_s: float = 30.0,
    ) -> None:
        self.edge_name = edge_name
        self._open_stream = open_tunnel_stream
        self.max_body_bytes = max_body_bytes
        self.counters = counters
        self._maintenance = maintenance
        self.response_timeout_s = response_timeout_s

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._server_header])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    @web.middleware
    async def _server_header(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            resp: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            exc.headers["Server"] = SERVER_HEADER
            raise
        if not resp.prepared:
            resp.headers["Server"] = SERVER_HEADER
        return resp

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.counters["requests"] = self.counters.get("requests", 0) + 1
        raw_path = request.raw_path.split("?", 1)[0]
        kind = classify(raw_path)
        if isinstance(kind, BadPath):
            self._count("rejected_path")
            log.info(
                "https %s %s from %s: %d %s",
                request.method,
                raw_path[:200],
                request.remote,
                kind.status,
                kind.reason,
            )
            return plain(kind.status, kind.reason)
        if self._maintenance():
            self._count("maintenance")
            return plain(503, "Service Unavailable: maintenance mode")
        if isinstance(kind, EdgeConfigPath):
            if not (_has_basic(request) or _has_bearer(request)):
                self._count("unauthenticated")
                return plain(401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="Cisco-Edge"'})
        elif isinstance(kind, DescriptorPath):
            if not (_has_x_auth(request) or _has_bearer(request)):
                self._count("unauthenticated")
                return plain(401, "Unauthorized", {"WWW-Authenticate": 'Basic realm="Cisco-Edge"'})
        elif isinstance(kind, EdgeSsoPath):
            pass
        return await self._forward(request)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._count("too_large")
            return plain(413, "Request Entity Too Large")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client = f"{peer[0]}:{peer[1]}" if peer else ""
        head = TunnelRequest(request.method, request.raw_path, headers, client=client, edge=self.edge_name)
        try:
            # Head, body and END leave with the OPEN (early data, traversal/link.py): no round trip.
            stream = await self._open_stream({"kind": "http", "client": client}, wait_accepted=False)
        except Exception as exc:  # no link, link lost, stream refused: all "next hop" failures
            self._count("next_hop_failed")
            log.warning("https: tunnel unavailable for %s: %s", request.raw_path[:120], exc)
            return plain(502, "Next Hop Connection Failed")
        try:
            stream.write(head.encode() + body if len(body) <= _SMALL_BODY_BYTES else head.encode())
            if len(body) > _SMALL_BODY_BYTES:
                stream.write(body)
            stream.write_eof()
            await stream.drain()
            async with asyncio.timeout(self.response_timeout_s):  # no extra task, unlike wait_for
                return await self._relay_response(request, stream)
        except (TimeoutError, TunnelProtocolError, ConnectionError, OSError) as exc:
            self._count("next_hop_failed")
            log.warning("https: tunnel failed for %s: %s", request.raw_path[:120], exc)
            stream.abort("edge gave up")
            return plain(502, "Next Hop Connection Failed")
        except Exception as exc:
            if type(exc).__name__ in ("StreamResetError", "StreamRejectedError"):
                self._count("next_hop_failed")
                return plain(502, "Next Hop Connection Failed")
            stream.abort("edge failed")
            raise
        except asyncio.CancelledError:
            # The client went away (handler_cancellation): reset the stream, else C's answer
            # beyond one window would wait for credit forever, held on both sides of the link.
            stream.abort("client went away")
            raise

    async def _relay_response(self, request: web.Request, stream: Any) -> web.StreamResponse:
        reader = HeadReader()
        got: tuple[bytes, bytes] | None = None
        while got is None:
            chunk = await stream.read(65536)
            if not chunk:
                raise TunnelProtocolError("tunnel stream ended before the response head")
            got = reader.feed(chunk)
        head_line, first = got
        head = TunnelResponse.decode(head_line)
        headers = CIMultiDict((k, v) for k, v in head.headers if k.lower() not in HOP_BY_HOP)
        headers["Server"] = SERVER_HEADER
        body = first + stream.read_available()
        if stream.eof_received:
            # The whole answer is here (the usual case: C sends head, body and END together):
            # one Response with Content-Length is one write to the client, not three.
            self._count(f"status_{head.status // 100}xx")
            return web.Response(status=head.status, reason=head.reason, headers=headers, body=body)
        resp = web.StreamResponse(status=head.status, reason=head.reason, headers=headers)
        await resp.prepare(request)
        if body:
            await resp.write(body)
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            await resp.write(chunk)
        await resp.write_eof()
        self._count(f"status_{head.status // 100}xx")
        return resp

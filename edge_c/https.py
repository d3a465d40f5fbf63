"""C's end of the HTTPS tunnel: every stream E opens is one client request (spec §4).

C decides everything E does not: the domain, credentials and cookies, the allow list, and the
proxying to the internal server. Answers: 401 bad credentials/cookie, 403 not on the allow list,
404 unknown domain, 429 rate control, 502 Next Hop Connection Failed, 503 during "refresh
servers" or maintenance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from yarl import URL

from edge.mra_paths import BadPath, DescriptorPath, EdgeConfigPath, EdgeSsoPath, classify
from edge_c.allowlist import AllowList
from edge_c.internal import is_connect_failure, summarize
from edge_c.provisioning import Answer, NextHopError, Provisioning
from traversal.http_tunnel import HOP_BY_HOP, HeadReader, TunnelProtocolError, TunnelRequest, TunnelResponse

log = logging.getLogger(__name__)

MAX_REQUEST_BODY = 8 * 1024 * 1024
SMALL_RESPONSE_BYTES = 64 * 1024
"""Backend answers up to this size are read whole and sent down the tunnel in one write."""


class TunnelHttpHandler:
    def __init__(
        self,
        provisioning: Provisioning,
        session: aiohttp.ClientSession,
        allow_list: Callable[[], AllowList],
        *,
        refreshing: Callable[[], bool],
        maintenance: Callable[[], bool],
    ) -> None:
        self.prov = provisioning
        self.session = session
        self.allow_list = allow_list
        self.refreshing = refreshing
        self.maintenance = maintenance
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def handle_stream(self, stream: Any) -> None:
        """Entry point for a stream E opened on the HTTPS link."""
        try:
            request, body = await self._read_request(stream)
        except (TunnelProtocolError, ValueError) as exc:
            self._count("bad_tunnel_request")
            await self._send(stream, Answer.text(400, "Bad Request", str(exc)))
            return
        except Exception as exc:  # the stream was reset under us: nobody to answer
            log.debug("https tunnel: stream failed before the request arrived: %s", exc)
            return
        try:
            await self._dispatch(stream, request, body)
        except Exception as exc:
            if type(exc).__name__ == "StreamResetError" or isinstance(exc, ConnectionError):
                return
            log.exception("https tunnel: %s %s failed", request.method, request.target[:200])
            self._count("internal_error")
            await self._send(stream, Answer.text(500, "Internal Server Error"))

    async def _read_request(self, stream: Any) -> tuple[TunnelRequest, bytes]:
        reader = HeadReader()
        got = None
        while got is None:
            chunk = await stream.read(65536)
            if not chunk:
                raise TunnelProtocolError("stream ended before the request head")
            got = reader.feed(chunk)
        head_line, rest = got
        request = TunnelRequest.decode(head_line)
        body = bytearray(rest)
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            body += chunk
            if len(body) > MAX_REQUEST_BODY:
                raise TunnelProtocolError("request body too large")
        return request, bytes(body)

    async def _send(self, stream: Any, answer: Answer) -> None:
        self._count(f"status_{answer.status}")
        try:
            stream.write(TunnelResponse(answer.status, answer.reason, answer.headers).encode() + answer.body)
            stream.write_eof()
            await stream.drain()
        except Exception as exc:
            log.debug("https tunnel: could not answer: %s", exc)

    async def _dispatch(self, stream: Any, request: TunnelRequest, body: bytes) -> None:
        raw_path = request.target.split("?", 1)[0]
        kind = classify(raw_path)
        if isinstance(kind, BadPath):
            await self._send(
                stream,
                Answer.text(kind.status, "Not Found" if kind.status == 404 else "Bad Request", kind.reason),
            )
            return
        if self.maintenance():
            await self._send(stream, Answer.text(503, "Service Unavailable", "maintenance mode"))
            return
        if self.refreshing():
            await self._send(
                stream, Answer.text(503, "Service Unavailable", "refreshing servers", Retry_After="5")
            )
            return
        try:
            if isinstance(kind, EdgeConfigPath):
                self._count("edge_config")
                answer = await self.prov.edge_config(kind.domain, request.target, request.headers)
            elif isinstance(kind, EdgeSsoPath):
                answer = await self.prov.edge_sso(kind.domain, request.target)
            else:
                await self._proxy(stream, request, body, kind)
                return
        except NextHopError as exc:
            log.warning("https tunnel: %s", exc)
            answer = Answer.text(502, "Next Hop Connection Failed")
        await self._send(stream, answer)

    async def _proxy(self, stream: Any, request: TunnelRequest, body: bytes, kind: DescriptorPath) -> None:
        if kind.domain != self.prov.config.lab.domain.lower():
            await self._send(stream, Answer.text(404, "Not Found", f"unknown domain {kind.domain}"))
            return
        principal = self.prov.authenticate_request(request.headers, time.time())
        if isinstance(principal, Answer):
            await self._send(stream, principal)
            return
        decision = self.allow_list().check(kind.scheme, kind.host, kind.port, request.method, kind.path)
        if not decision.allowed:
            self._count("blocked")
            log.info(
                "allow list blocked %s %s://%s:%d%s for %s: %s",
                request.method,
                kind.scheme,
                kind.host,
                kind.port,
                kind.path[:200],
                principal.username,
                decision.reason,
            )
            await self._send(stream, Answer.text(403, "Forbidden", "request not on the HTTP allow list"))
            return
        await self._forward(stream, request, body, kind, decision.path)

    async def _forward(
        self, stream: Any, request: TunnelRequest, body: bytes, kind: DescriptorPath, path: str
    ) -> None:
        """Forward exactly the path the allow list checked (normalised), never the raw one."""
        query = request.target.split("?", 1)[1] if "?" in request.target else ""
        url = f"{kind.scheme}://{kind.host}:{kind.port}{path}" + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in request.headers if k.lower() not in HOP_BY_HOP]
        headers = [(k, _strip_x_auth(v) if k.lower() == "cookie" else v) for k, v in headers]
        headers = [(k, v) for k, v in headers if not (k.lower() == "cookie" and not v)]
        headers.append(("X-Forwarded-For", request.client.rsplit(":", 1)[0]))
        health = self.prov.health
        self._count("proxied")
        head_sent = False
        try:
            async with self.session.request(
                request.method,
                URL(url, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as resp:
                health.mark_up(kind.host)
                out_headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP]
                head = TunnelResponse(resp.status, resp.reason or "", out_headers).encode()
                length = resp.content_length
                if length is not None and length <= SMALL_RESPONSE_BYTES:
                    # Small answer (most UDS/TFTP/VMREST): head, body and END leave together.
                    body = await resp.read()
                    head_sent = True
                    stream.write(head + body)
                else:
                    stream.write(head)
                    head_sent = True
                    async for chunk in resp.content.iter_chunked(65536):
                        stream.write(chunk)
                        await stream.drain()
                stream.write_eof()
                await stream.drain()
                self._count(f"status_{resp.status}")
        except Exception as exc:
            if not is_connect_failure(exc):
                raise
            log.warning("proxy %s: %s", url[:200], summarize(exc))
            if head_sent:  # too late for a status: cut the stream so the client sees a broken body
                stream.abort("backend failed mid-response")
                return
            health.mark_down(kind.host, summarize(exc))
            await self._send(stream, Answer.text(502, "Next Hop Connection Failed"))
        except asyncio.CancelledError:
            stream.abort("cancelled")
            raise


def _strip_x_auth(cookie_header: str) -> str:
    parts = [p.strip() for p in cookie_header.split(";")]
    return "; ".join(p for p in parts if p and not p.startswith("X-Auth="))

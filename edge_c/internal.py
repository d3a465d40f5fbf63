"""How C reaches internal servers: names through the lab DNS internal view, HTTPS trusting the
lab CA, from C's own address; and which nodes are known to be down (spec §4: never list a
failed node, retry another node of the cluster)."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from edge.dns.resolver import DnsLookupError, LabResolver

log = logging.getLogger(__name__)


class LabAiohttpResolver(AbstractResolver):
    """aiohttp resolver backed by the lab DNS, so C resolves names as the inside does."""

    def __init__(self, resolver: LabResolver) -> None:
        self.resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            _ip_literal = socket.inet_aton(host)
            addrs = [host]
        except OSError:
            try:
                addrs = await self.resolver.resolve_a(host)
            except DnsLookupError as exc:
                raise OSError(f"cannot resolve {host}: {exc}") from exc
        if not addrs:
            raise OSError(f"cannot resolve {host}: no address")
        return [
            {
                "hostname": host,
                "host": ip,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for ip in addrs
        ]

    async def close(self) -> None:
        return None


class NodeHealth:
    """Nodes that failed recently are skipped for `hold_down_s` (then tried again)."""

    def __init__(self, hold_down_s: float = 30.0) -> None:
        self.hold_down_s = hold_down_s
        self._down: dict[str, tuple[float, str]] = {}

    def mark_down(self, host: str, reason: str, now: float | None = None) -> None:
        self._down[host.lower()] = ((now if now is not None else time.monotonic()), reason)
        log.warning("internal node %s marked down: %s", host, reason)

    def mark_up(self, host: str) -> None:
        if self._down.pop(host.lower(), None) is not None:
            log.info("internal node %s is up again", host)

    def is_down(self, host: str, now: float | None = None) -> bool:
        entry = self._down.get(host.lower())
        if entry is None:
            return False
        t = now if now is not None else time.monotonic()
        return t - entry[0] < self.hold_down_s

    def snapshot(self) -> dict[str, str]:
        return {host: reason for host, (_, reason) in self._down.items() if self.is_down(host)}


def make_session(
    resolver: LabResolver, ssl_context: ssl.SSLContext, local_address: str | None, *, limit: int = 200
) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        resolver=LabAiohttpResolver(resolver),
        ssl=ssl_context,
        local_addr=(local_address, 0) if local_address else None,
        limit=limit,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=15, connect=3),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        # One session carries every user's proxied requests: a shared cookie jar would replay one
        # user's backend session cookie (JSESSIONID) on another's requests. Cookies pass through
        # as the clients' own headers instead.
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def is_connect_failure(exc: BaseException) -> bool:
    return isinstance(
        exc,
        aiohttp.ClientConnectionError | aiohttp.ClientOSError | TimeoutError | OSError,
    )


def summarize(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


Json = dict[str, Any]

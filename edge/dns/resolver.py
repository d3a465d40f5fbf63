"""An async stub resolver for lab components and tests, pointed at the lab DNS server.

It binds its queries to ``source`` so that the split-horizon server sees the component's own
address and picks its view (spec §3): Expressway-C on 127.10.3.x finds ``_cisco-uds._tcp``, an
outside client does not. Queries go over UDP and are retried over TCP when the answer comes back
truncated (RFC 7766 §5, via ``dns.asyncquery.udp_with_fallback``).

Names are returned without the trailing dot (``"expe.example.com"``), ready for a TLS SNI or a
connect call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename


class DnsLookupError(Exception):
    """A lookup that gave no usable answer; ``reason`` is an rcode name or a transport failure."""

    def __init__(self, name: str, rtype: str, reason: str) -> None:
        super().__init__(f"{rtype} lookup of {name} failed: {reason}")
        self.name = name
        self.rtype = rtype
        self.reason = reason
        """``"NXDOMAIN"``, ``"REFUSED"``, ``"SERVFAIL"`` (any rcode name), ``"timeout"``,
        ``"unreachable"`` or ``"malformed response"``."""


@dataclass(frozen=True, order=True)
class SrvTarget:
    priority: int
    weight: int
    port: int
    target: str


def sort_srv(targets: Sequence[SrvTarget]) -> list[SrvTarget]:
    """Deterministic RFC 2782 order: lowest priority first; within a priority the heaviest
    weight first (the most likely pick of the weighted selection), then by name."""
    return sorted(targets, key=lambda t: (t.priority, -t.weight, t.target, t.port))


def rfc2782_order(targets: Sequence[SrvTarget], rng: random.Random) -> list[SrvTarget]:
    """The randomized order RFC 2782 "Usage rules" describe, for clients that load-balance."""
    out: list[SrvTarget] = []
    for priority in sorted({t.priority for t in targets}):
        # Weight-0 entries first, so they have a small chance when others exist (RFC 2782).
        group = sorted((t for t in targets if t.priority == priority), key=lambda t: t.weight)
        while group:
            total = sum(t.weight for t in group)
            pick = rng.randint(0, total)
            running = 0
            for i, t in enumerate(group):
                running += t.weight
                if running >= pick:
                    out.append(group.pop(i))
                    break
    return out


@dataclass
class _CacheEntry:
    expires_at: float
    value: list[Any]


class LabResolver:
    """``resolve_srv`` / ``resolve_a`` / ``resolve_ptr`` against one lab DNS server.

    ``cache_entries`` > 0 turns on a small positive cache that honours record TTLs (the
    smallest TTL of the answer); ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        server: str,
        port: int = 53,
        source: str | None = None,
        timeout_s: float = 2.0,
        *,
        edns_payload_bytes: int | None = 1232,
        cache_entries: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server = server
        self.port = port
        self.source = source
        self.timeout_s = timeout_s
        self.edns_payload_bytes = edns_payload_bytes
        self.cache_entries = cache_entries
        self._clock = clock
        self._cache: dict[tuple[str, str], _CacheEntry] = {}
        self.queries_sent = 0
        self.tcp_fallbacks = 0

    async def resolve_srv(self, name: str) -> list[SrvTarget]:
        """SRV targets in RFC 2782 order (`sort_srv`); [] when the service is absent ("." target)."""
        rdatas = await self._resolve(name, "SRV")
        targets = [
            SrvTarget(r.priority, r.weight, r.port, _host(r.target))
            for r in rdatas
            if r.target != dns.name.root  # RFC 2782: "." means "decidedly not available"
        ]
        return sort_srv(targets)

    async def resolve_a(self, name: str) -> list[str]:
        return sorted(r.address for r in await self._resolve(name, "A"))

    async def resolve_aaaa(self, name: str) -> list[str]:
        return sorted(r.address for r in await self._resolve(name, "AAAA"))

    async def resolve_ptr(self, ip: str) -> list[str]:
        try:
            rev = dns.reversename.from_address(ip).to_text()
        except (dns.exception.SyntaxError, ValueError) as exc:
            raise DnsLookupError(ip, "PTR", "not an IP address") from exc
        return sorted(_host(r.target) for r in await self._resolve(rev, "PTR"))

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _resolve(self, name: str, rtype: str) -> list[Any]:
        key = (name.lower().rstrip("."), rtype)
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and entry.expires_at > now:
            return entry.value
        rdatas, ttl = await self._query(name, rtype)
        if self.cache_entries > 0 and ttl > 0:
            if len(self._cache) >= self.cache_entries:
                self._evict(now)
            self._cache[key] = _CacheEntry(now + ttl, rdatas)
        return rdatas

    def _evict(self, now: float) -> None:
        for key in [k for k, e in self._cache.items() if e.expires_at <= now]:
            del self._cache[key]
        while len(self._cache) >= self.cache_entries:
            del self._cache[next(iter(self._cache))]  # oldest insertion first

    async def _query(self, name: str, rtype: str) -> tuple[list[Any], int]:
        rdtype = dns.rdatatype.from_text(rtype)
        use_edns = self.edns_payload_bytes is not None
        query = dns.message.make_query(
            name, rdtype, use_edns=use_edns, payload=self.edns_payload_bytes or 512
        )
        self.queries_sent += 1
        try:
            response, used_tcp = await dns.asyncquery.udp_with_fallback(
                query,
                self.server,
                timeout=self.timeout_s,
                port=self.port,
                source=self.source,
                ignore_unexpected=True,
            )
        except dns.exception.Timeout as exc:
            raise DnsLookupError(name, rtype, "timeout") from exc
        except dns.exception.DNSException as exc:  # FormError, ShortHeader, BadEDNS...
            raise DnsLookupError(name, rtype, "malformed response") from exc
        except OSError as exc:  # ECONNREFUSED from ICMP, unreachable source...
            raise DnsLookupError(name, rtype, "unreachable") from exc
        self.tcp_fallbacks += used_tcp
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsLookupError(name, rtype, dns.rcode.to_text(rcode))
        if not isinstance(response, dns.message.QueryMessage):
            raise DnsLookupError(name, rtype, "malformed response")
        try:
            chain = response.resolve_chaining()  # follows CNAMEs within the answer
        except dns.exception.DNSException as exc:
            raise DnsLookupError(name, rtype, "malformed response") from exc
        if chain.answer is None:
            return [], 0  # NODATA: the name exists without this type
        return list(chain.answer), chain.minimum_ttl


def _host(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)

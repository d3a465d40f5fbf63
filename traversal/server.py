"""E's side of the traversal zone: listen, authenticate C, hold the links C opened.

E never dials C (spec §1). It accepts mutual-TLS links on the tunnel (2222) and XMPP (7400)
ports, checks C's certificate SAN against the configured "TLS verify subject name" and C's
zone credentials against its local authentication database, and then uses those links to push
inbound work down to C.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any

from edge.pki import peer_has_san
from traversal.channel import LinkConfig, LinkEndpoint, LinkStream, serve_links
from traversal.zone import ChannelStatus

log = logging.getLogger(__name__)


class NoLinkError(ConnectionError):
    """No live link from C on this channel: the caller answers its protocol's next-hop error."""


class LinkPool:
    """The live links of one channel (several when a C cluster or reconnect overlap)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.links: list[LinkEndpoint] = []
        self._rr = itertools.count()
        self.status = ChannelStatus(channel, "expc", state="failed", reason="no connection from Expressway-C")
        self.accepted = 0
        self.rejected = 0
        self.last_rejection = ""

    def add(self, link: LinkEndpoint) -> None:
        self.links.append(link)
        self.accepted += 1
        if self.accepted > 1:
            self.status.reconnects += 1
        self.status.set("active", "")

    def remove(self, link: LinkEndpoint, reason: str) -> None:
        if link in self.links:
            self.links.remove(link)
        if not self.links:
            self.status.set("failed", f"link from Expressway-C lost: {reason}")

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self.last_rejection = reason
        if not self.links:
            self.status.set("failed", f"Expressway-C rejected: {reason}")

    def pick(self) -> LinkEndpoint:
        live = [link for link in self.links if link.is_open]
        if not live:
            raise NoLinkError(f"no {self.channel} link from Expressway-C")
        return live[next(self._rr) % len(live)]

    async def open_stream(self, metadata: dict[str, Any], *, wait_accepted: bool = True) -> LinkStream:
        return await self.pick().open_stream(metadata, wait_accepted=wait_accepted)


class ZoneServer:
    """The traversal server zone on E: one LinkPool per channel."""

    def __init__(
        self,
        *,
        host: str,
        ssl_context: ssl.SSLContext,
        credentials: Mapping[str, str],
        verify_subject_name: str,
        link_config: LinkConfig,
        spawn: Callable[[Any], asyncio.Task[Any]],
    ) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.credentials = dict(credentials)
        self.verify_subject_name = verify_subject_name
        self.link_config = link_config
        self.pools: dict[str, LinkPool] = {}
        self._servers: list[asyncio.Server] = []
        self._spawn = spawn

    def pool(self, channel: str) -> LinkPool:
        if channel not in self.pools:
            self.pools[channel] = LinkPool(channel)
        return self.pools[channel]

    def _authenticate(self, channel: str) -> Callable[[str, str, str], str | None]:
        def check(username: str, password: str, announced: str) -> str | None:
            if announced != channel:
                reason = f"channel {announced!r} offered on the {channel} port"
            else:
                expected = self.credentials.get(username)
                if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
                    return None
                reason = "authentication failed"
            self.pool(channel).reject(reason)
            log.warning("zone %s: rejected a link: %s (user %r)", channel, reason, username)
            return reason

        return check

    def _verify_peer(self, channel: str) -> Callable[[Any], str | None]:
        def verify(ssl_object: Any) -> str | None:
            if ssl_object is not None and peer_has_san(ssl_object, self.verify_subject_name):
                return None
            reason = f"TLS verify subject name {self.verify_subject_name!r} not in the client certificate SAN"
            self.pool(channel).reject(reason)
            log.warning("zone %s: %s", channel, reason)
            return reason

        return verify

    async def listen(
        self, channel: str, port: int, on_stream: Callable[[LinkStream], Any] | None = None
    ) -> int:
        pool = self.pool(channel)

        def on_link(link: LinkEndpoint) -> None:
            if on_stream is not None:
                link.set_stream_handler(on_stream)
            pool.add(link)
            log.info("zone %s: link from Expressway-C up", channel)

            async def watch() -> None:
                reason = await link.wait_closed()
                pool.remove(link, reason)
                log.warning("zone %s: link from Expressway-C down: %s", channel, reason)

            self._spawn(watch())

        server = await serve_links(
            self.host,
            port,
            ssl=self.ssl_context,
            authenticate=self._authenticate(channel),
            verify_peer=self._verify_peer(channel),
            on_link=on_link,
            config=self.link_config,
        )
        self._servers.append(server)
        sock = server.sockets[0]
        return int(sock.getsockname()[1])

    async def close(self) -> None:
        for pool in self.pools.values():
            for link in list(pool.links):
                link.close("Expressway-E shutting down")
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=2.0)
            except TimeoutError:
                pass

    def channel_status(self) -> list[ChannelStatus]:
        return [p.status for p in self.pools.values()]

    def link_details(self) -> dict[str, Any]:
        return {
            ch: {
                "links": [link.status() for link in pool.links],
                "accepted": pool.accepted,
                "rejected": pool.rejected,
                "last_rejection": pool.last_rejection,
            }
            for ch, pool in self.pools.items()
        }


def now() -> float:
    return time.time()

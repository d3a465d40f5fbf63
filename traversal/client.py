"""C's side of the traversal zone: dial out to every E peer and keep every channel up."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from traversal.channel import LinkConfig, LinkEndpoint, LinkStream, connect_link
from traversal.zone import ChannelConnection, ChannelSupervisor, zone_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerTarget:
    """One Expressway-E peer as C sees it: the name in its certificate and its ports."""

    name: str
    fqdn: str
    ports: dict[str, int]


Resolve = Callable[[str], Awaitable[str]]


class ZoneClient:
    """Supervises channels (https, xmpp, …) to each peer; exposes per-channel links."""

    def __init__(
        self,
        *,
        zone_name: str,
        peers: list[PeerTarget],
        username: str,
        password: str,
        ssl_context: ssl.SSLContext,
        resolve: Resolve,
        local_address: str | None,
        link_config: LinkConfig,
        connect_timeout_s: float,
        reconnect_initial_s: float,
        reconnect_max_s: float,
    ) -> None:
        self.zone_name = zone_name
        self.peers = peers
        self.username = username
        self.password = password
        self.ssl_context = ssl_context
        self.resolve = resolve
        self.local_address = local_address
        self.link_config = link_config
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.supervisors: list[ChannelSupervisor] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.up_event = asyncio.Event()

    def add_link_channel(
        self, channel: str, on_stream: Callable[[LinkStream], Awaitable[None]] | None = None
    ) -> None:
        """A multiplexed traversal link on port `channel` of every peer."""
        for peer in self.peers:
            self.add_channel(channel, peer, self._link_connector(channel, peer, on_stream))

    def add_channel(
        self,
        channel: str,
        peer: PeerTarget,
        connect: Callable[[], Awaitable[ChannelConnection]],
        on_up: Callable[[ChannelConnection], None] | None = None,
        on_down: Callable[[ChannelConnection, str], None] | None = None,
    ) -> ChannelSupervisor:
        sup = ChannelSupervisor(
            channel,
            peer.name,
            connect,
            on_up=self._wrap_up(on_up),
            on_down=on_down,
            initial_s=self.reconnect_initial_s,
            max_s=self.reconnect_max_s,
        )
        self.supervisors.append(sup)
        return sup

    def _wrap_up(
        self, on_up: Callable[[ChannelConnection], None] | None
    ) -> Callable[[ChannelConnection], None]:
        def up(conn: ChannelConnection) -> None:
            if on_up is not None:
                on_up(conn)
            if self.is_active:
                self.up_event.set()

        return up

    def _link_connector(
        self, channel: str, peer: PeerTarget, on_stream: Callable[[LinkStream], Awaitable[None]] | None
    ) -> Callable[[], Awaitable[ChannelConnection]]:
        async def connect() -> ChannelConnection:
            host = await self.resolve(peer.fqdn)
            link = await connect_link(
                host,
                peer.ports[channel],
                ssl=self.ssl_context,
                server_hostname=peer.fqdn,
                channel=channel,
                username=self.username,
                password=self.password,
                config=self.link_config,
                local_addr=(self.local_address, 0) if self.local_address else None,
                timeout_s=self.connect_timeout_s,
            )
            if on_stream is not None:
                link.set_stream_handler(on_stream)
            return link

        return connect

    def start(self) -> None:
        for sup in self.supervisors:
            task = asyncio.ensure_future(sup.run())
            task.set_name(f"zone-{sup.status.channel}-{sup.status.peer}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for sup in self.supervisors:
            sup.stop()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=3.0)

    @property
    def is_active(self) -> bool:
        return bool(self.supervisors) and all(s.is_up for s in self.supervisors)

    def links(self, channel: str) -> list[LinkEndpoint]:
        out = []
        for sup in self.supervisors:
            if sup.status.channel == channel and sup.connection is not None:
                out.append(sup.connection)
        return [link for link in out if isinstance(link, LinkEndpoint)]

    def status(self) -> dict[str, Any]:
        return zone_summary(self.zone_name, [s.status for s in self.supervisors])

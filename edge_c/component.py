"""Expressway-C: the inside gateway process.

C dials out to every Expressway-E peer and keeps the traversal zone's channels up; it is the only
box that talks to internal servers (spec §1): it authenticates and authorizes clients, holds the
HTTP allow list, and proxies to Unified CM, IM&P and Unity Connection.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from edge.config import AccessControl, LabConfig
from edge.dns.resolver import LabResolver
from edge.lab_pki import lab_pki
from edge.media_metrics import media_samples
from edge.metrics import Sample, StatusCollector, counter_samples, zone_samples
from edge.pki import client_context, server_context
from edge.runtime import BaseComponent
from edge_c.allowlist import AllowList, Rule, automatic_rules
from edge_c.discovery import Discoverer, Inventory, configured_inventory
from edge_c.https import TunnelHttpHandler
from edge_c.internal import NodeHealth, make_session
from edge_c.media import GatewayMedia
from edge_c.provisioning import Provisioning
from edge_c.sip import ExpcSip
from edge_c.sip_zone import ZoneConnector
from edge_c.xmpp import GatewayXmpp
from traversal.channel import LinkConfig
from traversal.client import PeerTarget, ZoneClient

log = logging.getLogger(__name__)


class ExpresswayC(BaseComponent):
    role = "expc"

    def __init__(self, name: str, config: LabConfig) -> None:
        super().__init__(name, config)
        self.settings = config.expc
        self.maintenance = False
        self.refreshing = False
        self.last_refresh: dict[str, Any] = {}
        self.inventory: Inventory = configured_inventory(config)
        self.registry.register(StatusCollector(self))

    # -- allow list -----------------------------------------------------------------------

    def _automatic_rules(self) -> list[Rule]:
        """Inbound rules for every known node (spec §4), rebuilt on "refresh servers"."""
        inv = self.inventory
        return list(
            automatic_rules(
                ucm_nodes=[(n.fqdn, n.https_port, n.tftp_http_port, n.tftp_https_port) for n in inv.ucm],
                imp_nodes=[(n.fqdn, n.https_port) for n in inv.imp],
                cuc_nodes=[(n.fqdn, n.https_port) for n in inv.cuc],
            )
        )

    def _build_allow_list(self) -> AllowList:
        allow = AllowList(self._automatic_rules())
        for rule in self.settings.allow_rules:
            allow.add(
                Rule.parse(
                    rule.url,
                    methods=rule.methods,
                    match=rule.match,
                    deployment=rule.deployment,
                    description=rule.description,
                )
            )
        return allow

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self.pki = lab_pki(cfg)
        zone_ctx = client_context(self.pki, self.name)
        internal_ctx = client_context(self.pki, self.name)
        self.resolver = LabResolver(
            cfg.dns.address, cfg.dns.port, source=self.settings.address, cache_entries=256
        )
        self.health = NodeHealth()
        self.session = make_session(self.resolver, internal_ctx, self.settings.address)
        self.discoverer = Discoverer(cfg, self.session, self.resolver, self.settings.address)
        self.provisioning = Provisioning(
            cfg, resolver=self.resolver, session=self.session, health=self.health
        )
        self.allow_list = self._build_allow_list()
        self.https = TunnelHttpHandler(
            self.provisioning,
            self.session,
            lambda: self.allow_list,
            refreshing=lambda: self.refreshing,
            maintenance=lambda: self.maintenance,
        )
        zs = self.settings.zone
        peers = [
            PeerTarget(
                e.name,
                e.fqdn,
                {"sip": e.traversal_sip_port, "https": e.tunnel_port, "xmpp": e.traversal_xmpp_port},
            )
            for e in cfg.expe
            if e.name in zs.peers
        ]
        self.zone = ZoneClient(
            zone_name=zs.name,
            peers=peers,
            username=zs.username,
            password=zs.password,
            ssl_context=zone_ctx,
            resolve=self._resolve_peer,
            local_address=self.settings.address,
            link_config=LinkConfig(
                keepalive_interval_s=zs.keepalive_interval_s, keepalive_timeout_s=zs.keepalive_timeout_s
            ),
            connect_timeout_s=zs.connect_timeout_s,
            reconnect_initial_s=zs.reconnect_initial_s,
            reconnect_max_s=zs.reconnect_max_s,
        )
        self.media = GatewayMedia(self.settings, on_stream_timeout=self._media_timeout)
        await self.media.start()
        self.sip = ExpcSip(
            cfg, ucm_health=self._ucm_reachable, maintenance=lambda: self.maintenance, media=self.media
        )
        ucm_server_ctx = server_context(self.pki, self.name, require_client_cert=False)
        for name, transport, host, port in await self.sip.start(ucm_server_ctx, internal_ctx):
            self.add_listener(name, transport, host, port)
        for peer in peers:
            self.zone.add_channel(
                "sip",
                peer,
                ZoneConnector(
                    self.sip,
                    peer.name,
                    self._peer_resolver(peer),
                    zone_ctx,
                    username=zs.username,
                    password=zs.password,
                    timeout_s=zs.connect_timeout_s,
                    keepalive_interval_s=zs.keepalive_interval_s,
                    keepalive_timeout_s=zs.keepalive_timeout_s,
                ),
            )
        self.zone.add_link_channel("https", on_stream=self.https.handle_stream)
        self.xmpp = GatewayXmpp(
            cfg, ssl_context=internal_ctx, imp_down=self.health.is_down, local_address=self.settings.address
        )
        self.zone.add_link_channel("xmpp", on_stream=self.xmpp.handle_stream)
        self.zone.start()
        self.spawn(self.sip.ucm_keepalive(self.settings.ucm_keepalive_interval_s), name="ucm-keepalive")
        if self.settings.refresh_servers_on_start:
            self.spawn(self.refresh_servers(), name="refresh-servers")

    def _media_timeout(self, call: str, event: object) -> None:
        log.info("media of call %s idle: %s", call, event)

    def _ucm_reachable(self) -> bool:
        return any(n.name not in self.sip.ucm_down for n in self.config.ucm)

    def _peer_resolver(self, peer: PeerTarget) -> Callable[[], Awaitable[tuple[str, int, str]]]:
        async def resolve() -> tuple[str, int, str]:
            return await self._resolve_peer(peer.fqdn), peer.ports["sip"], peer.fqdn

        return resolve

    async def _resolve_peer(self, fqdn: str) -> str:
        addrs = await self.resolver.resolve_a(fqdn)
        if not addrs:
            raise OSError(f"{fqdn} has no address in the internal view")
        return addrs[0]

    async def refresh_servers(self) -> dict[str, Any]:
        """Rediscover the internal nodes, check them, rebuild the automatic allow-list rules and
        fetch the OAuth keys (spec §4); MRA requests get 503 while it runs (spec §8)."""
        if self.refreshing:
            return {"error": "a refresh is already running"}
        self.refreshing = True
        started = time.time()
        try:
            result = await self.discoverer.discover(self.inventory)
            self.inventory = inv = result.inventory
            for node in inv.nodes():
                if node.state == "active":
                    self.health.mark_up(node.fqdn)
                elif node.state == "unreachable":
                    self.health.mark_down(node.fqdn, node.reason)
            self.provisioning.set_inventory(inv)
            self.allow_list.set_automatic(self._automatic_rules())
            keys = await self.provisioning.fetch_oauth_keys()
            self.last_refresh = {
                "at": started,
                "duration_s": round(time.time() - started, 3),
                "oauth_keys": keys,
                "errors": result.errors,
                **{role: [n.fqdn for n in nodes] for role, nodes in inv.by_role().items()},
            }
        except Exception as exc:  # the refresh reports it; C keeps the nodes it knew
            log.exception("refresh servers failed")
            self.last_refresh = {"at": started, "error": str(exc)[:200]}
        finally:
            self.refreshing = False
        return self.last_refresh

    def node_status(self) -> dict[str, list[dict[str, Any]]]:
        """Every known node with its check result and whether C currently holds it down."""
        return {
            role: [{**n.as_json(), "down": self.health.is_down(n.fqdn)} for n in nodes]
            for role, nodes in self.inventory.by_role().items()
        }

    async def stop(self) -> None:
        if hasattr(self, "zone"):
            await self.zone.stop()
        if hasattr(self, "sip"):
            await self.sip.stop()
        if hasattr(self, "media"):
            await self.media.stop()
        if hasattr(self, "session"):
            await self.session.close()
        await super().stop()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        prov = self.provisioning
        return {
            "zones": [self.zone.status()],
            "sip": self.sip.status(),
            "xmpp": self.xmpp.status(),
            "maintenance": self.maintenance,
            "refreshing": self.refreshing,
            "last_refresh": self.last_refresh,
            "nodes": self.node_status(),
            "https": dict(self.https.counters),
            "provisioning": {
                **prov.counters,
                "credential_cache_entries": len(prov.credentials),
                "rate_limited": prov.rate.refused,
            },
            "counts": {"provisioning_sessions": len(prov.sessions)},
            "allow_list": {"rules": len(self.allow_list.rules())},
        }

    # -- admin API (edge/admin_api.py) ----------------------------------------------------

    def apply_access_control(self, values: dict[str, Any]) -> None:
        """New access-control settings: flags apply to the next request, limits to the live
        rate control, cookie issuer and credential cache."""
        access = AccessControl.model_validate(values)
        self.settings.access = access
        prov = self.provisioning
        prov.rate.limit, prov.rate.window_s = access.auth_rate_max, access.auth_rate_window_s
        prov.cookies.lifetime_s = access.credentials_refresh_min * 60
        prov.credentials.refresh_s = access.credentials_refresh_min * 60
        prov.credentials.cleanup_s = access.credentials_cleanup_min * 60

    def apply_zone_keepalive(self, interval_s: float, timeout_s: float) -> None:
        """New keepalive timers for links established from now on (live links keep theirs)."""
        zs = self.settings.zone
        zs.keepalive_interval_s, zs.keepalive_timeout_s = interval_s, timeout_s
        self.zone.link_config = dataclasses.replace(
            self.zone.link_config, keepalive_interval_s=interval_s, keepalive_timeout_s=timeout_s
        )

    def metric_samples(self) -> Iterable[Sample]:
        yield from zone_samples(self.zone.status())
        yield Sample("edge_maintenance", "gauge", "1 while maintenance mode is on", float(self.maintenance))
        yield Sample(
            "edge_provisioning_sessions",
            "gauge",
            "Users provisioned over MRA (get_edge_config) on this C",
            float(len(self.provisioning.sessions)),
        )
        for role, nodes in self.inventory.by_role().items():
            for n in nodes:
                yield Sample(
                    "edge_node_down",
                    "gauge",
                    "1 while C holds an internal node down",
                    float(self.health.is_down(n.fqdn)),
                    {"node": n.fqdn, "node_role": role},
                )
        yield Sample("edge_allowlist_rules", "gauge", "HTTP allow-list rules", float(len(self.allow_list)))
        yield from counter_samples(
            "edge_https_requests_total",
            "Proxied HTTPS requests on C by outcome",
            self.https.counters,
            "outcome",
        )
        yield from media_samples(self.media.snapshot())

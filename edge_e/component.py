"""Expressway-E: the DMZ edge process.

E faces the clients (HTTPS 8443, SIP TLS 5061, XMPP 5222, media) and listens for Expressway-C's
traversal links (7001, 2222, 7400). It never dials C and holds no user credentials (spec §1).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from edge.config import LabConfig
from edge.lab_pki import lab_pki
from edge.media_metrics import media_samples
from edge.metrics import Sample, StatusCollector, counter_samples, zone_samples
from edge.pki import server_context
from edge.runtime import BaseComponent
from edge_e.https import EdgeHttps
from edge_e.media import EdgeMedia
from edge_e.sip import EdgeSip
from edge_e.xmpp import EdgeXmpp
from traversal.channel import LinkConfig
from traversal.server import ZoneServer
from traversal.zone import zone_summary

log = logging.getLogger(__name__)


class ExpresswayE(BaseComponent):
    role = "expe"

    def __init__(self, name: str, config: LabConfig) -> None:
        super().__init__(name, config)
        self.settings = config.expe_node(name)
        self.maintenance = False
        self.https_counters: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.registry.register(StatusCollector(self))

    async def start(self) -> None:
        s = self.settings
        self.pki = lab_pki(self.config)
        zone_ctx = server_context(self.pki, self.name, require_client_cert=True)
        client_ctx = server_context(self.pki, self.name, require_client_cert=False)
        zs = self.config.expc.zone
        self.zone = ZoneServer(
            host=s.internal_address,
            ssl_context=zone_ctx,
            credentials=s.zone_credentials,
            verify_subject_name=s.tls_verify_subject_name,
            link_config=LinkConfig(
                keepalive_interval_s=zs.keepalive_interval_s, keepalive_timeout_s=zs.keepalive_timeout_s
            ),
            spawn=self.spawn,
        )
        port = await self.zone.listen("https", s.tunnel_port)
        self.add_listener("traversal-https", "tls", s.internal_address, port)
        port = await self.zone.listen("xmpp", s.traversal_xmpp_port)
        self.add_listener("traversal-xmpp", "tls", s.internal_address, port)
        await self._start_https(client_ctx)
        self.media = EdgeMedia(s, on_stream_timeout=lambda call, _event: self.sip.sdp.end(call))
        await self.media.start()
        self.add_listener("media-demux-rtp", "udp", s.internal_address, s.demux_rtp_port)
        self.add_listener("media-demux-rtcp", "udp", s.internal_address, s.demux_rtcp_port)
        self.sip = EdgeSip(
            name=self.name,
            external_address=s.external_address,
            internal_address=s.internal_address,
            client_port=s.sip_tls_port,
            zone_port=s.traversal_sip_port,
            zone_name=zs.name,
            zone_id="1",
            credentials=s.zone_credentials,
            verify_subject_name=s.tls_verify_subject_name,
            maintenance=lambda: self.maintenance,
            keepalive_timeout_s=zs.keepalive_timeout_s,
            media=self.media,
        )
        for name, transport, host, lport in await self.sip.start(client_ctx, zone_ctx):
            self.add_listener(name, transport, host, lport)
        self.xmpp = EdgeXmpp(
            domain=self.config.lab.domain,
            address=s.external_address,
            port=s.xmpp_port,
            ssl_context=client_ctx,
            open_stream=self.zone.pool("xmpp").open_stream,
        )
        self.add_listener(*await self.xmpp.start())

    async def _start_https(self, ctx: ssl.SSLContext) -> None:
        s = self.settings
        pool = self.zone.pool("https")
        self.https = EdgeHttps(
            self.name,
            pool.open_stream,
            max_body_bytes=s.max_http_body_bytes,
            counters=self.https_counters,
            maintenance=lambda: self.maintenance,
        )
        self._runner = web.AppRunner(self.https.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, s.external_address, s.https_port, ssl_context=ctx, reuse_address=True
        )
        await site.start()
        self.add_listener("https", "tls", s.external_address, s.https_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if hasattr(self, "xmpp"):
            await self.xmpp.stop()
        if hasattr(self, "sip"):
            await self.sip.stop()
        if hasattr(self, "media"):
            await self.media.stop()
        if hasattr(self, "zone"):
            await self.zone.close()
        await super().stop()

    def zone_status(self) -> dict[str, Any]:
        return zone_summary(self.config.expc.zone.name, [self.sip.zone_status, *self.zone.channel_status()])

    def status(self) -> dict[str, Any]:
        sip = self.sip.status()
        return {
            "zones": [self.zone_status()],
            "links": self.zone.link_details(),
            "maintenance": self.maintenance,
            "https": dict(self.https_counters),
            "sip": sip,
            "xmpp": self.xmpp.status(),
            "media": self.media.snapshot(),
            "counts": {
                "registrations": sip["registrations"],
                "registrations_peak": sip["registrations_peak"],
                "calls": 0,
                "xmpp_sessions": self.xmpp.current,
                "xmpp_sessions_peak": self.xmpp.peak,
            },
            "time": time.time(),
        }

    def metric_samples(self) -> Iterable[Sample]:
        yield from zone_samples(self.zone_status())
        yield from counter_samples(
            "edge_https_requests_total", "HTTPS requests on E by outcome", self.https_counters, "outcome"
        )
        sip = self.sip.status()
        yield Sample(
            "edge_mra_registrations", "gauge", "MRA registrations through this E", sip["registrations"]
        )
        yield Sample(
            "edge_mra_registrations_peak",
            "gauge",
            "Peak MRA registrations since start",
            sip["registrations_peak"],
        )
        yield from counter_samples("edge_sip_events_total", "SIP events on E", sip["counters"], "event")
        yield from media_samples(self.media.snapshot())

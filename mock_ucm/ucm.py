"""One mock Unified CM node as a lab process: UDS + OAuth on HTTPS 8443, TFTP over HTTP 6970 and
HTTPS 6972, and the SIP registrar / call control on TCP 5060 and TLS 5061."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from edge.config import LabConfig, UcmNode
from edge.lab_pki import lab_pki
from edge.metrics import Sample, StatusCollector
from edge.pki import client_context, server_context
from edge.runtime import BaseComponent
from mock_ucm.directory import Directory
from mock_ucm.http_apps import build_ucm_http_apps
from mock_ucm.http_common import STATS_KEY
from mock_ucm.oauth import OAuthIssuer
from mock_ucm.sip.service import UcmSipService

log = logging.getLogger(__name__)


class UcmComponent(BaseComponent):
    role = "ucm"

    def __init__(self, name: str, config: LabConfig) -> None:
        super().__init__(name, config)
        self.node = next(n for n in config.ucm if n.name == name)
        self.directory = Directory.from_config(config)
        self.oauth = OAuthIssuer.for_node(config, self.node)
        self._runners: list[web.AppRunner] = []
        self.sip: UcmSipService | None = None
        self.registry.register(StatusCollector(self))

    async def _serve(self, app: web.Application, sites: list[tuple[str, int, Any]]) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runners.append(runner)
        for name, port, ctx in sites:
            site = web.TCPSite(runner, self.node.address, port, ssl_context=ctx, reuse_address=True)
            await site.start()
            self.add_listener(name, "tls" if ctx is not None else "tcp", self.node.address, port)

    async def start(self) -> None:
        node: UcmNode = self.node
        pki = lab_pki(self.config)
        ctx = server_context(pki, self.name, require_client_cert=False)
        https_app, tftp_app = build_ucm_http_apps(
            self.config, node, self.directory, self.oauth, registry=self.registry
        )
        await self._serve(https_app, [("https", node.https_port, ctx)])
        await self._serve(
            tftp_app, [("tftp-http", node.tftp_http_port, None), ("tftp-https", node.tftp_https_port, ctx)]
        )
        self.sip = UcmSipService(
            self.config, node, ssl_context=ctx, client_ssl_context=client_context(pki, None)
        )
        await self.sip.start()
        for name, transport, host, port in self.sip.listeners:
            self.add_listener(name, transport, host, port)

    async def stop(self) -> None:
        if self.sip is not None:
            await self.sip.stop()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await super().stop()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"users": len(self.directory), "fqdn": self.node.fqdn}
        out["http"] = {
            name: r.app[STATS_KEY].snapshot()
            for name, r in zip(("https", "tftp"), self._runners, strict=False)
        }
        if self.sip is not None:
            out["sip"] = self.sip.status()
        return out

    def metric_samples(self) -> Iterable[Sample]:
        if self.sip is not None:
            regs = self.sip.status()["registrations"]
            yield Sample(
                "edge_ucm_registrations",
                "gauge",
                "Devices registered on this UCM node",
                float(regs["current"]),
            )
            yield Sample(
                "edge_ucm_registrations_peak",
                "gauge",
                "Most devices registered at once on this UCM node since start",
                float(regs["peak"]),
            )
            for key, what in (
                ("new", "new registrations"),
                ("refreshes", "registration refreshes"),
                ("failures", "REGISTERs refused"),
            ):
                yield Sample(f"edge_ucm_register_{key}_total", "counter", f"UCM {what}", float(regs[key]))

"""One mock IM&P node as a lab process: XMPP for inside clients (5222, STARTTLS) and for
Expressway-C (7400, TLS), authenticating against the UCM user directory and its OAuth tokens, and
HTTPS on its https_port (8443) with a minimal AXL (`mock_ucm.axl`: `listProcessNode`) that
Expressway-C's "refresh servers" asks for the cluster's nodes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from edge.config import ImpNode, LabConfig
from edge.lab_pki import lab_pki
from edge.metrics import Sample, StatusCollector
from edge.pki import server_context
from edge.runtime import BaseComponent
from mock_ucm.axl import build_axl_app
from mock_ucm.directory import Directory
from mock_ucm.http_common import RequestStats
from mock_ucm.imp.server import ImpServer
from mock_ucm.oauth import state_verifier


class ImpComponent(BaseComponent):
    role = "imp"

    def __init__(self, name: str, config: LabConfig) -> None:
        super().__init__(name, config)
        self.node: ImpNode = next(n for n in config.imp if n.name == name)
        self.directory = Directory.from_config(config)
        self.verifier = state_verifier(config)
        self.axl_stats = RequestStats("axl")
        self._runner: web.AppRunner | None = None
        self.registry.register(StatusCollector(self))

    def _token_ok(self, username: str, token: str) -> bool:
        claims = self.verifier.validate_token(token)
        return claims is not None and str(claims.get("sub", "")).lower() == username.lower()

    async def start(self) -> None:
        # Expressway-C holds one TLS connection here per XMPP session and keeps every certificate
        # the node sent, parsed, for the session's life (OpenSSL 3.0). So, like the Prosody the
        # benchmark runs, the node sends its leaf alone (RFC 8446 §4.4.2: the trust anchor may be
        # omitted; every client here trusts the lab CA): ~5 KiB less per session on C.
        ctx = server_context(lab_pki(self.config), self.name, require_client_cert=False, send_ca=False)
        self.server = ImpServer(
            self.config.lab.domain,
            authenticate_plain=self.directory.authenticate,
            validate_token=self._token_ok,
            ssl_context=ctx,
            users=[u.username for u in self.directory.users()],
        )
        await self.server.start(
            [
                (self.node.address, self.node.client_port, "starttls"),
                (self.node.address, self.node.edge_port, "tls"),
            ]
        )
        for host, port, mode in self.server.listeners:
            self.add_listener(
                "xmpp-client" if mode == "starttls" else "xmpp-edge",
                "tcp" if mode == "starttls" else "tls",
                host,
                port,
            )
        https_ctx = server_context(lab_pki(self.config), self.name, require_client_cert=False)
        runner = web.AppRunner(
            build_axl_app(self.config, self.node, stats=self.axl_stats), access_log=None, handle_signals=False
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(
            runner, self.node.address, self.node.https_port, ssl_context=https_ctx, reuse_address=True
        )
        await site.start()
        self.add_listener("https", "tls", self.node.address, self.node.https_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if hasattr(self, "server"):
            await self.server.stop()
        await super().stop()

    def status(self) -> dict[str, Any]:
        return {"xmpp": self.server.status(), "http": self.axl_stats.snapshot()}

    def metric_samples(self) -> Iterable[Sample]:
        st = self.server.status()
        for key in ("sessions_current", "sessions_peak"):
            if isinstance(st.get(key), int):
                yield Sample(f"edge_imp_{key}", "gauge", f"IM&P XMPP {key.replace('_', ' ')}", float(st[key]))

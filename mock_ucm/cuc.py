"""The mock Unity Connection node: VMREST over HTTPS on the node's address (spec §1, §2).

Users and passwords come from the same lab directory as Unified CM's. OAuth access tokens issued
by the cluster validate too: the verifier reads the UCM nodes' keys from the lab state directory
(``<state>/oauth/``), as a real Unity Connection fetches them from Unified CM. ``/vmrest/cluster``
lists the lab's Unity Connection nodes plus the node's ``cluster_extra`` (see `mock_ucm.vmrest`).
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

from aiohttp import web

from edge.config import CucNode, LabConfig
from edge.runtime import BaseComponent
from mock_ucm.directory import Directory
from mock_ucm.http_common import HttpMetrics, RequestStats
from mock_ucm.oauth import Clock, TokenVerifier, state_verifier
from mock_ucm.vmrest import build_vmrest_app

log = logging.getLogger(__name__)


def _lab_server_context(config: LabConfig, node_name: str) -> ssl.SSLContext:
    # Local import: edge.pki is only needed when no context is injected (tests inject one).
    from edge.lab_pki import lab_pki
    from edge.pki import server_context

    return server_context(lab_pki(config), node_name, require_client_cert=False)


def cluster_members(config: LabConfig, node: CucNode) -> list[str]:
    """What the node's `/vmrest/cluster` lists: itself first, the lab's other Unity Connection
    nodes (the lab's nodes form one cluster), then its `cluster_extra` FQDNs."""
    out: list[str] = []
    for fqdn in [node.fqdn, *(n.fqdn for n in config.cuc), *node.cluster_extra]:
        if fqdn.lower() not in out:
            out.append(fqdn.lower())
    return out


class CucComponent(BaseComponent):
    role = "cuc"

    def __init__(
        self,
        name: str,
        config: LabConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        directory: Directory | None = None,
        verifier: TokenVerifier | None = None,
        clock: Clock = time.time,
        port: int | None = None,
    ) -> None:
        """`ssl_context`, `directory`, `verifier` and `port` (0: any free port) are injectable for tests."""
        super().__init__(name, config)
        self.node = self._node(config, name)
        self._ssl_context = ssl_context
        self._port = self.node.https_port if port is None else port
        self.directory = directory or Directory.from_config(config)
        self.verifier = verifier if verifier is not None else state_verifier(config, clock=clock)
        self.stats = RequestStats("vmrest", HttpMetrics(self.registry, "cuc"))
        self.app = build_vmrest_app(
            self.node,
            self.directory,
            verifier=self.verifier,
            stats=self.stats,
            clock=clock,
            cluster=cluster_members(config, self.node),
            admin=(config.lab.admin_username, config.lab.admin_password),
        )
        self._runner: web.AppRunner | None = None

    @staticmethod
    def _node(config: LabConfig, name: str) -> CucNode:
        for node in config.cuc:
            if node.name == name:
                return node
        raise ValueError(f"no Unity Connection node named {name!r}")

    async def start(self) -> None:
        context = self._ssl_context or _lab_server_context(self.config, self.node.name)
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.node.address, self._port, ssl_context=context, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.add_listener("https", "tls", str(host), int(port))
        log.info("%s: VMREST on https://%s:%d", self.name, host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await super().stop()

    def status(self) -> dict[str, Any]:
        return {"users": len(self.directory), "http": self.stats.snapshot()}

"""The lab DNS process: split-horizon views built from the configuration (spec §3)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edge.config import LabConfig
from edge.dns.core import DnsCore
from edge.dns.lab import lab_views
from edge.dns.server import DnsServer
from edge.metrics import Sample, StatusCollector
from edge.runtime import BaseComponent


class DnsComponent(BaseComponent):
    role = "dns"

    def __init__(self, name: str, config: LabConfig) -> None:
        super().__init__(name, config)
        self.core = DnsCore(list(lab_views(config)))
        self.server = DnsServer(self.core, config.dns.address, config.dns.port)
        self.registry.register(StatusCollector(self))

    async def start(self) -> None:
        await self.server.start()
        for lst in self.server.listeners:
            self.add_listener(lst.name, lst.transport, lst.host, lst.port)

    async def stop(self) -> None:
        await self.server.stop()
        await super().stop()

    def status(self) -> dict[str, Any]:
        return {"dns": {**self.core.stats(), "server": self.server.stats()}}

    def metric_samples(self) -> Iterable[Sample]:
        stats = self.core.stats()
        for view, rcodes in stats.get("views", {}).items():
            for rcode, n in rcodes.items():
                yield Sample(
                    "edge_dns_answers_total",
                    "counter",
                    "DNS answers by view and rcode",
                    float(n),
                    {"view": view, "rcode": rcode},
                )

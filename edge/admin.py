"""Each process's local admin HTTP endpoint: ``/status`` (JSON) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from edge.runtime import BaseComponent

log = logging.getLogger(__name__)


class AdminServer:
    def __init__(self, component: BaseComponent, host: str, port: int) -> None:
        self.component = component
        self.host = host
        self.port = port
        self.state = "starting"
        self.failure: str | None = None
        self._runner: web.AppRunner | None = None

    def status(self) -> dict[str, Any]:
        c = self.component
        body: dict[str, Any] = {
            "name": c.name,
            "role": c.role,
            "pid": os.getpid(),
            "state": self.state,
            "started_at": c.started_at,
            "uptime_s": round(time.time() - c.started_at, 3),
            "listeners": [lst.as_dict() for lst in c.listeners()],
            "admin": {"host": self.host, "port": self.port},
        }
        if self.failure:
            body["failure"] = self.failure
        if self.state == "ready":
            try:
                body.update(c.status())
            except Exception as exc:  # status must never take the endpoint down
                log.exception("%s: status() failed", c.name)
                body["status_error"] = str(exc)
        return body

    async def _handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        data = generate_latest(self.component.registry)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/metrics", self._handle_metrics)
        for method, path, handler in self.component.extra_routes:
            app.router.add_route(method, path, handler)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

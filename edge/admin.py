"""Each process's local admin HTTP endpoint: ``/status`` (JSON) and ``/metrics`` (Prometheus).

The Expressways add their admin REST API under ``/api/v1`` (edge/admin_api.py) and the status
page at ``/`` (edge/webui/, polling ``/status``; spec §8 "Status > Unified Communications").
"""

from __future__ import annotations

import logging
import os
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from edge.runtime import BaseComponent

log = logging.getLogger(__name__)

WEBUI_FILES = {"app.js": "application/javascript", "style.css": "text/css"}


def webui_text(name: str) -> str:
    return resources.files("edge.webui").joinpath(name).read_text(encoding="utf-8")


def status_page(source: str, title: str) -> str:
    """The status page, polling `source` (``/status`` of one process, or the console's lab status)."""
    html = webui_text("index.html")
    return html.replace("{{source}}", source).replace("{{title}}", title)


async def handle_webui_file(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in WEBUI_FILES:
        raise web.HTTPNotFound()
    return web.Response(
        text=webui_text(name), content_type=WEBUI_FILES[name], headers={"Cache-Control": "no-cache"}
    )


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
        if c.role in ("expc", "expe"):
            body["domains"] = [c.config.lab.domain]  # the edge and UC domain (spec §9)
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

    async def _handle_page(self, request: web.Request) -> web.Response:
        title = f"{self.component.name} ({self.component.role})"
        return web.Response(text=status_page("/status", title), content_type="text/html")

    async def start(self) -> None:
        from edge.admin_api import build_api

        app = web.Application()
        app.router.add_get("/status", self._handle_status)
        app.router.add_get("/metrics", self._handle_metrics)
        api = build_api(self.component)
        if api is not None:
            api.install(app)
            app.router.add_get("/", self._handle_page)
            app.router.add_get("/ui/{name}", handle_webui_file)
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

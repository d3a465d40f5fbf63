"""The lab console: `edge lab console [--port 9099]`.

One loopback web page for the whole lab: it reads the lab state (edge.lab.lab_status, the same
aggregation `edge lab status --json` prints) and serves the status page of edge/webui for every
component, plus that JSON at ``/api/lab/status``.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

from edge.admin import handle_webui_file, status_page
from edge.config import LabConfig
from edge.lab import lab_status

DEFAULT_PORT = 9099


def console_app(config: LabConfig) -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text=status_page("/api/lab/status", "MRA lab console"), content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await lab_status(config))

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/ui/{name}", handle_webui_file)
    app.router.add_get("/api/lab/status", status)
    return app


async def serve_console(
    config: LabConfig, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, stop: asyncio.Event | None = None
) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(console_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        print(f"lab console on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()

"""What `edge load` does around the engine: uvloop, live progress, report files, summary, exit code."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from rich.console import Console

from mra_client.load.engine import LoadEngine
from mra_client.load.progress import Progress, print_summary
from mra_client.load.report import build_report, write_report
from mra_client.load.settings import LoadSettings
from mra_client.signin import ClientSettings


@dataclass(frozen=True)
class Outputs:
    json_path: str
    html_path: str
    progress: bool = True


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without it
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_load_command(
    settings: LoadSettings, client: ClientSettings, outputs: Outputs, console: Console
) -> int:
    """Run, write the JSON and HTML reports, print the summary. Exit code: 0 when nothing failed,
    1 when any error was counted (sign-in, registration, call, media, message)."""
    load_before = os.getloadavg()
    engine = LoadEngine(settings, client)
    progress = Progress(console, outputs.progress)
    engine.on_sample = progress.update
    try:
        with progress, asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(engine.run())
    except KeyboardInterrupt:  # before the engine's own SIGINT handler was installed
        engine.stop_reason = engine.stop_reason or "interrupted (SIGINT) while starting"
    report = build_report(engine, load_before)
    write_report(report, outputs.json_path, outputs.html_path)
    print_summary(console, report, outputs.json_path, outputs.html_path)
    if (
        report["signins"]["ok"] == 0
        and any(e["kind"] == "get_edge_config 401" for e in report["errors"]["by_kind"])
        and settings.user_pattern == LoadSettings.user_pattern
    ):
        last = settings.username(settings.users - 1)
        console.print(
            f"hint: every sign-in got 401; does the lab have users up to {last}? "
            f"Start it with `edge lab up --set load.count={settings.first_index + settings.users - 1}`"
        )
    return 1 if report["errors"]["total"] else 0

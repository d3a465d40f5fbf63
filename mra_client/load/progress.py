"""Live progress of a load run (rich) and the final summary printed from the report."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from mra_client.load.engine import LoadEngine
from mra_client.load.report import summary_rows
from mra_client.load.stats import percentile

PLAIN_EVERY_S = 5.0


def _table(engine: LoadEngine) -> Table:
    st, se = engine.stats, engine.settings
    elapsed = time.perf_counter() - st.started_at
    sent, received = engine.media.live_totals()
    setup = sorted(st.setup_ms)
    table = Table(title=f"edge load — {elapsed:5.1f} / {se.duration_s:g} s", show_header=False, min_width=60)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row(
        "sign-ins",
        f"{st.signins_ok} ok, [red]{st.signins_failed} failed[/red] of {se.users} "
        f"(at {se.signin_rate_per_s:g}/s)",
    )
    table.add_row("registrations", f"{st.registrations} (peak {st.registrations_peak})")
    table.add_row("XMPP sessions", f"{st.xmpp_sessions} (peak {st.xmpp_sessions_peak})")
    table.add_row(
        "calls",
        f"{st.calls_active} active (peak {st.calls_active_peak}), {st.calls_ok} ok, "
        f"[red]{st.calls_failed} failed[/red] of {se.calls}",
    )
    if setup:
        table.add_row("setup ms", f"p50 {percentile(setup, 50):.1f}, p95 {percentile(setup, 95):.1f}")
    table.add_row("media packets", f"{st.media_sent + sent} sent, {st.media_received + received} received")
    table.add_row("messages", f"{st.messages_sent} sent, {st.messages_received} received")
    top = sorted(st.errors.values(), key=lambda e: -e.count)[:3]
    table.add_row("errors", ", ".join(f"{e.kind} ×{e.count}" for e in top) or "none")
    if engine.stopping:
        table.add_row("stopping", engine.stop_reason)
    return table


class Progress:
    """A rich Live table on a terminal; one plain line every few seconds otherwise (logs, CI)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.live: Live | None = None
        self._last_plain = 0.0

    def __enter__(self) -> Progress:
        if self.enabled and self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, engine: LoadEngine) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.update(_table(engine))
            return
        now = time.monotonic()
        if now - self._last_plain < PLAIN_EVERY_S:
            return
        self._last_plain = now
        st = engine.stats
        self.console.print(
            f"t={time.perf_counter() - st.started_at:.0f}s sign-ins {st.signins_ok}/"
            f"{engine.settings.users} (failed {st.signins_failed}), registrations {st.registrations}, "
            f"calls active {st.calls_active} ok {st.calls_ok} failed {st.calls_failed}, "
            f"messages {st.messages_sent}/{st.messages_received}, errors {st.errors_total}",
            highlight=False,
            soft_wrap=True,
        )


def print_summary(console: Console, report: dict[str, Any], json_path: str, html_path: str) -> None:
    console.print(
        f"[bold]edge load[/bold]: {report['settings']['users']} users, ran {report['elapsed_s']} s, "
        f"stopped: {report['stopped']}"
    )
    for name, rows in summary_rows(report):
        console.print(f"  [bold]{name}[/bold]")
        for key, value in rows:
            console.print(f"    {key:<34} {value}", highlight=False, soft_wrap=True)
    errors = report["errors"]["by_kind"]
    if errors:
        console.print("  [bold]Errors by kind[/bold]")
        for e in errors[:12]:
            console.print(
                f"    {e['count']:>6} × {e['kind']}: {e['example']}", highlight=False, soft_wrap=True
            )
        if len(errors) > 12:
            console.print(f"    … {len(errors) - 12} more kinds in the JSON report")
    host = report["host"]
    console.print(
        f"  load average before {host['load_average_before']}, after {host['load_average_after']} "
        f"({host['cpus']} CPUs); generator CPU {host['generator_cpu_s']} s, "
        f"max RSS {host['generator_max_rss_mib']} MiB",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"  report: {json_path} and {html_path}", highlight=False, soft_wrap=True)

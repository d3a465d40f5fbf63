"""The demo flow `edge lab up` runs once the lab is ready: alice signs in over MRA."""

from __future__ import annotations

import asyncio
from typing import Any

from rich.console import Console

from edge.config import LabConfig
from mra_client.edge_http import StepError
from mra_client.signin import ClientSettings, Ladder, sign_in, sign_out


def lab_client_settings(config: LabConfig, username: str, password: str | None = None) -> ClientSettings:
    user = next((u for u in config.all_users() if u.username == username), None)
    return ClientSettings(
        username=username,
        password=password if password is not None else (user.password if user else ""),
        domain=config.lab.domain,
        dns_server=config.dns.address,
        dns_port=config.dns.port,
        ca_file=str(config.lab.state_path / "certs" / "ca.pem"),
    )


def print_ladder(ladder: Ladder, console: Console, title: str) -> None:
    console.print(f"[bold]{title}[/bold]")
    for step in ladder.steps:
        mark = "[green]✓[/green]" if step.ok else "[red]✗[/red]"
        console.print(f"  {mark} {step.name:<18} {step.elapsed_ms:>8.1f} ms  {step.detail}")


async def _demo(config: LabConfig, console: Console) -> int:
    ladder = Ladder()
    settings = lab_client_settings(config, "alice")
    try:
        session = await sign_in(settings, ladder)
    except StepError as exc:
        print_ladder(ladder, console, "demo: alice signs in over MRA")
        console.print(f"[red]demo failed at {exc}[/red]")
        return 1
    print_ladder(ladder, console, "demo: alice signs in over MRA")
    await sign_out(session)
    return 0


def run_demo_flow(config: LabConfig, console: Any) -> int:
    return asyncio.run(_demo(config, console))

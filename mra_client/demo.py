"""The demo flow `edge lab up` runs once the lab is ready: alice signs in over MRA."""

from __future__ import annotations

import asyncio
from typing import Any

import slixmpp
from rich.console import Console

from edge.config import LabConfig
from mra_client.call import place_call
from mra_client.edge_http import StepError
from mra_client.signin import ClientSettings, Ladder, SignedIn, sign_in, sign_out
from mra_client.xmpp import MraXmppClient


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


async def chat_over_mra(
    config: LabConfig, ladder: Ladder, session: SignedIn, settings: ClientSettings, to: str, text: str
) -> str:
    """Alice over MRA (E's xmppEdgeServer) chats with a user signed in inside (straight to IM&P)."""
    if not session.config.xmpp_edge:
        raise StepError("XMPP sign-in", "no xmppEdgeServer in the edge config")
    domain = settings.domain
    peer_user = next((u for u in config.all_users() if u.username == to), None)
    if peer_user is None:
        raise StepError("chat", f"no lab user {to!r}")
    imp = config.imp[0]
    mra = MraXmppClient(f"{settings.username}@{domain}/mra", settings.password, settings.ca_file)
    inside = MraXmppClient(f"{to}@{domain}/desk", peer_user.password, settings.ca_file)
    host = session.edge[2]
    port = session.config.xmpp_edge[0][1]
    try:
        await ladder.run(
            "XMPP sign-in",
            lambda: mra.sign_in(host, port),
            lambda ms: f"STARTTLS + SASL through {session.config.xmpp_edge[0][0]}:{port}",
        )
        await inside.sign_in(imp.address, imp.client_port)

        async def exchange() -> str:
            mra.send_message(mto=slixmpp.JID(f"{to}@{domain}"), mbody=text, mtype="chat")
            got = await inside.wait_message()
            inside.send_message(
                mto=slixmpp.JID(f"{settings.username}@{domain}"), mbody=f"re: {got['body']}", mtype="chat"
            )
            reply = await mra.wait_message()
            return str(reply["body"])

        return await ladder.run("chat", exchange, lambda r: f"{settings.username} → {to} and back: {r!r}")
    finally:
        await mra.sign_out()
        await inside.sign_out()


async def _demo(config: LabConfig, console: Console) -> int:
    ladder = Ladder()
    settings = lab_client_settings(config, "alice")
    title = "demo: alice signs in over MRA, calls 9999, chats with bob"
    try:
        session = await sign_in(settings, ladder)
        try:
            sip = session.sip
            assert sip is not None
            await ladder.run(
                "call 9999",
                lambda: place_call(sip, config.echo_number, 2.0),
                lambda r: (
                    f"SRTP {r.suite} via {r.remote[0]}:{r.remote[1]}: {r.received}/{r.sent} back, "
                    f"loss {r.loss_pct}%, rtt p50 {r.rtt_ms_p50} ms"
                ),
            )
            await chat_over_mra(config, ladder, session, settings, "bob", "hello from MRA")
        finally:
            await sign_out(session)
    except StepError as exc:
        print_ladder(ladder, console, title)
        console.print(f"[red]demo failed at {exc}[/red]")
        return 1
    print_ladder(ladder, console, title)
    return 0


def run_demo_flow(config: LabConfig, console: Any) -> int:
    return asyncio.run(_demo(config, console))

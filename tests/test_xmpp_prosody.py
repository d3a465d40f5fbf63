"""XMPP over MRA with a real XMPP server as the IM&P node (shared/spec/MRA.md §6).

The lab runs without its mock IM&P (`imp.0.external=true`); Debian's Prosody 0.12 takes the IM&P
node's address with the lab's imp1 certificate: STARTTLS on `client_port` for inside clients,
direct TLS on `edge_port` for Expressway-C. Then the same flow as
tests/test_mra_xmpp.py::test_presence_and_chat_between_mra_and_inside_clients: alice over MRA
(client → E:5222 → 7400 traversal link → C → Prosody), bob straight to Prosody, presence both
ways and ten chats each way in order. This proves the edge does not lean on mock-only behaviour
(stream feature order, header attributes, TLS details).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningLab
from tests.prosody_tools import ProsodyServer
from tests.xmpp.xmpp_helpers import send_chat, start_client, stop_client

pytestmark = pytest.mark.interop

CLIENT_PORT = 15222
EDGE_PORT = 17400
PASSWORD = "lab-pass"


@pytest.fixture
def prosody_lab(lab_factory: Any, tmp_path: Path) -> Iterator[tuple[RunningLab, ProsodyServer]]:
    lab: RunningLab = lab_factory(
        "imp.0.external=true", f"imp.0.edge_port={EDGE_PORT}", f"imp.0.client_port={CLIENT_PORT}"
    )
    imp = lab.config.imp[0]
    certs = lab.state_dir / "certs"
    server = ProsodyServer(
        workdir=tmp_path / "prosody",
        address=imp.address,
        domain=lab.config.lab.domain,
        cert_path=certs / f"{imp.name}.pem",
        key_path=certs / f"{imp.name}.key",
        client_port=imp.client_port,
        edge_port=imp.edge_port,
        users=[("alice", PASSWORD), ("bob", PASSWORD)],
    )
    with server:
        yield lab, server


def test_presence_and_chat_through_the_edge_to_prosody(prosody_lab: tuple[RunningLab, ProsodyServer]) -> None:
    lab, server = prosody_lab
    e = lab.config.expe[0]
    imp = lab.config.imp[0]
    ca = lab.state_dir / "certs" / "ca.pem"

    async def flow() -> None:
        alice = await start_client("alice@example.com/mra", PASSWORD, e.external_address, e.xmpp_port, ca)
        bob = await start_client("bob@example.com/desk", PASSWORD, imp.address, imp.client_port, ca)
        try:
            await alice.presence_from("bob@example.com")
            await bob.presence_from("alice@example.com")
            assert alice.roster_iq is not None
            for i in range(10):
                send_chat(alice, "bob@example.com", f"a->b {i}")
                send_chat(bob, "alice@example.com", f"b->a {i}")
            got_b = [str((await bob.next_message())["body"]) for _ in range(10)]
            got_a = [str((await alice.next_message())["body"]) for _ in range(10)]
            assert got_b == [f"a->b {i}" for i in range(10)], "in order, nothing lost"
            assert got_a == [f"b->a {i}" for i in range(10)]
            assert lab.component("expe")["counts"]["xmpp_sessions"] == 1
            assert lab.component("expc")["xmpp"]["sessions"] == 1
        finally:
            await stop_client(alice)
            await stop_client(bob)

    try:
        asyncio.run(flow())
    except BaseException:
        print(server.log_text()[-6000:])
        raise
    # alice really signed in on Prosody through Expressway-C's address, bob from inside.
    log = server.log_text()
    assert "Authenticated as alice@example.com" in log
    assert "Authenticated as bob@example.com" in log

"""The mock IM&P against real slixmpp clients over loopback (STARTTLS and direct TLS)."""

from __future__ import annotations

import asyncio

from edge.xmpp.events import StanzaReceived
from mock_ucm.imp import ImpServer
from tests.xmpp.conftest import DOMAIN, PASSWORD
from tests.xmpp.xmpp_helpers import (
    RawXmppClient,
    ThrowawayPki,
    new_client,
    send_chat,
    start_client,
    stop_client,
)


def port_of(imp: ImpServer, mode: str) -> int:
    return next(port for _host, port, m in imp.listeners if m == mode)


async def test_two_users_presence_and_chat_both_ways_in_order(imp: ImpServer, pki: ThrowawayPki) -> None:
    port = port_of(imp, "starttls")
    alice = await start_client(f"alice@{DOMAIN}/laptop", PASSWORD, "127.0.0.1", port, pki.ca_path)
    bob = await start_client(f"bob@{DOMAIN}/phone", PASSWORD, "127.0.0.1", port, pki.ca_path)
    try:
        assert str(alice.boundjid) == f"alice@{DOMAIN}/laptop"
        # Directory roster: every other user, subscription both.
        items = {str(j): v["subscription"] for j, v in alice.roster_iq["roster"]["items"].items()}
        assert items == {f"{u}@{DOMAIN}": "both" for u in ("bob", "carol", "dave")}
        # Alice was online first: she sees bob's initial presence, bob gets alice's from the probe.
        assert str((await alice.presence_from(f"bob@{DOMAIN}"))["from"]) == f"bob@{DOMAIN}/phone"
        assert str((await bob.presence_from(f"alice@{DOMAIN}"))["from"]) == f"alice@{DOMAIN}/laptop"

        for i in range(20):
            send_chat(alice, f"bob@{DOMAIN}", f"a->b {i}")
            send_chat(bob, f"alice@{DOMAIN}/laptop", f"b->a {i}")
        got_bob = [await bob.next_message() for _ in range(20)]
        got_alice = [await alice.next_message() for _ in range(20)]
        assert [m["body"] for m in got_bob] == [f"a->b {i}" for i in range(20)]
        assert [m["body"] for m in got_alice] == [f"b->a {i}" for i in range(20)]
        assert str(got_bob[0]["from"]) == f"alice@{DOMAIN}/laptop"
        assert imp.status()["messages_routed"] == 40
        assert imp.status()["sessions_current"] == 2

        await stop_client(bob)
        unavailable = await alice.presence_from(f"bob@{DOMAIN}", "unavailable")
        assert str(unavailable["from"]) == f"bob@{DOMAIN}/phone"
    finally:
        await stop_client(alice)
        await stop_client(bob)
    status = imp.status()
    assert status["sessions_peak"] == 2


async def test_direct_tls_listener_like_expressway_c(imp: ImpServer, pki: ThrowawayPki) -> None:
    port = port_of(imp, "tls")
    carol = await start_client(f"carol@{DOMAIN}/c", PASSWORD, "127.0.0.1", port, pki.ca_path, direct_tls=True)
    try:
        assert carol.started.is_set()
        assert imp.status()["sessions_current"] == 1
    finally:
        await stop_client(carol)


async def test_bad_password_is_refused(imp: ImpServer, pki: ThrowawayPki) -> None:
    client = new_client(f"alice@{DOMAIN}/x", "wrong", pki.ca_path)
    client.connect("127.0.0.1", port_of(imp, "starttls"))
    try:
        await asyncio.wait_for(client.auth_failed.wait(), 10)
        await asyncio.wait_for(client.ended.wait(), 10)  # slixmpp gives up after its mechanisms
        assert not client.started.is_set()
        assert imp.status()["auth_failures"] >= 1
        assert imp.status()["sessions_current"] == 0
    finally:
        await stop_client(client)


async def test_offline_message_delivered_with_delay_on_next_sign_in(
    imp: ImpServer, pki: ThrowawayPki
) -> None:
    port = port_of(imp, "starttls")
    alice = await start_client(f"alice@{DOMAIN}/laptop", PASSWORD, "127.0.0.1", port, pki.ca_path)
    dave = None
    try:
        send_chat(alice, f"dave@{DOMAIN}", "while you were out")
        send_chat(alice, f"dave@{DOMAIN}", "second")
        # Readiness: the server handles a stream in order, so once a note to herself is back,
        # both messages for dave have been stored.
        send_chat(alice, f"alice@{DOMAIN}/laptop", "marker")
        assert (await alice.next_message())["body"] == "marker"
        assert imp.status()["offline_stored"] == 2
        dave = await start_client(f"dave@{DOMAIN}/desk", PASSWORD, "127.0.0.1", port, pki.ca_path)
        first, second = await dave.next_message(), await dave.next_message()
        assert (first["body"], second["body"]) == ("while you were out", "second")
        assert str(first["from"]) == f"alice@{DOMAIN}/laptop"
        delay = first.xml.find("{urn:xmpp:delay}delay")
        assert delay is not None and delay.get("from") == DOMAIN and delay.get("stamp", "").endswith("Z")
        assert imp.status()["offline_pending"] == 0
    finally:
        await stop_client(alice)
        if dave is not None:
            await stop_client(dave)


async def test_oversized_stanza_kills_only_that_stream(imp: ImpServer, pki: ThrowawayPki) -> None:
    port = port_of(imp, "starttls")
    alice = await start_client(f"alice@{DOMAIN}/a", PASSWORD, "127.0.0.1", port, pki.ca_path)
    bob = await start_client(f"bob@{DOMAIN}/b", PASSWORD, "127.0.0.1", port, pki.ca_path)
    raw = await RawXmppClient.connect("127.0.0.1", port)
    try:
        bound = await raw.login(DOMAIN, "carol", PASSWORD, "raw", pki.client_context())
        assert bound.get("type") == "result"
        raw.send(b"<message to='bob@example.com'><body>" + b"x" * 70_000 + b"</body></message>")
        events = await raw.drain_until_closed()
        errors = [e.element for e in events if isinstance(e, StanzaReceived)]
        assert errors, events
        error = errors[-1]
        assert error.tag == "{http://etherx.jabber.org/streams}error"
        assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}policy-violation") is not None

        send_chat(alice, f"bob@{DOMAIN}", "still here")
        assert (await bob.next_message())["body"] == "still here"
        send_chat(bob, f"alice@{DOMAIN}", "me too")
        assert (await alice.next_message())["body"] == "me too"
    finally:
        await raw.close()
        await stop_client(alice)
        await stop_client(bob)

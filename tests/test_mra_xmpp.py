"""XMPP over MRA through the real processes (spec §6): alice over MRA (client → E:5222 → 7400
traversal link → C → IM&P) and bob inside (straight to the IM&P) with real slixmpp clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from edge.lab import pid_alive
from edge.xmpp.events import StanzaReceived, StreamErrorDetected
from edge.xmpp.stanza import NS_SASL, NS_STREAM_ERRORS, qn
from tests.conftest import RunningLab, edge_cli
from tests.xmpp.xmpp_helpers import RawXmppClient, send_chat, start_client, stop_client


def _ca(lab: RunningLab) -> Path:
    return lab.state_dir / "certs" / "ca.pem"


def _ssl(lab: RunningLab) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(_ca(lab)))


def test_presence_and_chat_between_mra_and_inside_clients(lab: RunningLab) -> None:
    e = lab.config.expe[0]
    imp = lab.config.imp[0]

    async def flow() -> None:
        alice = await start_client(
            "alice@example.com/mra", "lab-pass", e.external_address, e.xmpp_port, _ca(lab)
        )
        bob = await start_client("bob@example.com/desk", "lab-pass", imp.address, imp.client_port, _ca(lab))
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
            status = lab.component("expe")
            assert status["counts"]["xmpp_sessions"] == 1
            assert lab.component("expc")["xmpp"]["sessions"] == 1
        finally:
            await stop_client(alice)
            await stop_client(bob)

    asyncio.run(flow())


def _raw_events(lab: RunningLab) -> Any:
    e = lab.config.expe[0]
    return RawXmppClient.connect(e.external_address, e.xmpp_port)


def test_bad_credentials_wrong_domain_and_tls_required(lab: RunningLab) -> None:
    async def flow() -> dict[str, Any]:
        out: dict[str, Any] = {}
        client = await _raw_events(lab)
        try:
            await client.open_stream("example.com")
            await client.starttls("example.com", _ssl(lab))
            result = await client.auth("PLAIN", b"\0alice\0wrong")
            out["bad_password"] = result.tag
        finally:
            await client.close()
        client = await _raw_events(lab)
        try:
            client.send(
                "<?xml version='1.0'?><stream:stream to='other.test' version='1.0' "
                "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
            )
            events = await client.drain_until_closed()
            out["wrong_domain"] = _stream_error(events)
        finally:
            await client.close()
        client = await _raw_events(lab)
        try:
            await client.open_stream("example.com")
            client.send(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAGxhYi1wYXNz</auth>"
            )
            out["no_tls"] = _stream_error(await client.drain_until_closed())
        finally:
            await client.close()
        return out

    out = asyncio.run(flow())
    assert out["bad_password"] == qn(NS_SASL, "failure")
    assert out["wrong_domain"] == "host-unknown"
    assert out["no_tls"] == "not-authorized"


def _stream_error(events: list[Any]) -> str | None:
    for event in events:
        if isinstance(event, StanzaReceived) and event.element.tag.endswith("}error"):
            for child in event.element:
                if child.tag.startswith("{" + NS_STREAM_ERRORS) and not child.tag.endswith("}text"):
                    return child.tag.split("}", 1)[1]
        if isinstance(event, StreamErrorDetected):
            return f"framer:{event.condition}"
    return None


def test_bind_conflict_and_oversized_stanza(lab: RunningLab) -> None:
    e = lab.config.expe[0]

    async def flow() -> tuple[ET.Element, str | None, bool]:
        first = await _raw_events(lab)
        second = await _raw_events(lab)
        try:
            await first.login("example.com", "bob", "lab-pass", "same", _ssl(lab))
            conflict = await second.login("example.com", "bob", "lab-pass", "same", _ssl(lab))
            big = "x" * 100_000
            second.send(f"<message to='alice@example.com' type='chat'><body>{big}</body></message>")
            err = _stream_error(await second.drain_until_closed())
            first.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
            pong = await first.next_stanza()
            return conflict, err, pong.get("type") == "result"
        finally:
            await first.close()
            await second.close()

    conflict, err, alive = asyncio.run(flow())
    assert conflict.get("type") == "error"
    assert conflict.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}conflict") is not None
    assert err == "policy-violation"
    assert alive, "the other session keeps working"
    assert e.xmpp_port == 5222


def _session_counts(lab: RunningLab) -> tuple[int, int, int]:
    """XMPP sessions held by E, C and the IM&P, from their /status."""
    e = int(lab.component("expe")["counts"]["xmpp_sessions"])
    c = int(lab.component("expc")["xmpp"]["sessions"])
    imp = int(lab.component("imp1")["xmpp"]["sessions_current"])
    return e, c, imp


async def _until_counts(lab: RunningLab, expected: tuple[int, int, int], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (counts := _session_counts(lab)) != expected:
        assert time.monotonic() < deadline, f"sessions (E, C, IM&P) stayed {counts}, expected {expected}"
        await asyncio.sleep(0.1)


def test_session_end_frees_it_on_e_c_and_imp(lab: RunningLab) -> None:
    """A client that closes its stream gets the server's close back (RFC 6120 §4.4); one that
    vanishes (TCP reset, no close tag) costs nothing once gone: E, C and IM&P all let go."""

    async def flow() -> list[Any]:
        await _until_counts(lab, (0, 0, 0))
        polite = await _raw_events(lab)
        await polite.login("example.com", "alice", "lab-pass", "polite", _ssl(lab))
        rude = await _raw_events(lab)
        await rude.login("example.com", "bob", "lab-pass", "rude", _ssl(lab))
        await _until_counts(lab, (2, 2, 2))
        rude.writer.transport.abort()
        await _until_counts(lab, (1, 1, 1))
        polite.send("</stream:stream>")
        try:
            closing: list[Any] = await polite.drain_until_closed()
            return closing
        finally:
            await polite.close()
            await _until_counts(lab, (0, 0, 0))

    events = asyncio.run(flow())
    assert [type(e).__name__ for e in events] == ["StreamClosed"]


def test_link_drop_ends_session_with_stream_error(lab_factory: Any) -> None:
    lab = lab_factory("expc.zone.reconnect_max_s=1")
    expc_pid = lab.component("expc")["pid"]

    async def flow() -> str | None:
        client = await _raw_events(lab)
        try:
            await client.login("example.com", "alice", "lab-pass", "r1", _ssl(lab))
            os.kill(expc_pid, signal.SIGKILL)
            started = time.monotonic()
            events = await client.drain_until_closed()
            assert time.monotonic() - started < 10
            return _stream_error(events)
        finally:
            await client.close()

    assert asyncio.run(flow()) == "remote-connection-failed"
    deadline = time.monotonic() + 5
    while pid_alive(expc_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(expc_pid)


def test_client_chat_cli(lab: RunningLab) -> None:
    out = edge_cli("client", "chat", "--user", "alice", "--to", "bob", "hello bob", "--json", *lab.args)
    ladder = json.loads(out.stdout)
    assert ladder["ok"] is True
    chat = next(s for s in ladder["steps"] if s["name"] == "chat")
    assert "re: hello bob" in chat["detail"]

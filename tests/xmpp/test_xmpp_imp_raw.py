"""The mock IM&P at the byte level: negotiation rules, SASL mechanisms, bind conflict, errors."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from edge.xmpp.events import StanzaReceived, StreamHeaderReceived
from edge.xmpp.stanza import NS_SASL, NS_STREAMS, qn, split_tag, stream_header
from mock_ucm.imp import ImpServer
from tests.xmpp.conftest import DOMAIN, PASSWORD, token_for
from tests.xmpp.xmpp_helpers import RawXmppClient, ThrowawayPki

STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"


def port_of(imp: ImpServer, mode: str) -> int:
    return next(port for _host, port, m in imp.listeners if m == mode)


async def secured(imp: ImpServer, pki: ThrowawayPki) -> RawXmppClient:
    """A raw client with TLS up and the SASL features read."""
    client = await RawXmppClient.connect("127.0.0.1", port_of(imp, "starttls"))
    await client.open_stream(DOMAIN)
    feats = await client.starttls(DOMAIN, pki.client_context())
    mechs = [m.text for m in feats.iter(qn(NS_SASL, "mechanism"))]
    assert mechs == ["PLAIN", "CISCO-VTG-TOKEN", "X-OAUTH2"]
    return client


def stream_error_condition(events: Sequence[object]) -> str:
    for event in events:
        if isinstance(event, StanzaReceived) and event.element.tag == qn(NS_STREAMS, "error"):
            return split_tag(event.element[0].tag)[1]
    raise AssertionError(f"no stream error in {events}")


async def test_plain_listener_offers_only_required_starttls(imp: ImpServer) -> None:
    client = await RawXmppClient.connect("127.0.0.1", port_of(imp, "starttls"))
    try:
        feats = await client.open_stream(DOMAIN)
        assert [child.tag for child in feats] == ["{urn:ietf:params:xml:ns:xmpp-tls}starttls"]
        assert feats[0].find("{urn:ietf:params:xml:ns:xmpp-tls}required") is not None
        client.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>AGFsaWNlAGxhYi1wYXNz</auth>")
        assert stream_error_condition(await client.drain_until_closed()) == "policy-violation"
    finally:
        await client.close()


async def test_token_mechanisms(imp: ImpServer, pki: ThrowawayPki) -> None:
    payloads = {
        "CISCO-VTG-TOKEN": f"userid=bob@{DOMAIN}\0token={token_for('bob')}".encode(),
        "X-OAUTH2": f"\0bob\0{token_for('bob')}".encode(),
        "PLAIN": f"bob@{DOMAIN}\0bob\0{PASSWORD}".encode(),
    }
    for mechanism, payload in payloads.items():
        client = await secured(imp, pki)
        try:
            assert (await client.auth(mechanism, payload)).tag == qn(NS_SASL, "success"), mechanism
            feats = await client.open_stream(DOMAIN)
            assert feats.find("{urn:ietf:params:xml:ns:xmpp-bind}bind") is not None
        finally:
            await client.close()


async def test_three_failures_then_stream_error(imp: ImpServer, pki: ThrowawayPki) -> None:
    client = await secured(imp, pki)
    try:
        bad = [
            ("CISCO-VTG-TOKEN", f"userid=alice@{DOMAIN}\0token=forged".encode(), "not-authorized"),
            ("PLAIN", b"\0mallory\0lab-pass", "not-authorized"),
        ]
        for mechanism, payload, condition in bad:
            failure = await client.auth(mechanism, payload)
            assert failure.tag == qn(NS_SASL, "failure")
            assert failure[0].tag == qn(NS_SASL, condition)
        third = base64.b64encode(b"\0alice\0nope").decode()
        client.send(f"<auth xmlns='{NS_SASL}' mechanism='X-OAUTH2'>{third}</auth>")
        events = await client.drain_until_closed()
        assert isinstance(events[0], StanzaReceived) and events[0].element.tag == qn(NS_SASL, "failure")
        assert stream_error_condition(events) == "policy-violation"
        assert imp.status()["auth_failures"] == 3
    finally:
        await client.close()


async def test_empty_initial_response_gets_a_challenge(imp: ImpServer, pki: ThrowawayPki) -> None:
    client = await secured(imp, pki)
    try:
        client.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>=</auth>")
        assert (await client.next_stanza()).tag == qn(NS_SASL, "challenge")
        answer = base64.b64encode(b"\0alice\0lab-pass").decode()
        client.send(f"<response xmlns='{NS_SASL}'>{answer}</response>")
        assert (await client.next_stanza()).tag == qn(NS_SASL, "success")
    finally:
        await client.close()


async def test_bind_conflict_is_409_and_first_session_survives(imp: ImpServer, pki: ThrowawayPki) -> None:
    port = port_of(imp, "starttls")
    first = await RawXmppClient.connect("127.0.0.1", port)
    second = await RawXmppClient.connect("127.0.0.1", port)
    try:
        ok = await first.login(DOMAIN, "alice", PASSWORD, "jabber", pki.client_context())
        assert ok.get("type") == "result"
        assert ok.findtext(".//{urn:ietf:params:xml:ns:xmpp-bind}jid") == f"alice@{DOMAIN}/jabber"
        clash = await second.login(DOMAIN, "alice", PASSWORD, "jabber", pki.client_context())
        assert clash.get("type") == "error" and clash.get("id") == "bind1"
        error = clash.find("{jabber:client}error")
        assert error is not None and error.get("type") == "cancel" and error.get("code") == "409"
        assert error.find("{urn:ietf:params:xml:ns:xmpp-stanzas}conflict") is not None
        # The refused client may bind another resource; the first one still works.
        other = await second.bind("jabber-2", "bind2")
        assert other.get("type") == "result"
        first.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
        pong = await first.next_stanza()
        assert (pong.get("type"), pong.get("id")) == ("result", "p1")
        assert imp.status()["sessions_current"] == 2
    finally:
        await first.close()
        await second.close()


async def test_wrong_domain_is_host_unknown(imp: ImpServer) -> None:
    client = await RawXmppClient.connect("127.0.0.1", port_of(imp, "starttls"))
    try:
        client.send(stream_header("other.example", None, None))
        events = await client.drain_until_closed()
        assert isinstance(events[0], StreamHeaderReceived)
        assert events[0].attrs["from"] == DOMAIN
        assert stream_error_condition(events) == "host-unknown"
    finally:
        await client.close()


async def test_not_well_formed_before_header_still_gets_header_and_error(imp: ImpServer) -> None:
    client = await RawXmppClient.connect("127.0.0.1", port_of(imp, "starttls"))
    try:
        client.send(b"GET / HTTP/1.1\r\n\r\n")
        events = await client.drain_until_closed()
        assert isinstance(events[0], StreamHeaderReceived)
        assert stream_error_condition(events) == "not-well-formed"
    finally:
        await client.close()


async def test_established_session_services(imp: ImpServer, pki: ThrowawayPki) -> None:
    client = await RawXmppClient.connect(
        "127.0.0.1", port_of(imp, "tls"), ssl_context=pki.client_context(), server_hostname=DOMAIN
    )
    try:
        bound = await client.login(DOMAIN, "carol", PASSWORD, "r", pki.client_context(), starttls=False)
        assert bound.get("type") == "result"
        client.send("<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
        assert (await client.next_stanza()).get("type") == "result"
        client.send("<iq type='get' id='u1'><query xmlns='urn:example:unknown'/></iq>")
        unknown = await client.next_stanza()
        assert unknown.get("type") == "error"
        assert unknown.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None
        client.send("<message to='nobody@example.com' id='m1'><body>hello?</body></message>")
        bounce = await client.next_stanza()
        assert (bounce.get("type"), bounce.get("from"), bounce.get("id")) == (
            "error",
            "nobody@example.com",
            "m1",
        )
        assert bounce.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None
        client.send("<message to='x@elsewhere.example'><body>hi</body></message>")
        remote = await client.next_stanza()
        assert remote.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}remote-server-not-found") is not None
        client.send(
            "<message from='alice@example.com/evil' to='bob@example.com'><body>spoof</body></message>"
        )
        assert stream_error_condition(await client.drain_until_closed()) == "invalid-from"
    finally:
        await client.close()

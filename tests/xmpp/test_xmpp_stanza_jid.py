"""Stanza helpers (serialisation without ns0, errors) and JID parsing (RFC 7622 basics)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.xmpp.events import StanzaReceived, StreamHeaderReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.jid import InvalidJid, Jid
from edge.xmpp.stanza import (
    NS_CLIENT,
    NS_DELAY,
    element,
    iq_error,
    iq_result,
    qn,
    serialize,
    stream_error,
    stream_header,
)


def reparse(data: bytes) -> ET.Element:
    framer = XmlStreamFramer()
    events = framer.receive_data(stream_header("example.com", None, None) + data)
    assert isinstance(events[0], StreamHeaderReceived)
    assert isinstance(events[1], StanzaReceived), events
    return events[1].element


def test_serialize_uses_default_namespaces_not_ns0() -> None:
    msg = element(
        qn(NS_CLIENT, "message"),
        {"to": "bob@example.com", "{http://www.w3.org/XML/1998/namespace}lang": "en"},
    )
    msg.append(element(qn(NS_CLIENT, "body"), text="a<b & 'c'"))
    msg.append(element(qn(NS_DELAY, "delay"), {"stamp": "x"}))
    data = serialize(msg)
    assert data == (
        b"<message to='bob@example.com' xml:lang='en'><body>a&lt;b &amp; 'c'</body>"
        b"<delay xmlns='urn:xmpp:delay' stamp='x'/></message>"
    )
    assert b"ns0" not in data


@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
    st.text(max_size=10, alphabet="ab'\"<>&\n"),
)
def test_serialize_round_trips_through_the_framer(text: str, attr: str) -> None:
    msg = element(qn(NS_CLIENT, "message"), {"id": attr}, element(qn(NS_CLIENT, "body"), text=text))
    back = reparse(serialize(msg))
    assert back.get("id") == attr
    assert (back.findtext(qn(NS_CLIENT, "body")) or "") == text


def test_stream_error_bytes() -> None:
    data = stream_error("host-unknown", "no such domain")
    assert data.endswith(b"</stream:error></stream:stream>")
    el = reparse(data.removesuffix(b"</stream:stream>"))
    assert el[0].tag == "{urn:ietf:params:xml:ns:xmpp-streams}host-unknown"
    assert el.findtext("{urn:ietf:params:xml:ns:xmpp-streams}text") == "no such domain"


def test_iq_result_and_error() -> None:
    request = reparse(
        b"<iq type='get' id='q1' from='a@example.com/r' to='example.com'><query xmlns='urn:x'/></iq>"
    )
    result = iq_result(request)
    assert (result.get("type"), result.get("id"), result.get("to"), result.get("from")) == (
        "result",
        "q1",
        "a@example.com/r",
        "example.com",
    )
    err = reparse(serialize(iq_error(request, "cancel", "conflict")))
    error = err.find(qn(NS_CLIENT, "error"))
    assert error is not None and (error.get("type"), error.get("code")) == ("cancel", "409")
    assert error.find("{urn:ietf:params:xml:ns:xmpp-stanzas}conflict") is not None
    assert err.find("{urn:x}query") is not None  # payload echoed (RFC 6120 §8.3.1)


def test_jid_parsing() -> None:
    jid = Jid.parse("Alice@Example.COM./Jabber Laptop/x")
    assert jid == Jid("alice", "example.com", "Jabber Laptop/x")
    assert str(jid.bare) == "alice@example.com"
    assert str(Jid.parse("example.com")) == "example.com"
    assert Jid.parse("a@b/c@d").resource == "c@d"
    assert Jid.parse("[::1]").domain == "[::1]"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "@example.com",
        "alice@",
        "alice@example.com/",
        "al ice@example.com",
        "a<b@example.com",
        "a@exa mple.com",
        "a@" + "x" * 64 + ".com",
        "x" * 1024 + "@example.com",
        "a@b..c",
    ],
)
def test_invalid_jids(bad: str) -> None:
    with pytest.raises(InvalidJid):
        Jid.parse(bad)

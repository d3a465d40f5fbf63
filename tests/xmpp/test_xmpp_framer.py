"""XmlStreamFramer: incremental, bounded, byte-exact, and strict about restricted XML."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.xmpp.events import (
    FramerEvent,
    StanzaReceived,
    StreamClosed,
    StreamErrorDetected,
    StreamHeaderReceived,
)
from edge.xmpp.framer import XmlStreamFramer

HEADER = (
    b"<stream:stream to='example.com' xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en'>"
)
STANZAS = [
    b"<message to='bob@example.com' type='chat' id='m1'><body>hi &amp; \xc3\xa9 &#x263A;</body></message>",
    b"<presence a='1\">'/>",
    b"<iq type='get' id='r1'><query xmlns='jabber:iq:roster'/></iq>",
    b'<message to="a@b" x=\'>\'><body>one<b/>two</body><x xmlns="urn:x" y="&quot;"/></message>',
]
STREAM = b"<?xml version='1.0'?>" + HEADER + b"\n " + b" \n".join(STANZAS) + b"</stream:stream>"


def feed_all(data: bytes, cuts: list[int] | None = None, **kwargs: Any) -> list[FramerEvent]:
    framer = XmlStreamFramer(**kwargs)
    events: list[FramerEvent] = []
    bounds = [0, *sorted(set(cuts or [])), len(data)]
    for start, end in itertools.pairwise(bounds):
        events += framer.receive_data(data[start:end])
    return events


def summary(events: list[FramerEvent]) -> list[tuple[str, bytes | str]]:
    out: list[tuple[str, bytes | str]] = []
    for e in events:
        if isinstance(e, StreamHeaderReceived | StanzaReceived):
            out.append((type(e).__name__, e.raw))
        elif isinstance(e, StreamErrorDetected):
            out.append(("error", e.condition))
        else:
            out.append((type(e).__name__, b""))
    return out


def test_whole_stream_events_and_byte_exact_raw() -> None:
    events = feed_all(STREAM)
    assert isinstance(events[0], StreamHeaderReceived)
    assert events[0].raw == HEADER
    assert events[0].attrs == {"to": "example.com", "version": "1.0", "xml:lang": "en"}
    assert events[0].default_namespace == "jabber:client"
    stanzas = [e for e in events if isinstance(e, StanzaReceived)]
    assert [s.raw for s in stanzas] == STANZAS
    assert isinstance(events[-1], StreamClosed)
    msg = stanzas[0].element
    assert msg.tag == "{jabber:client}message"
    assert msg.findtext("{jabber:client}body") == "hi & \u00e9 \u263a"
    assert stanzas[1].element.get("a") == '1">'
    assert stanzas[2].element[0].tag == "{jabber:iq:roster}query"
    body = stanzas[3].element.find("{jabber:client}body")
    assert body is not None and body.text == "one" and body[0].tail == "two"
    assert stanzas[3].element[1].get("y") == '"'


def test_byte_at_a_time_gives_same_events() -> None:
    expected = summary(feed_all(STREAM))
    framer = XmlStreamFramer()
    events: list[FramerEvent] = []
    for i in range(len(STREAM)):
        events += framer.receive_data(STREAM[i : i + 1])
    assert summary(events) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=20))
def test_any_split_gives_same_events(cuts: list[int]) -> None:
    assert summary(feed_all(STREAM, cuts)) == summary(feed_all(STREAM))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises_and_fails_cleanly(junk: bytes) -> None:
    framer = XmlStreamFramer(max_stanza_bytes=128)
    events = framer.receive_data(HEADER + junk)
    for event in events:
        assert isinstance(event, StreamHeaderReceived | StanzaReceived | StreamClosed | StreamErrorDetected)
    if framer.failed:
        assert isinstance(events[-1], StreamErrorDetected)
        assert framer.receive_data(b"<message/>") == []


def test_stanza_events_arrive_as_soon_as_complete() -> None:
    framer = XmlStreamFramer()
    assert len(framer.receive_data(HEADER)) == 1
    assert framer.receive_data(b"<message><body>x</body></mess") == []
    (event,) = framer.receive_data(b"age>")
    assert isinstance(event, StanzaReceived) and event.raw == b"<message><body>x</body></message>"
    assert framer.buffered_bytes == 0


def test_oversized_stanza_is_policy_violation() -> None:
    framer = XmlStreamFramer(max_stanza_bytes=1024)
    framer.receive_data(HEADER)
    ok = b"<message><body>" + b"a" * 900 + b"</body></message>"
    assert isinstance(framer.receive_data(ok)[0], StanzaReceived)
    events = framer.receive_data(b"<message><body>" + b"a" * 2000)
    assert events == [StreamErrorDetected("policy-violation", "stanza exceeds 1024 bytes")]
    assert framer.failed
    assert framer.buffered_bytes == 0


def test_oversize_detected_byte_at_a_time_and_memory_bounded() -> None:
    framer = XmlStreamFramer(max_stanza_bytes=512)
    framer.receive_data(HEADER + b"<message><body>")
    peak = 0
    events: list[FramerEvent] = []
    for _ in range(2000):
        events += framer.receive_data(b"x")
        peak = max(peak, framer.buffered_bytes)
        if events:
            break
    assert [e.condition for e in events if isinstance(e, StreamErrorDetected)] == ["policy-violation"]
    assert peak <= 513


def test_huge_single_write_is_cut_off() -> None:
    framer = XmlStreamFramer(max_stanza_bytes=4096)
    events = framer.receive_data(HEADER + b"<message a='" + b"x" * 5_000_000 + b"'/>")
    assert [type(e) for e in events] == [StreamHeaderReceived, StreamErrorDetected]
    assert isinstance(events[1], StreamErrorDetected) and events[1].condition == "policy-violation"


def test_unterminated_stream_header_is_bounded() -> None:
    framer = XmlStreamFramer(max_stanza_bytes=256)
    events = framer.receive_data(b"<stream:stream to='" + b"a" * 1000)
    assert events == [StreamErrorDetected("policy-violation", "stanza exceeds 256 bytes")]


def test_whitespace_keepalives_do_not_accumulate() -> None:
    framer = XmlStreamFramer(max_stanza_bytes=64)
    framer.receive_data(HEADER)
    for _ in range(1000):
        assert framer.receive_data(b" \n") == []
    assert framer.buffered_bytes <= 2
    assert isinstance(framer.receive_data(b"<presence/>")[0], StanzaReceived)


def test_depth_limit() -> None:
    framer = XmlStreamFramer(max_depth=4)
    framer.receive_data(HEADER)
    assert isinstance(framer.receive_data(b"<iq><a><b><c/></b></a></iq>")[0], StanzaReceived)
    events = framer.receive_data(b"<iq><a><b><c><d/></c></b></a></iq>")
    assert [e.condition for e in events if isinstance(e, StreamErrorDetected)] == ["policy-violation"]


def test_billion_laughs_is_refused_without_expansion() -> None:
    lol = (
        b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
        + b"".join(
            b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
            for i in range(1, 10)
        )
        + b"]>"
        + HEADER
        + b"<message><body>&lol9;</body></message>"
    )
    framer = XmlStreamFramer()
    events = framer.receive_data(lol)
    assert events == [StreamErrorDetected("restricted-xml", "DTDs are not allowed (RFC 6120 §11.1)")]
    assert framer.buffered_bytes == 0


def test_dtd_after_header_is_not_well_formed_or_restricted() -> None:
    events = feed_all(HEADER + b"<!DOCTYPE x>")
    assert isinstance(events[-1], StreamErrorDetected)
    assert events[-1].condition in ("restricted-xml", "not-well-formed")


def test_restricted_xml() -> None:
    cases = {
        b"<!-- hello -->": "restricted-xml",
        b"<message><!-- inside --></message>": "restricted-xml",
        b"<?php echo 1 ?>": "restricted-xml",
        b"<message><body>&custom;</body></message>": "restricted-xml",
    }
    for tail, condition in cases.items():
        events = feed_all(HEADER + tail)
        assert isinstance(events[-1], StreamErrorDetected), tail
        assert events[-1].condition == condition, tail


def test_predefined_and_character_references_are_fine() -> None:
    events = feed_all(HEADER + b"<message><body>&lt;&gt;&amp;&apos;&quot;&#65;&#x42;</body></message>")
    stanza = events[-1]
    assert isinstance(stanza, StanzaReceived)
    assert stanza.element.findtext("{jabber:client}body") == "<>&'\"AB"


def test_not_well_formed() -> None:
    for tail in (b"<message></presence>", b"<a b='1' b='2'/>", b"<message>\xff</message>", b"<x:y/>", b"<&>"):
        events = feed_all(HEADER + tail)
        assert isinstance(events[-1], StreamErrorDetected), tail
        assert events[-1].condition == "not-well-formed", tail


def test_text_at_stream_level_is_bad_format() -> None:
    events = feed_all(HEADER + b"hello")
    assert events[-1] == StreamErrorDetected("bad-format", "character data at stream level")


def test_stream_header_namespace_checks() -> None:
    wrong_ns = b"<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>"
    assert feed_all(wrong_ns)[0].condition == "invalid-namespace"  # type: ignore[union-attr]
    wrong_root = b"<foo xmlns='jabber:client'>"
    assert feed_all(wrong_root)[0].condition == "invalid-namespace"  # type: ignore[union-attr]
    no_default = b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>"
    assert feed_all(no_default)[0].condition == "invalid-namespace"  # type: ignore[union-attr]
    prefix = b"<s:stream xmlns='jabber:client' xmlns:s='http://etherx.jabber.org/streams'>"
    assert feed_all(prefix)[0].condition == "bad-namespace-prefix"  # type: ignore[union-attr]
    server = HEADER.replace(b"jabber:client", b"jabber:server")
    assert isinstance(feed_all(server)[0], StreamHeaderReceived)
    anything = XmlStreamFramer(content_namespaces=None).receive_data(
        HEADER.replace(b"jabber:client", b"urn:x")
    )
    assert isinstance(anything[0], StreamHeaderReceived)


def test_non_utf8_declaration_is_unsupported_encoding() -> None:
    events = feed_all(b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER)
    assert events == [StreamErrorDetected("unsupported-encoding", "encoding 'ISO-8859-1'; XMPP is UTF-8")]


def test_failed_state_is_sticky() -> None:
    framer = XmlStreamFramer()
    framer.receive_data(HEADER + b"<!-- x -->")
    assert framer.failed
    assert framer.receive_data(b"<message/>") == []


def test_close_then_nothing() -> None:
    framer = XmlStreamFramer()
    events = framer.receive_data(HEADER + b"<presence/></stream:stream>junk<<<")
    assert [type(e) for e in events] == [StreamHeaderReceived, StanzaReceived, StreamClosed]
    assert framer.closed
    assert framer.receive_data(b"more") == []


def test_reset_restarts_the_stream_after_starttls_and_sasl() -> None:
    framer = XmlStreamFramer()
    events = framer.receive_data(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert isinstance(events[-1], StanzaReceived)
    assert events[-1].element.tag == "{urn:ietf:params:xml:ns:xmpp-tls}starttls"
    framer.reset()  # TLS up: a new stream document begins, XML declaration allowed again
    events = framer.receive_data(
        b"<?xml version='1.0'?>" + HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
    )
    assert [type(e) for e in events] == [StreamHeaderReceived, StanzaReceived]
    framer.reset()
    events = framer.receive_data(HEADER)
    assert [type(e) for e in events] == [StreamHeaderReceived]


def test_reset_clears_a_failure() -> None:
    framer = XmlStreamFramer()
    framer.receive_data(b"<junk")
    framer.receive_data(b"&&&")
    assert framer.failed
    framer.reset()
    assert isinstance(framer.receive_data(HEADER)[0], StreamHeaderReceived)


def test_stream_level_elements_keep_their_prefix_namespace() -> None:
    events = feed_all(
        HEADER + b"<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>"
    )
    stanza = events[-1]
    assert isinstance(stanza, StanzaReceived)
    assert stanza.element.tag == "{http://etherx.jabber.org/streams}features"
    assert stanza.raw.startswith(b"<stream:features>")
    assert ET.tostring(stanza.element[0]).startswith(b"<ns0:bind")


def feed_compacting(data: bytes, cuts: list[int]) -> tuple[list[FramerEvent], int]:
    """Like `feed_all`, calling `compact()` after every piece; also counts the compactions."""
    framer = XmlStreamFramer()
    events: list[FramerEvent] = []
    compacted = 0
    for start, end in itertools.pairwise([0, *sorted(set(cuts)), len(data)]):
        events += framer.receive_data(data[start:end])
        compacted += framer.compact()
    return events, compacted


def elements(events: list[FramerEvent]) -> list[bytes]:
    return [ET.tostring(e.element) for e in events if isinstance(e, StanzaReceived)]


def test_compact_between_stanzas_gives_the_same_events() -> None:
    whole = feed_all(STREAM)
    cuts = [STREAM.index(s) + len(s) for s in STANZAS]  # right after each stanza
    events, compacted = feed_compacting(STREAM, cuts)
    assert compacted == len(STANZAS)  # after each stanza; not after the close
    assert summary(events) == summary(whole)
    assert elements(events) == elements(whole)
    assert sum(isinstance(e, StreamHeaderReceived) for e in events) == 1, "priming emits nothing"


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=30))
def test_compact_after_any_split_gives_the_same_events(cuts: list[int]) -> None:
    events, _ = feed_compacting(STREAM, cuts)
    assert summary(events) == summary(feed_all(STREAM))
    assert elements(events) == elements(feed_all(STREAM))


def test_compact_only_between_stanzas() -> None:
    framer = XmlStreamFramer()
    assert not framer.compact(), "no stream yet"
    framer.receive_data(HEADER)
    assert framer.compact()
    framer.receive_data(b"<message><body>x</bo")
    assert not framer.compact(), "inside a stanza"
    (event,) = framer.receive_data(b"dy></message>  ")
    assert isinstance(event, StanzaReceived) and event.raw == b"<message><body>x</body></message>"
    framer.receive_data(b"<pres")
    assert not framer.compact(), "a tag is half-received"
    (event,) = framer.receive_data(b"ence/>")
    assert event.raw == b"<presence/>"  # type: ignore[union-attr]
    assert framer.compact()
    assert framer.buffered_bytes == 0


def test_limits_hold_after_compaction() -> None:
    framer = XmlStreamFramer(max_stanza_bytes=256)
    framer.receive_data(HEADER + b"<presence/>")
    assert framer.compact()
    ok = b"<message><body>" + b"a" * 200 + b"</body></message>"
    assert isinstance(framer.receive_data(ok)[0], StanzaReceived)
    assert framer.compact()
    assert framer.receive_data(b"<message><body>" + b"a" * 300) == [
        StreamErrorDetected("policy-violation", "stanza exceeds 256 bytes")
    ]
    framer = XmlStreamFramer()
    framer.receive_data(HEADER)
    framer.compact()
    assert framer.receive_data(b"<!-- no -->") == [
        StreamErrorDetected("restricted-xml", "comments are not allowed (RFC 6120 §11.1)")
    ]


def test_compact_then_close_and_reset() -> None:
    framer = XmlStreamFramer()
    framer.receive_data(HEADER)
    framer.compact()
    assert [type(e) for e in framer.receive_data(b"</stream:stream>")] == [StreamClosed]
    framer.reset()
    framer.receive_data(HEADER)
    framer.compact()
    framer.reset()  # a restart drops the kept header: the next one is parsed for real
    assert [type(e) for e in framer.receive_data(HEADER)] == [StreamHeaderReceived]


def test_owner_close_frees_the_parser_and_stops_parsing() -> None:
    framer = XmlStreamFramer()
    framer.receive_data(HEADER + b"<message><body>x")
    framer.close()
    assert framer.buffered_bytes == 0
    assert framer.receive_data(b"</body></message>") == []

"""Stream framer and datagram path: equivalence under arbitrary chunking, limits, keepalives, STUN."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.sip.events import FramingError, KeepaliveReceived, MessageReceived, StunReceived
from edge.sip.framing import StreamFramer, parse_datagram
from edge.stun import binding_request


def sip(n: int, body: bytes = b"") -> bytes:
    return (
        f"OPTIONS sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TLS 198.51.100.7:5061;branch=z9hG4bK{n}\r\n"
        f"From: <sip:alice@example.com>;tag={n}\r\n"
        f"To: <sip:bob@example.com>\r\n"
        f"Call-ID: call-{n}\r\n"
        f"CSeq: {n} OPTIONS\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


STUN = binding_request(transaction_id=b"0123456789ab").serialize(fingerprint=True)
STREAM = b"\r\n\r\n" + sip(1, b"hello\r\n\r\nworld") + b"\r\n" + sip(2) + STUN + sip(3, bytes(range(256)))


def summary(events: Sequence[object]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for e in events:
        if isinstance(e, MessageReceived):
            out.append(("msg", bytes(e.message)))
        elif isinstance(e, KeepaliveReceived):
            out.append(("ka", e.pong_needed))
        elif isinstance(e, StunReceived):
            out.append(("stun", e.data))
        else:
            out.append(("other", e))
    return out


def test_whole_stream_events() -> None:
    events = StreamFramer().receive_data(STREAM)
    assert summary(events) == [
        ("ka", True),
        ("msg", sip(1, b"hello\r\n\r\nworld")),
        ("ka", False),
        ("msg", sip(2)),
        ("stun", STUN),
        ("msg", sip(3, bytes(range(256)))),
    ]


def test_byte_at_a_time_gives_same_events() -> None:
    f = StreamFramer()
    events = []
    for b in STREAM:
        events += f.receive_data(bytes([b]))
    assert summary(events) == summary(StreamFramer().receive_data(STREAM))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60))
def test_any_chunking_gives_same_events(sizes: list[int]) -> None:
    f = StreamFramer()
    events, pos, i = [], 0, 0
    while pos < len(STREAM):
        n = sizes[i % len(sizes)]
        events += f.receive_data(STREAM[pos : pos + n])
        pos, i = pos + n, i + 1
    assert summary(events) == summary(StreamFramer().receive_data(STREAM))


def test_pong_after_ping_sent_is_immediate() -> None:
    f = StreamFramer()
    assert f.receive_data(b"\r\n") == []  # could still be a ping
    f2 = StreamFramer()
    f2.ping_sent()
    assert f2.receive_data(b"\r\n") == [KeepaliveReceived(pong_needed=False)]


def test_oversize_headers_and_body_are_fatal_413() -> None:
    f = StreamFramer(max_message_bytes=200)
    (err,) = f.receive_data(b"OPTIONS sip:x SIP/2.0\r\n" + b"X: " + b"a" * 300)
    assert isinstance(err, FramingError) and err.status_code == 413 and err.fatal
    assert f.receive_data(sip(1)) == []  # closed
    f = StreamFramer(max_message_bytes=300)
    (err,) = f.receive_data(sip(1).replace(b"Content-Length: 0", b"Content-Length: 9999"))
    assert isinstance(err, FramingError) and err.status_code == 413


def test_missing_or_bad_content_length_is_fatal_400() -> None:
    no_cl = sip(1).replace(b"Content-Length: 0\r\n", b"")
    (err,) = StreamFramer().receive_data(no_cl)
    assert isinstance(err, FramingError) and (err.status_code, err.fatal) == (400, True)
    (err,) = StreamFramer().receive_data(sip(1).replace(b"Content-Length: 0", b"Content-Length: -1"))
    assert isinstance(err, FramingError) and err.fatal


def test_garbage_is_fatal() -> None:
    (err,) = StreamFramer().receive_data(b"\x00\x01\x00\x00XXXXjunkjunkjunkjunk")
    assert isinstance(err, FramingError) and err.fatal
    ka, err = StreamFramer().receive_data(b"\r\n\rX")
    assert ka == KeepaliveReceived(pong_needed=False)
    assert isinstance(err, FramingError) and err.fatal
    (err,) = StreamFramer().receive_data(b"garbage line\r\n\r\n")
    assert isinstance(err, FramingError) and (err.status_code, err.fatal) == (400, True)


def test_malformed_but_framed_message_is_not_fatal() -> None:
    bad = sip(1).replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE")
    events = StreamFramer().receive_data(bad + sip(2))
    assert isinstance(events[0], FramingError) and not events[0].fatal and events[0].data == bad
    assert isinstance(events[1], MessageReceived)


def test_datagram_path() -> None:
    ev = parse_datagram(sip(5, b"xy"))
    assert isinstance(ev, MessageReceived) and ev.message.body == b"xy"
    assert parse_datagram(STUN) == StunReceived(STUN)
    assert parse_datagram(b"\r\n\r\n") == KeepaliveReceived(pong_needed=True)
    err = parse_datagram(sip(5).replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
    assert isinstance(err, FramingError) and err.status_code == 505 and not err.fatal

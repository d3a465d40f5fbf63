"""Malformed input never raises out of the core: it becomes GOAWAY + LinkLost (STYLE 5, 7)."""

from __future__ import annotations

import itertools
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.traversal.test_link_core import T0, Pair, frames
from traversal import events as ev
from traversal.link import HEADER, FrameType, LinkConfig, LinkConnection, LinkState, Role, encode_frame


def established() -> tuple[Pair, int]:
    pair = Pair(server_config=LinkConfig(max_frame_payload_bytes=1024))
    pair.establish()
    return pair, pair.open()


MALFORMED = {
    "unknown frame type 99": HEADER.pack(99, 0, 0, 0),
    "frame too large": encode_frame(FrameType.DATA, 1, b"x" * 1025),
    "PING payload must be 8 bytes": encode_frame(FrameType.PING, 0, b"1234"),
    "PING with invalid stream id 1": encode_frame(FrameType.PING, 1, b"12345678"),
    "DATA with invalid stream id 0": encode_frame(FrameType.DATA, 0, b"x"),
    "DATA on idle stream 7": encode_frame(FrameType.DATA, 7, b"x"),
    "WINDOW_UPDATE on idle stream 4": encode_frame(FrameType.WINDOW_UPDATE, 4, b"\0\0\0\1"),
    "OPEN with invalid stream id 2": encode_frame(FrameType.OPEN, 2, b"{}"),
    "OPEN with invalid stream id 1": encode_frame(FrameType.OPEN, 1, b"{}"),
    "malformed OPEN metadata": encode_frame(FrameType.OPEN, 3, b"[1, 2]"),
    "WINDOW_UPDATE of zero": encode_frame(FrameType.WINDOW_UPDATE, 1, b"\0\0\0\0"),
    "unexpected HELLO in state established": encode_frame(FrameType.HELLO, 0, b"{}"),
    "end-received on stream 1 in state remote-ended": encode_frame(FrameType.END, 1, b"") * 2,
}


@pytest.mark.parametrize("reason", list(MALFORMED))
def test_malformed_frame_sends_goaway_and_loses_the_link(reason: str) -> None:
    pair, sid = established()
    events = pair.server.receive_data(MALFORMED[reason], pair.now)
    streams_reset = [e for e in events if isinstance(e, ev.StreamReset)]
    assert events[-1] == ev.LinkLost(f"protocol error: {reason}")
    assert streams_reset == [ev.StreamReset(sid, f"link lost: protocol error: {reason}")]
    assert frames(pair.server.data_to_send())[-1] == (
        FrameType.GOAWAY,
        0,
        f"protocol error: {reason}".encode(),
    )
    assert pair.server.state is LinkState.CLOSED and pair.server.get_timer() is None
    assert pair.server.receive_data(b"anything after the loss", pair.now) == []


def test_oversize_frame_fails_on_its_header_alone() -> None:
    pair, _sid = established()
    header_only = HEADER.pack(FrameType.DATA, 0, 1, 10_000_000)
    events = pair.server.receive_data(header_only, pair.now)
    assert events[-1] == ev.LinkLost("protocol error: frame too large")


def test_malformed_hello_is_a_protocol_error() -> None:
    server = LinkConnection(Role.SERVER)
    server.initiate(T0)
    bad = json.dumps({"version": 1, "channel": "https", "username": 5, "password": "p"}).encode()
    assert server.receive_data(encode_frame(FrameType.HELLO, 0, bad), T0) == [
        ev.LinkLost("protocol error: malformed HELLO")
    ]


SMALL = LinkConfig(initial_window_bytes=64, max_frame_payload_bytes=16)


def _setup() -> Pair:
    """Deterministic: an established link where E (server) opened streams 2, 4, 6, 8."""
    pair = Pair(server_config=SMALL)
    pair.establish()
    for i in range(4):
        pair.server.open_stream({"kind": "xmpp", "i": i}, pair.now)
    pair.pump()
    return pair


def _client_script() -> bytes:
    """What C sends next in a busy session: accepts, data in many frames, ENDs, OPENs, a PING."""
    pair = _setup()
    for sid in (2, 4, 6, 8):
        pair.client.accept_stream(sid)
        pair.client.send_data(sid, bytes(range(40 + sid)), pair.now)
        pair.client.end_stream(sid)
    pair.client.open_stream({"kind": "http", "peer": "198.51.100.7:51000"}, pair.now)
    pair.client.handle_timer(pair.now + pair.client.config.keepalive_interval_s)
    pair.client.reset_stream(2, "done early")
    return pair.client.data_to_send()


def _feed(chunks: list[bytes]) -> list[ev.Event]:
    server = _setup().server
    events: list[ev.Event] = []
    for chunk in chunks:
        events += server.receive_data(chunk, T0)
    return events


def _coalesce(events: list[ev.Event]) -> list[ev.Event]:
    """DataReceived split differently is the same stream content; compare it joined per stream."""
    out: list[ev.Event] = []
    for e in events:
        if isinstance(e, ev.DataReceived) and out and isinstance(out[-1], ev.DataReceived):
            last = out[-1]
            if last.stream_id == e.stream_id:
                out[-1] = ev.DataReceived(e.stream_id, last.data + e.data)
                continue
        out.append(e)
    return out


def test_byte_at_a_time_equals_whole() -> None:
    script = _client_script()
    whole = _feed([script])
    assert sum(isinstance(e, ev.StreamAccepted) for e in whole) == 4
    assert sum(isinstance(e, ev.StreamEnded) for e in whole) == 4
    assert ev.StreamOpened(1, {"kind": "http", "peer": "198.51.100.7:51000"}) in whole
    assert whole[-1] == ev.StreamReset(2, "done early")
    assert sum(len(e.data) for e in whole if isinstance(e, ev.DataReceived)) == 42 + 44 + 46 + 48
    assert not any(isinstance(e, ev.LinkLost) for e in whole)
    assert _feed([script[i : i + 1] for i in range(len(script))]) == whole


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    script = _client_script()
    bounds = sorted({min(c, len(script)) for c in cuts} | {0, len(script)})
    chunks = [script[a:b] for a, b in itertools.pairwise(bounds)]
    assert _coalesce(_feed(chunks)) == _coalesce(_feed([script]))


@settings(max_examples=300)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=13))
def test_garbage_after_handshake_never_raises(garbage: bytes, ftype: int) -> None:
    pair, _sid = established()
    header = struct.pack(">BBII", ftype, 0, len(garbage) % 6, len(garbage))
    events = pair.server.receive_data(header + garbage, pair.now)
    events += pair.server.receive_data(garbage, pair.now)
    lost = [e for e in events if isinstance(e, ev.LinkLost)]
    assert len(lost) <= 1 and (not lost or events[-1] == lost[0])
    if lost:
        assert pair.server.state is LinkState.CLOSED
        if not any(isinstance(e, ev.GoAwayReceived) for e in events):  # else the peer ended it
            assert frames(pair.server.data_to_send())[-1][0] is FrameType.GOAWAY

"""Early data on the traversal link: DATA and END right behind OPEN, before OPEN_ACCEPT.

Core tests with two in-memory peers (no I/O), including an older peer that does not announce
`early_data` (the opener then holds its data until the accept), and adapter tests over loopback
mutual TLS (`open_stream(wait_accepted=False)`, data that arrives before a handler is set, a
gate that rejects such a stream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.traversal.conftest import LabTls
from tests.traversal.test_link_channel import GUARD_S, Harness, echo
from tests.traversal.test_link_core import Pair, frames
from traversal import events as ev
from traversal.channel import LinkStream, StreamResetError
from traversal.link import FrameType, LinkConfig, StreamState, encode_frame

# -- core ---------------------------------------------------------------------------------------


def test_request_leaves_with_the_open_and_the_answer_retires_the_stream() -> None:
    pair = Pair()
    pair.establish()
    sid = pair.client.open_stream({"kind": "http"}, pair.now)
    pair.client.send_data(sid, b"GET /", pair.now)
    pair.client.end_stream(sid)
    assert pair.client.stream_state(sid) is StreamState.OPENING_ENDED
    wire = pair.client.data_to_send()
    assert [f[0] for f in frames(wire)] == [FrameType.OPEN, FrameType.DATA, FrameType.END]
    events = pair.server.receive_data(wire, pair.now)
    assert events == [
        ev.StreamOpened(sid, {"kind": "http"}),
        ev.DataReceived(sid, b"GET /"),
        ev.StreamEnded(sid),
    ]
    assert pair.server.stream_state(sid) is StreamState.PENDING_ENDED
    pair.server.accept_stream(sid)
    pair.server.acknowledge_received(sid, 5)
    pair.server.send_data(sid, b"200 OK", pair.now)
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.cev == [ev.StreamAccepted(sid), ev.DataReceived(sid, b"200 OK"), ev.StreamEnded(sid)]
    assert pair.client.streams_open == pair.server.streams_open == 0


def test_accept_of_an_early_stream_rides_the_first_answer_frame() -> None:
    pair = Pair()
    pair.establish()
    early = pair.client.open_stream({"kind": "http"}, pair.now)
    pair.client.end_stream(early)
    waiting = pair.client.open_stream({"kind": "xmpp"}, pair.now)  # no early data: opener waits
    pair.pump()
    pair.server.accept_stream(early)
    pair.server.accept_stream(waiting)
    assert frames(pair.server.data_to_send()) == [(FrameType.OPEN_ACCEPT, waiting, b"")]
    pair.server.send_data(early, b"answer", pair.now)
    assert frames(pair.server.data_to_send()) == [
        (FrameType.OPEN_ACCEPT, early, b""),
        (FrameType.DATA, early, b"answer"),
    ]
    pair.server.end_stream(early)
    assert frames(pair.server.data_to_send()) == [(FrameType.END, early, b"")]
    # An accepted early stream reset before any answer needs no OPEN_ACCEPT at all.
    third = pair.client.open_stream({"kind": "http"}, pair.now)
    pair.client.send_data(third, b"q", pair.now)
    pair.pump()
    pair.server.accept_stream(third)
    pair.server.reset_stream(third, "backend gone")
    assert frames(pair.server.data_to_send()) == [(FrameType.RESET, third, b"backend gone")]


def test_rejected_stream_drops_its_early_data_without_error() -> None:
    pair = Pair()
    pair.establish()
    sid = pair.client.open_stream({"kind": "sip"}, pair.now)
    pair.client.send_data(sid, b"x" * 100, pair.now)
    pair.client.end_stream(sid)
    pair.pump()
    pair.server.reject_stream(sid, "unsupported kind")
    pair.pump()
    assert pair.cev == [ev.StreamRejected(sid, "unsupported kind")]
    assert pair.client.streams_open == pair.server.streams_open == 0
    # Data still in flight for the rejected id is ignored, not a protocol error.
    assert pair.server.receive_data(encode_frame(FrameType.DATA, sid, b"late"), pair.now) == []


def test_early_data_still_respects_the_window() -> None:
    pair = Pair(server_config=LinkConfig(initial_window_bytes=16, max_frame_payload_bytes=16))
    pair.establish()
    sid = pair.client.open_stream({}, pair.now)
    pair.client.send_data(sid, b"y" * 40, pair.now)  # only 16 may leave before credit returns
    wire = pair.client.data_to_send()
    assert [len(p) for t, _, p in frames(wire) if t is FrameType.DATA] == [16]
    assert pair.client.buffered_bytes(sid) == 24
    over = encode_frame(FrameType.DATA, sid, b"z")  # one byte beyond the window
    events = pair.server.receive_data(wire + over, pair.now)
    assert events[-1] == ev.LinkLost(f"protocol error: flow control window exceeded on stream {sid}")


def test_peer_without_early_data_gets_the_data_after_its_accept() -> None:
    pair = Pair()
    pair.start()
    old_accept = {"version": 1, "window": 65536, "max_frame": 16384, "max_streams": 100, "max_control": 4096}
    pair.cev += pair.client.receive_data(
        encode_frame(FrameType.HELLO_ACCEPT, 0, json.dumps(old_accept).encode()), pair.now
    )
    assert pair.cev == [ev.LinkEstablished("https")]
    sid = pair.client.open_stream({}, pair.now)
    pair.client.send_data(sid, b"hello", pair.now)
    pair.client.end_stream(sid)
    assert [f[0] for f in frames(pair.client.data_to_send())] == [FrameType.OPEN]
    pair.client.receive_data(encode_frame(FrameType.OPEN_ACCEPT, sid), pair.now)
    assert frames(pair.client.data_to_send()) == [
        (FrameType.DATA, sid, b"hello"),
        (FrameType.END, sid, b""),
    ]
    assert pair.client.stream_state(sid) is StreamState.LOCAL_ENDED


# -- adapter ------------------------------------------------------------------------------------


@pytest.fixture
async def harness(lab_tls: LabTls) -> AsyncIterator[Harness]:
    h = Harness(lab_tls)
    await h.start()
    async with asyncio.timeout(GUARD_S):
        yield h
    await h.close()


async def test_open_without_waiting_for_the_accept(harness: Harness) -> None:
    await harness.connect(stream_handler=echo)
    e_side = await harness.server_link()

    async def one(i: int) -> bytes:
        stream = await e_side.open_stream({"kind": "http", "n": i}, wait_accepted=False)
        stream.write(b"request %d" % i)
        stream.write_eof()
        await stream.drain()
        return await stream.read()

    answers = await asyncio.gather(*(one(i) for i in range(50)))
    assert answers == [b"request %d" % i for i in range(50)]
    assert e_side.status()["streams"] == 0


async def test_early_data_waits_for_a_late_handler_and_a_gate_resets_the_opener(harness: Harness) -> None:
    link = await harness.connect()  # no handler yet
    e_side = await harness.server_link()
    served = await e_side.open_stream({"kind": "http"}, wait_accepted=False)
    served.write(b"early bytes")
    served.write_eof()
    refused = await e_side.open_stream({"kind": "sip"}, wait_accepted=False)
    refused.write(b"never read")
    refused.write_eof()
    for _ in range(10_000):  # until C's core holds both streams, ended, unanswered
        states = {link.core.stream_state(s.stream_id) for s in (served, refused)}
        if states == {StreamState.PENDING_ENDED}:
            break
        await asyncio.sleep(0)
    assert states == {StreamState.PENDING_ENDED}

    got: list[bytes] = []

    async def collect(stream: LinkStream) -> None:
        got.append(await stream.read())
        stream.write(b"ok")

    link.set_stream_handler(collect, gate=lambda meta: None if meta["kind"] == "http" else "unsupported kind")
    assert await served.read() == b"ok"
    assert got == [b"early bytes"]
    with pytest.raises(StreamResetError, match="rejected: unsupported kind"):
        await refused.read()
    assert link.status()["streams"] == 0 and e_side.status()["streams"] == 0

"""Core tests: two in-memory LinkConnections and a fake clock (no I/O, no sleeps)."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from traversal import events as ev
from traversal.link import (
    HEADER,
    FrameType,
    Hello,
    LinkConfig,
    LinkConnection,
    LinkState,
    LinkUsageError,
    Role,
    StreamState,
    encode_frame,
)

T0 = 1000.0


def frames(data: bytes) -> list[tuple[FrameType, int, bytes]]:
    out = []
    offset = 0
    while offset < len(data):
        ftype, _flags, sid, length = HEADER.unpack_from(data, offset)
        offset += HEADER.size
        out.append((FrameType(ftype), sid, data[offset : offset + length]))
        offset += length
    return out


class Pair:
    """A client and a server wired back to back; `pump` moves bytes until both are quiet."""

    def __init__(self, client_config: LinkConfig | None = None, server_config: LinkConfig | None = None):
        self.now = T0
        self.client = LinkConnection(Role.CLIENT, config=client_config or LinkConfig())
        self.server = LinkConnection(Role.SERVER, config=server_config or LinkConfig())
        self.cev: list[ev.Event] = []
        self.sev: list[ev.Event] = []

    def pump(self) -> None:
        for _ in range(10_000):
            c, s = self.client.data_to_send(), self.server.data_to_send()
            if not c and not s:
                return
            self.sev += self.server.receive_data(c, self.now)
            self.cev += self.client.receive_data(s, self.now)
        raise AssertionError("links did not settle")

    def start(self, password: str = "secret") -> ev.AuthenticationRequested:
        self.client.initiate(self.now, Hello("https", "expc", password))
        self.server.initiate(self.now)
        self.pump()
        (auth,) = self.sev
        assert isinstance(auth, ev.AuthenticationRequested)
        self.sev.clear()
        return auth

    def establish(self) -> None:
        self.start()
        self.server.accept_hello(self.now)
        self.pump()
        assert self.cev == [ev.LinkEstablished("https")]
        self.cev.clear()

    def open(self, metadata: dict[str, object] | None = None) -> int:
        sid = self.client.open_stream(metadata or {"kind": "http"}, self.now)
        self.pump()
        self.server.accept_stream(sid)
        self.pump()
        self.sev.clear()
        self.cev.clear()
        return sid

    def advance(self, until: float) -> None:
        """Run both timers up to `until`, firing every deadline in order (bounded)."""
        for _ in range(100_000):
            deadlines = [t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None]
            if not deadlines or min(deadlines) > until:
                break
            self.now = max(self.now, min(deadlines))
            self.cev += self.client.handle_timer(self.now)
            self.sev += self.server.handle_timer(self.now)
            self.pump()
        self.now = until


def test_handshake_accepted() -> None:
    pair = Pair()
    auth = pair.start()
    assert (auth.username, auth.password, auth.channel, auth.version) == ("expc", "secret", "https", 1)
    assert "secret" not in repr(auth)
    assert pair.server.state is LinkState.AUTHENTICATING
    pair.server.accept_hello(pair.now)
    pair.pump()
    assert pair.cev == [ev.LinkEstablished("https")]
    assert {pair.client.state.value, pair.server.state.value} == {"established"}
    assert pair.server.channel == "https"
    assert pair.client.bytes_out == pair.server.bytes_in > 0


def test_handshake_rejected() -> None:
    pair = Pair()
    pair.start(password="wrong")
    pair.server.reject_hello("authentication failed")
    pair.pump()
    assert pair.cev == [ev.LinkRejected("authentication failed")]
    assert pair.client.state is pair.server.state is LinkState.CLOSED
    assert pair.client.get_timer() is None
    with pytest.raises(LinkUsageError):
        pair.client.open_stream({}, pair.now)


def test_unsupported_version_is_rejected_without_asking_the_application() -> None:
    server = LinkConnection(Role.SERVER)
    server.initiate(T0)
    hello = {"version": 99, "channel": "xmpp", "username": "u", "password": "p"}
    hello |= {"window": 10, "max_frame": 10, "max_streams": 1, "max_control": 512}
    events = server.receive_data(encode_frame(FrameType.HELLO, 0, json.dumps(hello).encode()), T0)
    assert events == [ev.LinkLost("unsupported protocol version 99")]
    assert frames(server.data_to_send()) == [(FrameType.HELLO_REJECT, 0, b"unsupported protocol version 99")]


def test_no_stream_before_handshake_completes() -> None:
    pair = Pair()
    pair.start()
    with pytest.raises(LinkUsageError):
        pair.client.open_stream({"kind": "http"}, pair.now)
    events = pair.server.receive_data(encode_frame(FrameType.OPEN, 1, b"{}"), pair.now)
    assert events == [ev.LinkLost("protocol error: unexpected OPEN in state authenticating")]
    assert frames(pair.server.data_to_send())[0][0] is FrameType.GOAWAY


def test_handshake_timeout_on_both_sides() -> None:
    pair = Pair(LinkConfig(handshake_timeout_s=5.0), LinkConfig(handshake_timeout_s=5.0))
    pair.start()  # the server application never decides
    assert pair.client.get_timer() == pair.server.get_timer() == T0 + 5.0
    assert pair.client.handle_timer(T0 + 4.9) == []
    assert pair.server.handle_timer(T0 + 5.0) == [ev.LinkLost("handshake timeout")]
    pair.pump()
    assert pair.cev == [
        ev.GoAwayReceived("handshake timeout"),
        ev.LinkLost("peer went away: handshake timeout"),
    ]


def test_many_streams_interleaved_both_directions() -> None:
    pair = Pair()
    pair.establish()
    client_ids = [pair.client.open_stream({"kind": "http", "n": i}, pair.now) for i in range(50)]
    server_ids = [pair.server.open_stream({"kind": "xmpp", "n": i}, pair.now) for i in range(50)]
    assert all(sid % 2 == 1 for sid in client_ids) and all(sid % 2 == 0 for sid in server_ids)
    pair.pump()
    opened_at_server = [e for e in pair.sev if isinstance(e, ev.StreamOpened)]
    assert [e.metadata["n"] for e in opened_at_server] == list(range(50))
    for sid in client_ids:
        pair.server.accept_stream(sid)
    for sid in server_ids:
        pair.client.accept_stream(sid)
    pair.pump()
    assert {e.stream_id for e in pair.cev if isinstance(e, ev.StreamAccepted)} == set(client_ids)
    pair.cev.clear()
    pair.sev.clear()
    for round_no in range(3):
        for sid in client_ids:
            pair.client.send_data(sid, f"c{sid}r{round_no};".encode(), pair.now)
        for sid in server_ids:
            pair.server.send_data(sid, f"s{sid}r{round_no};".encode(), pair.now)
    for sid in client_ids:
        pair.client.end_stream(sid)
    pair.pump()
    got: dict[int, bytes] = {}
    for e in pair.sev:
        if isinstance(e, ev.DataReceived):
            got[e.stream_id] = got.get(e.stream_id, b"") + e.data
    assert got == {sid: b"".join(f"c{sid}r{r};".encode() for r in range(3)) for sid in client_ids}
    assert {e.stream_id for e in pair.sev if isinstance(e, ev.StreamEnded)} == set(client_ids)
    got_c = b"".join(e.data for e in pair.cev if isinstance(e, ev.DataReceived) and e.stream_id == 2)
    assert got_c == b"s2r0;s2r1;s2r2;"
    for sid in client_ids:
        pair.server.end_stream(sid)
    pair.pump()
    assert pair.client.streams_open == pair.server.streams_open == 50  # only the server-opened ones


def test_stream_rejected() -> None:
    pair = Pair()
    pair.establish()
    sid = pair.client.open_stream({"kind": "http"}, pair.now)
    pair.pump()
    assert pair.sev == [ev.StreamOpened(sid, {"kind": "http"})]
    pair.server.reject_stream(sid, "maintenance mode")
    pair.pump()
    assert pair.cev == [ev.StreamRejected(sid, "maintenance mode")]
    assert pair.client.streams_open == pair.server.streams_open == 0


def test_flow_control_with_tiny_window() -> None:
    pair = Pair(server_config=LinkConfig(initial_window_bytes=8, max_frame_payload_bytes=5))
    pair.establish()
    sid = pair.open()
    payload = bytes(range(100))
    pair.client.send_data(sid, payload, pair.now)
    pair.client.end_stream(sid)  # END must wait behind the buffered data
    pair.pump()
    first = [e for e in pair.sev if isinstance(e, ev.DataReceived)]
    assert [len(e.data) for e in first] == [5, 3]  # window 8, frames of at most 5
    assert pair.client.buffered_bytes(sid) == 92 and pair.client.send_window(sid) == 0
    received, acked, ended = b"", 0, False
    for _ in range(200):
        received += b"".join(e.data for e in pair.sev if isinstance(e, ev.DataReceived))
        ended = ended or ev.StreamEnded(sid) in pair.sev
        assert not any(isinstance(e, ev.LinkLost) for e in pair.sev)
        pair.sev.clear()
        if ended:
            break
        pair.server.acknowledge_received(sid, len(received) - acked)
        acked = len(received)
        pair.pump()
    assert received == payload and ended
    assert pair.server.stream_state(sid) is StreamState.REMOTE_ENDED
    with pytest.raises(LinkUsageError):
        pair.server.acknowledge_received(sid, 1_000)


def test_window_violation_is_a_protocol_error() -> None:
    pair = Pair(server_config=LinkConfig(initial_window_bytes=8))
    pair.establish()
    sid = pair.open()
    events = pair.server.receive_data(encode_frame(FrameType.DATA, sid, b"x" * 9), pair.now)
    assert events == [
        ev.StreamReset(sid, f"link lost: protocol error: flow control window exceeded on stream {sid}"),
        ev.LinkLost(f"protocol error: flow control window exceeded on stream {sid}"),
    ]


def test_keepalive_measures_rtt() -> None:
    pair = Pair(LinkConfig(keepalive_interval_s=2.0, keepalive_timeout_s=6.0))
    pair.establish()
    assert pair.client.get_timer() == T0 + 2.0
    assert pair.client.handle_timer(T0 + 2.0) == []
    assert pair.client.pings_sent == pair.client.pings_unanswered == 1
    pair.server.receive_data(pair.client.data_to_send(), T0 + 2.1)
    events = pair.client.receive_data(pair.server.data_to_send(), T0 + 2.25)
    assert len(events) == 1 and isinstance(events[0], ev.PingAcknowledged)
    assert events[0].rtt_s == pytest.approx(0.25)
    assert pair.client.last_rtt_s == pytest.approx(0.25)
    assert pair.client.pings_unanswered == 0


def test_keepalive_keeps_an_idle_link_up() -> None:
    config = LinkConfig(keepalive_interval_s=2.0, keepalive_timeout_s=6.0)
    pair = Pair(config, config)
    pair.establish()
    pair.advance(T0 + 600.0)
    assert pair.client.state is pair.server.state is LinkState.ESTABLISHED
    assert pair.client.pings_sent >= 299 and pair.server.pings_sent >= 299
    assert sum(isinstance(e, ev.PingAcknowledged) for e in pair.cev) == pair.client.pings_sent


def test_keepalive_timeout_loses_link_and_resets_streams() -> None:
    config = LinkConfig(keepalive_interval_s=2.0, keepalive_timeout_s=6.0)
    pair = Pair(config, config)
    pair.establish()
    sids = [pair.open() for _ in range(3)]
    # From now on the server hears nothing: the client's bytes are lost in the network.
    events: list[ev.Event] = []
    fired: list[float] = []
    for _ in range(100):
        deadline = pair.server.get_timer()
        if deadline is None:
            break
        fired.append(deadline)
        events += pair.server.handle_timer(deadline)
        pair.cev += pair.client.receive_data(pair.server.data_to_send(), deadline)
    assert events == [ev.StreamReset(sid, "link lost: keepalive timeout") for sid in sids] + [
        ev.LinkLost("keepalive timeout")
    ]
    assert fired == [T0 + 2.0, T0 + 4.0, T0 + 6.0]  # nothing received since the handshake at T0
    assert pair.server.pings_unanswered == 2  # pings at +2 and +4 went unanswered
    assert pair.server.close_reason == "keepalive timeout"
    assert pair.cev[-1] == ev.LinkLost("peer went away: keepalive timeout")


def test_local_close_sends_goaway_and_resets_streams() -> None:
    pair = Pair()
    pair.establish()
    sid = pair.open()
    assert pair.client.close("shutdown") == [
        ev.StreamReset(sid, "link lost: shutdown"),
        ev.LinkLost("shutdown"),
    ]
    pair.pump()
    assert pair.sev == [
        ev.GoAwayReceived("shutdown"),
        ev.StreamReset(sid, "link lost: peer went away: shutdown"),
        ev.LinkLost("peer went away: shutdown"),
    ]
    assert pair.client.close("again") == []


def test_stream_reset_by_peer_and_data_racing_the_reset_is_ignored() -> None:
    pair = Pair()
    pair.establish()
    sid = pair.open()
    pair.client.send_data(sid, b"in flight", pair.now)
    in_flight = pair.client.data_to_send()
    pair.server.reset_stream(sid, "cancelled")
    pair.server.reset_stream(sid, "cancelled twice is a no-op")
    assert pair.server.receive_data(in_flight, pair.now) == []  # lenient: legitimate race
    pair.pump()
    assert pair.cev == [ev.StreamReset(sid, "cancelled")]
    assert pair.client.stream_state(sid) is None
    with pytest.raises(LinkUsageError):
        pair.client.send_data(sid, b"x", pair.now)


def test_half_close_both_ways_retires_the_stream() -> None:
    pair = Pair()
    pair.establish()
    sid = pair.open()
    pair.client.end_stream(sid)
    pair.pump()
    assert pair.client.stream_state(sid) is StreamState.LOCAL_ENDED
    assert pair.server.stream_state(sid) is StreamState.REMOTE_ENDED
    with pytest.raises(LinkUsageError):
        pair.client.send_data(sid, b"late", pair.now)
    pair.server.send_data(sid, b"reply", pair.now)
    pair.server.end_stream(sid)
    pair.pump()
    assert pair.cev == [ev.DataReceived(sid, b"reply"), ev.StreamEnded(sid)]
    assert pair.client.streams_open == pair.server.streams_open == 0


def test_max_concurrent_streams() -> None:
    pair = Pair(server_config=LinkConfig(max_concurrent_streams=2))
    pair.establish()
    pair.open()
    pair.open()
    with pytest.raises(LinkUsageError):  # the client honours the limit the server announced
        pair.client.open_stream({}, pair.now)
    # A peer that ignores it gets OPEN_REJECT, not a dead link.
    pair.server.receive_data(encode_frame(FrameType.OPEN, 5, b"{}"), pair.now)
    assert frames(pair.server.data_to_send()) == [(FrameType.OPEN_REJECT, 5, b"too many streams")]
    assert pair.server.state is LinkState.ESTABLISHED


def test_idle_stream_costs_well_under_one_kib() -> None:
    pair = Pair()
    pair.establish()
    count = 2_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(count):
            sid = pair.client.open_stream({"kind": "xmpp", "peer": f"198.51.100.7:{i}"}, pair.now)
            pair.server.receive_data(pair.client.data_to_send(), pair.now)
            pair.server.accept_stream(sid)
            pair.client.receive_data(pair.server.data_to_send(), pair.now)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert pair.client.streams_open == pair.server.streams_open == count
    per_stream_per_side = (after - before) / count / 2
    assert per_stream_per_side < 512, per_stream_per_side

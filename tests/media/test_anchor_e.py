"""Expressway-E's media relay (edge_e.media): SDP rewrites, ports, streams, rejections (spec §7)."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator

import pytest

from edge.config import ExpeSettings
from edge.media_hooks import MediaRejected, MediaSession
from edge_e.media import EdgeMedia
from media_relay.events import StreamTimedOut
from media_relay.sdp import SessionDescription
from media_relay.srtp import generate_crypto

# Every test here runs on the native fast path and on the pure-Python path.
pytestmark = pytest.mark.usefixtures("relay_path")

CLIENT = "198.51.100.7"
C_ADDR = "192.0.2.10"
KEY1 = generate_crypto(1, "AES_CM_128_HMAC_SHA1_80")
KEY2 = generate_crypto(2, "AES_CM_128_HMAC_SHA1_32")


def loopback_prefix() -> str:
    """A 127.x.y block no one else uses (parallel runs, a developer's lab on 127.10)."""
    for _ in range(200):
        prefix = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((f"{prefix}.2", 2776))
            except OSError:
                continue
        return prefix
    raise RuntimeError("no free loopback block")


@pytest.fixture
async def edge() -> AsyncIterator[EdgeMedia]:
    p = loopback_prefix()
    media = EdgeMedia(
        ExpeSettings(
            external_address=f"{p}.1", internal_address=f"{p}.2", media_port_min=40000, media_port_max=40099
        )
    )
    await media.start()
    try:
        yield media
    finally:
        await media.stop()


def sdp(addr: str, *media: str, session_c: bool = True) -> bytes:
    lines = ["v=0", f"o=- 1 1 IN IP4 {addr}", "s=-"]
    if session_c:
        lines.append(f"c=IN IP4 {addr}")
    lines.append("t=0 0")
    for m in media:
        lines.extend(m.strip().splitlines())
    return ("\r\n".join(lines) + "\r\n").encode()


def audio(port: int, *extra: str, proto: str = "RTP/SAVP") -> str:
    return "\n".join([f"m=audio {port} {proto} 0 8", "a=rtpmap:0 PCMU/8000", *extra])


def video(port: int, *extra: str, proto: str = "RTP/SAVP") -> str:
    return "\n".join([f"m=video {port} {proto} 97", "a=rtpmap:97 H264/90000", *extra])


def assert_points_at(sd: SessionDescription, i: int, addr: str, port: int, rtcp: int) -> None:
    conn = sd.media_connection(i)
    assert conn is not None and conn.address == addr
    m = sd.media[i]
    assert m.port == port
    assert m.rtcp is not None and m.rtcp.port == rtcp and m.rtcp.connection is None


def test_edge_media_is_a_media_session() -> None:
    media: MediaSession = EdgeMedia(ExpeSettings())
    assert media.snapshot()["running"] is False
    with pytest.raises(MediaRejected) as info:
        media.process_offer("c", "outside", sdp(CLIENT, audio(5000)))
    assert info.value.status == 503
    with pytest.raises(ValueError):
        EdgeMedia(ExpeSettings(demux_rtp_port=40000))


async def test_offer_from_outside_then_answer_from_inside(edge: EdgeMedia) -> None:
    s = edge.settings
    offer = sdp(CLIENT, audio(5000, KEY1.to_line(), KEY2.to_line(), "a=rtcp-mux", "a=x-cisco-foo:1"))
    to_c = SessionDescription.parse(edge.process_offer("call1", "outside", offer))
    assert_points_at(to_c, 0, s.internal_address, 2776, 2777)
    m = to_c.media[0]
    assert m.proto == "RTP/SAVP"
    assert [str(c) for c in m.crypto] == [str(KEY1), str(KEY2)]  # crypto passes untouched
    assert not m.rtcp_mux and m.has_attribute("x-cisco-foo")
    assert to_c.origin_address == CLIENT  # o= is not E's business

    snap = edge.snapshot()
    [stream] = snap["calls"]["call1"]
    port = stream["client_port"]
    assert s.media_port_min <= port <= s.media_port_max and port % 2 == 0
    assert stream["state"] == "offered" and stream["stream"] is None
    assert edge.worker.allocator is not None and edge.worker.allocator.in_use == 1

    answer = sdp(C_ADDR, audio(36010, KEY1.to_line().replace(str(KEY1), str(generate_crypto(1)))))
    to_client = SessionDescription.parse(edge.process_answer("call1", "inside", answer))
    assert_points_at(to_client, 0, s.external_address, port, port + 1)
    assert to_client.media[0].crypto[0].tag == 1

    snap = edge.snapshot()
    [stream] = snap["calls"]["call1"]
    assert stream["state"] == "relaying" and stream["c_remote"] == f"{C_ADDR}:36010"
    client_leg, c_leg = stream["stream"]["legs"]
    assert client_leg["kind"] == "dedicated" and client_leg["local_rtp_port"] == port
    assert client_leg["remote_rtp"] is None and not client_leg["latched"]  # latches on traffic
    assert c_leg["kind"] == "demux" and c_leg["local_rtp_port"] == 2776 and c_leg["local_rtcp_port"] == 2777
    assert c_leg["remote_rtp"] == f"{C_ADDR}:36010" and c_leg["remote_rtcp"] == f"{C_ADDR}:36011"
    assert snap["totals"]["streams"] == 1 and snap["demux_ports"] == [2776, 2777]

    edge.end_call("call1")
    assert edge.worker.allocator.in_use == 0
    assert edge.worker.ports == [2776, 2777]
    assert "call1" not in edge.snapshot()["calls"]
    edge.end_call("call1")  # idempotent


async def test_offer_from_inside_then_answer_from_outside(edge: EdgeMedia) -> None:
    s = edge.settings
    offer = sdp(C_ADDR, audio(36020, KEY1.to_line(), "a=rtcp:36031"))
    to_client = SessionDescription.parse(edge.process_offer("call2", "inside", offer))
    port = edge.snapshot()["calls"]["call2"][0]["client_port"]
    assert_points_at(to_client, 0, s.external_address, port, port + 1)
    assert [str(c) for c in to_client.media[0].crypto] == [str(KEY1)]

    answer = sdp(CLIENT, audio(5000, KEY1.to_line()))
    to_c = SessionDescription.parse(edge.process_answer("call2", "outside", answer))
    assert_points_at(to_c, 0, s.internal_address, 2776, 2777)
    c_leg = edge.snapshot()["calls"]["call2"][0]["stream"]["legs"][1]
    assert c_leg["remote_rtp"] == f"{C_ADDR}:36020" and c_leg["remote_rtcp"] == f"{C_ADDR}:36031"

    # A 200 after a 183: the last answer wins, the stream stays.
    edge.process_answer("call2", "outside", answer)
    assert len(edge.worker.table) == 1


async def test_audio_video_and_disabled_streams(edge: EdgeMedia) -> None:
    s = edge.settings
    offer = sdp(
        CLIENT,
        audio(5000, KEY1.to_line()),
        video(5002, KEY1.to_line(), f"c=IN IP4 {CLIENT}"),
        "m=video 0 RTP/SAVP 98",
        "m=application 5010 TCP/BFCP *",
        session_c=True,
    )
    out = edge.process_offer("call3", "outside", offer)
    to_c = SessionDescription.parse(out)
    assert_points_at(to_c, 0, s.internal_address, 2776, 2777)
    assert_points_at(to_c, 1, s.internal_address, 2776, 2777)
    assert to_c.media[1].connection is not None  # its own c= line was rewritten too
    assert str(to_c).count("m=video 0 RTP/SAVP 98\r\n") == 1  # port 0 untouched
    assert to_c.media[3].port == 5010 and to_c.media[3].rtcp is None  # not RTP: untouched
    streams = edge.snapshot()["calls"]["call3"]
    assert [(x["index"], x["media"]) for x in streams] == [(0, "audio"), (1, "video")]
    ports = [x["client_port"] for x in streams]
    assert len(set(ports)) == 2

    answer = sdp(
        C_ADDR,
        audio(36040, KEY1.to_line()),
        video(36042, KEY1.to_line()),
        "m=video 0 RTP/SAVP 98",
        "m=application 0 TCP/BFCP *",
    )
    back = SessionDescription.parse(edge.process_answer("call3", "inside", answer))
    assert_points_at(back, 0, s.external_address, ports[0], ports[0] + 1)
    assert_points_at(back, 1, s.external_address, ports[1], ports[1] + 1)
    streams = edge.snapshot()["calls"]["call3"]
    assert streams[1]["stream"]["clock_rate"] == 90000
    assert [x["c_remote"] for x in streams] == [f"{C_ADDR}:36040", f"{C_ADDR}:36042"]

    # Re-INVITE from the client: same audio port kept, video dropped (port 0), C moves.
    reoffer = sdp(CLIENT, audio(5000, KEY1.to_line()), "m=video 0 RTP/SAVP 97", "m=video 0 RTP/SAVP 98")
    edge.process_offer("call3", "outside", reoffer)
    assert [x["client_port"] for x in edge.snapshot()["calls"]["call3"]] == [ports[0]]
    back = SessionDescription.parse(
        edge.process_answer(
            "call3",
            "inside",
            sdp(C_ADDR, audio(36050, KEY1.to_line()), "m=video 0 RTP/SAVP 97", "m=video 0 RTP/SAVP 98"),
        )
    )
    assert back.media[0].port == ports[0]
    c_leg = edge.snapshot()["calls"]["call3"][0]["stream"]["legs"][1]
    assert c_leg["remote_rtp"] == f"{C_ADDR}:36050"
    assert edge.worker.allocator is not None and edge.worker.allocator.in_use == 1


async def test_answer_refusing_a_stream_releases_it(edge: EdgeMedia) -> None:
    edge.process_offer("call4", "inside", sdp(C_ADDR, audio(36020), video(36022)))
    assert edge.worker.allocator is not None and edge.worker.allocator.in_use == 2
    back = edge.process_answer("call4", "outside", sdp(CLIENT, audio(5000), video(0)))
    sd = SessionDescription.parse(back)
    assert sd.media[1].port == 0
    assert edge.worker.allocator.in_use == 1 and len(edge.worker.table) == 1


async def test_rejections(edge: EdgeMedia) -> None:
    def rejected(fn: object, *args: object) -> MediaRejected:
        with pytest.raises(MediaRejected) as info:
            fn(*args)  # type: ignore[operator]
        assert info.value.status == 488
        return info.value

    rejected(edge.process_offer, "c", "outside", b"not sdp")
    rejected(edge.process_offer, "c", "outside", sdp(CLIENT, audio(5000), session_c=False))  # no c=
    assert edge.worker.allocator is not None and edge.worker.allocator.in_use == 0  # rolled back
    rejected(edge.process_answer, "nobody", "inside", sdp(C_ADDR, audio(36000)))
    edge.process_offer("c", "outside", sdp(CLIENT, audio(5000)))
    assert "offerer" in rejected(edge.process_answer, "c", "outside", sdp(CLIENT, audio(5000))).reason
    rejected(edge.process_answer, "c", "inside", sdp(C_ADDR, audio(36000), video(36002)))
    # Two streams may not share C's address: it is the demux key on 2776.
    edge.process_answer("c", "inside", sdp(C_ADDR, audio(36000)))
    edge.process_offer("d", "outside", sdp(CLIENT, audio(5002)))
    rejected(edge.process_answer, "d", "inside", sdp(C_ADDR, audio(36000)))
    assert edge.rejected == 6
    edge.end_call("d")
    edge.end_call("c")
    assert edge.worker.allocator.in_use == 0


async def test_ports_exhausted_is_rejected() -> None:
    p = loopback_prefix()
    edge = EdgeMedia(
        ExpeSettings(
            external_address=f"{p}.1", internal_address=f"{p}.2", media_port_min=40000, media_port_max=40003
        )
    )
    await edge.start()
    try:
        edge.process_offer("a", "outside", sdp(CLIENT, audio(5000), video(5002)))
        with pytest.raises(MediaRejected):
            edge.process_offer("b", "outside", sdp(CLIENT, audio(5000)))
        edge.end_call("a")
        edge.process_offer("b", "outside", sdp(CLIENT, audio(5000)))
    finally:
        await edge.stop()
    assert edge.snapshot()["running"] is False


async def test_idle_stream_times_out_and_is_forgotten() -> None:
    p = loopback_prefix()
    timed_out: asyncio.Queue[tuple[str, StreamTimedOut]] = asyncio.Queue()
    edge = EdgeMedia(
        ExpeSettings(external_address=f"{p}.1", internal_address=f"{p}.2"),
        inactivity_timeout_s=0.1,
        on_stream_timeout=lambda call, event: timed_out.put_nowait((call, event)),
    )
    await edge.start()
    try:
        edge.process_offer("idle", "outside", sdp(CLIENT, audio(5000), video(5002)))
        edge.process_answer("idle", "inside", sdp(C_ADDR, audio(36000), video(36002)))
        got = [await asyncio.wait_for(timed_out.get(), 5.0) for _ in range(2)]
        assert sorted(e.stream_id for _, e in got) == ["idle#0", "idle#1"] and {c for c, _ in got} == {"idle"}
        assert edge.snapshot()["calls"]["idle"] == []
        assert edge.worker.allocator is not None and edge.worker.allocator.in_use == 0
        # A late answer (the 200 after a 183) cannot revive them: the streams go on with port 0.
        late = SessionDescription.parse(
            edge.process_answer("idle", "inside", sdp(C_ADDR, audio(36000), video(36002)))
        )
        assert [m.port for m in late.media] == [0, 0]
        edge.end_call("idle")
        assert edge.worker.ports == [2776, 2777]
    finally:
        await edge.stop()

"""Expressway-C's media anchor (edge_c.media): SDES negotiation, SDP rewrites on both legs, ports,
the first packet towards E, rejections and counters (spec §7)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator
from typing import cast

import pytest

from edge.config import ExpcSettings
from edge.media_hooks import MediaRejected, MediaSession
from edge_c.media import GatewayMedia
from media_relay.sdp import SessionDescription
from media_relay.srtp import CryptoAttribute, Direction, SrtpContext, generate_crypto

# Every test here runs on the native fast path and on the pure-Python path.
pytestmark = pytest.mark.usefixtures("relay_path")

E_ADDR = "192.0.2.2"  # E's internal address as E's SDP names it
FAR = "192.0.2.50"
CM80 = "AES_CM_128_HMAC_SHA1_80"
CM32 = "AES_CM_128_HMAC_SHA1_32"
GCM128 = "AEAD_AES_128_GCM"
GCM256 = "AEAD_AES_256_GCM"


def loopback_prefix() -> str:
    """A 127.x.y block no one else uses (parallel runs, a developer's lab on 127.10)."""
    for _ in range(200):
        prefix = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((f"{prefix}.3", 42000))
            except OSError:
                continue
        return prefix
    raise RuntimeError("no free loopback block")


async def started(aes_gcm: bool = False, port_max: int = 42099) -> GatewayMedia:
    p = loopback_prefix()
    media = GatewayMedia(
        ExpcSettings(address=f"{p}.3", media_port_min=42000, media_port_max=port_max, aes_gcm=aes_gcm)
    )
    await media.start()
    return media


@pytest.fixture
async def gw() -> AsyncIterator[GatewayMedia]:
    media = await started()
    try:
        yield media
    finally:
        await media.stop()


@pytest.fixture
async def gw_gcm() -> AsyncIterator[GatewayMedia]:
    media = await started(aes_gcm=True)
    try:
        yield media
    finally:
        await media.stop()


def sdp(addr: str, *media: str) -> bytes:
    lines = ["v=0", f"o=- 1 1 IN IP4 {addr}", "s=-", f"c=IN IP4 {addr}", "t=0 0"]
    for m in media:
        lines.extend(m.strip().splitlines())
    return ("\r\n".join(lines) + "\r\n").encode()


def audio(port: int, *cryptos: CryptoAttribute | str, proto: str = "RTP/SAVP", extra: str = "") -> str:
    lines = [f"m=audio {port} {proto} 0 13", "a=rtpmap:0 PCMU/8000"]
    lines += [c if isinstance(c, str) else c.to_line() for c in cryptos]
    return "\n".join(lines + ([extra] if extra else []))


def video(port: int, *cryptos: CryptoAttribute, proto: str = "RTP/SAVP") -> str:
    return "\n".join(
        [f"m=video {port} {proto} 97", "a=rtpmap:97 H264/90000", *(c.to_line() for c in cryptos)]
    )


def e_offer(*media: str) -> bytes:
    """What C receives from E for a client's call: c=E internal, m=2776, a=rtcp:2777."""
    return sdp(E_ADDR, *media)


def check_leg(sd: SessionDescription, i: int, address: str, port: int, proto: str) -> None:
    conn = sd.media_connection(i)
    assert conn is not None and conn.address == address
    m = sd.media[i]
    assert m.port == port and m.proto == proto
    assert m.rtcp is not None and m.rtcp.port == port + 1
    assert not m.rtcp_mux


def stream(gw: GatewayMedia, call: str, i: int = 0) -> dict[str, object]:
    return cast(dict[str, object], gw.snapshot()["calls"][call][i])


def ports(gw: GatewayMedia, call: str, i: int = 0) -> tuple[int, int]:
    st = stream(gw, call, i)
    out, ins = cast(dict[str, int], st["outside"]), cast(dict[str, int], st["inside"])
    return out["local_port"], ins["local_port"]


def test_gateway_media_is_a_media_session() -> None:
    media: MediaSession = GatewayMedia(ExpcSettings())
    assert media.snapshot()["running"] is False
    with pytest.raises(MediaRejected) as info:
        media.process_offer("c", "outside", e_offer(audio(2776, generate_crypto(1))))
    assert info.value.status == 503
    assert GatewayMedia(ExpcSettings()).suites == (CM80, CM32)
    assert GatewayMedia(ExpcSettings(aes_gcm=True)).suites == (CM80, CM32, GCM128, GCM256)


async def test_client_offer_plain_inside_srtp_answer_outside(gw: GatewayMedia) -> None:
    addr = gw.settings.address
    gcm, cm32, cm80 = generate_crypto(1, GCM128), generate_crypto(2, CM32), generate_crypto(3, CM80)
    offer = e_offer(audio(2776, gcm, cm32, cm80, extra="a=rtcp:2777\na=rtcp-mux"))
    inside = SessionDescription.parse(gw.process_offer("c1", "outside", offer))
    out_port, in_port = ports(gw, "c1")
    assert out_port != in_port and out_port % 2 == 0 and in_port % 2 == 0
    assert all(42000 <= p <= 42099 for p in (out_port, in_port))
    check_leg(inside, 0, addr, in_port, "RTP/AVP")
    assert inside.media[0].crypto == [] and b"a=crypto" not in bytes(inside)
    assert stream(gw, "c1")["state"] == "offered"

    answer = SessionDescription.parse(
        gw.process_answer("c1", "inside", sdp(FAR, audio(30000, proto="RTP/AVP")))
    )
    check_leg(answer, 0, addr, out_port, "RTP/SAVP")
    [ours] = answer.media[0].crypto
    # GCM is off: the first suite C supports is the -32 one, under the client's tag.
    assert (ours.tag, ours.suite) == (2, CM32)
    assert ours.key_salt not in (cm32.key_salt, cm80.key_salt) and len(ours.key_salt) == 30

    st = stream(gw, "c1")
    assert st["state"] == "relaying" and st["outside_srtp"] == CM32 and st["inside_srtp"] is None
    legs = gw.worker.table.get_stream("c1#0").snapshot()["legs"]
    assert legs[0]["remote_rtp"] == f"{E_ADDR}:2776" and legs[0]["remote_rtcp"] == f"{E_ADDR}:2777"
    assert legs[1]["send_to_rtp"] == f"{FAR}:30000" and not legs[1]["latched"]
    outside = cast(dict[str, object], st["outside"])
    assert set(outside) >= {"packets", "bytes", "lost", "jitter_ms", "srtp_auth_failures", "drops"}

    # The 200 after a 183: same key, same ports.
    again = SessionDescription.parse(
        gw.process_answer("c1", "inside", sdp(FAR, audio(30000, proto="RTP/AVP")))
    )
    assert again.media[0].crypto == [ours] and again.media[0].port == out_port

    gw.end_call("c1")
    assert gw.worker.allocator is not None and gw.worker.allocator.in_use == 0
    assert gw.worker.ports == [] and len(gw.worker.table) == 0


async def test_gcm_suites_with_the_option(gw_gcm: GatewayMedia) -> None:
    for call, suite in (("g1", GCM128), ("g2", GCM256)):
        offer = e_offer(audio(2776, generate_crypto(1, suite), generate_crypto(2, CM80)))
        gw_gcm.process_offer(call, "outside", offer)
        answer = gw_gcm.process_answer(call, "inside", sdp(FAR, audio(30000, proto="RTP/AVP")))
        [ours] = SessionDescription.parse(answer).media[0].crypto
        assert (ours.tag, ours.suite) == (1, suite)
        assert len(ours.key_salt) == (28 if suite == GCM128 else 44)


async def test_no_acceptable_crypto_is_488(gw: GatewayMedia) -> None:
    cases = [
        e_offer(audio(2776, proto="RTP/AVP")),  # plain RTP from outside
        e_offer(audio(2776, generate_crypto(1, GCM128))),  # GCM without the option
        e_offer(audio(2776)),  # SAVP without a=crypto
        e_offer(audio(2776, "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:short")),  # malformed
        e_offer(audio(2776, "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40 + "|2^20|1:4")),  # MKI
        e_offer(audio(0, generate_crypto(1))),
        b"garbage",
    ]
    for offer in cases:
        with pytest.raises(MediaRejected) as info:
            gw.process_offer("bad", "outside", offer)
        assert info.value.status == 488
    assert gw.worker.allocator is not None and gw.worker.allocator.in_use == 0
    assert gw.rejected == len(cases)


async def test_audio_and_video_one_refused(gw: GatewayMedia) -> None:
    addr = gw.settings.address
    offer = e_offer(
        audio(2776, generate_crypto(1)),
        video(2776, generate_crypto(1, GCM128)),  # not acceptable: refused, port 0 inside
        "m=video 0 RTP/SAVP 98",
        video(2776, generate_crypto(5, CM80)),
    )
    inside = SessionDescription.parse(gw.process_offer("av", "outside", offer))
    assert [m.port for m in inside.media][1:3] == [0, 0]
    assert inside.media[1].crypto == []  # the client's key is never handed inside
    streams = gw.snapshot()["calls"]["av"]
    assert [s["index"] for s in streams] == [0, 3]
    check_leg(inside, 3, addr, streams[1]["inside"]["local_port"], "RTP/AVP")
    assert gw.worker.allocator is not None and gw.worker.allocator.in_use == 4

    answer = sdp(
        FAR,
        audio(30000, proto="RTP/AVP"),
        video(0, proto="RTP/AVP"),
        "m=video 0 RTP/AVP 98",
        video(30002, proto="RTP/AVP"),
    )
    out = SessionDescription.parse(gw.process_answer("av", "inside", answer))
    assert [m.port for m in out.media] == [
        streams[0]["outside"]["local_port"],
        0,
        0,
        streams[1]["outside"]["local_port"],
    ]
    assert [m.proto for m in out.media] == ["RTP/SAVP", "RTP/AVP", "RTP/AVP", "RTP/SAVP"]
    assert out.media[3].crypto[0].tag == 5
    assert gw.worker.table.get_stream("av#3").clock_rate == 90000

    # The far end refuses the video in a later answer: that stream goes, audio stays.
    answer2 = sdp(FAR, audio(30000, proto="RTP/AVP"), video(0), "m=video 0 RTP/AVP 98", video(0))
    out2 = SessionDescription.parse(gw.process_answer("av", "inside", answer2))
    assert out2.media[3].port == 0 and out2.media[3].proto == "RTP/SAVP" and out2.media[3].crypto == []
    assert gw.worker.allocator.in_use == 2 and len(gw.worker.table) == 1


async def test_inside_offer_plain_rtp(gw: GatewayMedia) -> None:
    addr = gw.settings.address
    out = SessionDescription.parse(gw.process_offer("in1", "inside", sdp(FAR, audio(30000, proto="RTP/AVP"))))
    out_port, in_port = ports(gw, "in1")
    check_leg(out, 0, addr, out_port, "RTP/SAVP")
    offered = out.media[0].crypto
    assert [(c.tag, c.suite) for c in offered] == [(1, CM80), (2, CM32)]
    assert len({c.key_salt for c in offered}) == 2

    client = generate_crypto(2, CM32)
    with pytest.raises(MediaRejected):  # a tag C did not offer
        gw.process_answer("in1", "outside", e_offer(audio(2776, generate_crypto(7, CM32))))
    with pytest.raises(MediaRejected):  # right tag, other suite
        gw.process_answer("in1", "outside", e_offer(audio(2776, generate_crypto(2, CM80))))
    answer = SessionDescription.parse(gw.process_answer("in1", "outside", e_offer(audio(2776, client))))
    check_leg(answer, 0, addr, in_port, "RTP/AVP")
    assert answer.media[0].crypto == []
    st = stream(gw, "in1")
    assert st["outside_srtp"] == CM32 and st["inside_srtp"] is None
    assert gw.worker.table.get_stream("in1#0").legs[0].rtp.remote == (E_ADDR, 2776)

    # A re-INVITE from UCM: C keeps its ports and keys (no rekey, the replay state survives).
    again = SessionDescription.parse(
        gw.process_offer("in1", "inside", sdp(FAR, audio(30010, proto="RTP/AVP")))
    )
    assert again.media[0].port == out_port and again.media[0].crypto == offered
    gw.process_answer("in1", "outside", e_offer(audio(2776, client)))
    assert gw.worker.table.get_stream("in1#0").legs[1].rtp.route == (in_port, (FAR, 30010))


async def test_inside_offer_srtp_is_terminated_too(gw: GatewayMedia) -> None:
    far_key = generate_crypto(4, CM80)
    out = gw.process_offer("in2", "inside", sdp(FAR, audio(30000, far_key, proto="RTP/SAVP")))
    offered = SessionDescription.parse(out).media[0].crypto
    assert far_key.key_salt not in {c.key_salt for c in offered}  # C's own keys outside
    answer = gw.process_answer("in2", "outside", e_offer(audio(2776, generate_crypto(1, CM80))))
    m = SessionDescription.parse(answer).media[0]
    assert m.proto == "RTP/SAVP"
    [ours] = m.crypto
    assert (ours.tag, ours.suite) == (4, CM80) and ours.key_salt != far_key.key_salt
    assert stream(gw, "in2")["inside_srtp"] == CM80


async def test_order_and_unknown_calls_are_rejected(gw: GatewayMedia) -> None:
    with pytest.raises(MediaRejected):
        gw.process_answer("none", "inside", sdp(FAR, audio(30000, proto="RTP/AVP")))
    gw.process_offer("o", "outside", e_offer(audio(2776, generate_crypto(1))))
    with pytest.raises(MediaRejected):
        gw.process_answer("o", "outside", e_offer(audio(2776, generate_crypto(1))))
    with pytest.raises(MediaRejected):  # m= count differs from the offer's
        gw.process_answer("o", "inside", sdp(FAR, audio(30000, proto="RTP/AVP"), video(30002)))
    gw.end_call("o")
    gw.end_call("o")


async def test_ports_exhausted_is_rejected_and_rolled_back() -> None:
    gw = await started(port_max=42005)  # three pairs: one stream needs two
    try:
        gw.process_offer("a", "outside", e_offer(audio(2776, generate_crypto(1))))
        with pytest.raises(MediaRejected):
            gw.process_offer("b", "outside", e_offer(audio(2776, generate_crypto(1))))
        assert gw.worker.allocator is not None and gw.worker.allocator.in_use == 2
        gw.end_call("a")
        gw.process_offer("b", "outside", e_offer(audio(2776, generate_crypto(1))))
    finally:
        await gw.stop()


async def test_c_sends_first_towards_e(gw: GatewayMedia) -> None:
    """The pinhole packet: SRTP CN from C's outside RTP port, SRTCP RR from its RTCP port."""
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    class FakeE(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            got.put_nowait((data, addr))

    host = gw.settings.address
    rtp_t, _ = await loop.create_datagram_endpoint(FakeE, local_addr=(host, 0))
    rtcp_t, _ = await loop.create_datagram_endpoint(FakeE, local_addr=(host, 0))
    try:
        e_rtp, e_rtcp = rtp_t.get_extra_info("sockname")[1], rtcp_t.get_extra_info("sockname")[1]
        offer = sdp(host, audio(e_rtp, generate_crypto(1), extra=f"a=rtcp:{e_rtcp}"))
        gw.process_offer("p", "outside", offer)
        answer = gw.process_answer("p", "inside", sdp(FAR, audio(30000, proto="RTP/AVP")))
        [ours] = SessionDescription.parse(answer).media[0].crypto
        out_port, _ = ports(gw, "p")
        ctx = SrtpContext.from_crypto(ours, Direction.INBOUND)
        first = [await asyncio.wait_for(got.get(), 5.0) for _ in range(2)]
        by_port = {addr[1]: data for data, addr in first}
        assert set(by_port) == {out_port, out_port + 1}
        cn = ctx.unprotect(by_port[out_port])
        assert cn[1] & 0x7F == 13 and cn[12:] == bytes([127])
        rr = ctx.unprotect_rtcp(by_port[out_port + 1])
        assert rr[1] == 201 and struct.unpack_from("!I", rr, 4)[0] == struct.unpack_from("!I", cn, 8)[0]
        assert gw.snapshot()["pinholes_sent"] == 1
        # A later answer with the same E address does not send again.
        gw.process_answer("p", "inside", sdp(FAR, audio(30000, proto="RTP/AVP")))
        assert gw.snapshot()["pinholes_sent"] == 1
    finally:
        rtp_t.close()
        rtcp_t.close()

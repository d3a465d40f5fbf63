"""The whole media path on loopback, without SIP: client <-SRTP-> E <-SRTP-> C <-RTP-> echo.

Signalling is driven by calling E's and C's ``process_offer`` / ``process_answer`` in the order the
SIP path would; media is real UDP on distinct loopback addresses (client, E external, E
internal, C, far end), so every address check in the relays is exercised (spec §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import pytest

from edge.config import ExpcSettings, ExpeSettings
from edge.media_hooks import MediaRejected
from edge.media_metrics import media_samples
from edge_c.media import GatewayMedia
from edge_e.media import EdgeMedia
from media_relay import fastpath
from media_relay.sdp import SessionDescription
from media_relay.srtp import CryptoAttribute, Direction, SrtpContext, generate_crypto
from media_relay.worker import THREADS_ENV_VAR

# Every test here runs on the native fast path and on the pure-Python path.
pytestmark = pytest.mark.usefixtures("relay_path")

SUITES = ["AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32", "AEAD_AES_128_GCM", "AEAD_AES_256_GCM"]
BATCH = 20
WAIT_S = 5.0


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


def rtp(seq: int, ssrc: int = 0x1234, pt: int = 0) -> bytes:
    payload = bytes((seq + i) & 0xFF for i in range(160))
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, seq * 160, ssrc) + payload


class Peer(asyncio.DatagramProtocol):
    """A UDP endpoint; with ``echo`` it returns each packet to its source (the far end)."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None
        self._want = 0
        self._enough: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)
        if self._enough is not None and len(self.received) >= self._want and not self._enough.done():
            self._enough.set_result(None)

    def expect(self, total: int) -> asyncio.Future[None]:
        self._want = total
        self._enough = asyncio.get_running_loop().create_future()
        if len(self.received) >= total:
            self._enough.set_result(None)
        return self._enough

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        name = self.transport.get_extra_info("sockname")
        return str(name[0]), int(name[1])

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)


async def peer(host: str, echo: bool = False) -> Peer:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(lambda: Peer(echo), local_addr=(host, 0))
    return proto


async def until(predicate: Callable[[], bool]) -> None:
    """Explicit readiness: yield to the loop until ``predicate`` holds (bounded)."""
    for _ in range(20_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


@dataclass
class Lab:
    prefix: str
    edge: EdgeMedia
    gateway: GatewayMedia
    client: Peer
    echo: Peer
    stranger: Peer


@pytest.fixture
async def lab(request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    async with open_lab(bool(getattr(request, "param", True))) as opened:
        yield opened


@contextlib.asynccontextmanager
async def open_lab(aes_gcm: bool = True) -> AsyncIterator[Lab]:
    """E and C in this process, on a loopback block of their own, with a client, an echo and a
    stranger."""
    p = loopback_prefix()
    edge = EdgeMedia(
        ExpeSettings(
            external_address=f"{p}.1", internal_address=f"{p}.2", media_port_min=40000, media_port_max=40099
        )
    )
    gateway = GatewayMedia(
        ExpcSettings(address=f"{p}.3", media_port_min=42000, media_port_max=42099, aes_gcm=aes_gcm)
    )
    await edge.start()
    await gateway.start()
    client, echo, stranger = await peer(f"{p}.4"), await peer(f"{p}.5", echo=True), await peer(f"{p}.6")
    try:
        yield Lab(p, edge, gateway, client, echo, stranger)
    finally:
        for x in (client, echo, stranger):
            assert x.transport is not None
            x.transport.close()
        await edge.stop()
        await gateway.stop()


def client_offer(addr: tuple[str, int], cryptos: list[CryptoAttribute]) -> bytes:
    lines = [
        "v=0",
        f"o=jabber 1 1 IN IP4 {addr[0]}",
        "s=-",
        f"c=IN IP4 {addr[0]}",
        "t=0 0",
        f"m=audio {addr[1]} RTP/SAVP 0 13",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:13 CN/8000",
        *(c.to_line() for c in cryptos),
        "a=sendrecv",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def plain_sdp(addr: tuple[str, int], profile: str = "RTP/AVP") -> bytes:
    return (
        f"v=0\r\no=ucm 7 7 IN IP4 {addr[0]}\r\ns=-\r\nc=IN IP4 {addr[0]}\r\nt=0 0\r\n"
        f"m=audio {addr[1]} {profile} 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


def e_external_port(lab: Lab, sdp: bytes) -> tuple[str, int]:
    sd = SessionDescription.parse(sdp)
    conn = sd.media_connection(0)
    assert conn is not None and conn.address == lab.edge.settings.external_address
    return conn.address, sd.media[0].port


async def call_out(lab: Lab, suite: str) -> tuple[tuple[str, int], SrtpContext, SrtpContext]:
    """Client calls in: client offer -> E(outside) -> C(outside) -> far end; answers back."""
    client_key = generate_crypto(1, suite)
    offer_to_c = lab.edge.process_offer("e-call", "outside", client_offer(lab.client.addr, [client_key]))
    offer_in = lab.gateway.process_offer("c-call", "outside", offer_to_c)
    assert b"a=crypto" not in offer_in
    answer_from_c = lab.gateway.process_answer("c-call", "inside", plain_sdp(lab.echo.addr))
    answer = lab.edge.process_answer("e-call", "inside", answer_from_c)
    m = SessionDescription.parse(answer).media[0]
    assert m.proto == "RTP/SAVP" and len(m.crypto) == 1
    c_key = m.crypto[0]
    assert c_key.tag == 1 and c_key.suite == suite and c_key.key_salt != client_key.key_salt
    await lab.edge.worker.wait_bound()
    await lab.gateway.worker.wait_bound()
    sender = SrtpContext.from_crypto(client_key, Direction.OUTBOUND)
    receiver = SrtpContext.from_crypto(c_key, Direction.INBOUND)
    return e_external_port(lab, answer), sender, receiver


async def round_trip(lab: Lab, e_port: tuple[str, int], sender: SrtpContext, seqs: range) -> None:
    """Send SRTP from the client in batches; wait for every echo to come back."""
    base = len(lab.client.received)
    sent = 0
    for i in range(0, len(seqs), BATCH):
        chunk = seqs[i : i + BATCH]
        done = lab.client.expect(base + sent + len(chunk))
        for seq in chunk:
            lab.client.send(sender.protect(rtp(seq)), e_port)
        sent += len(chunk)
        await asyncio.wait_for(done, WAIT_S)


def check_echoes(
    lab: Lab, e_port: tuple[str, int], receiver: SrtpContext, seqs: range, start: int = 0
) -> None:
    got = lab.client.received[start:]
    assert all(src == e_port for _, src in got)  # symmetric: E answers from the latched port
    plain = [receiver.unprotect(data) for data, _ in got]
    assert [struct.unpack_from("!H", p, 2)[0] for p in plain] == list(seqs)
    assert plain == [rtp(s) for s in seqs]


@pytest.mark.parametrize("suite", SUITES)
async def test_client_call_media_path_each_suite(lab: Lab, suite: str) -> None:
    e_port, sender, receiver = await call_out(lab, suite)
    seqs = range(1000, 1200)
    await round_trip(lab, e_port, sender, seqs)
    assert len(lab.client.received) == 200
    check_echoes(lab, e_port, receiver, seqs)
    # The far end saw plain RTP, from C's inside port, byte-exact.
    assert [d for d, _ in lab.echo.received] == [rtp(s) for s in seqs]

    snap_c = lab.gateway.snapshot()["calls"]["c-call"][0]
    assert snap_c["outside_srtp"] == suite and snap_c["inside_srtp"] is None
    assert snap_c["outside"]["packets"] == 200 and snap_c["inside"]["packets"] == 200
    assert snap_c["outside"]["lost"] == 0 and snap_c["outside"]["srtp_auth_failures"] == 0
    snap_e = lab.edge.snapshot()["calls"]["e-call"][0]["stream"]["legs"]
    assert snap_e[0]["rx_packets"] == 200 and snap_e[0]["tx_packets"] == 200
    assert snap_e[0]["remote_rtp"] == "{}:{}".format(*lab.client.addr)
    # C's pinhole packets (SRTP CN + SRTCP RR, sent at its outside offer) waited in E's socket
    # until E's loop ran, by then with the stream: dropped because the client had not latched.
    assert snap_e[1]["drops"]["not_latched"] == 2 and snap_e[1]["rx_packets"] == 202
    assert lab.gateway.snapshot()["pinholes_sent"] == 1


@pytest.mark.parametrize("lab", [False], indirect=True)
async def test_gcm_needs_the_option(lab: Lab) -> None:
    key = generate_crypto(1, "AEAD_AES_128_GCM")
    offer = lab.edge.process_offer("e-call", "outside", client_offer(lab.client.addr, [key]))
    with pytest.raises(MediaRejected) as info:
        lab.gateway.process_offer("c-call", "outside", offer)
    assert info.value.status == 488


async def test_strangers_and_forged_packets_are_dropped_and_counted(lab: Lab) -> None:
    suite = "AES_CM_128_HMAC_SHA1_80"
    e_port, sender, receiver = await call_out(lab, suite)
    await round_trip(lab, e_port, sender, range(1, 51))

    # A stranger sends to E's client port (E has latched the client) and to C's inside port.
    c_inside = lab.gateway.snapshot()["calls"]["c-call"][0]["inside"]["local_port"]
    lab.stranger.send(rtp(5000), e_port)
    lab.stranger.send(rtp(5001), (lab.gateway.settings.address, c_inside))
    # The client sends packets whose SRTP tag is wrong: E relays them, C refuses them.
    for seq in (51, 52, 53):
        forged = bytearray(sender.protect(rtp(seq)))
        forged[-1] ^= 0x5A
        lab.client.send(bytes(forged), e_port)

    # The stream keeps working.
    await round_trip(lab, e_port, sender, range(54, 154))
    assert len(lab.client.received) == 150
    check_echoes(lab, e_port, receiver, range(54, 154), start=50)

    e_leg = lab.edge.worker.table.get_stream("e-call#0").legs[0]
    await until(lambda: e_leg.rtp.unlatched_drops == 1)
    await until(lambda: lab.gateway.snapshot()["calls"]["c-call"][0]["outside"]["srtp_auth_failures"] == 3)
    await until(lambda: lab.gateway.snapshot()["calls"]["c-call"][0]["inside"]["drops"]["unlatched"] == 1)
    snap = lab.gateway.snapshot()["calls"]["c-call"][0]
    assert snap["outside"]["drops"]["transcode"] == 3
    assert snap["outside"]["packets"] == 150  # the forged packets are not counted as received
    assert snap["inside"]["remote"] == "{}:{}".format(*lab.echo.addr)
    assert lab.edge.snapshot()["calls"]["e-call"][0]["stream"]["legs"][0]["rx_packets"] == 153


async def test_inside_call_media_path(lab: Lab) -> None:
    """UCM calls the client: C offers SRTP outside, the client picks the -32 suite (tag 2)."""
    offer_out = lab.gateway.process_offer("c-call", "inside", plain_sdp(lab.echo.addr))
    offer = lab.edge.process_offer("e-call", "inside", offer_out)
    offered = SessionDescription.parse(offer).media[0].crypto
    assert [(c.tag, c.suite) for c in offered] == list(enumerate(lab.gateway.suites, start=1))
    chosen = offered[1]
    client_key = generate_crypto(chosen.tag, chosen.suite)
    client_answer = client_offer(lab.client.addr, [client_key])
    answer_to_c = lab.edge.process_answer("e-call", "outside", client_answer)
    answer_in = lab.gateway.process_answer("c-call", "outside", answer_to_c)
    sd_in = SessionDescription.parse(answer_in)
    assert sd_in.media[0].proto == "RTP/AVP" and not sd_in.media[0].crypto
    await lab.edge.worker.wait_bound()
    await lab.gateway.worker.wait_bound()
    e_port = e_external_port(lab, offer)
    # C's pinhole, sent when the client's answer named E's demux ports, reached E's stream and
    # was dropped there: the client leg had not latched yet.
    c_leg = lab.edge.worker.table.get_stream("e-call#0").legs[1]
    await until(lambda: c_leg.rtp.not_latched_drops == 1 and c_leg.rtcp.not_latched_drops == 1)

    sender = SrtpContext.from_crypto(client_key, Direction.OUTBOUND)
    receiver = SrtpContext.from_crypto(chosen, Direction.INBOUND)
    await round_trip(lab, e_port, sender, range(7, 107))
    check_echoes(lab, e_port, receiver, range(7, 107))
    assert lab.gateway.snapshot()["calls"]["c-call"][0]["outside_srtp"] == chosen.suite


async def test_c_transcodes_in_the_native_forwarder_on_the_native_path(lab: Lab, relay_path: str) -> None:
    e_port, sender, receiver = await call_out(lab, "AES_CM_128_HMAC_SHA1_80")
    await round_trip(lab, e_port, sender, range(1, 101))
    check_echoes(lab, e_port, receiver, range(1, 101))
    worker = lab.gateway.snapshot()["worker"]
    if relay_path == "native" and fastpath.native_srtp():  # (built with libsrtp2: see setup.py)
        assert worker["fastpath"] == "native" and worker["srtp"] == "native"
        # Both directions once established; only a burst that arrived before the inside leg
        # latched (at most one batch) went through the table.
        # Flows: outside RTP and RTCP (E's address is known from SDP), inside RTP (latched by
        # the echo's first packet); the inside RTCP port has heard nothing, so it has none.
        assert worker["native"]["transcoded"] >= 200 - BATCH and worker["native"]["flows"] == 3
    else:
        assert worker["fastpath"] == relay_path and worker["srtp"] == "python"
        assert worker["srtp_primitives"] == "pylibsrtp"


async def test_media_metrics_per_leg_while_the_call_lives(lab: Lab) -> None:
    """``edge.media_metrics``: per-leg series of a live call on E and C, totals that agree."""
    e_port, sender, receiver = await call_out(lab, "AES_CM_128_HMAC_SHA1_80")
    await round_trip(lab, e_port, sender, range(1, 51))
    check_echoes(lab, e_port, receiver, range(1, 51))
    for media, legs in ((lab.edge, ("client", "c")), (lab.gateway, ("outside", "inside"))):
        samples = list(media_samples(media.snapshot()))
        per_leg = {
            (s.labels["leg"], s.labels["direction"]): s.value
            for s in samples
            if s.name == "edge_media_leg_packets_total"
        }
        assert {leg for leg, _ in per_leg} == set(legs)
        assert all(per_leg[(leg, "rx")] >= 50 for leg in legs), per_leg
        rx_total = next(
            s.value for s in samples if s.name == "edge_media_packets_total" and s.labels["direction"] == "rx"
        )
        assert rx_total >= sum(per_leg[(leg, "rx")] for leg in legs)
        assert {s.labels["stream"] for s in samples if "stream" in s.labels}
        names = {s.name for s in samples}
        assert {"edge_media_leg_lost", "edge_media_leg_jitter_ms", "edge_media_streams"} <= names
    assert "edge_media_leg_srtp_auth_failures" in {s.name for s in media_samples(lab.gateway.snapshot())}


@pytest.fixture
def two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every relay worker made after this spreads its ports over two forwarders (one thread)."""
    monkeypatch.setenv(THREADS_ENV_VAR, "2")


async def test_two_forwarder_threads_keep_order_and_counts(
    two_threads: None, lab: Lab, relay_path: str
) -> None:
    """``media_threads`` / ``EDGE_MEDIA_THREADS``: half of the ports are served by a thread of
    their own; a leg's first packets (through the table) are never overtaken by the next ones
    (native), and every echo comes back intact and in order."""
    e_port, sender, receiver = await call_out(lab, "AES_CM_128_HMAC_SHA1_80")
    await round_trip(lab, e_port, sender, range(1, 301))
    check_echoes(lab, e_port, receiver, range(1, 301))
    for media in (lab.edge, lab.gateway):
        worker = media.snapshot()["worker"]
        if relay_path == "native":
            assert worker["native"]["threads"] == 2
            assert worker["native"]["forwarded"] >= 300 - 2 * BATCH
            assert worker["native"]["handback_drops"] == 0
    totals = lab.gateway.snapshot()["totals"]
    assert totals["rx_packets"] >= 600 and totals["transcode_drops"] == 0

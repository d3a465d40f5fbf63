"""`edge client call`: an MRA call with SDES-SRTP media both ways, measured (spec §5, §7).

The client offers RTP/SAVP with its own `a=crypto`, sends G.711-like packets (160-byte payload,
20 ms, 50 pps) to whatever address the answer names (E's relay port once the edge anchors media),
and measures what comes back: packets, loss, jitter and round-trip time — the echo test number
9999 returns every packet, so one client alone proves both directions.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from edge.sip.address import Via
from edge.sip.dialog import Dialog
from edge.sip.message import Request, Response
from media_relay.rtp import RtpHeader
from media_relay.sdp import SessionDescription
from media_relay.srtp import CryptoAttribute, Direction, SrtpAuthError, SrtpContext, generate_crypto
from mra_client.edge_http import StepError
from mra_client.sip_ua import MraSipUa

PAYLOAD_BYTES = 160
PTIME_S = 0.02


@dataclass
class CallReport:
    target: str
    setup_ms: float = 0.0
    suite: str = ""
    remote: tuple[str, int] = ("", 0)
    sent: int = 0
    received: int = 0
    mismatched: int = 0
    auth_failures: int = 0
    loss_pct: float = 0.0
    jitter_ms: float = 0.0
    rtt_ms_p50: float = 0.0
    rtt_ms_p99: float = 0.0
    bye_status: int = 0
    rtts: list[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "rtts"}
        d["remote"] = f"{self.remote[0]}:{self.remote[1]}"
        return d


class _MediaSocket(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queue.put_nowait((data, time.perf_counter()))


def make_invite(sip: MraSipUa, target: str, port: int, ours: CryptoAttribute, kind: str = "call") -> Request:
    """An INVITE to ``target`` offering SDES-SRTP audio on our ``port`` (Call-ID ``<kind>-…``)."""
    body = offer_sdp(sip.local[0], port, ours, int.from_bytes(os.urandom(4), "big"))
    invite = sip._request(
        "INVITE",
        f"sip:{target}@{sip.domain}",
        to=f"<sip:{target}@{sip.domain}>",
        call_id=f"{kind}-{os.urandom(6).hex()}",
        from_tag=os.urandom(4).hex(),
        body=body,
        content_type="application/sdp",
    )
    invite.headers.add("Contact", f"<sip:{sip.dn}@{sip.local[0]}:{sip.local[1]};transport=tls>")
    return invite


def offer_sdp(address: str, port: int, crypto: CryptoAttribute, session_id: int) -> bytes:
    return (
        "v=0\r\n"
        f"o=mra-client {session_id} 1 IN IP4 {address}\r\n"
        "s=MRA call\r\n"
        f"c=IN IP4 {address}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/SAVP 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        f"a=rtcp:{port + 1}\r\n"
        f"{crypto.to_line()}\r\n"
        "a=sendrecv\r\n"
    ).encode()


async def place_call(
    sip: MraSipUa,
    target: str,
    seconds: float,
    *,
    suite: str = "AES_CM_128_HMAC_SHA1_80",
    answer_timeout_s: float = 15.0,
) -> CallReport:
    report = CallReport(target=target)
    loop = asyncio.get_running_loop()
    local_ip = sip.local[0]
    transport, proto = await loop.create_datagram_endpoint(_MediaSocket, local_addr=(local_ip, 0))
    try:
        port = int(transport.get_extra_info("sockname")[1])
        ours = generate_crypto(1, suite)
        invite = make_invite(sip, target, port, ours)
        started = time.perf_counter()
        try:
            resp = await sip.transact(invite, answer_timeout_s)
        except (TimeoutError, ConnectionError) as exc:
            raise StepError("INVITE", f"no answer from {target}: {exc or 'timeout'}") from exc
        report.setup_ms = round((time.perf_counter() - started) * 1000, 2)
        if resp.status_code != 200:
            raise StepError("INVITE", f"{resp.status_code} {resp.reason}")
        dialog = Dialog.from_uac(invite, resp)
        via = Via(sip.local[0], sip.local[1], "TLS")
        sip.send(dialog.make_request("ACK", via=via))
        try:
            remote, theirs = _parse_answer(resp)
        except StepError:
            await _bye(sip, dialog, via)
            raise
        report.remote = remote
        report.suite = theirs.suite
        await _media(proto, transport, remote, ours, theirs, seconds, report)
        report.bye_status = await _bye(sip, dialog, via)
        return report
    finally:
        transport.close()


def _parse_answer(resp: Response) -> tuple[tuple[str, int], CryptoAttribute]:
    try:
        sdp = SessionDescription.parse(resp.body)
        media = sdp.media[0]
        conn = media.connection or sdp.session.connection
        cryptos = media.crypto
    except (ValueError, IndexError) as exc:
        raise StepError("INVITE", f"unusable SDP answer: {exc}") from exc
    if conn is None or not cryptos:
        raise StepError("INVITE", "answer without connection address or a=crypto")
    return (conn.address, media.port), cryptos[0]


async def _bye(sip: MraSipUa, dialog: Dialog, via: Via) -> int:
    bye: Request = dialog.make_request("BYE", via=via)
    try:
        return (await sip.transact(bye, 10)).status_code
    except (TimeoutError, ConnectionError):
        return 0


async def _media(
    proto: _MediaSocket,
    transport: asyncio.DatagramTransport,
    remote: tuple[str, int],
    ours: CryptoAttribute,
    theirs: CryptoAttribute,
    seconds: float,
    report: CallReport,
) -> None:
    out_ctx = SrtpContext.from_crypto(ours, Direction.OUTBOUND)
    in_ctx = SrtpContext.from_crypto(theirs, Direction.INBOUND)
    ssrc = int.from_bytes(os.urandom(4), "big")
    count = max(1, int(seconds / PTIME_S))
    sent_at: dict[int, float] = {}
    payloads: dict[int, bytes] = {}

    async def sender() -> None:
        start = time.perf_counter()
        for i in range(count):
            seq = i & 0xFFFF
            payload = struct.pack(">I", i) + os.urandom(PAYLOAD_BYTES - 4)
            header = struct.pack(">BBHII", 0x80, 0, seq, (i * 160) & 0xFFFFFFFF, ssrc)
            sent_at[i] = time.perf_counter()
            payloads[i] = payload
            transport.sendto(out_ctx.protect(header + payload), remote)
            report.sent += 1
            delay = start + (i + 1) * PTIME_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

    send_task = asyncio.ensure_future(sender())
    prev_transit: float | None = None
    jitter = 0.0
    deadline = time.perf_counter() + seconds + 2.0
    while time.perf_counter() < deadline and report.received < count:
        try:
            data, arrived = await asyncio.wait_for(
                proto.queue.get(), max(0.01, deadline - time.perf_counter())
            )
        except TimeoutError:
            break
        try:
            plain = in_ctx.unprotect(data)
        except SrtpAuthError:
            report.auth_failures += 1
            continue
        header = RtpHeader.parse(plain)
        body = plain[12:]
        index = struct.unpack(">I", body[:4])[0] if len(body) >= 4 else -1
        if index not in payloads or payloads[index] != body:
            report.mismatched += 1
            continue
        report.received += 1
        rtt = arrived - sent_at[index]
        report.rtts.append(rtt * 1000)
        transit = arrived - sent_at[index]
        if prev_transit is not None:  # RFC 3550 A.8 on the echo path, in seconds
            jitter += (abs(transit - prev_transit) - jitter) / 16
        prev_transit = transit
        _ = header
    await send_task
    report.loss_pct = round(100.0 * (report.sent - report.received) / report.sent, 3)
    report.jitter_ms = round(jitter * 1000, 3)
    if report.rtts:
        ordered = sorted(report.rtts)
        report.rtt_ms_p50 = round(ordered[len(ordered) // 2], 3)
        report.rtt_ms_p99 = round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3)

"""The echo test number (spec §9 [lab]): SDP answer planning and the sans-IO echo media session.

The echo answers the first usable audio stream of the offer and returns every datagram to its
source. Plain RTP/AVP is echoed as is. For RTP/SAVP with SDES (RFC 4568) a byte-identical echo
would fail the offerer's authentication (it expects our key), so SRTP is unprotected with the
offered key and re-protected with our own (pylibsrtp via media_relay.srtp). Other profiles
(SAVPF, DTLS-SRTP) are rejected; an offer with nothing usable gets 488 (RFC 3264 §6).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from media_relay.sdp import MediaSection, SdpError, SessionDescription
from media_relay.srtp import (
    CryptoAttribute,
    Direction,
    SrtpContext,
    SrtpError,
    SrtpTranscoder,
    generate_crypto,
    negotiate,
)

PLAIN = "RTP/AVP"
SECURE = "RTP/SAVP"
_KEPT_ATTRIBUTES = ("rtpmap", "fmtp")
_MIRROR = {"sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}
# Delayed offer (INVITE without SDP): UCM offers G.711 and telephone-events in its 200 OK.
_DEFAULT_FORMATS = ("0", "8", "101")
_DEFAULT_ATTRIBUTES = ("a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000", "a=rtpmap:101 telephone-event/8000")


class EchoNotAcceptable(ValueError):
    """No audio stream of the offer can be echoed: answer 488 Not Acceptable Here."""


@dataclass
class EchoPlan:
    """What the echo will answer, decided before a socket exists (the port comes later)."""

    proto: str
    formats: list[str]
    attributes: list[str]
    direction: str = "sendrecv"
    remote_crypto: CryptoAttribute | None = None
    local_crypto: CryptoAttribute | None = None
    rejected: list[str] = field(default_factory=list)  # m= lines of other streams, port 0
    audio_index: int = 0
    session_id: int = field(default_factory=lambda: secrets.randbelow(2**31))

    def render(self, address: str, port: int) -> bytes:
        """The SDP answer: the audio stream on (address, port), every other stream refused."""
        family = "IP6" if ":" in address else "IP4"
        lines = [
            "v=0",
            f"o=CiscoSystemsCCM-SIP {self.session_id} 1 IN {family} {address}",
            "s=SIP Call",
            f"c=IN {family} {address}",
            "t=0 0",
        ]
        media = [
            f"m=audio {port} {self.proto} {' '.join(self.formats)}",
            *self.attributes,
            *([self.local_crypto.to_line()] if self.local_crypto is not None else []),
            f"a={self.direction}",
        ]
        streams = list(self.rejected)
        streams.insert(self.audio_index, "\r\n".join(media))  # answer keeps the offer's m= order
        return ("\r\n".join(lines + streams) + "\r\n").encode()

    def session(self) -> EchoSession:
        inbound = outbound = None
        if self.remote_crypto is not None and self.local_crypto is not None:
            inbound = SrtpContext.from_crypto(self.remote_crypto, Direction.INBOUND)
            outbound = SrtpContext.from_crypto(self.local_crypto, Direction.OUTBOUND)
        return EchoSession(SrtpTranscoder(inbound, outbound))


def plan_echo(offer: bytes) -> EchoPlan:
    """Pick the stream to echo from an SDP offer (empty body: delayed offer, we offer G.711)."""
    if not offer.strip():
        return EchoPlan(PLAIN, list(_DEFAULT_FORMATS), list(_DEFAULT_ATTRIBUTES))
    try:
        sdp = SessionDescription.parse(offer)
    except SdpError as exc:
        raise EchoNotAcceptable(f"unreadable SDP: {exc}") from None
    plan: EchoPlan | None = None
    rejected: list[str] = []
    for index, m in enumerate(sdp.media):
        if plan is None and m.media == "audio" and m.port != 0 and m.proto in (PLAIN, SECURE):
            plan = _plan_audio(m, index)
            if plan is not None:
                continue
        rejected.append(f"m={m.media} 0 {m.proto} {' '.join(m.formats)}")
    if plan is None:
        raise EchoNotAcceptable("no RTP/AVP or SDES RTP/SAVP audio stream")
    plan.rejected = rejected
    return plan


def _plan_audio(m: MediaSection, index: int) -> EchoPlan | None:
    remote = local = None
    if m.proto == SECURE:
        remote = negotiate(m.crypto)
        if remote is None:
            return None
        local = generate_crypto(remote.tag, remote.suite)
    formats = m.formats
    attributes = [
        f"a={name}:{value}"
        for name in _KEPT_ATTRIBUTES
        for value in m.attribute_values(name)
        if value is not None and value.split(" ", 1)[0] in formats
    ]
    if m.rtcp_mux:
        attributes.append("a=rtcp-mux")
    direction = _MIRROR.get(m.direction or "sendrecv", "sendrecv")
    return EchoPlan(m.proto, formats, attributes, direction, remote, local, audio_index=index)


@dataclass
class EchoSession:
    """One call's echo: feed each datagram, send back what it returns (None: drop)."""

    transcoder: SrtpTranscoder
    packets: int = 0
    octets: int = 0
    dropped: int = 0

    def receive_datagram(self, data: bytes) -> bytes | None:
        if len(data) < 2:
            self.dropped += 1
            return None
        rtcp = 192 <= data[1] <= 223  # RFC 5761 §4: RTCP packet types on a muxed port
        try:
            out = self.transcoder.transcode(data, rtcp)
        except SrtpError:
            self.dropped += 1
            return None
        self.packets += 1
        self.octets += len(data)
        return out

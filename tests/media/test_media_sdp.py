"""Minimal SDP: byte-exact round trip and the rewrites C's B2BUA needs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_relay.sdp import Connection, RtcpAttribute, SdpError, SessionDescription
from media_relay.srtp import CryptoAttribute, generate_crypto

KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"

# Shaped like a Jabber MRA offer: x-cisco attributes, two crypto lines, audio + video + BFCP.
JABBER = (
    "v=0\r\n"
    "o=Cisco-SIPUA 11111 0 IN IP4 192.168.1.20\r\n"
    "s=SIP Call\r\n"
    "b=AS:4064\r\n"
    "t=0 0\r\n"
    "a=cisco-mari:v1\r\n"
    "a=cisco-mari-rate\r\n"
    "m=audio 24580 RTP/SAVP 114 9 0 8 101\r\n"
    "c=IN IP4 192.168.1.20\r\n"
    "b=TIAS:64000\r\n"
    f"a=crypto:0 AES_CM_128_HMAC_SHA1_80 inline:{KEY}\r\n"
    f"a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:{KEY}|2^31\r\n"
    "a=rtpmap:114 opus/48000/2\r\n"
    "a=fmtp:114 maxplaybackrate=16000;sprop-maxcapturerate=16000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=sendrecv\r\n"
    "m=video 24582 RTP/SAVP 126 97\r\n"
    "c=IN IP4 192.168.1.20\r\n"
    "a=rtpmap:126 H264/90000\r\n"
    "a=rtcp-fb:* nack pli\r\n"
    "a=x-cisco-weird   spacing  kept \r\n"
    "a=content:main\r\n"
    "a=label:11\r\n"
    "m=application 5070 UDP/BFCP *\r\n"
    "a=floorctrl:c-s\r\n"
)


def test_round_trip_byte_exact() -> None:
    raw = JABBER.encode()
    sd = SessionDescription.parse(raw)
    assert bytes(sd) == raw
    assert [m.media for m in sd.media] == ["audio", "video", "application"]


@pytest.mark.parametrize(
    "raw",
    [
        b"v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 4000 RTP/AVP 0\n",
        b"v=0\r\ns=-\r\nm=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000",  # no final CRLF
        b"v=0\r\ns=caf\xc3\xa9 \xff\xfe raw bytes\r\n\r\n",  # non-UTF-8 and an empty line
        b"v=0\r\nm=audio 0 RTP/AVP 0\r\nm=video 0 RTP/AVP 31\r\n",
    ],
)
def test_round_trip_variants(raw: bytes) -> None:
    assert bytes(SessionDescription.parse(raw)) == raw


@given(
    st.lists(
        st.from_regex(r"[a-z]=[ -~]{0,30}", fullmatch=True).filter(lambda s: not s.startswith("m=")),
        max_size=15,
    ),
    st.sampled_from(["\r\n", "\n"]),
)
def test_round_trip_property(lines: list[str], eol: str) -> None:
    raw = eol.join(["v=0", *lines, "m=audio 9 RTP/AVP 0", *lines]) + eol
    assert bytes(SessionDescription.parse(raw.encode())) == raw.encode()


def test_rewrite_for_the_outer_leg() -> None:
    """What C does to an inside endpoint's plain-RTP answer before sending it towards E."""
    sd = SessionDescription.parse(JABBER.encode())
    audio = sd.media[0]
    assert audio.port == 24580 and audio.proto == "RTP/SAVP"
    assert sd.media_connection(0) == Connection("192.168.1.20")
    assert [c.tag for c in audio.crypto] == [0, 1]
    assert audio.crypto[1].keys[0].lifetime == "2^31"
    assert audio.direction == "sendrecv"
    assert audio.clock_rate() == 48000
    assert audio.clock_rate("101") == 8000

    mine = generate_crypto(0, "AES_CM_128_HMAC_SHA1_80")
    audio.set_port(36002)
    audio.set_connection("127.10.3.1")
    audio.set_crypto([mine])
    audio.set_rtcp(RtcpAttribute(36003))
    audio.set_direction("sendonly")
    sd.set_origin_address("127.10.3.1")
    sd.bump_origin_version()
    out = bytes(sd).decode()

    assert "m=audio 36002 RTP/SAVP 114 9 0 8 101\r\n" in out
    assert out.count("a=crypto:") == 1
    assert f"{mine.to_line()}\r\n" in out
    assert "a=sendonly\r\n" in out and "a=sendrecv" not in out
    assert "a=rtcp:36003\r\n" in out
    assert "o=Cisco-SIPUA 11111 1 IN IP4 127.10.3.1\r\n" in out
    # The crypto line stays where the old ones were (before rtpmap); everything else is untouched.
    lines = out.split("\r\n")
    assert lines.index(mine.to_line()) == lines.index("b=TIAS:64000") + 1
    assert "a=x-cisco-weird   spacing  kept \r\n" in out
    assert out.split("m=video", 1)[1] == JABBER.split("m=video", 1)[1]
    reparsed = SessionDescription.parse(out.encode())
    assert reparsed.media[0].crypto == [mine]
    assert reparsed.media[0].rtcp == RtcpAttribute(36003)
    assert reparsed.media_connection(0) == Connection("127.10.3.1")


def test_plain_rtp_towards_inside_drops_crypto_and_profile() -> None:
    sd = SessionDescription.parse(JABBER.encode())
    audio = sd.media[0]
    audio.set_crypto([])
    audio.set_proto("RTP/AVP")
    out = bytes(sd).decode()
    assert "a=crypto" not in out.split("m=video")[0]
    assert "m=audio 24580 RTP/AVP 114 9 0 8 101\r\n" in out


def test_session_connection_and_additions() -> None:
    raw = b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    sd = SessionDescription.parse(raw)
    assert sd.connection is None and sd.media_connection(0) is None
    sd.set_connection("2001:db8::1")
    assert sd.connection == Connection("2001:db8::1", "IP6")
    sd.media[0].set_rtcp(RtcpAttribute(4001, Connection("10.0.0.9")))
    sd.media[0].set_crypto([CryptoAttribute.parse(f"1 AES_CM_128_HMAC_SHA1_80 inline:{KEY}")])
    sd.media[0].set_direction("inactive")
    assert bytes(sd) == (
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP6 2001:db8::1\r\nt=0 0\r\n"
        b"m=audio 4000 RTP/AVP 0\r\na=rtcp:4001 IN IP4 10.0.0.9\r\n"
        b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + KEY.encode() + b"\r\na=inactive\r\n"
    )
    sd.media[0].set_rtcp(None)
    assert b"a=rtcp" not in bytes(sd)
    assert sd.media[0].rtcp_mux is False


def test_media_level_connection_inserted_after_m_line_and_no_final_eol_kept() -> None:
    sd = SessionDescription.parse(b"v=0\nm=audio 4000 RTP/AVP 0\na=rtpmap:0 PCMU/8000")
    sd.media[0].set_connection("10.1.1.1")
    sd.media[0].set_attribute("rtcp-mux", None)
    assert bytes(sd) == b"v=0\nm=audio 4000 RTP/AVP 0\nc=IN IP4 10.1.1.1\na=rtpmap:0 PCMU/8000\na=rtcp-mux"
    assert sd.media[0].rtcp_mux


def test_port_count_kept_and_malformed_crypto_ignored() -> None:
    raw = b"v=0\r\nm=audio 4000/2 RTP/AVP 0\r\na=crypto:garbage\r\na=crypto:1 FOO inline:QUJD\r\n"
    sd = SessionDescription.parse(raw)
    sd.media[0].set_port(5000)
    assert sd.media[0].port == 5000
    assert b"m=audio 5000/2 RTP/AVP 0\r\n" in bytes(sd)
    assert [c.suite for c in sd.media[0].crypto] == ["FOO"]


@pytest.mark.parametrize(
    "raw", [b"", b"o=- 1 1 IN IP4 1.2.3.4\r\n", b"v=0\r\nm=audio\r\n", b"v=0\r\nm=a x RTP/AVP 0\r\n"]
)
def test_malformed_sdp(raw: bytes) -> None:
    with pytest.raises(SdpError):
        SessionDescription.parse(raw)

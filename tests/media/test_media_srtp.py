"""SDES a=crypto codec (RFC 4568) and SRTP/SRTCP contexts over pylibsrtp, incl. C's transcoding."""

from __future__ import annotations

import base64
import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_relay.srtp import (
    KNOWN_SUITES,
    SUITES,
    CryptoAttribute,
    Direction,
    KeyParams,
    SdesError,
    SrtpAuthError,
    SrtpContext,
    SrtpError,
    SrtpTranscoder,
    SrtpUnsupportedError,
    check_usable,
    generate_crypto,
    negotiate,
)

# RFC 4568 §9.1 example key (30 bytes).
RFC_KEY = "PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"


def rtp(seq: int, ssrc: int = 0xCAFE) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, ssrc) + bytes(range(160))


def rtcp_rr(ssrc: int = 0xCAFE) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


# -- SDES -----------------------------------------------------------------------------------------


def test_parse_rfc4568_example_with_lifetime_and_mki() -> None:
    line = f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|2^20|1:4"
    attr = CryptoAttribute.parse(line)
    assert attr.tag == 1
    assert attr.suite == "AES_CM_128_HMAC_SHA1_80"
    key = attr.keys[0]
    assert key.key_salt == base64.b64decode(RFC_KEY)
    assert len(key.key_salt) == 30
    assert (key.lifetime, key.lifetime_packets) == ("2^20", 1 << 20)
    assert (key.mki, key.mki_length) == (1, 4)
    assert attr.to_line() == line


@pytest.mark.parametrize(
    "value",
    [
        f"1 AES_CM_128_HMAC_SHA1_32 inline:{RFC_KEY}",
        f"7 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|1048576",
        f"2 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|5:2",
        f"3 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|2^20|1:4;inline:{RFC_KEY}|2^20|2:4",
        f"4 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY} KDR=1 UNENCRYPTED_SRTCP",
    ],
)
def test_round_trip(value: str) -> None:
    assert str(CryptoAttribute.parse(value)) == value


def test_lifetime_decimal() -> None:
    attr = CryptoAttribute.parse(f"7 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|1048576")
    assert attr.keys[0].lifetime_packets == 1048576
    assert attr.keys[0].mki is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1 AES_CM_128_HMAC_SHA1_80",
        f"x AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}",
        "1 AES_CM_128_HMAC_SHA1_80 inline:not*base64",
        f"1 AES_CM_128_HMAC_SHA1_80 key:{RFC_KEY}",
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|2^x",
        f"1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|1:0",
        "1 AES_CM_128_HMAC_SHA1_80 inline:QUJD=",
    ],
)
def test_malformed_rejected(value: str) -> None:
    with pytest.raises(SdesError):
        CryptoAttribute.parse(value)


@given(st.text(max_size=80))
def test_parse_never_raises_other_errors(value: str) -> None:
    with contextlib.suppress(SdesError):
        CryptoAttribute.parse(value)


@pytest.mark.parametrize(
    ("suite", "length"),
    [
        ("AES_CM_128_HMAC_SHA1_80", 30),
        ("AES_CM_128_HMAC_SHA1_32", 30),
        ("AEAD_AES_128_GCM", 28),
        ("AEAD_AES_256_GCM", 44),
    ],
)
def test_generate_crypto(suite: str, length: int) -> None:
    attr = generate_crypto(5, suite)
    assert attr.tag == 5 and attr.suite == suite and len(attr.key_salt) == length
    assert CryptoAttribute.parse(attr.to_line()) == attr
    assert check_usable(attr).key_salt_bytes == length
    assert generate_crypto(5, suite).key_salt != attr.key_salt


def test_all_four_suites_available_in_installed_libsrtp() -> None:
    assert set(SUITES) == set(KNOWN_SUITES)


def test_unsupported_things_refused_at_negotiation() -> None:
    with pytest.raises(SrtpUnsupportedError):
        generate_crypto(1, "F8_128_HMAC_SHA1_80")
    with_mki = CryptoAttribute.parse(f"1 AES_CM_128_HMAC_SHA1_80 inline:{RFC_KEY}|2^20|1:4")
    with pytest.raises(SrtpUnsupportedError):
        check_usable(with_mki)
    wrong_len = CryptoAttribute(1, "AEAD_AES_256_GCM", (KeyParams(bytes(30)),))
    with pytest.raises(SdesError):
        check_usable(wrong_len)
    offers = [
        with_mki,
        CryptoAttribute.parse(f"2 F8_128_HMAC_SHA1_80 inline:{RFC_KEY}"),
        generate_crypto(3, "AEAD_AES_128_GCM"),
        generate_crypto(4, "AES_CM_128_HMAC_SHA1_32"),
    ]
    chosen = negotiate(offers)
    assert chosen is not None and chosen.tag == 4  # GCM not allowed unless the UCM option is on
    gcm = negotiate(offers, allowed=("AEAD_AES_128_GCM", "AES_CM_128_HMAC_SHA1_80"))
    assert gcm is not None and gcm.tag == 3
    assert negotiate(offers[:2]) is None


# -- SRTP -----------------------------------------------------------------------------------------


def pair(suite: str) -> tuple[SrtpContext, SrtpContext]:
    attr = generate_crypto(1, suite)
    return SrtpContext.from_crypto(attr, Direction.OUTBOUND), SrtpContext.from_crypto(attr, Direction.INBOUND)


@pytest.mark.parametrize("suite", KNOWN_SUITES)
def test_rtp_round_trip_and_tamper(suite: str) -> None:
    tx, rx = pair(suite)
    for seq in range(1, 20):
        packet = rtp(seq)
        protected = tx.protect(packet)
        assert protected != packet and protected[:12] == packet[:12]
        assert rx.unprotect(protected) == packet
    tampered = bytearray(tx.protect(rtp(50)))
    tampered[-1] ^= 0x01
    with pytest.raises(SrtpAuthError):
        rx.unprotect(bytes(tampered))
    # The tag check protects the payload too.
    tampered2 = bytearray(tx.protect(rtp(51)))
    tampered2[20] ^= 0x80
    with pytest.raises(SrtpAuthError):
        rx.unprotect(bytes(tampered2))


@pytest.mark.parametrize("suite", KNOWN_SUITES)
def test_rtcp_round_trip_and_tamper(suite: str) -> None:
    tx, rx = pair(suite)
    packet = rtcp_rr()
    protected = tx.protect_rtcp(packet)
    assert rx.unprotect_rtcp(protected) == packet
    bad = bytearray(tx.protect_rtcp(packet))
    bad[-1] ^= 0xFF
    with pytest.raises(SrtpAuthError):
        rx.unprotect_rtcp(bytes(bad))


def test_replay_and_wrong_key_are_auth_errors() -> None:
    tx, rx = pair("AES_CM_128_HMAC_SHA1_80")
    protected = tx.protect(rtp(1))
    rx.unprotect(protected)
    with pytest.raises(SrtpAuthError):
        rx.unprotect(protected)
    _, other_rx = pair("AES_CM_128_HMAC_SHA1_80")
    with pytest.raises(SrtpAuthError):
        other_rx.unprotect(tx.protect(rtp(2)))


def test_too_long_packet_is_an_srtp_error() -> None:
    tx, _ = pair("AES_CM_128_HMAC_SHA1_80")
    with pytest.raises(SrtpError):
        tx.protect(rtp(1) + bytes(1400))


def test_context_rejects_bad_key_length() -> None:
    with pytest.raises(SdesError):
        SrtpContext("AES_CM_128_HMAC_SHA1_80", bytes(16), Direction.INBOUND)


# -- C's B2BUA transcoding ------------------------------------------------------------------------


def test_transcode_srtp_to_rtp_and_back() -> None:
    client_key = generate_crypto(1, "AES_CM_128_HMAC_SHA1_80")  # what the MRA client offered
    c_key = generate_crypto(1, "AES_CM_128_HMAC_SHA1_80")  # what C announced on the outer leg
    client_tx = SrtpContext.from_crypto(client_key, Direction.OUTBOUND)
    client_rx = SrtpContext.from_crypto(c_key, Direction.INBOUND)
    # Outside -> inside plain RTP endpoint (it did not offer SRTP).
    to_inside = SrtpTranscoder(SrtpContext.from_crypto(client_key, Direction.INBOUND), None)
    # Inside -> outside: protect with C's key.
    to_outside = SrtpTranscoder(None, SrtpContext.from_crypto(c_key, Direction.OUTBOUND))
    for seq in range(1, 10):
        assert to_inside.transcode(client_tx.protect(rtp(seq)), rtcp=False) == rtp(seq)
        assert client_rx.unprotect(to_outside.transcode(rtp(seq, ssrc=7), rtcp=False)) == rtp(seq, ssrc=7)
    assert to_inside.transcode(client_tx.protect_rtcp(rtcp_rr()), rtcp=True) == rtcp_rr()
    assert client_rx.unprotect_rtcp(to_outside.transcode(rtcp_rr(7), rtcp=True)) == rtcp_rr(7)
    bad = bytearray(client_tx.protect(rtp(99)))
    bad[-2] ^= 1
    with pytest.raises(SrtpAuthError):
        to_inside.transcode(bytes(bad), rtcp=False)


def test_transcode_srtp_to_srtp_with_different_suites() -> None:
    a_key = generate_crypto(1, "AES_CM_128_HMAC_SHA1_32")
    b_key = generate_crypto(1, "AEAD_AES_256_GCM")
    t = SrtpTranscoder(
        SrtpContext.from_crypto(a_key, Direction.INBOUND), SrtpContext.from_crypto(b_key, Direction.OUTBOUND)
    )
    a_tx = SrtpContext.from_crypto(a_key, Direction.OUTBOUND)
    b_rx = SrtpContext.from_crypto(b_key, Direction.INBOUND)
    assert b_rx.unprotect(t.transcode(a_tx.protect(rtp(3)), rtcp=False)) == rtp(3)
    assert SrtpTranscoder(None, None).transcode(rtp(4), rtcp=False) == rtp(4)
    with pytest.raises(ValueError):
        SrtpTranscoder(a_tx, None)

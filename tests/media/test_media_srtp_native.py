"""Native SRTP (``media_relay/_srtp.c`` over the system libsrtp2) against pylibsrtp, in one process.

pylibsrtp links its own static libsrtp (and OpenSSL); the extension links Debian's libsrtp2.so
(NSS inside, with OpenSSL's AES/SHA-1 plugged in by ``_srtp_ossl.c``). Both are initialised in
this process: every test here uses the two side by side, byte for byte.
"""

from __future__ import annotations

import os
import struct

import pylibsrtp
import pytest

from media_relay import _fastpath, fastpath
from media_relay.srtp import (
    KNOWN_SUITES,
    SUITES,
    Direction,
    SrtpAuthError,
    SrtpContext,
    SrtpError,
    SrtpTranscoder,
    SrtpUnsupportedError,
    generate_crypto,
)


def test_the_extension_has_native_srtp() -> None:
    assert fastpath.built(), "media_relay._fastpath is not built: pip install -e . (gcc, python3-dev)"
    assert _fastpath.HAVE_SRTP, "built without libsrtp2: install libsrtp2-dev and rebuild"
    assert _fastpath.SRTP_VERSION.startswith("libsrtp2 2.")
    assert _fastpath.SRTP_PRIMITIVES in ("openssl", "libsrtp")
    assert set(SUITES) == set(KNOWN_SUITES)  # pylibsrtp and libsrtp2 both do all four


def rtp(seq: int, ssrc: int = 0x1234, size: int = 172) -> bytes:
    head = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * 160) & 0xFFFFFFFF, ssrc)
    return head + bytes((seq + i) & 0xFF for i in range(size - 12))


def rtcp_rr(ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


def contexts(suite: str, key: bytes, direction: Direction) -> tuple[SrtpContext, SrtpContext]:
    """(pylibsrtp, native) contexts of the same key."""
    py = SrtpContext(suite, key, direction, native=False)
    nat = SrtpContext(suite, key, direction, native=True)
    assert py.native is None and nat.native is not None
    return py, nat


@pytest.mark.parametrize("suite", KNOWN_SUITES)
def test_both_libraries_protect_byte_identically_across_a_rollover(suite: str) -> None:
    key = generate_crypto(1, suite).key_salt
    py_tx, nat_tx = contexts(suite, key, Direction.OUTBOUND)
    py_rx, nat_rx = contexts(suite, key, Direction.INBOUND)
    for k in range(300):  # seq 65400.. wraps: the rollover counter goes to 1 in both
        for ssrc in (0x1234, 0xBEEF):
            packet = rtp(65400 + k, ssrc, size=12 + (k * 7) % 200)
            a, b = py_tx.protect(packet), nat_tx.protect(packet)
            assert a == b
            assert nat_rx.unprotect(a) == packet and py_rx.unprotect(b) == packet
        if k % 50 == 0:
            a, b = py_tx.protect_rtcp(rtcp_rr()), nat_tx.protect_rtcp(rtcp_rr())
            assert a == b
            assert nat_rx.unprotect_rtcp(a) == rtcp_rr() and py_rx.unprotect_rtcp(b) == rtcp_rr()


@pytest.mark.parametrize("suite", KNOWN_SUITES)
def test_both_libraries_refuse_the_same_packets_the_same_way(suite: str) -> None:
    key = generate_crypto(1, suite).key_salt
    tx = SrtpContext(suite, key, Direction.OUTBOUND, native=False)
    receivers = contexts(suite, key, Direction.INBOUND)
    good = [tx.protect(rtp(s)) for s in range(1, 6)]
    forged = bytearray(tx.protect(rtp(6)))
    forged[-1] ^= 1
    garbled = bytearray(tx.protect(rtp(7)))
    garbled[20] ^= 0x80
    cases: list[tuple[bytes, type[Exception] | None]] = [
        (good[0], None),
        (good[0], SrtpAuthError),  # replay
        (good[2], None),
        (good[1], None),  # late but inside the window
        (bytes(forged), SrtpAuthError),
        (bytes(garbled), SrtpAuthError),
        (good[1][:10], SrtpError),  # shorter than an RTP header
        (rtp(8) + bytes(1400), SrtpError),  # longer than either binding takes (1500)
    ]
    for packet, error in cases:
        outcomes: list[bytes | type[Exception]] = []
        for rx in receivers:
            try:
                outcomes.append(rx.unprotect(packet))
            except SrtpError as exc:
                outcomes.append(type(exc))
        assert outcomes[0] == outcomes[1], (packet[:4], outcomes)
        if error is None:
            assert isinstance(outcomes[0], bytes)
        else:
            assert outcomes[0] is error
    for native in (False, True):  # over pylibsrtp's protect limit (1356): both refuse it
        with pytest.raises(SrtpError) as info:
            SrtpContext(suite, key, Direction.OUTBOUND, native=native).protect(rtp(9, size=1357))
        assert not isinstance(info.value, SrtpAuthError)
        SrtpContext(suite, key, Direction.OUTBOUND, native=native).protect(rtp(9, size=1356))


def test_pylibsrtp_still_works_with_the_native_library_loaded() -> None:
    """Two libsrtp copies, two crypto kernels: creating and using sessions interleaved is fine."""
    key = os.urandom(30)
    policy = pylibsrtp.Policy(
        key=key,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND,
        srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    )
    for _ in range(20):
        raw = pylibsrtp.Session(policy)
        nat = _fastpath.SrtpSession(pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, key, True)
        assert raw.protect(rtp(1)) == nat.protect(rtp(1))


def test_native_session_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        _fastpath.SrtpSession(1, bytes(29), True)  # key||salt of the wrong length
    with pytest.raises(ValueError):
        _fastpath.SrtpSession(99, bytes(30), True)  # no such profile
    tx = _fastpath.SrtpSession(1, bytes(30), True)
    rx = _fastpath.SrtpSession(1, bytes(30), False)
    with pytest.raises(TypeError):
        tx.protect(bytearray(rtp(1)))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _fastpath.Transcoder(tx, None)  # an outbound session where the inbound one goes
    with pytest.raises(TypeError):
        _fastpath.Transcoder("x", None)  # type: ignore[arg-type]
    t = _fastpath.Transcoder(rx, tx)
    assert t.inbound is rx and t.outbound is tx and t.auth_failures == 0


def test_a_sessions_rollover_counter_can_be_read_and_moved_on() -> None:
    """``roc``/``set_roc`` (C's kernel SRTP flows take libsrtp's index over and hand it back):
    None before an SSRC's first packet, the ROC after; a ROC set for an SSRC is what the next
    packet's index uses (libsrtp applies it then): the same bytes as a session that got there."""
    key = os.urandom(30)
    tx = _fastpath.SrtpSession(1, key, True)
    assert tx.roc(0x1234) is None and tx.set_roc(0x1234, 1) is False  # no stream yet
    tx.protect(rtp(65535))
    assert tx.roc(0x1234) == 0
    tx.protect(rtp(0))  # the wrap
    assert tx.roc(0x1234) == 1 and tx.roc(0x9999) is None
    moved = _fastpath.SrtpSession(1, key, True)
    moved.protect(rtp(5))  # ROC 0 here ...
    assert moved.set_roc(0x1234, 1) is True  # ... until a kernel flow took it to 1
    assert moved.protect(rtp(6)) == tx.protect(rtp(6))  # index 65,542 in both
    for bad in (-1, 1 << 32):
        with pytest.raises((ValueError, OverflowError)):
            tx.roc(bad)
        with pytest.raises((ValueError, OverflowError)):
            tx.set_roc(0x1234, bad)


@pytest.mark.parametrize("suite", KNOWN_SUITES)
def test_transcoders_on_both_bindings_agree_and_count_auth_failures(suite: str) -> None:
    their = generate_crypto(1, suite)
    ours = generate_crypto(1, "AES_CM_128_HMAC_SHA1_80")
    peer_tx = SrtpContext.from_crypto(their, Direction.OUTBOUND, native=False)
    transcoders = [
        SrtpTranscoder(
            SrtpContext.from_crypto(their, Direction.INBOUND, native=native),
            SrtpContext.from_crypto(ours, Direction.OUTBOUND, native=native),
        )
        for native in (False, True)
    ]
    assert transcoders[0].native is None and transcoders[1].native is not None
    for seq in range(1, 40):
        packet = peer_tx.protect(rtp(seq))
        if seq % 9 == 0:
            packet = packet[:-1] + bytes([packet[-1] ^ 0xFF])
        outs = []
        for t in transcoders:
            try:
                outs.append(t.transcode(packet, rtcp=False))
            except SrtpAuthError:
                outs.append(b"auth")
        assert outs[0] == outs[1]
    assert transcoders[0].auth_failures == transcoders[1].auth_failures == 4
    plain = [SrtpTranscoder(None, None) for _ in range(2)]
    assert plain[1].native is not None or not fastpath.native_srtp()
    assert [t.transcode(rtp(3), rtcp=False) for t in plain] == [rtp(3), rtp(3)]


def test_a_suite_the_native_library_refuses_falls_back_to_pylibsrtp(monkeypatch: pytest.MonkeyPatch) -> None:
    """(A libsrtp2 built without GCM, say): that key's contexts use pylibsrtp, its transcoders
    have no native half, so the forwarder leaves the leg to the Python path."""

    class NoGcm:
        def __init__(self, profile: int, key_salt: bytes, outbound: bool) -> None:
            raise ValueError(f"SRTP profile {profile} is not supported by libsrtp")

    monkeypatch.setattr(_fastpath, "SrtpSession", NoGcm)  # (what media_relay.srtp calls)
    key = generate_crypto(1, "AEAD_AES_128_GCM")
    auto = SrtpContext.from_crypto(key, Direction.INBOUND)
    assert auto.native is None
    assert SrtpTranscoder(auto, None).native is None
    with pytest.raises(SrtpUnsupportedError):
        SrtpContext.from_crypto(key, Direction.INBOUND, native=True)
    tx = SrtpContext.from_crypto(key, Direction.OUTBOUND, native=False)
    assert auto.unprotect(tx.protect(rtp(1))) == rtp(1)

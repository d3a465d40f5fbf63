"""Digest authentication: RFC 2617 vector, challenge/response round trip, stateless nonces."""

from __future__ import annotations

from edge.sip.auth import (
    DigestChallenge,
    DigestCredentials,
    DigestVerdict,
    DigestVerifier,
    compute_authorization,
    compute_response,
)


def test_rfc2617_example_vector() -> None:
    # RFC 2617 §3.5 (its published digest for these inputs).
    got = compute_response(
        username="Mufasa", password="Circle Of Life", realm="testrealm@host.com",
        nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", method="GET", uri="/dir/index.html",
        qop="auth", nc="00000001", cnonce="0a4f113b",
    )  # fmt: skip
    assert got == "6629fae49393a05397450978507c4ef1"


def test_challenge_header_round_trip() -> None:
    ch = DigestChallenge("example.com", "n0nce", opaque="op", qop="auth", stale=True)
    assert (
        ch.to_header()
        == 'Digest realm="example.com", nonce="n0nce", opaque="op", algorithm=MD5, qop="auth", stale=true'
    )
    assert DigestChallenge.parse(ch.to_header()) == ch


def test_client_answer_verifies_and_wrong_password_fails() -> None:
    v = DigestVerifier("example.com", b"k" * 32, nonce_ttl_s=300)
    header = v.challenge(1000.0).to_header()
    auth = compute_authorization(
        header, "REGISTER", "sip:example.com", "alice", "lab-pass", nc=1, cnonce="abc"
    )
    cred = DigestCredentials.parse(auth)
    assert (cred.username, cred.qop, cred.nc, cred.cnonce) == ("alice", "auth", "00000001", "abc")
    assert v.verify(auth, "REGISTER", 1010.0, password="lab-pass") is DigestVerdict.OK
    assert v.verify(auth, "REGISTER", 1010.0, password="wrong") is DigestVerdict.BAD_RESPONSE
    assert v.verify(auth, "INVITE", 1010.0, password="lab-pass") is DigestVerdict.BAD_RESPONSE
    assert v.verify(auth, "REGISTER", 1301.0, password="lab-pass") is DigestVerdict.STALE
    other = DigestVerifier("example.com", b"x" * 32)
    assert other.verify(auth, "REGISTER", 1010.0, password="lab-pass") is DigestVerdict.BAD_NONCE
    assert (
        v.verify("Basic YWxpY2U6cGFzcw==", "REGISTER", 1010.0, password="lab-pass") is DigestVerdict.MALFORMED
    )


def test_no_qop_and_ha1() -> None:
    v = DigestVerifier("r", b"s" * 16, qop=None)
    ch = v.challenge(0.0)
    assert "qop" not in ch.to_header()
    auth = compute_authorization(ch.to_header(), "INVITE", "sip:bob@r", "bob", "pw")
    assert "qop" not in auth and "cnonce" not in auth
    import hashlib

    ha1 = hashlib.md5(b"bob:r:pw").hexdigest()
    assert v.verify(auth, "INVITE", 1.0, ha1=ha1) is DigestVerdict.OK

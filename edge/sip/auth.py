"""HTTP Digest for SIP (RFC 3261 §22, RFC 2617, RFC 7616 MD5): challenges, verifier, client.

The verifier is stateless: a nonce is `base64url(timestamp || HMAC-SHA256(secret, timestamp))`,
so any worker holding the secret can verify it and expiry needs no table. Nonce-count replay
tracking is left to callers that need it (documented limit).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from enum import Enum

from edge.sip.headers import quote, split_quoted, unquote

_NONCE_MAC_BYTES = 16


def _md5(s: str) -> str:
    return hashlib.md5(s.encode("utf-8"), usedforsecurity=False).hexdigest()


def parse_auth_header(value: str) -> tuple[str, dict[str, str]]:
    """`Digest a=b, c="d"` -> ("Digest", {"a": "b", "c": "d"}); names lower-cased, values unquoted."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    for part in split_quoted(rest, ","):
        name, eq, val = part.partition("=")
        if not eq:
            if part.strip():
                raise ValueError("malformed auth parameter")
            continue
        params[name.strip().lower()] = unquote(val.strip())
    return scheme, params


def compute_response(
    *,
    username: str,
    password: str | None = None,
    realm: str,
    nonce: str,
    method: str,
    uri: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    ha1: str | None = None,
) -> str:
    """RFC 2617 §3.2.2.1 request-digest (MD5, qop=auth or no qop)."""
    if ha1 is None:
        if password is None:
            raise ValueError("password or ha1 required")
        ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


@dataclass(frozen=True, slots=True)
class DigestChallenge:
    realm: str
    nonce: str
    opaque: str | None = None
    algorithm: str = "MD5"
    qop: str | None = "auth"
    stale: bool = False

    def to_header(self) -> str:
        """The value of WWW-Authenticate (401) or Proxy-Authenticate (407)."""
        parts = [f"realm={quote(self.realm)}", f"nonce={quote(self.nonce)}"]
        if self.opaque is not None:
            parts.append(f"opaque={quote(self.opaque)}")
        parts.append(f"algorithm={self.algorithm}")
        if self.qop:
            parts.append(f"qop={quote(self.qop)}")
        if self.stale:
            parts.append("stale=true")
        return "Digest " + ", ".join(parts)

    @classmethod
    def parse(cls, value: str) -> DigestChallenge:
        scheme, p = parse_auth_header(value)
        if scheme.lower() != "digest" or "realm" not in p or "nonce" not in p:
            raise ValueError("not a Digest challenge")
        return cls(
            realm=p["realm"],
            nonce=p["nonce"],
            opaque=p.get("opaque"),
            algorithm=p.get("algorithm", "MD5"),
            qop=p.get("qop"),
            stale=p.get("stale", "").lower() == "true",
        )


def compute_authorization(
    challenge_header: str,
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
    cnonce: str | None = None,
) -> str:
    """The Authorization / Proxy-Authorization value answering a challenge header value."""
    ch = DigestChallenge.parse(challenge_header)
    if ch.algorithm.upper() != "MD5":
        raise ValueError(f"unsupported digest algorithm {ch.algorithm}")
    qop: str | None = None
    if ch.qop:
        offered = [q.strip().lower() for q in ch.qop.split(",")]
        if "auth" not in offered:
            raise ValueError("only qop=auth is supported")
        qop = "auth"
    nc_text = f"{nc:08x}"
    cn = cnonce or secrets.token_hex(8)
    resp = compute_response(
        username=username, password=password, realm=ch.realm, nonce=ch.nonce, method=method, uri=uri,
        qop=qop, nc=nc_text, cnonce=cn,
    )  # fmt: skip
    parts = [
        f"username={quote(username)}",
        f"realm={quote(ch.realm)}",
        f"nonce={quote(ch.nonce)}",
        f"uri={quote(uri)}",
        f"response={quote(resp)}",
        "algorithm=MD5",
    ]
    if ch.opaque is not None:
        parts.append(f"opaque={quote(ch.opaque)}")
    if qop:
        parts += [f"qop={qop}", f"nc={nc_text}", f"cnonce={quote(cn)}"]
    return "Digest " + ", ".join(parts)


class DigestVerdict(Enum):
    OK = "ok"
    STALE = "stale"  # valid credentials on an expired nonce: re-challenge with stale=true
    BAD_RESPONSE = "bad-response"  # wrong password (or tampering)
    BAD_NONCE = "bad-nonce"  # not one of ours
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class DigestCredentials:
    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    qop: str | None
    nc: str | None
    cnonce: str | None
    opaque: str | None

    @classmethod
    def parse(cls, value: str) -> DigestCredentials:
        scheme, p = parse_auth_header(value)
        if scheme.lower() != "digest":
            raise ValueError("not Digest credentials")
        try:
            return cls(
                p["username"], p["realm"], p["nonce"], p["uri"], p["response"],
                p.get("qop"), p.get("nc"), p.get("cnonce"), p.get("opaque"),
            )  # fmt: skip
        except KeyError as exc:
            raise ValueError(f"missing {exc.args[0]}") from None


class DigestVerifier:
    """Server side: issue stateless HMAC-signed nonces and verify Authorization headers."""

    def __init__(
        self, realm: str, secret: bytes, nonce_ttl_s: float = 300.0, *, qop: str | None = "auth"
    ) -> None:
        self.realm = realm
        self._secret = secret
        self.nonce_ttl_s = nonce_ttl_s
        self.qop = qop

    def make_nonce(self, now: float) -> str:
        ts = struct.pack(">Q", int(now))
        mac = hmac.new(self._secret, ts, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]
        return base64.urlsafe_b64encode(ts + mac).decode().rstrip("=")

    def nonce_time(self, nonce: str) -> int | None:
        """The issue time of one of our nonces, or None if forged / foreign."""
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return None
        if len(raw) != 8 + _NONCE_MAC_BYTES:
            return None
        ts, mac = raw[:8], raw[8:]
        want = hmac.new(self._secret, ts, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]
        if not hmac.compare_digest(mac, want):
            return None
        return int(struct.unpack(">Q", ts)[0])

    def challenge(self, now: float, *, stale: bool = False) -> DigestChallenge:
        return DigestChallenge(self.realm, self.make_nonce(now), qop=self.qop, stale=stale)

    def verify(
        self,
        authorization: str,
        method: str,
        now: float,
        *,
        password: str | None = None,
        ha1: str | None = None,
    ) -> DigestVerdict:
        """Check credentials for `method`; give the user's password (or its HA1)."""
        try:
            cred = DigestCredentials.parse(authorization)
        except ValueError:
            return DigestVerdict.MALFORMED
        if cred.realm != self.realm or (cred.qop is not None and cred.qop.lower() != "auth"):
            return DigestVerdict.MALFORMED
        if cred.qop and (not cred.nc or not cred.cnonce):
            return DigestVerdict.MALFORMED
        issued = self.nonce_time(cred.nonce)
        if issued is None:
            return DigestVerdict.BAD_NONCE
        want = compute_response(
            username=cred.username, password=password, ha1=ha1, realm=self.realm, nonce=cred.nonce,
            method=method, uri=cred.uri, qop=cred.qop, nc=cred.nc, cnonce=cred.cnonce,
        )  # fmt: skip
        if not hmac.compare_digest(want, cred.response.lower()):
            return DigestVerdict.BAD_RESPONSE
        if now - issued > self.nonce_ttl_s or issued - now > 5:
            return DigestVerdict.STALE
        return DigestVerdict.OK

"""Expressway-C's authorization state (spec §4): X-Auth cookies, the credentials cache,
authorization rate control and offline validation of Unified CM's OAuth access tokens. Time is an
argument everywhere; no I/O here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CookieClaims:
    username: str
    expires_at: float
    issued_at: float


class CookieIssuer:
    """Opaque, HMAC-signed X-Auth cookies valid for the credentials refresh interval."""

    def __init__(self, secret: bytes | None = None, *, lifetime_s: float) -> None:
        self.secret = secret or secrets.token_bytes(32)
        self.lifetime_s = lifetime_s

    def issue(self, username: str, now: float) -> str:
        body = json.dumps(
            {
                "u": username,
                "iat": int(now),
                "exp": round(now + self.lifetime_s, 3),
                "n": secrets.token_hex(6),
            },
            separators=(",", ":"),
        ).encode()
        mac = hmac.new(self.secret, body, hashlib.sha256).digest()[:20]
        return f"{_b64(body)}.{_b64(mac)}"

    def validate(self, cookie: str, now: float) -> CookieClaims | None:
        """None for a forged, garbled or expired cookie (the caller answers 401)."""
        if len(cookie) > 512 or cookie.count(".") != 1:
            return None
        body_b64, mac_b64 = cookie.split(".")
        try:
            body = _unb64(body_b64)
            mac = _unb64(mac_b64)
        except (ValueError, TypeError):
            return None
        expected = hmac.new(self.secret, body, hashlib.sha256).digest()[:20]
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            data = json.loads(body)
            claims = CookieClaims(str(data["u"]), float(data["exp"]), float(data["iat"]))
        except (ValueError, KeyError, TypeError):
            return None
        if claims.expires_at <= now:
            return None
        return claims


class CredentialCache:
    """Recently verified credentials: re-checked against UCM after `refresh_s`, forgotten after
    `cleanup_s` (spec §4: 480 / 720 minutes). Stores a salted hash, never the password."""

    def __init__(self, *, refresh_s: float, cleanup_s: float, max_entries: int = 200_000) -> None:
        self.refresh_s = refresh_s
        self.cleanup_s = cleanup_s
        self.max_entries = max_entries
        self._salt = secrets.token_bytes(16)
        self._entries: dict[str, tuple[bytes, float]] = {}
        self.hits = 0
        self.misses = 0

    def _digest(self, username: str, password: str) -> bytes:
        return hashlib.sha256(self._salt + username.encode() + b"\0" + password.encode()).digest()

    def check(self, username: str, password: str, now: float) -> bool:
        entry = self._entries.get(username)
        if entry is not None:
            digest, verified_at = entry
            if now - verified_at < self.refresh_s and hmac.compare_digest(
                digest, self._digest(username, password)
            ):
                self.hits += 1
                return True
        self.misses += 1
        return False

    def remember(self, username: str, password: str, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            self.cleanup(now)
        self._entries[username] = (self._digest(username, password), now)

    def forget(self, username: str) -> None:
        self._entries.pop(username, None)

    def cleanup(self, now: float) -> int:
        stale = [u for u, (_, t) in self._entries.items() if now - t >= self.cleanup_s]
        for u in stale:
            del self._entries[u]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)


class RateControl:
    """At most `limit` authorizations of one user per `window_s` (spec §4: 8 per 300 s → 429)."""

    def __init__(self, *, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: dict[str, deque[float]] = {}
        self.refused = 0

    def allow(self, username: str, now: float) -> bool:
        q = self._events.setdefault(username, deque())
        while q and now - q[0] >= self.window_s:
            q.popleft()
        if len(q) >= self.limit:
            self.refused += 1
            return False
        q.append(now)
        return True

    def retry_after(self, username: str, now: float) -> int:
        q = self._events.get(username)
        if not q:
            return 0
        return max(1, int(self.window_s - (now - q[0]) + 0.999))

    def prune(self, now: float) -> None:
        for user in [u for u, q in self._events.items() if not q or now - q[-1] >= self.window_s]:
            del self._events[user]


def parse_basic(header: str) -> tuple[str, str] | None:
    """`Basic <b64(user:pass)>` → (user, pass); None when malformed."""
    if header[:6].lower() != "basic ":
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    if not sep or not user or len(user) > 256 or len(password) > 1024:
        return None
    return user, password


def parse_bearer(header: str) -> str | None:
    if header[:7].lower() != "bearer ":
        return None
    token = header[7:].strip()
    return token if 0 < len(token) <= 8192 else None


# -- OAuth access tokens ------------------------------------------------------------------------

TOKEN_ALGORITHM = "ES256"
"""What Unified CM signs its self-describing tokens with (mock_ucm/oauth.py)."""


class TokenRejected(Exception):
    """A bearer token C refuses; `reason` goes into the 401's error_description (RFC 6750 §3)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenValidator:
    """Offline validation of Unified CM access tokens with the keys C fetched from the cluster
    (JWKS at `/ssp/oauth/keys`) when servers were refreshed (spec §4).

    A token is accepted when it is an ES256 JWT signed by a known key (`kid`), issued by a known
    cluster (`iss`) for that cluster (`aud`), of type access, not expired at `now`, with a subject.
    """

    def __init__(self) -> None:
        self._keys: dict[str, Any] = {}
        self._audiences: dict[str, str] = {}  # issuer → the audience its tokens must name

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def set_keys(self, keys: Mapping[str, Any], issuers: Mapping[str, str]) -> None:
        """Replace the signing keys (kid → public key) and the clusters (issuer → audience)."""
        self._keys = dict(keys)
        self._audiences = dict(issuers)

    def validate(self, token: str, now: float) -> str:
        """The token's username (`sub`), or TokenRejected saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        kid = header.get("kid")
        if header.get("alg") != TOKEN_ALGORITHM or not isinstance(kid, str):
            raise TokenRejected("unsupported token algorithm or no key id")
        key = self._keys.get(kid)
        if key is None:
            raise TokenRejected("token signed by an unknown key")
        try:
            # Only the signature and the structure here; the claims are checked below against
            # `now` and the clusters C knows, so every refusal has its own reason.
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[TOKEN_ALGORITHM],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "require": ["iss", "sub", "aud", "exp"],
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad token signature") from None
        except jwt.PyJWTError:
            raise TokenRejected("malformed token") from None
        audience = self._audiences.get(str(claims["iss"]))
        if audience is None:
            raise TokenRejected("token from an unknown issuer")
        aud = claims["aud"]
        if not (aud == audience or (isinstance(aud, list) and audience in aud)):
            raise TokenRejected("token for another audience")
        if claims.get("token_type", "access") != "access":
            raise TokenRejected("not an access token")
        exp, nbf = claims["exp"], claims.get("nbf", 0)
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            raise TokenRejected("malformed token")
        if exp <= now:
            raise TokenRejected("token expired")
        if nbf > now:
            raise TokenRejected("token not yet valid")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > 256:
            raise TokenRejected("token without a valid subject")
        return sub

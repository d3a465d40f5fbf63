"""Self-describing OAuth tokens, as Unified CM issues them for MRA (spec §4).

Access and refresh tokens are JWTs signed ES256 with a P-256 key the node generates on first
start and keeps in ``<state>/oauth/<node>.key``, so a restarted node (and every other process of
the lab that reads the state directory) still validates tokens it issued before. The JWKS at
``/ssp/oauth/keys`` lets Expressway-C fetch the public keys and validate offline, as the real C
does when servers are refreshed. Time is injected (``clock``) so expiry is testable without sleeps.

The password grant is the lab's stand-in for the SSO / authorization-code flow: the resulting
tokens are the same.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge.config import LabConfig, UcmNode

log = logging.getLogger(__name__)

Clock = Callable[[], float]
TokenType = Literal["access", "refresh"]

ALGORITHM = "ES256"
DEFAULT_SCOPE = "UnifiedCommunications:readwrite"
ACCESS_TTL_S = 3600
"""Unified CM's default OAuth access-token expiry: 60 minutes."""
REFRESH_TTL_S = 60 * 86400
"""Unified CM's default refresh-token expiry: 60 days."""
_KEY_RESCAN_INTERVAL_S = 5.0


class TokenError(Exception):
    """A token that must be refused; `error` is the RFC 6749 §5.2 error code."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What the token endpoint returns (RFC 6749 §5.1)."""

    access_token: str
    refresh_token: str
    expires_in: int
    scope: str
    token_type: str = "Bearer"

    def as_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = public_key.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint: stable across restarts and identical in every process."""
    jwk = public_jwk(public_key)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read the node's signing key, or generate it (mode 0600, written atomically) on first start."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError(f"{path}: not a P-256 EC private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, path)
    return key


def load_public_keys(directory: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """Every node key found in a lab state's ``oauth/`` directory, by kid. Unreadable files are skipped."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    if not directory.is_dir():
        return keys
    for path in sorted(directory.glob("*.key")):
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("oauth: skipping key %s: %s", path, exc)
            continue
        if isinstance(private, ec.EllipticCurvePrivateKey):
            public = private.public_key()
            keys[key_id(public)] = public
    return keys


def keys_from_jwks(jwks: Mapping[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    """Public keys from a JWKS document (what Expressway-C fetches from `/ssp/oauth/keys`)."""
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for jwk in jwks.get("keys", []):
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            continue
        x = int.from_bytes(base64.urlsafe_b64decode(str(jwk["x"]) + "=="), "big")
        y = int.from_bytes(base64.urlsafe_b64decode(str(jwk["y"]) + "=="), "big")
        public = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        keys[str(jwk.get("kid") or key_id(public))] = public
    return keys


class TokenVerifier:
    """Offline validation of the cluster's tokens: signature by a known key, audience, issuer, expiry.

    With a `key_dir`, an unknown kid triggers a (rate-limited) rescan of that directory, so a
    token issued by another node of the cluster, or by this node before a key rotation, validates.
    """

    def __init__(
        self,
        keys: Mapping[str, ec.EllipticCurvePublicKey],
        *,
        audience: str,
        issuer: str | None = None,
        clock: Clock = time.time,
        key_dir: Path | None = None,
    ) -> None:
        self._keys = dict(keys)
        self.audience = audience
        self.issuer = issuer
        self.clock = clock
        self._key_dir = key_dir
        self._last_scan = float("-inf")

    def add_key(self, kid: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._keys[kid] = public_key

    def rescan_keys(self) -> None:
        """Pick up keys that appeared in the key directory; at most once per few seconds."""
        now = self.clock()
        if self._key_dir is not None and now - self._last_scan >= _KEY_RESCAN_INTERVAL_S:
            self._last_scan = now
            self._keys.update(load_public_keys(self._key_dir))

    def _key_for(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        if kid not in self._keys:
            self.rescan_keys()
        return self._keys.get(kid)

    def decode(self, token: str, token_type: TokenType = "access") -> dict[str, Any]:
        """The token's claims, or TokenError saying why it is refused."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError("invalid_token", f"malformed token: {exc}") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise TokenError("invalid_token", "unsupported algorithm or missing kid")
        key = self._key_for(kid)
        if key is None:
            raise TokenError("invalid_token", "unknown signing key")
        try:
            # Expiry is checked below against the injected clock, not pyjwt's wall clock.
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "require": ["iss", "sub", "aud", "exp", "iat", "jti", "token_type"],
                },
            )
        except jwt.PyJWTError as exc:
            raise TokenError("invalid_token", f"token rejected: {exc}") from None
        if claims.get("token_type") != token_type:
            raise TokenError("invalid_token", f"not an {token_type} token")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= self.clock():
            raise TokenError("invalid_token", "token expired")
        return claims

    def validate_token(self, token: str, token_type: TokenType = "access") -> dict[str, Any] | None:
        """Claims of a valid token of that type, else None (for in-process callers such as IM&P)."""
        try:
            return self.decode(token, token_type)
        except TokenError:
            return None


class OAuthIssuer(TokenVerifier):
    """A Unified CM node's authorization server: issues and validates the cluster's tokens."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey,
        *,
        issuer: str,
        audience: str,
        clock: Clock = time.time,
        access_ttl_s: int = ACCESS_TTL_S,
        refresh_ttl_s: int = REFRESH_TTL_S,
        scope: str = DEFAULT_SCOPE,
        key_dir: Path | None = None,
    ) -> None:
        self._private_key = private_key
        self.kid = key_id(private_key.public_key())
        super().__init__(
            {self.kid: private_key.public_key()},
            audience=audience,
            issuer=issuer,
            clock=clock,
            key_dir=key_dir,
        )
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self.scope = scope
        self.issued_access = 0
        self.issued_refresh = 0

    @classmethod
    def for_node(cls, config: LabConfig, node: UcmNode, *, clock: Clock = time.time) -> OAuthIssuer:
        """The node's issuer with its key at ``<state>/oauth/<node>.key`` (created on first start).

        Issuer and audience are cluster-wide (the publisher), so every node of the cluster
        accepts the others' tokens.
        """
        key_dir = config.lab.state_path / "oauth"
        publisher = config.ucm[0]
        return cls(
            load_or_create_key(key_dir / f"{node.name}.key"),
            issuer=f"https://{publisher.fqdn}:{publisher.https_port}/ssp/oauth",
            audience=publisher.fqdn,
            clock=clock,
            key_dir=key_dir,
        )

    def jwks(self) -> dict[str, Any]:
        """Every public key this node knows (its own first), as an RFC 7517 key set."""
        self.rescan_keys()
        keys = [
            {**public_jwk(pub), "kid": kid, "use": "sig", "alg": ALGORITHM} for kid, pub in self._keys.items()
        ]
        keys.sort(key=lambda k: k["kid"] != self.kid)
        return {"keys": keys}

    def _sign(
        self, subject: str, token_type: TokenType, ttl_s: int, now: float, extra: Mapping[str, Any]
    ) -> str:
        iat = int(now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": iat,
            "exp": iat + ttl_s,
            "jti": uuid.uuid4().hex,
            "scope": self.scope,
            "token_type": token_type,
            **extra,
        }
        return jwt.encode(claims, self._private_key, algorithm=ALGORITHM, headers={"kid": self.kid})

    def issue(self, username: str, *, client_id: str | None = None) -> TokenGrant:
        """A fresh access + refresh token pair for an authenticated user."""
        now = self.clock()
        extra = {"client_id": client_id} if client_id else {}
        refresh = self._sign(username, "refresh", self.refresh_ttl_s, now, extra)
        self.issued_refresh += 1
        return self._grant(username, refresh, now, extra)

    def refresh(self, refresh_token: str, *, user_exists: Callable[[str], bool] | None = None) -> TokenGrant:
        """A new access token for a valid refresh token; the refresh token itself stays valid (as on UCM).

        Raises TokenError("invalid_grant") for anything else (RFC 6749 §5.2).
        """
        try:
            claims = self.decode(refresh_token, "refresh")
        except TokenError as exc:
            raise TokenError("invalid_grant", exc.description) from None
        subject = str(claims["sub"])
        if user_exists is not None and not user_exists(subject):
            raise TokenError("invalid_grant", "user no longer exists")
        extra = {"client_id": claims["client_id"]} if "client_id" in claims else {}
        return self._grant(subject, refresh_token, self.clock(), extra)

    def _grant(self, username: str, refresh: str, now: float, extra: Mapping[str, Any]) -> TokenGrant:
        access = self._sign(username, "access", self.access_ttl_s, now, extra)
        self.issued_access += 1
        return TokenGrant(
            access_token=access, refresh_token=refresh, expires_in=self.access_ttl_s, scope=self.scope
        )


def state_verifier(config: LabConfig, *, clock: Clock = time.time) -> TokenVerifier:
    """A verifier for another process of the lab (Unity Connection, IM&P): the cluster's keys from
    the state directory, rescanned when an unknown kid shows up."""
    key_dir = config.lab.state_path / "oauth"
    publisher = config.ucm[0]
    return TokenVerifier(
        load_public_keys(key_dir),
        audience=publisher.fqdn,
        issuer=f"https://{publisher.fqdn}:{publisher.https_port}/ssp/oauth",
        clock=clock,
        key_dir=key_dir,
    )

"""OAuth on the Unified CM HTTPS app: password and refresh grants, JWKS, expiry with a fake clock."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest

from edge.config import LabConfig
from mock_ucm.oauth import OAuthIssuer, TokenError, keys_from_jwks, state_verifier

from .conftest import FakeClock, UcmApps


async def token(apps: UcmApps, status: int = 200, **form: str) -> dict[str, Any]:
    resp = await apps.https.post("/ssp/oauth/token", data=form)
    body = await resp.json()
    assert resp.status == status, body
    assert resp.headers["Cache-Control"] == "no-store"
    assert isinstance(body, dict)
    return body


async def test_password_grant_and_jwks_validation_with_pyjwt(ucm: UcmApps, clock: FakeClock) -> None:
    grant = await token(ucm, grant_type="password", username="alice", password="lab-pass")
    assert grant["token_type"] == "Bearer"
    assert grant["expires_in"] == 3600
    resp = await ucm.https.get("/ssp/oauth/keys")
    assert resp.status == 200
    jwks = await resp.json()
    [jwk] = jwks["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")

    header = jwt.get_unverified_header(grant["access_token"])
    assert header["alg"] == "ES256" and header["kid"] == jwk["kid"]
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(
        grant["access_token"],
        key,
        algorithms=["ES256"],
        audience="ucm1.example.com",
        issuer="https://ucm1.example.com:8443/ssp/oauth",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == "alice"
    assert claims["token_type"] == "access"
    assert claims["scope"] == "UnifiedCommunications:readwrite"
    assert claims["iat"] == int(clock.now) and claims["exp"] == int(clock.now) + 3600
    assert len(claims["jti"]) == 32
    refresh = jwt.decode(
        grant["refresh_token"],
        key,
        algorithms=["ES256"],
        audience="ucm1.example.com",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert refresh["token_type"] == "refresh" and refresh["exp"] == int(clock.now) + 60 * 86400

    # What Expressway-C does: build keys from the fetched JWKS and validate offline.
    assert keys_from_jwks(jwks).keys() == {jwk["kid"]}


async def test_password_grant_failures(ucm: UcmApps) -> None:
    bad = await token(ucm, 400, grant_type="password", username="alice", password="nope")
    assert bad["error"] == "invalid_grant"
    bad = await token(ucm, 400, grant_type="password", username="nobody", password="lab-pass")
    assert bad["error"] == "invalid_grant"
    bad = await token(ucm, 400, grant_type="password", username="alice")
    assert bad["error"] == "invalid_request"
    bad = await token(ucm, 400, grant_type="client_credentials")
    assert bad["error"] == "unsupported_grant_type"
    bad = await token(ucm, 400)
    assert bad["error"] == "invalid_request"
    resp = await ucm.https.post(
        "/ssp/oauth/token",
        data=json.dumps({"grant_type": "password"}),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    resp = await ucm.https.post(
        "/ssp/oauth/token",
        data=b"x=" + b"a" * 100_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 413
    resp = await ucm.https.get("/ssp/oauth/token")
    assert resp.status == 405


async def test_refresh_grant_and_expiry(ucm: UcmApps, issuer: OAuthIssuer, clock: FakeClock) -> None:
    grant = await token(ucm, grant_type="password", username="bob", password="lab-pass")
    assert issuer.validate_token(grant["access_token"]) is not None
    clock.now += 3600  # the access token's expiry instant
    assert issuer.validate_token(grant["access_token"]) is None
    resp = await ucm.https.get(
        "/cucm-uds/user/bob", headers={"Authorization": f"Bearer {grant['access_token']}"}
    )
    assert resp.status == 401

    fresh = await token(ucm, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert fresh["refresh_token"] == grant["refresh_token"]
    claims = issuer.validate_token(fresh["access_token"])
    assert claims is not None and claims["sub"] == "bob" and claims["iat"] == int(clock.now)
    resp = await ucm.https.get(
        "/cucm-uds/user/bob", headers={"Authorization": f"Bearer {fresh['access_token']}"}
    )
    assert resp.status == 200

    # An access token is not a refresh token; garbage and expired refresh tokens are invalid_grant.
    for bad_token in (fresh["access_token"], "garbage", grant["refresh_token"] + "x"):
        bad = await token(ucm, 400, grant_type="refresh_token", refresh_token=bad_token)
        assert bad == {"error": "invalid_grant", "error_description": bad["error_description"]}
    clock.now += 60 * 86400
    bad = await token(ucm, 400, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert bad["error"] == "invalid_grant"


def test_key_persists_across_restarts(config: LabConfig, clock: FakeClock) -> None:
    first = OAuthIssuer.for_node(config, config.ucm[0], clock=clock)
    key_path = config.lab.state_path / "oauth" / "ucm1.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    grant = first.issue("alice")
    restarted = OAuthIssuer.for_node(config, config.ucm[0], clock=clock)
    assert restarted.kid == first.kid
    assert restarted.validate_token(grant.access_token) is not None


def test_other_processes_validate_from_the_state_dir(config: LabConfig, tmp_path: Path) -> None:
    clock = FakeClock()
    issuer = OAuthIssuer.for_node(config, config.ucm[0], clock=clock)
    grant = issuer.issue("carol", client_id="jabber")
    verifier = state_verifier(config, clock=clock)  # e.g. Unity Connection or IM&P
    claims = verifier.validate_token(grant.access_token)
    assert claims is not None and claims["sub"] == "carol" and claims["client_id"] == "jabber"
    assert verifier.validate_token(grant.refresh_token) is None
    assert verifier.validate_token(grant.refresh_token, "refresh") is not None

    # A token signed by a key nobody in the cluster holds is refused, with a reason.
    other_config = config.model_copy(deep=True)
    other_config.lab.state_dir = str(tmp_path / "elsewhere")
    stranger = OAuthIssuer.for_node(other_config, other_config.ucm[0], clock=clock)
    with pytest.raises(TokenError, match="unknown signing key"):
        verifier.decode(stranger.issue("carol").access_token)
    forged = jwt.encode({"sub": "carol"}, "s" * 32, algorithm="HS256", headers={"kid": issuer.kid})
    with pytest.raises(TokenError, match="unsupported algorithm"):
        verifier.decode(forged)


def test_tokens_of_another_cluster_node_validate(config: LabConfig, clock: FakeClock) -> None:
    config.ucm.append(config.ucm[0].model_copy(update={"name": "ucm2", "fqdn": "ucm2.example.com"}))
    ucm1 = OAuthIssuer.for_node(config, config.ucm[0], clock=clock)
    ucm2 = OAuthIssuer.for_node(config, config.ucm[1], clock=clock)
    assert ucm1.kid != ucm2.kid
    assert ucm1.validate_token(ucm2.issue("alice").access_token) is not None
    assert {k["kid"] for k in ucm1.jwks()["keys"]} == {ucm1.kid, ucm2.kid}
    assert ucm1.jwks()["keys"][0]["kid"] == ucm1.kid

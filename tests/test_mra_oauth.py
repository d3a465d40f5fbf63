"""OAuth bearer tokens through the edge (spec §4 "authorize by OAuth token with refresh").

A client signs in once with Basic (get_edge_config → X-Auth cookie), obtains tokens from Unified
CM's token endpoint through the descriptor lane, then uses `Authorization: Bearer` alone for
get_edge_config and for UDS through E → tunnel → C → UCM. C validates tokens offline with the
keys it fetched from UCM's JWKS when servers were refreshed. Bad tokens (expired, forged
signature, wrong audience or issuer, a refresh token, garbage) get 401 with a Bearer challenge,
from C for get_edge_config and the lane alike. Plus C's validator with a fake clock.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from edge_c.auth import TokenRejected, TokenValidator
from mock_ucm.oauth import key_id
from mra_client.edge_http import EdgeConfig, EdgeHttpClient, HttpResult, b64
from tests.conftest import RunningLab
from tests.test_admin_api import call

UCM = "ucm1.example.com"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _lab_key(lab: RunningLab) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((lab.state_dir / "oauth" / "ucm1.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": f"https://{UCM}:8443/ssp/oauth",
        "sub": "alice",
        "aud": UCM,
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
        "scope": "UnifiedCommunications:readwrite",
        "token_type": "access",
    }
    claims.update(over)
    return claims


def _sign(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any], kid: str) -> str:
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


class Edge:
    """The requests a client makes through E, with or without the X-Auth cookie."""

    def __init__(self, client: EdgeHttpClient) -> None:
        self.client = client

    async def edge_config(self, token: str) -> HttpResult:
        path = f"/{b64(self.client.domain)}/get_edge_config?service_name=_cisco-uds"
        return await self.client.request("GET", path, headers={"Authorization": f"Bearer {token}"})

    async def uds(self, path: str, token: str | None) -> HttpResult:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.client.request(
            "GET", self.client.descriptor("https", UCM, 8443) + path, headers=headers
        )

    async def token(self, form: dict[str, str], bearer: str | None = None) -> HttpResult:
        headers = dict(FORM)
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        lane = self.client.descriptor("https", UCM, 8443)
        return await self.client.request(
            "POST", lane + "/ssp/oauth/token", headers=headers, data=urlencode(form).encode()
        )


def test_tokens_through_the_edge(lab: RunningLab) -> None:
    async def flow() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with lab.edge_http() as signin:
            await signin.get_edge_config("alice", "lab-pass")  # Basic → X-Auth cookie
            grant = await Edge(signin).token(
                {"grant_type": "password", "username": "alice", "password": "lab-pass"}
            )
            out["grant"] = (grant.status, grant.headers.get("Cache-Control"))
            tokens = json.loads(grant.body)
        async with lab.edge_http() as client:  # a fresh client: no cookie, the bearer token only
            edge = Edge(client)
            assert client.cookie is None
            config = await edge.edge_config(tokens["access_token"])
            out["edge_config"] = (
                config.status,
                EdgeConfig.parse(config.body).uds if config.status == 200 else [],
            )
            out["cookie"] = "X-Auth=" in config.headers.get("Set-Cookie", "")
            client.cookie = None  # keep to the bearer token
            user = await edge.uds("/cucm-uds/user/alice", tokens["access_token"])
            out["uds"] = (user.status, ET.fromstring(user.body).findtext("userName"))
            out["uds_other_user"] = (await edge.uds("/cucm-uds/user/bob", tokens["access_token"])).status
            out["no_credentials"] = (await edge.uds("/cucm-uds/user/alice", None)).status
            refreshed = await edge.token(
                {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                bearer=tokens["access_token"],
            )
            new = json.loads(refreshed.body)
            out["refresh"] = (refreshed.status, new["access_token"] != tokens["access_token"])
            out["refreshed_uds"] = (await edge.uds("/cucm-uds/user/alice", new["access_token"])).status
            out["refreshed_edge_config"] = (await edge.edge_config(new["access_token"])).status
        return out

    out = asyncio.run(flow())
    assert out["grant"] == (200, "no-store")
    assert out["edge_config"] == (200, [(UCM, 8443)]) and out["cookie"]
    assert out["uds"] == (200, "alice")
    assert out["uds_other_user"] == 403  # UCM checks the token's user too
    assert out["no_credentials"] == 401  # E: neither cookie nor bearer
    assert out["refresh"] == (200, True)
    assert out["refreshed_uds"] == 200 and out["refreshed_edge_config"] == 200


def test_bad_tokens_get_401_with_a_bearer_challenge(lab: RunningLab) -> None:
    key = _lab_key(lab)
    kid = key_id(key.public_key())
    other = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    bad = {
        "token expired": _sign(key, _claims(iat=now - 7200, exp=now - 10), kid),
        "bad token signature": _sign(other, _claims(), kid),  # right kid, wrong key
        "token for another audience": _sign(key, _claims(aud="ucm9.example.org"), kid),
        "token from an unknown issuer": _sign(key, _claims(iss="https://idp.example.org/oauth"), kid),
        "not an access token": _sign(key, _claims(token_type="refresh"), kid),
        "token signed by an unknown key": _sign(other, _claims(), key_id(other.public_key())),
        "malformed token": "not-a-jwt",
    }
    good = _sign(key, _claims(), kid)

    async def flow() -> dict[str, Any]:
        results: dict[str, Any] = {}
        async with lab.edge_http() as client:
            edge = Edge(client)
            results["good"] = (
                (await edge.edge_config(good)).status,
                (await edge.uds("/cucm-uds/user/alice", good)).status,
            )
            for reason, token in bad.items():
                answers = [await edge.edge_config(token), await edge.uds("/cucm-uds/user/alice", token)]
                results[reason] = [(r.status, r.headers.get("WWW-Authenticate", "")) for r in answers]
        return results

    results = asyncio.run(flow())
    assert results.pop("good") == (200, 200)
    for reason, answers in results.items():
        for status, challenge in answers:
            assert status == 401, reason
            assert challenge.startswith('Bearer realm="Cisco-Edge", error="invalid_token"'), (
                reason,
                challenge,
            )
            assert f'error_description="{reason}"' in challenge, (reason, challenge)


def test_bearer_refused_when_oauth_authorization_is_off(lab: RunningLab) -> None:
    key = _lab_key(lab)
    token = _sign(key, _claims(), key_id(key.public_key()))
    _, _, before = call(lab, "expc", "GET", "/access-control")
    off = {**before, "authorize_by_oauth_refresh": False, "authorize_by_oauth_sso": False}
    assert call(lab, "expc", "PUT", "/access-control", off)[0] == 200

    async def flow() -> list[tuple[int, str]]:
        async with lab.edge_http() as client:
            edge = Edge(client)
            answers = [await edge.edge_config(token), await edge.uds("/cucm-uds/version", token)]
        return [(r.status, r.headers.get("WWW-Authenticate", "")) for r in answers]

    try:
        answers = asyncio.run(flow())
    finally:
        assert call(lab, "expc", "PUT", "/access-control", before)[0] == 200
    assert [s for s, _ in answers] == [401, 401]
    assert all("authorization by OAuth token is off" in c for _, c in answers)


# -- C's validator with a fake clock --------------------------------------------------------------

Fixture = tuple[TokenValidator, ec.EllipticCurvePrivateKey, str]


@pytest.fixture
def validator() -> Fixture:
    key = ec.generate_private_key(ec.SECP256R1())
    kid = key_id(key.public_key())
    v = TokenValidator()
    v.set_keys({kid: key.public_key()}, {f"https://{UCM}:8443/ssp/oauth": UCM})
    return v, key, kid


def test_validator_accepts_until_expiry(validator: Fixture) -> None:
    v, key, kid = validator
    token = _sign(key, _claims(iat=1000, exp=4600, nbf=1000), kid)
    assert v.validate(token, 1000.0) == "alice"
    assert v.validate(token, 4599.9) == "alice"
    for now, reason in ((4600.0, "token expired"), (999.0, "token not yet valid")):
        with pytest.raises(TokenRejected, match=reason):
            v.validate(token, now)


@pytest.mark.parametrize(
    ("header", "claims", "reason"),
    [
        ({"alg": "HS256"}, {}, "unsupported token algorithm"),
        ({}, {"aud": ["other", UCM]}, None),
        ({}, {"aud": ["other"]}, "another audience"),
        ({}, {"sub": ""}, "without a valid subject"),
        ({}, {"exp": "soon"}, "malformed token"),
    ],
)
def test_validator_claims(
    validator: Fixture,
    header: dict[str, str],
    claims: dict[str, Any],
    reason: str | None,
) -> None:
    v, key, kid = validator
    if header.get("alg") == "HS256":
        token = jwt.encode(_claims(), "k" * 32, algorithm="HS256", headers={"kid": kid})
    else:
        token = _sign(key, _claims(**claims), kid)
    if reason is None:
        assert v.validate(token, time.time()) == "alice"
    else:
        with pytest.raises(TokenRejected, match=reason):
            v.validate(token, time.time())


def test_validator_without_keys_refuses_everything() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TokenRejected, match="unknown key"):
        TokenValidator().validate(_sign(key, _claims(), key_id(key.public_key())), time.time())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@given(text=st.text(max_size=300))
def test_validator_refuses_any_text_with_a_reason(text: str) -> None:
    with pytest.raises(TokenRejected):
        TokenValidator().validate(text, 0.0)


@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "x"]), _JSON), claims=_JSON)
def test_validator_refuses_forged_structures_with_a_reason(header: dict[str, Any], claims: Any) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    kid = key_id(key.public_key())
    v = TokenValidator()
    v.set_keys({kid: key.public_key()}, {f"https://{UCM}:8443/ssp/oauth": UCM})
    header = {"alg": "ES256", "kid": kid, **header} if "kid" not in header else header

    def seg(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    token = f"{seg(header)}.{seg(claims)}.{base64.urlsafe_b64encode(b'x' * 64).rstrip(b'=').decode()}"
    with pytest.raises(TokenRejected):
        v.validate(token, time.time())

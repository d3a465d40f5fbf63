"""Fixtures for the XMPP tests: a throwaway PKI and a running mock IM&P on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mock_ucm.imp import ImpServer
from tests.xmpp.xmpp_helpers import ThrowawayPki, make_test_pki

DOMAIN = "example.com"
PASSWORD = "lab-pass"
USERS = ["alice", "bob", "carol", "dave"]


def token_for(user: str) -> str:
    return f"token-{user}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayPki:
    return make_test_pki(Path(tmp_path_factory.mktemp("xmpp-pki")))


@pytest.fixture
async def imp(pki: ThrowawayPki) -> AsyncIterator[ImpServer]:
    server = ImpServer(
        DOMAIN,
        authenticate_plain=lambda user, password: password == PASSWORD,
        validate_token=lambda user, token: token == token_for(user),
        ssl_context=pki.server_context(),
        users=USERS,
    )
    await server.start([("127.0.0.1", 0, "starttls"), ("127.0.0.1", 0, "tls")])
    try:
        yield server
    finally:
        await server.stop()

"""Fixtures for the mock Unified CM / Unity Connection HTTP roles: a lab config with a private
state directory, a fake clock, the aiohttp apps under aiohttp's test server, a throwaway TLS cert."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.config import LabConfig, load_config
from mock_ucm.directory import Directory
from mock_ucm.http_apps import build_ucm_http_apps
from mock_ucm.oauth import OAuthIssuer

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def lab_config(state_dir: Path, *extra: str) -> LabConfig:
    overrides = [f'lab.state_dir="{state_dir}"', "lab.demo=false", *extra]
    return load_config(None, overrides=overrides, environ={})


@pytest.fixture
def config(tmp_path: Path) -> LabConfig:
    return lab_config(
        tmp_path / "state",
        'users=[{username="alice", dn="1001", display_name="Alice Example"},'
        ' {username="bob", dn="1002", display_name="Bob Example", devices=["CSFBOB", "BOTBOB"]},'
        ' {username="carol", dn="1003", display_name="Carol Smith"}]',
        "load.count=30",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def directory(config: LabConfig) -> Directory:
    return Directory.from_config(config)


@pytest.fixture
def issuer(config: LabConfig, clock: FakeClock) -> OAuthIssuer:
    return OAuthIssuer.for_node(config, config.ucm[0], clock=clock)


@dataclass
class UcmApps:
    https: TestClient[web.Request, web.Application]
    tftp: TestClient[web.Request, web.Application]
    https_app: web.Application
    tftp_app: web.Application


@pytest.fixture
async def ucm(config: LabConfig, directory: Directory, issuer: OAuthIssuer) -> AsyncIterator[UcmApps]:
    https_app, tftp_app = build_ucm_http_apps(config, config.ucm[0], directory, issuer)
    https = TestClient(TestServer(https_app, host="127.0.0.1"))
    tftp = TestClient(TestServer(tftp_app, host="127.0.0.1"))
    await https.start_server()
    await tftp.start_server()
    try:
        yield UcmApps(https, tftp, https_app, tftp_app)
    finally:
        await https.close()
        await tftp.close()


@dataclass(frozen=True)
class ThrowawayTls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture
def tls(tmp_path: Path) -> ThrowawayTls:
    """A self-signed P-256 cert for cuc1.example.com / 127.0.0.1, independent of edge.pki."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cuc1.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("cuc1.example.com"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return ThrowawayTls(server, client)

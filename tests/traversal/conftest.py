"""Throwaway PKI for the traversal-link loopback tests: one CA, E's server certificate and C's
client certificates, all with serverAuth+clientAuth EKU (spec §3). Made once per session."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

E_NAME = "expe.example.com"
C_NAME = "expc.example.com"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    *,
    ca: bool = False,
    sans: tuple[x509.GeneralName, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _write(directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> Path:
    path = directory / f"{stem}.pem"
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pem_key)
    return path


@dataclass(frozen=True)
class LabTls:
    ca_path: Path
    server_path: Path
    client_path: Path
    make_client: Callable[[str], Path]

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_path)
        ctx.load_verify_locations(self.ca_path)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: E requires C's certificate
        return ctx

    def client_context(self, cert_path: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(cert_path or self.client_path)
        ctx.load_verify_locations(self.ca_path)
        return ctx


@pytest.fixture(scope="session")
def lab_tls(tmp_path_factory: pytest.TempPathFactory) -> LabTls:
    directory = tmp_path_factory.mktemp("traversal-pki")
    ca_key, ca_cert = _issue("Traversal Test CA", _name("Traversal Test CA"), None, ca=True)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def make(dns_name: str, *extra: x509.GeneralName) -> Path:
        sans = (x509.DNSName(dns_name), *extra)
        key, cert = _issue(dns_name, ca_cert.subject, ca_key, sans=sans)
        return _write(directory, dns_name, key, cert)

    server_path = make(E_NAME, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    return LabTls(ca_path, server_path, make(C_NAME), make)

"""The lab PKI (edge/pki.py): certificate profiles, renewal, idempotency, and real TLS handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import multiprocessing
import ssl
import stat
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given
from hypothesis import strategies as st

from edge.pki import (
    SRV_NAME_OID,
    CertSpec,
    LabPki,
    PkiFileMissingError,
    SanNames,
    client_context,
    decode_ia5string,
    describe_certificates,
    dns_name_matches,
    encode_ia5string,
    ensure_lab_pki,
    load_lab_pki,
    peer_has_san,
    peer_san_names,
    server_context,
)

DOMAIN = "example.com"
E_SPEC = CertSpec(
    name="expe",
    common_name="expe.example.com",
    dns_names=("expe.example.com", DOMAIN, f"collab-edge.{DOMAIN}"),
    ip_addresses=("127.0.0.1", "::1"),
    srv_names=(f"_collab-edge._tls.{DOMAIN}",),
)
C_SPEC = CertSpec(
    name="expc",
    common_name="expc.example.com",
    dns_names=("expc.example.com", "cluster.example.com"),
    ip_addresses=("127.0.0.1",),
)
SPECS = [E_SPEC, C_SPEC]
# Subject CN says one thing, the SAN another: only the SAN may count.
CN_ONLY = CertSpec(name="cnonly", common_name="cn.example.com", dns_names=("san.example.com",))
NO_SAN = CertSpec(name="nosan", common_name="nosan.example.com")
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19  # the chain file carries the other CA
X509_V_ERR_HOSTNAME_MISMATCH = 62


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def snapshot(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir() if p.name != ".lock"}


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return ensure_lab_pki(tmp_path / "certs", [*SPECS, CN_ONLY, NO_SAN])


# -- files and profiles ------------------------------------------------------------------


def test_first_call_creates_ca_and_every_leaf(tmp_path: Path) -> None:
    lab = ensure_lab_pki(tmp_path / "certs", SPECS)
    assert lab.issued == [("ca", "missing"), ("expe", "missing"), ("expc", "missing")]
    names = {p.name for p in lab.directory.iterdir()}
    expected = {"ca.pem", "ca.key", ".lock"}
    for n in ("expe", "expc"):
        expected |= {f"{n}.pem", f"{n}.key", f"{n}-chain.pem"}
    assert names == expected
    for key in ("ca.key", "expe.key", "expc.key"):
        assert stat.S_IMODE((lab.directory / key).stat().st_mode) == 0o600
    assert lab.ca_path == lab.directory / "ca.pem"
    assert lab.cert_path("expe") == lab.directory / "expe.pem"


def test_ca_profile(pki: LabPki) -> None:
    ca = cert(pki.ca_path)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "MRA Lab Root CA"
    assert ca.issuer == ca.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    ca.verify_directly_issued_by(ca)
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_leaf_profile(pki: LabPki) -> None:
    ca = cert(pki.ca_path)
    leaf = cert(pki.cert_path("expe"))
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "expe.example.com"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["expe.example.com", DOMAIN, f"collab-edge.{DOMAIN}"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_agreement and not ku.key_cert_sign
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    leaf.verify_directly_issued_by(ca)
    # The key file belongs to the certificate.
    key = serialization.load_pem_private_key(pki.key_path("expe").read_bytes(), None)
    assert key.public_key() == leaf.public_key()


def test_srvname_other_name_is_der_ia5string_in_explicit_wrapper(pki: LabPki) -> None:
    leaf = cert(pki.cert_path("expe"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [other] = san.get_values_for_type(x509.OtherName)
    assert other.type_id == SRV_NAME_OID and SRV_NAME_OID.dotted_string == "1.3.6.1.5.5.7.8.7"
    want = b"_collab-edge._tls.example.com"
    # OtherName.value is the content of the [0] EXPLICIT: a bare DER IA5String (tag 0x16).
    assert other.value == bytes([0x16, len(want)]) + want
    assert decode_ia5string(other.value) == "_collab-edge._tls.example.com"
    # In the encoded extension: otherName [0] { OID, [0] EXPLICIT { IA5String } }.
    raw = san.public_bytes()
    oid_der = bytes.fromhex("06082b06010505070807")
    inner = bytes([0xA0, len(want) + 2, 0x16, len(want)]) + want
    other_der = bytes([0xA0, len(oid_der) + len(inner)]) + oid_der + inner
    assert other_der in raw


def test_chain_file_is_leaf_then_ca_and_leaf_file_is_leaf_only(pki: LabPki) -> None:
    chain = x509.load_pem_x509_certificates(pki.chain_path("expe").read_bytes())
    assert chain == [cert(pki.cert_path("expe")), cert(pki.ca_path)]
    assert len(x509.load_pem_x509_certificates(pki.cert_path("expe").read_bytes())) == 1


def test_chain_verifies_with_webpki_policy(pki: LabPki, tmp_path: Path) -> None:
    store = Store([cert(pki.ca_path)])
    builder = PolicyBuilder().store(store).time(now_utc())
    e_leaf, c_leaf = cert(pki.cert_path("expe")), cert(pki.cert_path("expc"))
    for host in ("expe.example.com", DOMAIN, f"collab-edge.{DOMAIN}"):
        chain = builder.build_server_verifier(x509.DNSName(host)).verify(e_leaf, [])
        assert chain[-1] == cert(pki.ca_path)
    builder.build_server_verifier(x509.IPAddress(ipaddress.ip_address("::1"))).verify(e_leaf, [])
    # clientAuth: C presents its certificate to E on the traversal zone.
    verified = builder.build_client_verifier().verify(c_leaf, [])
    assert x509.DNSName("cluster.example.com") in (verified.subjects or [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("expc.example.com")).verify(e_leaf, [])
    other = ensure_lab_pki(tmp_path / "other", [E_SPEC])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("expe.example.com")).verify(
            cert(other.cert_path("expe")), []
        )


# -- idempotency and renewal -------------------------------------------------------------


def test_second_call_rewrites_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ensure_lab_pki(directory, SPECS)
    before = snapshot(directory)
    serials = {n: cert(directory / f"{n}.pem").serial_number for n in ("ca", "expe", "expc")}
    again = ensure_lab_pki(directory, SPECS)
    assert again.issued == []
    assert snapshot(directory) == before
    assert {n: cert(directory / f"{n}.pem").serial_number for n in serials} == serials


def test_leaf_near_expiry_is_renewed(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ensure_lab_pki(directory, SPECS)
    ca_serial = cert(directory / "ca.pem").serial_number
    old = cert(directory / "expe.pem").serial_number
    # 825-day leaves are renewed once they are within 7 days of their end.
    assert ensure_lab_pki(directory, SPECS, now=now_utc() + dt.timedelta(days=810)).issued == []
    later = now_utc() + dt.timedelta(days=820)
    lab = ensure_lab_pki(directory, SPECS, now=later)
    assert lab.issued == [("expe", "expired"), ("expc", "expired")]
    renewed = cert(directory / "expe.pem")
    assert renewed.serial_number != old
    assert renewed.not_valid_after_utc > later + dt.timedelta(days=800)
    assert cert(directory / "ca.pem").serial_number == ca_serial
    assert cert(directory / "expe-chain.pem") == renewed


def test_expired_ca_reissues_ca_and_every_leaf(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ensure_lab_pki(directory, SPECS)
    later = now_utc() + dt.timedelta(days=3700)
    lab = ensure_lab_pki(directory, SPECS, now=later)
    assert lab.issued == [("ca", "expired"), ("expe", "ca changed"), ("expc", "ca changed")]
    store = Store([cert(directory / "ca.pem")])
    verifier = PolicyBuilder().store(store).time(later).build_server_verifier(x509.DNSName(DOMAIN))
    verifier.verify(cert(directory / "expe.pem"), [])


def test_replaced_ca_reissues_leaves(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ensure_lab_pki(directory, SPECS)
    (directory / "ca.pem").unlink()
    lab = ensure_lab_pki(directory, SPECS)
    assert lab.issued == [("ca", "missing"), ("expe", "ca changed"), ("expc", "ca changed")]
    cert(directory / "expc.pem").verify_directly_issued_by(cert(directory / "ca.pem"))


def test_changed_names_reissue_only_that_leaf(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ensure_lab_pki(directory, SPECS)
    c_before = (directory / "expc.pem").stat().st_mtime_ns
    more = replace(E_SPEC, dns_names=(*E_SPEC.dns_names, "example.org", "collab-edge.example.org"))
    lab = ensure_lab_pki(directory, [more, C_SPEC])
    assert lab.issued == [("expe", "names changed")]
    assert "example.org" in peer_san_names(cert(directory / "expe.pem")).dns_names
    assert (directory / "expc.pem").stat().st_mtime_ns == c_before
    srv = replace(more, srv_names=("_collab-edge._tls.example.org",))
    assert ensure_lab_pki(directory, [srv, C_SPEC]).issued == [("expe", "names changed")]
    assert peer_san_names(cert(directory / "expe.pem")).srv_names == ("_collab-edge._tls.example.org",)
    cn = replace(srv, common_name="edge.example.org")
    assert ensure_lab_pki(directory, [cn, C_SPEC]).issued == [("expe", "names changed")]
    # The same names in another order and case are not a change.
    shuffled = replace(cn, dns_names=tuple(reversed([d.upper() for d in cn.dns_names])))
    assert ensure_lab_pki(directory, [shuffled, C_SPEC]).issued == []


def test_missing_key_reissues_and_missing_chain_is_only_rebuilt(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ensure_lab_pki(directory, SPECS)
    (directory / "expc.key").unlink()
    assert ensure_lab_pki(directory, SPECS).issued == [("expc", "missing")]
    serial = cert(directory / "expe.pem").serial_number
    (directory / "expe-chain.pem").unlink()
    assert ensure_lab_pki(directory, SPECS).issued == []
    assert cert(directory / "expe.pem").serial_number == serial
    chain = x509.load_pem_x509_certificates((directory / "expe-chain.pem").read_bytes())
    assert [c.serial_number for c in chain] == [serial, cert(directory / "ca.pem").serial_number]


def test_concurrent_processes_issue_each_certificate_once(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=3, mp_context=ctx) as pool:
        futures = [pool.submit(ensure_lab_pki, directory, SPECS) for _ in range(6)]
        results = [f.result(timeout=60) for f in futures]
    issued = sorted(item for r in results for item in r.issued)
    assert issued == [("ca", "missing"), ("expc", "missing"), ("expe", "missing")]
    ca = cert(directory / "ca.pem")
    for n in ("expe", "expc"):
        cert(directory / f"{n}.pem").verify_directly_issued_by(ca)
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_load_lab_pki_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PkiFileMissingError, match=r"ca\.pem"):
        load_lab_pki(tmp_path)
    ensure_lab_pki(tmp_path, [C_SPEC])
    lab = load_lab_pki(tmp_path, ["expc"])
    assert lab.issued == [] and lab.chain_path("expc").is_file()
    (tmp_path / "expc.key").unlink()
    with pytest.raises(PkiFileMissingError, match=r"expc\.key"):
        load_lab_pki(tmp_path, ["expc"])
    with pytest.raises(FileNotFoundError, match=r"nobody\.pem"):
        lab.cert_path("nobody")


def test_describe_certificates(pki: LabPki) -> None:
    infos = {i.name: i for i in describe_certificates(pki.directory)}
    assert list(infos) == ["ca", "cnonly", "expc", "expe", "nosan"]
    e = infos["expe"]
    assert e.common_name == "expe.example.com" and e.issuer_common_name == "MRA Lab Root CA"
    assert e.srv_names == ("_collab-edge._tls.example.com",)
    assert e.ip_addresses == ("127.0.0.1", "::1")
    assert e.eku == ("serverAuth", "clientAuth") and not e.is_ca
    assert e.state == "valid" and e.not_before < now_utc() < e.not_after
    leaf = cert(pki.cert_path("expe"))
    assert int(e.serial_hex, 16) == leaf.serial_number
    assert len(e.fingerprint_sha256.split(":")) == 32
    assert infos["ca"].is_ca and infos["ca"].eku == ()
    future = describe_certificates(pki.directory, now=now_utc() + dt.timedelta(days=900))
    assert {i.name: i.state for i in future}["expe"] == "expired"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "ca"},
        {"name": "../x"},
        {"name": "e-chain"},
        {"common_name": ""},
        {"ip_addresses": ("not-an-ip",)},
        {"validity_days": 0},
        {"srv_names": ("_collab-edge._tls.exämple.com",)},
    ],
)
def test_certspec_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(C_SPEC, **kwargs)


# -- names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("expc.example.com", "EXPC.Example.COM", True),
        ("expc.example.com.", "expc.example.com", True),
        ("*.example.com", "expc.example.com", True),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "example.com", False),
        ("*.example.com", ".example.com", False),
        ("f*.example.com", "foo.example.com", False),
        ("www.*.example.com", "www.a.example.com", False),
        ("*.com", "example.com", False),
        ("example.com", "expc.example.com", False),
    ],
)
def test_dns_name_matches_rfc6125(pattern: str, host: str, ok: bool) -> None:
    assert dns_name_matches(pattern, host) is ok


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=400))
def test_ia5string_roundtrip(value: str) -> None:
    der = encode_ia5string(value)
    assert der[0] == 0x16
    assert decode_ia5string(der) == value


def test_peer_has_san_ignores_the_common_name(pki: LabPki) -> None:
    der = cert(pki.cert_path("cnonly")).public_bytes(serialization.Encoding.DER)
    assert peer_has_san(der, "san.example.com")
    assert not peer_has_san(der, "cn.example.com")
    assert not peer_has_san(cert(pki.cert_path("nosan")), "nosan.example.com")
    assert peer_san_names(cert(pki.cert_path("nosan"))) == SanNames()
    assert peer_has_san(cert(pki.cert_path("expe")), "::1")
    assert not peer_has_san(cert(pki.cert_path("expe")), "127.0.0.2")
    assert not peer_has_san(None, "expc.example.com")


# -- real TLS over loopback --------------------------------------------------------------
#
# The server accepts plain TCP and upgrades with `start_tls`, so the test sees the server's own
# handshake error (asyncio would otherwise only abort the connection) and waits for it explicitly.


@dataclass
class Handshake:
    """What the server saw of one connection."""

    error: Exception | None = None
    peer: SanNames = field(default_factory=SanNames)
    verified: bool | None = None
    alpn: str | None = None


@dataclass
class Server:
    port: int = 0
    results: asyncio.Queue[Handshake] = field(default_factory=asyncio.Queue)

    async def next(self) -> Handshake:
        async with asyncio.timeout(10):
            return await self.results.get()


@contextlib.asynccontextmanager
async def tls_server(ctx: ssl.SSLContext, verify_name: str | None = None) -> AsyncIterator[Server]:
    state = Server()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await writer.start_tls(ctx)
        except (ssl.SSLError, ConnectionError) as exc:
            state.results.put_nowait(Handshake(error=exc))
            writer.close()
            return
        obj = writer.get_extra_info("ssl_object")
        verified = None if verify_name is None else peer_has_san(obj, verify_name)
        state.results.put_nowait(Handshake(None, peer_san_names(obj), verified, obj.selected_alpn_protocol()))
        writer.write(b"ok\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            await asyncio.wait(handlers, timeout=10)


async def exchange(port: int, ctx: ssl.SSLContext, hostname: str) -> tuple[bytes, ssl.SSLObject]:
    """Connect, finish the handshake, and read the server's one line (b"" if it hung up)."""
    async with asyncio.timeout(10):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=hostname)
        try:
            obj = writer.get_extra_info("ssl_object")
            with contextlib.suppress(ConnectionResetError):
                return await reader.readline(), obj
            return b"", obj
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


@pytest.mark.parametrize(
    "hostname", ["expe.example.com", "EXPE.example.com", DOMAIN, f"collab-edge.{DOMAIN}", "127.0.0.1"]
)
async def test_mutual_tls_succeeds_for_every_san(pki: LabPki, hostname: str) -> None:
    ctx = server_context(pki, "expe", require_client_cert=True)
    async with tls_server(ctx, "cluster.example.com") as srv:
        line, obj = await exchange(srv.port, client_context(pki, "expc"), hostname)
        seen = await srv.next()
    assert line == b"ok\n"
    assert obj.version() in ("TLSv1.2", "TLSv1.3")
    assert peer_san_names(obj).srv_names == ("_collab-edge._tls.example.com",)
    assert seen.error is None and seen.verified is True
    assert seen.peer.dns_names == ("expc.example.com", "cluster.example.com")


async def test_wrong_server_name_is_rejected(pki: LabPki) -> None:
    async with tls_server(server_context(pki, "expe", require_client_cert=True)) as srv:
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            await exchange(srv.port, client_context(pki, "expc"), "expc.example.com")
        seen = await srv.next()
    assert err.value.verify_code == X509_V_ERR_HOSTNAME_MISMATCH
    assert seen.error is not None


@pytest.mark.parametrize(("name", "cn"), [("cnonly", "cn.example.com"), ("nosan", "nosan.example.com")])
async def test_common_name_match_without_san_is_rejected(pki: LabPki, name: str, cn: str) -> None:
    async with tls_server(server_context(pki, name, require_client_cert=False)) as srv:
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            await exchange(srv.port, client_context(pki, None), cn)
        await srv.next()
    assert err.value.verify_code == X509_V_ERR_HOSTNAME_MISMATCH


async def test_server_checks_client_san_not_cn(pki: LabPki) -> None:
    ctx = server_context(pki, "expe", require_client_cert=True)
    async with tls_server(ctx, "cn.example.com") as srv:
        line, _ = await exchange(srv.port, client_context(pki, "cnonly"), "expe.example.com")
        seen = await srv.next()
    assert line == b"ok\n"
    assert seen.peer.dns_names == ("san.example.com",)
    assert seen.verified is False


async def test_server_from_another_ca_is_rejected(pki: LabPki, tmp_path: Path) -> None:
    other = ensure_lab_pki(tmp_path / "other", [E_SPEC])
    async with tls_server(server_context(other, "expe", require_client_cert=False)) as srv:
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            await exchange(srv.port, client_context(pki, None), "expe.example.com")
        await srv.next()
    assert err.value.verify_code == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN


async def test_client_cert_from_another_ca_is_rejected(pki: LabPki, tmp_path: Path) -> None:
    other = ensure_lab_pki(tmp_path / "other", [C_SPEC])
    ctx = client_context(pki, None)
    ctx.load_cert_chain(other.chain_path("expc"), other.key_path("expc"))
    async with tls_server(server_context(pki, "expe", require_client_cert=True)) as srv:
        # TLS 1.3: the client finishes before the server judges its certificate, so the client
        # only sees the connection end; the server's own handshake error says why.
        with contextlib.suppress(ssl.SSLError):
            line, _ = await exchange(srv.port, ctx, "expe.example.com")
            assert line == b""
        seen = await srv.next()
    assert isinstance(seen.error, ssl.SSLCertVerificationError)
    assert seen.error.verify_code == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN


async def test_client_without_cert_is_rejected_when_required(pki: LabPki) -> None:
    async with tls_server(server_context(pki, "expe", require_client_cert=True)) as srv:
        with contextlib.suppress(ssl.SSLError):
            line, _ = await exchange(srv.port, client_context(pki, None), "expe.example.com")
            assert line == b""
        seen = await srv.next()
    assert isinstance(seen.error, ssl.SSLError)
    assert seen.error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


async def test_optional_client_cert_and_alpn(pki: LabPki) -> None:
    ctx = server_context(pki, "expe", require_client_cert=False, alpn=["h2", "http/1.1"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    client = client_context(pki, None)
    client.set_alpn_protocols(["http/1.1"])
    async with tls_server(ctx) as srv:
        line, obj = await exchange(srv.port, client, "collab-edge.example.com")
        seen = await srv.next()
    assert line == b"ok\n"
    assert obj.selected_alpn_protocol() == "http/1.1"
    assert seen.alpn == "http/1.1"
    assert seen.peer == SanNames()


async def test_client_context_without_hostname_check_still_verifies_the_ca(
    pki: LabPki, tmp_path: Path
) -> None:
    loose = client_context(pki, None, check_hostname=False)
    assert loose.verify_mode == ssl.CERT_REQUIRED and not loose.hostname_checks_common_name
    async with tls_server(server_context(pki, "expe", require_client_cert=False)) as srv:
        line, _ = await exchange(srv.port, loose, "wrong.example.net")
        await srv.next()
    assert line == b"ok\n"
    other = ensure_lab_pki(tmp_path / "other", [E_SPEC])
    async with tls_server(server_context(other, "expe", require_client_cert=False)) as srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            await exchange(srv.port, loose, "expe.example.com")
        await srv.next()

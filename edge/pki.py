"""The lab PKI: one root CA and a leaf certificate per component (shared/spec/MRA.md §3).

The lab generates its own CA and every certificate on first start, with no manual step. Leaves
carry the SAN the configuration asks for (E: its FQDN, every edge domain, `collab-edge.<domain>`
and the RFC 4985 SRVName `_collab-edge._tls.<domain>`), and both serverAuth and clientAuth EKU
because C and E are TLS client and server of each other on the traversal zone.

Verification always uses the SAN, never the CN: the client contexts turn off the CN fallback and
`peer_has_san` (for a server checking a client's "TLS verify subject name") ignores the subject.

`ensure_lab_pki` is idempotent and safe to call from several processes at once: it holds an
exclusive `fcntl.flock` on `<directory>/.lock` while it checks and issues, and every file is
written to a temporary name and then `os.replace`d. Readers building TLS contexts take the same
lock shared, so they never pair a new key with an old certificate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

# RFC 4985 §2: id-on-dnsSRV, the SRVName otherName.
SRV_NAME_OID = ObjectIdentifier("1.3.6.1.5.5.7.8.7")
CA_COMMON_NAME = "MRA Lab Root CA"
CA_ORGANIZATION = "MRA Edge Lab"
CA_VALIDITY_DAYS = 3650
# A certificate this close to its end is renewed now rather than failing a handshake next week.
RENEW_BEFORE = dt.timedelta(days=7)
# Back-date notBefore a little so a peer whose clock lags ours still accepts a fresh certificate.
BACKDATE = dt.timedelta(minutes=5)

IssueReason = Literal["missing", "expired", "names changed", "ca changed"]
CertState = Literal["valid", "expired", "not yet valid"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LOCK_FILE = ".lock"
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
}


class PkiError(Exception):
    """The lab PKI cannot be used as asked."""


class PkiFileMissingError(PkiError, FileNotFoundError):
    """A file the lab PKI needs is absent; the message names it."""


@dataclass(frozen=True)
class CertSpec:
    """One leaf certificate the lab needs.

    `name` is the file stem (`<name>.pem`, `<name>-chain.pem`, `<name>.key`). `srv_names` are
    encoded verbatim as RFC 4985 SRVName otherNames (an IA5String), e.g.
    `_collab-edge._tls.example.com` as the MRA spec writes them.
    """

    name: str
    common_name: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    srv_names: tuple[str, ...] = ()
    validity_days: int = 825

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or self.name == "ca" or self.name.endswith("-chain"):
            raise ValueError(f"certificate name {self.name!r} is not a usable file stem")
        if not 1 <= len(self.common_name) <= 64:
            raise ValueError(f"common name {self.common_name!r} must be 1..64 characters (RFC 5280)")
        if self.validity_days < 1:
            raise ValueError(f"validity_days must be positive, not {self.validity_days}")
        for ip in self.ip_addresses:
            ipaddress.ip_address(ip)  # raises ValueError naming the bad address
        for srv in self.srv_names:
            if not srv.isascii():
                raise ValueError(f"SRVName {srv!r} must be ASCII (IA5String)")


@dataclass(frozen=True)
class SanNames:
    """The subjectAltName of a certificate, split by kind. DNS names are lower-cased."""

    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    srv_names: tuple[str, ...] = ()

    def key(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """An order-insensitive identity used to decide whether the names changed."""
        return frozenset(self.dns_names), frozenset(self.ip_addresses), frozenset(self.srv_names)


@dataclass(frozen=True)
class LabPki:
    """Where the lab PKI lives, and what the call that produced this value issued."""

    directory: Path
    names: tuple[str, ...] = ()
    issued: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def cert_path(self, name: str) -> Path:
        """`<name>.pem`: the leaf alone."""
        return _existing(self.directory / f"{name}.pem")

    def key_path(self, name: str) -> Path:
        """`<name>.key`: the leaf's private key (mode 0600)."""
        return _existing(self.directory / f"{name}.key")

    def chain_path(self, name: str) -> Path:
        """`<name>-chain.pem`: the leaf followed by the lab CA."""
        return _existing(self.directory / f"{name}-chain.pem")


@dataclass(frozen=True)
class CertInfo:
    """One certificate as `edge certs show` presents it."""

    name: str
    common_name: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    srv_names: tuple[str, ...]
    eku: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    serial_hex: str
    issuer_common_name: str
    fingerprint_sha256: str
    is_ca: bool
    state: CertState


# -- creating and renewing ---------------------------------------------------------------


def ensure_lab_pki(directory: Path, specs: Sequence[CertSpec], now: dt.datetime | None = None) -> LabPki:
    """Create the lab CA and every leaf in `specs` if absent; renew what is stale.

    A leaf is reissued when its files are missing (or its key does not match), when it is not
    signed by the current CA, when it is expired or expires within `RENEW_BEFORE`, or when its
    CN or SAN set differs from the spec. Anything else is left untouched.
    """
    when = _utc(now)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PkiError(f"duplicate certificate names in {names}")
    directory.mkdir(parents=True, exist_ok=True)
    issued: list[tuple[str, str]] = []
    with _locked(directory, exclusive=True):
        ca_cert, ca_key, ca_reason = _ensure_ca(directory, when)
        if ca_reason is not None:
            issued.append(("ca", ca_reason))
        ca_pem = (directory / "ca.pem").read_bytes()
        for spec in specs:
            reason = _leaf_reason(directory, spec, ca_cert, when)
            if reason is not None:
                _issue_leaf(directory, spec, ca_cert, ca_key, ca_pem, when)
                issued.append((spec.name, reason))
            else:
                _repair_chain(directory, spec.name, ca_pem)
    return LabPki(directory=directory, names=tuple(names), issued=issued)


def load_lab_pki(directory: Path, names: Sequence[str] = ()) -> LabPki:
    """The PKI for a process that only reads it; raises `PkiFileMissingError` naming a gap."""
    _existing(directory / "ca.pem")
    for name in names:
        for suffix in (".pem", "-chain.pem", ".key"):
            _existing(directory / f"{name}{suffix}")
    return LabPki(directory=directory, names=tuple(names), issued=[])


def _ensure_ca(
    directory: Path, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, IssueReason | None]:
    cert = _read_cert(directory / "ca.pem")
    key = _read_key(directory / "ca.key")
    reason: IssueReason | None = None
    if cert is None or key is None or not _key_matches(cert, key):
        reason = "missing"
    elif not _fresh(cert, now):
        reason = "expired"
    if reason is None and cert is not None and key is not None:
        return cert, key, None
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_ca(key, now)
    _atomic_write(directory / "ca.key", _key_pem(key), 0o600)
    _atomic_write(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key, reason


def _leaf_reason(
    directory: Path, spec: CertSpec, ca: x509.Certificate, now: dt.datetime
) -> IssueReason | None:
    cert = _read_cert(directory / f"{spec.name}.pem")
    key = _read_key(directory / f"{spec.name}.key")
    if cert is None or key is None or not _key_matches(cert, key):
        return "missing"
    if not _signed_by(cert, ca):
        return "ca changed"
    if not _fresh(cert, now):
        return "expired"
    if _common_name(cert) != spec.common_name or san_names(cert).key() != _spec_sans(spec).key():
        return "names changed"
    return None


def _issue_leaf(
    directory: Path,
    spec: CertSpec,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_pem: bytes,
    now: dt.datetime,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _build_leaf(spec, key.public_key(), ca_cert, ca_key, now)
    leaf_pem = cert.public_bytes(serialization.Encoding.PEM)
    # Key first: a reader that ignores the lock sees a mismatch only for the moment between writes.
    _atomic_write(directory / f"{spec.name}.key", _key_pem(key), 0o600)
    _atomic_write(directory / f"{spec.name}.pem", leaf_pem, 0o644)
    _atomic_write(directory / f"{spec.name}-chain.pem", leaf_pem + ca_pem, 0o644)


def _repair_chain(directory: Path, name: str, ca_pem: bytes) -> None:
    expected = (directory / f"{name}.pem").read_bytes() + ca_pem
    chain = directory / f"{name}-chain.pem"
    with contextlib.suppress(FileNotFoundError):
        if chain.read_bytes() == expected:
            return
    _atomic_write(chain, expected, 0o644)


def _build_ca(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_leaf(
    spec: CertSpec,
    public_key: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # A leaf must not outlive its issuer (RFC 5280 path validation would reject it then anyway).
    not_after = min(now + dt.timedelta(days=spec.validity_days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, spec.common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # EC keys: digitalSignature for ECDSA, keyAgreement for static ECDH suites.
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        # spec §3: C and E need both, they are client and server of each other.
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    general_names = _general_names(spec)
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(
    *, digital_signature: bool = False, key_agreement: bool = False, key_cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_names(spec: CertSpec) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(spec.dns_names)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in dict.fromkeys(spec.ip_addresses)]
    names += [x509.OtherName(SRV_NAME_OID, encode_ia5string(s)) for s in dict.fromkeys(spec.srv_names)]
    return names


def _spec_sans(spec: CertSpec) -> SanNames:
    return SanNames(
        dns_names=tuple(d.lower() for d in spec.dns_names),
        ip_addresses=tuple(str(ipaddress.ip_address(ip)) for ip in spec.ip_addresses),
        srv_names=spec.srv_names,
    )


# -- DER for the SRVName value -----------------------------------------------------------


def encode_ia5string(value: str) -> bytes:
    """DER IA5String (tag 22). `x509.OtherName` adds the [0] EXPLICIT wrapper around it."""
    body = value.encode("ascii")
    return b"\x16" + _der_length(len(body)) + body


def decode_ia5string(der: bytes) -> str:
    """Inverse of `encode_ia5string`; raises ValueError on anything but one DER IA5String."""
    if len(der) < 2 or der[0] != 0x16:
        raise ValueError("not an IA5String")
    first = der[1]
    if first < 0x80:
        length, offset = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            raise ValueError("bad IA5String length")
        length, offset = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if len(der) != offset + length:
        raise ValueError("IA5String length does not match its content")
    return der[offset:].decode("ascii")


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


# -- reading -----------------------------------------------------------------------------


def san_names(cert: x509.Certificate) -> SanNames:
    """The certificate's SAN; SRVName otherNames are decoded, other otherNames ignored."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return SanNames()
    srv: list[str] = []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == SRV_NAME_OID:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                srv.append(decode_ia5string(other.value))
    return SanNames(
        dns_names=tuple(d.lower() for d in san.get_values_for_type(x509.DNSName)),
        ip_addresses=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
        srv_names=tuple(srv),
    )


def describe_certificates(directory: Path, now: dt.datetime | None = None) -> list[CertInfo]:
    """The CA first, then every leaf in `directory` by name."""
    when = _utc(now)
    ca_path = _existing(directory / "ca.pem")
    paths = [("ca", ca_path)]
    for path in sorted(directory.glob("*.pem")):
        if path.name != "ca.pem" and not path.name.endswith("-chain.pem"):
            paths.append((path.stem, path))
    infos = []
    for name, path in paths:
        cert = _read_cert(path)
        if cert is not None:
            infos.append(_describe(name, cert, when))
    return infos


def _describe(name: str, cert: x509.Certificate, now: dt.datetime) -> CertInfo:
    sans = san_names(cert)
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        eku = tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usages)
    except x509.ExtensionNotFound:
        eku = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    state: CertState = "valid"
    if now >= cert.not_valid_after_utc:
        state = "expired"
    elif now < cert.not_valid_before_utc:
        state = "not yet valid"
    return CertInfo(
        name=name,
        common_name=_common_name(cert),
        dns_names=sans.dns_names,
        ip_addresses=sans.ip_addresses,
        srv_names=sans.srv_names,
        eku=eku,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial_hex=f"{cert.serial_number:x}",
        issuer_common_name=_common_name(cert, issuer=True),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(":").upper(),
        is_ca=is_ca,
        state=state,
    )


# -- TLS ---------------------------------------------------------------------------------


def server_context(
    pki: LabPki,
    name: str,
    *,
    require_client_cert: bool,
    alpn: list[str] | None = None,
    send_ca: bool = True,
) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting `<name>-chain.pem` (`<name>.pem` if not `send_ca`).

    With `require_client_cert` the peer must present a certificate issued by the lab CA; the
    caller then checks its identity with `peer_has_san` (spec §3, "TLS verify subject name").
    Without it no certificate is requested at all (browsers would otherwise prompt for one).
    `send_ca=False` leaves the trust anchor out of the handshake (RFC 8446 §4.4.2), for peers
    that hold many connections and keep every certificate they were sent (mock_ucm/imp).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    with _locked(pki.directory, exclusive=False):
        ctx.load_cert_chain(pki.chain_path(name) if send_ca else pki.cert_path(name), pki.key_path(name))
        if send_ca or require_client_cert:  # OpenSSL would also send a CA it finds in this store
            ctx.load_verify_locations(cafile=pki.ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(pki: LabPki, name: str | None, *, check_hostname: bool = True) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting only the lab CA, optionally presenting `<name>`.

    The server certificate is always verified against the CA; with `check_hostname` the
    `server_hostname` must match a SAN. The CN is never consulted (spec §3).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.hostname_checks_common_name = False
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    with _locked(pki.directory, exclusive=False):
        ctx.load_verify_locations(cafile=_existing(pki.ca_path))
        if name is not None:
            ctx.load_cert_chain(pki.chain_path(name), pki.key_path(name))
    return ctx


PeerCert: TypeAlias = ssl.SSLObject | ssl.SSLSocket | bytes | x509.Certificate | None


def peer_san_names(peer: PeerCert) -> SanNames:
    """The SAN of the peer's certificate (empty when the peer presented none)."""
    if isinstance(peer, ssl.SSLObject | ssl.SSLSocket):
        peer = peer.getpeercert(binary_form=True)
    if peer is None:
        return SanNames()
    cert = peer if isinstance(peer, x509.Certificate) else x509.load_der_x509_certificate(peer)
    return san_names(cert)


def peer_has_san(peer: PeerCert, name: str) -> bool:
    """Whether the peer's certificate names `name` in its SAN; the CN never counts.

    DNS names match case-insensitively, with a wildcard allowed only as the whole left-most
    label (RFC 6125 §6.4.3). An IP literal is compared with the IP SANs instead.
    """
    sans = peer_san_names(peer)
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return any(dns_name_matches(pattern, name) for pattern in sans.dns_names)
    return str(ip) in sans.ip_addresses


def dns_name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125 §6.4: exact (case-insensitive) or `*.rest` matching exactly one more label."""
    pattern = pattern.lower().rstrip(".")
    hostname = hostname.lower().rstrip(".")
    if not pattern or not hostname:
        return False
    if "*" not in pattern:
        return pattern == hostname
    first, _, rest = pattern.partition(".")
    # Only a whole left-most label, and never directly under a single-label suffix (`*.com`).
    if first != "*" or "*" in rest or "." not in rest:
        return False
    label, _, host_rest = hostname.partition(".")
    return bool(label) and host_rest == rest


# -- helpers -----------------------------------------------------------------------------


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise PkiFileMissingError(f"lab PKI file missing: {path}")
    return path


def _fresh(cert: x509.Certificate, now: dt.datetime) -> bool:
    # A not-yet-valid certificate is as unusable as an expired one.
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc - RENEW_BEFORE


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _key_matches(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _common_name(cert: x509.Certificate, *, issuer: bool = False) -> str:
    name = cert.issuer if issuer else cert.subject
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _read_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write beside the target and rename over it, so readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(directory: Path, *, exclusive: bool) -> Iterator[None]:
    """`flock` on `<directory>/.lock`; a reader without write access proceeds unlocked."""
    try:
        fd = os.open(directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        if exclusive:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock

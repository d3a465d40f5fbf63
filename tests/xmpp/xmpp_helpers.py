"""Reusable XMPP test clients: a throwaway PKI, a real slixmpp client, and a raw stream client.

Everything waits on explicit readiness (events, stanzas, EOF) with bounded timeouts. The lead
reuses these for the end-to-end test through Expressway-E and -C.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import ssl
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slixmpp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.xmpp.events import FramerEvent, StanzaReceived, StreamClosed, StreamErrorDetected
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.stanza import NS_BIND, NS_SASL, NS_TLS, qn, stream_header

DEFAULT_TIMEOUT_S = 10.0

# -- throwaway PKI ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThrowawayPki:
    ca_path: Path
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        return ctx


def make_test_pki(
    directory: Path,
    dns_names: tuple[str, ...] = ("example.com", "imp1.example.com"),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> ThrowawayPki:
    """A CA and one server certificate (SAN = ``dns_names`` + ``ip_addresses``), as PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "XMPP test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = ThrowawayPki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki


# -- slixmpp client ----------------------------------------------------------------------------------


class LabXmppClient(slixmpp.ClientXMPP):
    """A real slixmpp client that records what it receives in asyncio queues."""

    def __init__(self, jid: str, password: str, *, initial_presence: bool = True) -> None:
        super().__init__(jid, password)
        self.initial_presence = initial_presence
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self.presences: asyncio.Queue[Any] = asyncio.Queue()
        self.stream_errors: asyncio.Queue[Any] = asyncio.Queue()
        self.roster_iq: Any = None
        self.started = asyncio.Event()
        self.auth_failed = asyncio.Event()
        self.ended = asyncio.Event()
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("presence", self.presences.put_nowait)
        self.add_event_handler("failed_auth", lambda _stanza: self.auth_failed.set())
        self.add_event_handler("stream_error", self.stream_errors.put_nowait)
        self.add_event_handler("disconnected", lambda _reason: self.ended.set())

    async def _on_session_start(self, _event: Any) -> None:
        self.roster_iq = await self.get_roster(timeout=DEFAULT_TIMEOUT_S)
        if self.initial_presence:
            self.send_presence()
        self.started.set()

    async def next_message(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
        return await asyncio.wait_for(self.messages.get(), timeout_s)

    async def presence_from(
        self, bare_jid: str, ptype: str = "available", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> Any:
        """Wait for a presence of ``ptype`` from ``bare_jid`` (skipping others)."""

        async def wait() -> Any:
            while True:
                pres = await self.presences.get()
                if pres["from"].bare == bare_jid and pres["type"] == ptype:
                    return pres

        return await asyncio.wait_for(wait(), timeout_s)


def send_chat(client: slixmpp.ClientXMPP, to: str, body: str) -> None:
    client.send_message(mto=slixmpp.JID(to), mbody=body, mtype="chat")


def new_client(
    jid: str,
    password: str,
    ca_path: Path,
    *,
    direct_tls: bool = False,
    initial_presence: bool = True,
) -> LabXmppClient:
    client = LabXmppClient(jid, password, initial_presence=initial_presence)
    client.ca_certs = ca_path
    client.enable_plaintext = False
    client.enable_direct_tls = direct_tls
    client.enable_starttls = not direct_tls
    return client


async def start_client(
    jid: str,
    password: str,
    host: str,
    port: int,
    ca_path: Path,
    *,
    direct_tls: bool = False,
    initial_presence: bool = True,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> LabXmppClient:
    """Connect, authenticate, bind, fetch the roster, send initial presence; fail on timeout."""
    client = new_client(jid, password, ca_path, direct_tls=direct_tls, initial_presence=initial_presence)
    client.connect(host, port)
    try:
        await asyncio.wait_for(client.started.wait(), timeout_s)
    except TimeoutError:
        await stop_client(client)
        raise
    return client


async def stop_client(client: LabXmppClient, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Close the stream and wait for the disconnect; never leaves the connect loop running."""
    client.cancel_connection_attempt()
    if client.transport is not None and not client.ended.is_set():
        await asyncio.wait_for(client.disconnect(wait=timeout_s / 2), timeout_s)
        await asyncio.wait_for(client.ended.wait(), timeout_s)
    filters = getattr(client, "_run_out_filters", None)
    if filters is not None and not filters.done():
        filters.cancel()
        await asyncio.gather(filters, return_exceptions=True)


# -- raw client for low-level cases --------------------------------------------------------------------


class RawXmppClient:
    """A byte-level XMPP client on asyncio streams, parsing answers with `XmlStreamFramer`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = XmlStreamFramer(max_stanza_bytes=1 << 20)
        self.events: deque[FramerEvent] = deque()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> RawXmppClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=server_hostname),
            DEFAULT_TIMEOUT_S,
        )
        return cls(reader, writer)

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def next_event(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> FramerEvent | None:
        """The next event from the server; ``None`` at end of stream (EOF)."""
        while not self.events:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
            if not data:
                return None
            self.events.extend(self.framer.receive_data(data))
        return self.events.popleft()

    async def next_stanza(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> ET.Element:
        while True:
            event = await self.next_event(timeout_s)
            if event is None or isinstance(event, StreamClosed | StreamErrorDetected):
                raise AssertionError(f"stream ended while waiting for a stanza: {event}")
            if isinstance(event, StanzaReceived):
                return event.element

    async def drain_until_closed(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[FramerEvent]:
        """Everything until EOF (the server closed the connection)."""
        seen: list[FramerEvent] = []
        while (event := await self.next_event(timeout_s)) is not None:
            seen.append(event)
        return seen

    async def open_stream(self, domain: str) -> ET.Element:
        """Send our header; return the server's ``<stream:features/>``."""
        self.framer.reset()
        self.send(stream_header(domain, None, None))
        return await self.next_stanza()

    async def starttls(self, domain: str, ssl_context: ssl.SSLContext) -> ET.Element:
        self.send(f"<starttls xmlns='{NS_TLS}'/>")
        proceed = await self.next_stanza()
        assert proceed.tag == qn(NS_TLS, "proceed"), proceed.tag
        await asyncio.wait_for(self.writer.start_tls(ssl_context, server_hostname=domain), DEFAULT_TIMEOUT_S)
        return await self.open_stream(domain)

    async def auth(self, mechanism: str, payload: bytes) -> ET.Element:
        """One SASL attempt; returns ``<success/>`` or ``<failure/>``."""
        encoded = base64.b64encode(payload).decode() or "="
        self.send(f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{encoded}</auth>")
        return await self.next_stanza()

    async def bind(self, resource: str, iq_id: str = "bind1") -> ET.Element:
        self.send(
            f"<iq type='set' id='{iq_id}'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>"
        )
        return await self.next_stanza()

    async def login(
        self,
        domain: str,
        user: str,
        password: str,
        resource: str,
        ssl_context: ssl.SSLContext,
        *,
        starttls: bool = True,
    ) -> ET.Element:
        """STARTTLS (unless already TLS), SASL PLAIN, restart, bind; returns the bind answer."""
        await self.open_stream(domain)
        if starttls:
            await self.starttls(domain, ssl_context)
        result = await self.auth("PLAIN", f"\0{user}\0{password}".encode())
        assert result.tag == qn(NS_SASL, "success"), ET.tostring(result)
        await self.open_stream(domain)
        return await self.bind(resource)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await asyncio.wait_for(self.writer.wait_closed(), DEFAULT_TIMEOUT_S)

"""Adapter tests over real loopback mutual TLS (no sleeps: every wait is on an explicit event)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.traversal.conftest import C_NAME, E_NAME, LabTls
from traversal.channel import (
    LinkEndpoint,
    LinkRejectedError,
    LinkStream,
    StreamRejectedError,
    StreamResetError,
    connect_link,
    serve_links,
)
from traversal.link import HEADER, FrameType, LinkConfig, encode_frame

USER, PASSWORD = "expc", "lab-pass"
GUARD_S = 20.0  # hang protection only; nothing here asserts on wall-clock speed
pytestmark = pytest.mark.timeout(60)


async def echo(stream: LinkStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()


class Harness:
    """An E-side `serve_links` on 127.0.0.1 and helpers to dial it as C."""

    def __init__(self, tls: LabTls) -> None:
        self.tls = tls
        self.server_links: list[LinkEndpoint] = []
        self.client_links: list[LinkEndpoint] = []
        self.link_up = asyncio.Event()
        self.handler: Callable[[LinkStream], Awaitable[None]] = echo
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, config: LinkConfig | None = None) -> None:
        def authenticate(username: str, password: str, channel: str) -> str | None:
            ok = (username, password, channel) == (USER, PASSWORD, "https")
            return None if ok else "authentication failed"

        def verify_peer(ssl_object: ssl.SSLObject) -> str | None:
            cert = ssl_object.getpeercert() or {}
            sans = [str(v) for k, v in cert.get("subjectAltName", ()) if k == "DNS"]  # type: ignore[str-unpack]
            return None if C_NAME in sans else f"TLS verify subject name {C_NAME!r} not in {sans}"

        def on_link(link: LinkEndpoint) -> None:
            link.set_stream_handler(lambda stream: self.handler(stream))
            self.server_links.append(link)
            self.link_up.set()

        self.server = await serve_links(
            "127.0.0.1",
            0,
            ssl=self.tls.server_context(),
            authenticate=authenticate,
            verify_peer=verify_peer,
            on_link=on_link,
            config=config,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def connect(self, **overrides: Any) -> LinkEndpoint:
        kwargs: dict[str, Any] = {
            "ssl": self.tls.client_context(),
            "server_hostname": E_NAME,
            "channel": "https",
            "username": USER,
            "password": PASSWORD,
            "timeout_s": GUARD_S,
        }
        kwargs.update(overrides)
        link = await connect_link("127.0.0.1", self.port, **kwargs)
        self.client_links.append(link)
        return link

    async def server_link(self) -> LinkEndpoint:
        await self.link_up.wait()
        return self.server_links[-1]

    async def close(self) -> None:
        links = self.client_links + self.server_links
        for link in links:
            link.close("test over")
        for link in links:
            await link.wait_closed()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def harness(lab_tls: LabTls) -> AsyncIterator[Harness]:
    h = Harness(lab_tls)
    await h.start()
    async with asyncio.timeout(GUARD_S):
        yield h
    await h.close()


async def test_echo_one_mebibyte_and_status(harness: Harness) -> None:
    link = await harness.connect()
    assert link.is_open
    stream = await link.open_stream({"kind": "http", "peer": "198.51.100.7:51000"})
    payload = bytes(i * 7 % 251 for i in range(1024 * 1024))

    async def send() -> None:
        for offset in range(0, len(payload), 32 * 1024):
            stream.write(payload[offset : offset + 32 * 1024])
            await stream.drain()
        stream.write_eof()

    sender = asyncio.create_task(send())
    assert await stream.read() == payload
    await sender
    client_status = link.status()
    server_status = (await harness.server_link()).status()
    assert client_status["state"] == server_status["state"] == "established"
    assert client_status["peer_cert_names"] == [E_NAME, "127.0.0.1"]
    assert server_status["peer_cert_names"] == [C_NAME]
    assert client_status["bytes_out"] > len(payload) and server_status["bytes_in"] > len(payload)
    assert client_status["peer"] == f"127.0.0.1:{harness.port}"


async def test_two_hundred_concurrent_streams_pushed_down_by_e(harness: Harness) -> None:
    link = await harness.connect(stream_handler=echo)
    e_side = await harness.server_link()

    async def one(i: int) -> None:
        stream = await e_side.open_stream({"kind": "xmpp", "session": i})
        body = f"<message id='{i}'/>".encode() * (i + 1) * 10
        stream.write(body)
        stream.write_eof()
        assert await stream.read() == body

    await asyncio.gather(*(one(i) for i in range(200)))
    assert link.status()["streams"] == 0 and e_side.status()["streams"] == 0


async def test_bad_password_is_refused_with_reason(harness: Harness) -> None:
    with pytest.raises(LinkRejectedError) as info:
        await harness.connect(password="wrong")
    assert info.value.reason == "authentication failed"


async def test_verify_peer_reason_reaches_the_client(harness: Harness, lab_tls: LabTls) -> None:
    rogue = lab_tls.client_context(lab_tls.make_client("rogue.example.com"))
    with pytest.raises(LinkRejectedError) as info:
        await harness.connect(ssl=rogue)
    assert info.value.reason == f"TLS verify subject name {C_NAME!r} not in ['rogue.example.com']"
    assert harness.server_links == []


async def test_tcp_failure_raises_oserror(harness: Harness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(OSError):
            await connect_link(
                "127.0.0.1",
                free_port,
                ssl=harness.tls.client_context(),
                server_hostname=E_NAME,
                channel="https",
                username=USER,
                password=PASSWORD,
            )


async def test_stream_gate_rejects_and_late_handler_serves_waiting_streams(harness: Harness) -> None:
    link = await harness.connect()  # no handler yet: E's streams wait unanswered
    e_side = await harness.server_link()
    early = asyncio.create_task(e_side.open_stream({"kind": "http"}))
    await asyncio.sleep(0)  # let the OPEN go out; the stream stays pending until a handler exists
    link.set_stream_handler(echo, gate=lambda meta: None if meta["kind"] == "http" else "unsupported kind")
    stream = await early
    stream.write(b"ping")
    stream.write_eof()
    assert await stream.readexactly(4) == b"ping"
    with pytest.raises(StreamRejectedError) as info:
        await e_side.open_stream({"kind": "sip"})
    assert info.value.reason == "unsupported kind"


async def test_stream_abort_and_link_abort_reset_peer_streams_promptly(harness: Harness) -> None:
    outcomes: asyncio.Queue[str] = asyncio.Queue()
    first_bytes = asyncio.Event()

    async def reader(stream: LinkStream) -> None:
        assert await stream.readexactly(3) == b"abc"
        first_bytes.set()
        try:
            await stream.read()
        except StreamResetError as exc:
            await outcomes.put(exc.reason)
            raise

    harness.handler = reader
    link = await harness.connect()
    stream = await link.open_stream({"kind": "http"})
    stream.write(b"abc")
    await first_bytes.wait()
    stream.abort("cancelled by client")
    assert await outcomes.get() == "cancelled by client"
    with pytest.raises(StreamResetError):
        stream.write(b"more")

    first_bytes.clear()
    second = await link.open_stream({"kind": "http"})
    second.write(b"abc")
    await first_bytes.wait()
    link.abort("cable pulled")  # no GOAWAY: the server only sees the TCP connection die
    assert (await outcomes.get()).startswith("link lost: connection lost")
    assert await link.wait_closed() == "cable pulled"
    with pytest.raises(StreamResetError, match="link lost: cable pulled"):
        await second.read()


async def test_closing_the_server_side_resolves_client_wait_closed(harness: Harness) -> None:
    link = await harness.connect()
    stream = await link.open_stream({"kind": "http"})
    (await harness.server_link()).close("Expressway-E shutting down")
    assert await link.wait_closed() == "peer went away: Expressway-E shutting down"
    assert not link.is_open
    with pytest.raises(StreamResetError, match="link lost: peer went away"):
        await stream.read()


async def test_keepalive_timeout_against_a_peer_that_stops_reading(lab_tls: LabTls) -> None:
    """A hand-made E answers the handshake and one OPEN, then stops reading and writing."""
    release = asyncio.Event()

    async def frozen_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in (FrameType.HELLO_ACCEPT, FrameType.OPEN_ACCEPT):
            _type, _flags, sid, length = HEADER.unpack(await reader.readexactly(HEADER.size))
            await reader.readexactly(length)
            limits = {"window": 65536, "max_frame": 16384, "max_streams": 10, "max_control": 4096}
            body = json.dumps({"version": 1} | limits).encode() if answer is FrameType.HELLO_ACCEPT else b""
            writer.write(encode_frame(answer, sid, body))
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(frozen_peer, "127.0.0.1", 0, ssl=lab_tls.server_context())
    port = server.sockets[0].getsockname()[1]
    config = LinkConfig(keepalive_interval_s=0.05, keepalive_timeout_s=0.3)
    try:
        async with asyncio.timeout(GUARD_S):
            link = await connect_link(
                "127.0.0.1",
                port,
                ssl=lab_tls.client_context(),
                server_hostname=E_NAME,
                channel="xmpp",
                username=USER,
                password=PASSWORD,
                config=config,
            )
            stream = await link.open_stream({"kind": "xmpp"})
            read = asyncio.create_task(stream.read())
            assert await link.wait_closed() == "keepalive timeout"
            with pytest.raises(StreamResetError, match="link lost: keepalive timeout"):
                await read
            status = link.status()
            assert status["state"] == "closed" and status["pings_sent"] >= 2
            assert status["pings_unanswered"] == status["pings_sent"]
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_handler_tasks_blocked_elsewhere_are_cancelled_when_the_link_closes(harness: Harness) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(stream: LinkStream) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # e.g. a backend that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    harness.handler = stuck
    link = await harness.connect()
    await link.open_stream({"kind": "http"})
    await started.wait()
    link.close("C shutting down")
    await cancelled.wait()
    assert await (await harness.server_link()).wait_closed() == "peer went away: C shutting down"

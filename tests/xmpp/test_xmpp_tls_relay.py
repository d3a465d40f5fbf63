"""The lean TLS end (`edge.xmpp.tls.TlsLayer`) over loopback, and the relay with fake peers."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from edge.xmpp.events import RelayEnded
from edge.xmpp.relay import DRAIN_EVERY_BYTES, StreamRelay
from edge.xmpp.tls import TlsLayer
from tests.xmpp.xmpp_helpers import ThrowawayPki

TIMEOUT_S = 5.0


class App:
    """A TlsApp that records what happens; `echo` sends every byte back."""

    def __init__(self, *, echo: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.echo = echo
        self.tls: TlsLayer | None = None
        self.established = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.data = bytearray()
        self.more = asyncio.Event()
        self.eof = False
        self.paused = 0

    def tls_established(self, tls: TlsLayer) -> None:
        self.tls = tls
        self.established.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()
        if self.echo:
            assert self.tls is not None
            self.tls.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost is reported once"
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        pass

    async def wait_for_bytes(self, n: int) -> bytes:
        async with asyncio.timeout(TIMEOUT_S):
            while len(self.data) < n:
                self.more.clear()
                await self.more.wait()
        return bytes(self.data)


async def tls_server(pki: ThrowawayPki, app: App, **kwargs: Any) -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    ctx = pki.server_context()
    server = await loop.create_server(lambda: TlsLayer(app, ctx, server_side=True, **kwargs), "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def tls_client(pki: ThrowawayPki, app: App, port: int, hostname: str = "example.com") -> TlsLayer:
    loop = asyncio.get_running_loop()
    layer = TlsLayer(app, pki.client_context(), server_side=False, server_hostname=hostname)
    await loop.create_connection(lambda: layer, "127.0.0.1", port)
    return layer


async def test_round_trip_large_writes_and_early_writes(pki: ThrowawayPki) -> None:
    server_app, client_app = App(echo=True), App()
    server, port = await tls_server(pki, server_app)
    try:
        layer = await tls_client(pki, client_app, port)
        layer.write(b"early ")  # before the handshake: held, then sent in order
        await asyncio.wait_for(client_app.established, TIMEOUT_S)
        big = bytes(range(256)) * 1000  # 256,000 bytes: many records, fed and written in slices
        layer.write(big)
        assert await client_app.wait_for_bytes(len(big) + 6) == b"early " + big
        assert layer.get_extra_info("peercert")["subjectAltName"][0] == ("DNS", "example.com")
        assert layer.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert layer.get_extra_info("peername")[0] == "127.0.0.1"
        layer.close()  # close_notify: the server hears EOF, then the loss
        assert await asyncio.wait_for(server_app.lost, TIMEOUT_S) is None
        assert server_app.eof
        assert await asyncio.wait_for(client_app.lost, TIMEOUT_S) is None
    finally:
        server.close()


async def test_certificate_mismatch_fails_the_handshake(pki: ThrowawayPki) -> None:
    server_app, client_app = App(), App()
    server, port = await tls_server(pki, server_app)
    try:
        await tls_client(pki, client_app, port, hostname="not-the-server.test")
        exc = await asyncio.wait_for(client_app.lost, TIMEOUT_S)
        assert isinstance(exc, ssl.SSLCertVerificationError)
        assert not client_app.established.done()
        assert isinstance(await asyncio.wait_for(server_app.lost, TIMEOUT_S), ssl.SSLError | ConnectionError)
        assert not server_app.established.done()
    finally:
        server.close()


async def test_silent_peer_times_out_the_handshake(pki: ThrowawayPki) -> None:
    app = App()
    server, port = await tls_server(pki, app, handshake_timeout_s=0.2)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        exc = await asyncio.wait_for(app.lost, TIMEOUT_S)
        assert isinstance(exc, TimeoutError)
        writer.close()
    finally:
        server.close()


async def test_plain_eof_during_handshake_is_an_error(pki: ThrowawayPki) -> None:
    app = App()
    server, port = await tls_server(pki, app)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write_eof()
        assert isinstance(await asyncio.wait_for(app.lost, TIMEOUT_S), ConnectionResetError)
        writer.close()
    finally:
        server.close()


class _StartTlsServer(asyncio.Protocol):
    """Plain until b"STARTTLS\\n", then TLS on the same connection (what 5222 does)."""

    def __init__(self, app: App, ctx: ssl.SSLContext) -> None:
        self.app, self.ctx = app, ctx
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert data == b"STARTTLS\n" and self.transport is not None
        self.transport.write(b"PROCEED\n")
        TlsLayer.upgrade(self.transport, self.app, self.ctx, server_side=True)


async def test_starttls_upgrade_of_a_plain_connection(pki: ThrowawayPki) -> None:
    app = App(echo=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _StartTlsServer(app, pki.server_context()), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"STARTTLS\n")
        assert await asyncio.wait_for(reader.readline(), TIMEOUT_S) == b"PROCEED\n"
        await asyncio.wait_for(
            writer.start_tls(pki.client_context(), server_hostname="example.com"), TIMEOUT_S
        )
        writer.write(b"inside TLS")
        assert await asyncio.wait_for(reader.readexactly(10), TIMEOUT_S) == b"inside TLS"
        assert app.data == b"inside TLS"
        writer.close()
        assert await asyncio.wait_for(app.lost, TIMEOUT_S) is None
    finally:
        server.close()


# -- StreamRelay with fakes -------------------------------------------------------------------------


class FakeStream:
    """A link stream: reads come from `incoming` (bytes, b"" for EOF, or an exception to raise)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self.written = bytearray()
        self.ended = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.drain_calls = 0

    async def read(self, n: int = -1) -> bytes:
        item = await self.incoming.get()
        if isinstance(item, Exception):
            raise item
        return item

    def write(self, data: bytes) -> None:
        self.written += data

    async def drain(self) -> None:
        self.drain_calls += 1
        await self.drained.wait()

    def write_eof(self) -> None:
        self.ended = True


class FakeConnection:
    def __init__(self) -> None:
        self.written = bytearray()
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_relay_both_ways_until_the_stream_closes_cleanly() -> None:
    stream, conn = FakeStream(), FakeConnection()
    relay = StreamRelay(stream, conn)
    task = asyncio.create_task(relay.run())
    relay.connection_data(b"<message/>")
    for chunk in (b"<presence/>", b"</stream:st", b"ream>\n", b""):  # the close tag split over reads
        stream.incoming.put_nowait(chunk)
    ended = await asyncio.wait_for(task, TIMEOUT_S)
    assert ended == RelayEnded(by_stream=True, clean=True, reason="stream ended")
    assert conn.written == b"<presence/></stream:stream>\n"
    assert stream.written == b"<message/>"


async def test_relay_stream_reset_is_unclean() -> None:
    stream, conn = FakeStream(), FakeConnection()
    relay = StreamRelay(stream, conn)
    task = asyncio.create_task(relay.run())
    stream.incoming.put_nowait(b"<message/>")
    stream.incoming.put_nowait(ConnectionResetError("link lost: keepalive timeout"))
    ended = await asyncio.wait_for(task, TIMEOUT_S)
    assert ended == RelayEnded(by_stream=True, clean=False, reason="link lost: keepalive timeout")


async def test_relay_connection_lost_ends_run_and_reports_its_tail() -> None:
    stream, conn = FakeStream(), FakeConnection()
    relay = StreamRelay(stream, conn)
    task = asyncio.create_task(relay.run())
    await settle()
    relay.connection_data(b"<stream:error/></stream:stream>")
    relay.connection_eof()
    assert stream.ended
    relay.connection_lost("closed by the peer")
    ended = await asyncio.wait_for(task, TIMEOUT_S)
    assert ended == RelayEnded(by_stream=False, clean=True, reason="closed by the peer")

    relay = StreamRelay(FakeStream(), FakeConnection())
    task = asyncio.create_task(relay.run())
    await settle()
    relay.connection_data(b"<message><bo")
    relay.connection_lost("reset")
    assert (await asyncio.wait_for(task, TIMEOUT_S)).clean is False


async def test_relay_owner_cancellation_propagates() -> None:
    relay = StreamRelay(FakeStream(), FakeConnection())
    task = asyncio.create_task(relay.run())
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_relay_backpressure_both_ways() -> None:
    stream, conn = FakeStream(), FakeConnection()
    relay = StreamRelay(stream, conn)
    task = asyncio.create_task(relay.run())
    # connection → stream: past DRAIN_EVERY_BYTES the connection is not read until the stream drained
    stream.drained.clear()
    relay.connection_data(b"x" * (DRAIN_EVERY_BYTES - 1))
    assert conn.reading
    relay.connection_data(b"x")
    assert not conn.reading
    await settle()
    assert stream.drain_calls == 1 and not conn.reading
    stream.drained.set()
    await settle()
    assert conn.reading
    # stream → connection: while the transport asked us to pause, no more is read from the stream
    relay.pause_writing()
    stream.incoming.put_nowait(b"one")
    stream.incoming.put_nowait(b"two")
    await settle()
    assert conn.written == b"one" and stream.incoming.qsize() == 1
    relay.resume_writing()
    await settle()
    assert conn.written == b"onetwo"
    stream.incoming.put_nowait(b"")
    assert (await asyncio.wait_for(task, TIMEOUT_S)).by_stream

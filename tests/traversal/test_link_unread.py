"""Unread stream data and the link's read backpressure (traversal/channel.py).

Every byte a stream receives counts against the link until it is read; above
`_PAUSE_READING_BYTES` the adapter stops reading the socket. Data nobody can read any more
(its handler returned, or both sides ended and the owner dropped the stream) must stop counting,
else each such session leaks a little until the link stops reading for good and every session on
it stalls. Data that a reader still holds must stay readable, also after both sides ended.
Loopback mutual TLS, the harness of test_link_channel.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from edge_e.https import EdgeHttps
from tests.traversal.conftest import LabTls
from tests.traversal.test_link_channel import GUARD_S, Harness, echo
from traversal import channel
from traversal.channel import LinkEndpoint, LinkStream, StreamResetError
from traversal.http_tunnel import TunnelResponse

pytestmark = pytest.mark.timeout(60)
PAUSE_BYTES = 512 * 1024  # lowered from 8 MiB so the test abandons several times the limit quickly
CHUNK = bytes(range(256)) * 256  # 64 KiB: within one stream's window, so END follows at once


@pytest.fixture
async def harness(lab_tls: LabTls, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    monkeypatch.setattr(channel, "_PAUSE_READING_BYTES", PAUSE_BYTES)
    h = Harness(lab_tls)
    await h.start()
    async with asyncio.timeout(GUARD_S):
        yield h
    await h.close()


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for a state the adapter has no event for, checking each millisecond (hang guard)."""
    for _ in range(int(GUARD_S * 1000)):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


async def round_trip(opener: LinkEndpoint) -> None:
    """An echo on a fresh stream: the peer has processed every frame the opener sent before it,
    and the opener every frame the peer sent before answering."""
    stream = await opener.open_stream({"kind": "echo"})
    stream.write(b"barrier")
    stream.write_eof()
    assert await stream.read() == b"barrier"


async def test_handler_returning_with_unread_data_releases_it(harness: Harness) -> None:
    """C's handler ends a session with the client's data unread (an XMPP client gone while IM&P
    still sends): the link forgets those bytes, and keeps reading after many times the limit."""

    async def serve(stream: LinkStream) -> None:
        if stream.metadata["kind"] == "echo":
            await echo(stream)
        else:
            await stream.readexactly(1)  # the rest arrives, or already waits, unread

    link = await harness.connect(stream_handler=serve)
    e_side = await harness.server_link()

    async def abandoned_session() -> None:
        stream = await e_side.open_stream({"kind": "session"})
        stream.write(CHUNK)
        stream.write_eof()
        assert await stream.read() == b""  # the handler returned: END, nothing else

    abandoned = 0
    while abandoned <= 4 * PAUSE_BYTES:
        await asyncio.gather(*(abandoned_session() for _ in range(8)))
        abandoned += 8 * (len(CHUNK) - 1)
        await round_trip(e_side)
        assert link.unread_bytes == 0
        assert link.status()["streams"] == e_side.status()["streams"] == 0

    payload = CHUNK * 32  # 2 MiB through a new stream, both ways
    stream = await e_side.open_stream({"kind": "echo"})
    sender = asyncio.create_task(_send_all(stream, payload))
    assert await stream.read() == payload
    await sender
    assert link.unread_bytes == e_side.unread_bytes == 0


async def test_opener_dropping_a_stream_after_both_ends_releases_its_data(harness: Harness) -> None:
    """E opens, C answers and ends, E reads a little, ends and forgets the stream (an HTTPS
    client that went away): once both sides ended, nobody can be owed more data on it."""

    async def serve(stream: LinkStream) -> None:
        if stream.metadata["kind"] == "echo":
            await echo(stream)
        else:
            stream.write(CHUNK)  # the answer, then END as the handler returns

    await harness.connect(stream_handler=serve)
    e_side = await harness.server_link()
    abandoned = 0
    while abandoned <= 4 * PAUSE_BYTES:
        for _ in range(8):
            stream = await e_side.open_stream({"kind": "http"})
            stream.write_eof()
            assert await stream.readexactly(1) == CHUNK[:1]
            abandoned += len(CHUNK) - 1
        await round_trip(e_side)
        assert e_side.unread_bytes == 0
        assert e_side.status()["streams"] == 0

    stream = await e_side.open_stream({"kind": "echo"})
    sender = asyncio.create_task(_send_all(stream, CHUNK * 32))
    assert await stream.read() == CHUNK * 32
    await sender


async def test_data_before_end_stays_readable_after_both_sides_ended(harness: Harness) -> None:
    """END after data: the stream is gone from the link, its data is still its reader's."""
    answer = CHUNK * 3  # 192 KiB: within the window, so C's END follows without a credit

    async def serve(stream: LinkStream) -> None:
        stream.write(answer)

    await harness.connect(stream_handler=serve)
    e_side = await harness.server_link()

    whole = await e_side.open_stream({"kind": "http"})
    whole.write_eof()
    await until(lambda: whole.eof_received)
    assert e_side.status()["streams"] == 0  # both sides ended: the link holds nothing for it
    assert e_side.unread_bytes == 0
    assert await whole.read() == answer
    assert whole.at_eof and e_side.unread_bytes == 0

    partly = await e_side.open_stream({"kind": "http"})
    partly.write_eof()
    await until(lambda: partly.eof_received)
    assert await partly.readexactly(1000) == answer[:1000]
    partly.abort("client went away")  # what is left is dropped, not released twice
    assert e_side.unread_bytes == 0


async def test_handler_reads_after_both_sides_ended(harness: Harness) -> None:
    """A handler half-closes first and reads later: the peer's data and END arrive meanwhile."""
    request = CHUNK * 3
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(stream: LinkStream) -> None:
        stream.write(b"ok")
        stream.write_eof()
        await until(lambda: stream.eof_received)
        got.set_result(await stream.read())

    link = await harness.connect(stream_handler=serve)
    e_side = await harness.server_link()
    stream = await e_side.open_stream({"kind": "http"})
    stream.write(request)
    stream.write_eof()
    assert await stream.read() == b"ok"
    assert await got == request
    assert link.unread_bytes == 0 and link.status()["streams"] == 0


async def test_end_queued_behind_data_still_retires_the_stream(harness: Harness) -> None:
    """The handler answers more than the peer's window and returns: its END leaves only after the
    peer's credit, and the adapter then forgets the stream too (it did not before)."""
    answer = CHUNK * 8  # 512 KiB, twice the default window

    async def serve(stream: LinkStream) -> None:
        stream.write(answer)  # no drain: the rest and END wait for the peer's WINDOW_UPDATEs

    link = await harness.connect(stream_handler=serve)
    e_side = await harness.server_link()
    stream = await e_side.open_stream({"kind": "http"})
    stream.write(CHUNK)  # left unread by the handler
    stream.write_eof()
    assert await stream.read() == answer
    await until(lambda: link.status()["streams"] == 0)
    assert link.unread_bytes == 0
    assert not link._streams  # the adapter's own table, which no event used to clear


async def test_https_client_gone_mid_download_resets_the_tunnel_stream(harness: Harness) -> None:
    """E's 8443 handler is cancelled when its client goes away (aiohttp handler_cancellation):
    it must reset the stream, else C's answer beyond one window waits for credit forever and
    the window's worth E received stays counted against the link."""
    client_gone = asyncio.Event()
    c_saw: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve(stream: LinkStream) -> None:  # C: a download larger than the window
        if stream.metadata["kind"] == "echo":
            return await echo(stream)
        await stream.read()  # the request: head, body, END
        stream.write(TunnelResponse(200, "OK", [("Content-Type", "application/octet-stream")]).encode())
        stream.write(CHUNK)
        await client_gone.wait()
        try:
            for _ in range(64):
                stream.write(CHUNK)
                await stream.drain()
        except StreamResetError as exc:
            c_saw.set_result(exc.reason)

    await harness.connect(stream_handler=serve)
    e_side = await harness.server_link()
    https = EdgeHttps("expe", e_side.open_stream, max_body_bytes=1024 * 1024, counters={})
    runner = web.AppRunner(https.app(), access_log=None, handler_cancellation=True)  # as edge_e
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        token = base64.urlsafe_b64encode(b"example.com").decode().rstrip("=")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /{token}/get_edge_sso HTTP/1.1\r\nHost: expe\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
        writer.transport.abort()
        assert runner.server is not None
        await until(lambda: not runner.server.connections)  # E's handler has been cancelled
        client_gone.set()
        async with asyncio.timeout(GUARD_S):  # hang guard: without the reset C waits for credit
            assert await c_saw == "client went away"
        await round_trip(e_side)
        assert e_side.unread_bytes == 0 and e_side.status()["streams"] == 0
    finally:
        await runner.cleanup()


async def _send_all(stream: LinkStream, payload: bytes) -> None:
    for offset in range(0, len(payload), len(CHUNK)):
        stream.write(payload[offset : offset + len(CHUNK)])
        await stream.drain()
    stream.write_eof()

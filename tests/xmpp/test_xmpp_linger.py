"""A stream error sent while the peer is still writing reaches it, then a clean close (no reset).

The peer sends one stanza far over the size limit. The server finds it too big after reading a
fraction of it, so the rest is still unread in its socket when it ends the stream: a plain close
then makes Linux answer with a RST, and the error can be lost (the `test_mra_xmpp` flake where C
saw its IM&P connection reset and told the client ``remote-connection-failed``). Each test fails
with ECONNRESET / EPIPE, or an EOF that is not clean, without the lingering close
(`edge.xmpp.linger`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, cast

from edge.xmpp.events import StanzaReceived, StreamClosed
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.linger import linger_close
from edge.xmpp.stanza import NS_STREAMS, qn, split_tag, stream_header
from edge_e.xmpp import EdgeXmpp
from mock_ucm.imp import ImpServer
from tests.xmpp.conftest import DOMAIN
from tests.xmpp.xmpp_helpers import ThrowawayPki

TIMEOUT_S = 10.0
# Far more than a server reads before it finds the stanza too big (the limit plus one socket
# read of at most 256 KiB), so some of it is always unread when the server ends the stream.
FLOOD = b"<message to='bob@example.com'><body>" + b"x" * (1 << 20) + b"</body></message>"


def port_of(imp: ImpServer, mode: str) -> int:
    return next(port for _host, port, m in imp.listeners if m == mode)


def stream_error_then_close(data: bytes) -> str:
    """The stream error condition in ``data``, which must end with ``</stream:stream>``."""
    events = XmlStreamFramer(max_stanza_bytes=1 << 20).receive_data(data)
    assert events and isinstance(events[-1], StreamClosed), events[-3:]
    for event in events:
        if isinstance(event, StanzaReceived) and event.element.tag == qn(NS_STREAMS, "error"):
            return split_tag(event.element[0].tag)[1]
    raise AssertionError(f"no stream error in {events}")


async def plain_flood(port: int) -> bytes:
    """Our header, the flood, our EOF; then everything the server sends, to a clean EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            writer.write(stream_header(DOMAIN, None, None))
            received = await reader.readuntil(b"</stream:features>")
            writer.write(FLOOD)
            await writer.drain()
            writer.write_eof()
            while data := await reader.read(65536):  # ConnectionResetError if reset
                received += data
        return received
    finally:
        writer.close()


def tls_flood(port: int, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """Blocking TLS client (run in a thread): what the server sends up to its close_notify, and
    what the TCP connection gives after that (b"" for a FIN; ECONNRESET raises)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    with context.wrap_socket(raw, server_hostname=DOMAIN) as tls:
        tls.sendall(stream_header(DOMAIN, None, None))
        received = bytearray()
        while b"</stream:features>" not in received:
            received += tls.recv(65536)
        tls.sendall(FLOOD)
        while data := tls.recv(65536):  # b"" at the server's close_notify
            received += data
        plain = tls.unwrap()  # our close_notify; the TCP connection stays ours to read
        assert plain is tls
        return bytes(received), plain.recv(1)


async def test_imp_plain_stream_error_lingers(imp: ImpServer) -> None:
    received = await plain_flood(port_of(imp, "starttls"))
    assert stream_error_then_close(received) == "policy-violation"


async def test_imp_tls_stream_error_lingers(imp: ImpServer, pki: ThrowawayPki) -> None:
    received, after = await asyncio.to_thread(tls_flood, port_of(imp, "tls"), pki.client_context())
    assert stream_error_then_close(received) == "policy-violation"
    assert after == b"", "the server's FIN, not a reset"


async def test_expe_refusal_before_tls_lingers(pki: ThrowawayPki) -> None:
    async def no_link(metadata: dict[str, Any]) -> Any:
        raise AssertionError("a refused client never reaches the traversal link")

    xmpp = EdgeXmpp(
        domain=DOMAIN, address="127.0.0.1", port=0, ssl_context=pki.server_context(), open_stream=no_link
    )
    await xmpp.start()
    try:
        assert xmpp._server is not None
        received = await plain_flood(int(xmpp._server.sockets[0].getsockname()[1]))
        assert stream_error_then_close(received) == "policy-violation"
        assert xmpp.counters["refused_policy-violation"] == 1
    finally:
        await xmpp.stop()


class _Closer(asyncio.Protocol):
    """Answers the first bytes with b"bye" and a lingering close; drops the rest."""

    def __init__(self, lost: asyncio.Future[None], timeout_s: float) -> None:
        self.lost, self.timeout_s = lost, timeout_s
        self.linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.linger is None:
            self.transport.write(b"bye")
            self.linger = linger_close(self.transport, self.timeout_s)
            assert self.linger is not None

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger is not None:
            self.linger.cancel()
        self.lost.set_result(None)


async def test_linger_is_bounded_for_a_peer_that_never_ends() -> None:
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()
    server = await loop.create_server(lambda: _Closer(lost, 0.2), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        async with asyncio.timeout(TIMEOUT_S):
            writer.write(b"hello")
            assert await reader.read() == b"bye"  # then the FIN of the half-close
            writer.write(b"more")  # read and dropped
            await lost  # we never end our side: the deadline does
    finally:
        writer.close()
        server.close()

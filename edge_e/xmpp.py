"""Expressway-E's XMPP listener on 5222 (spec §6).

E speaks only the first, unauthenticated part of the client stream itself: the stream header for
the edge domain and mandatory STARTTLS with E's certificate. After the TLS upgrade the client's
stream (SASL and everything after) is carried byte for byte to Expressway-C over a stream of the
XMPP traversal link that C opened on 7400. E never dials C and never authenticates the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from edge.xmpp.events import StanzaReceived, StreamErrorDetected, StreamHeaderReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.stanza import NS_TLS, element, features, qn, serialize, stream_error, stream_header

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 30.0


class EdgeXmpp:
    def __init__(
        self,
        *,
        domain: str,
        address: str,
        port: int,
        ssl_context: ssl.SSLContext,
        open_stream: Callable[[dict[str, Any]], Awaitable[Any]],
        max_stanza_bytes: int = 65536,
    ) -> None:
        self.domain = domain.lower()
        self.address = address
        self.port = port
        self.ssl_context = ssl_context
        self.open_stream = open_stream
        self.max_stanza_bytes = max_stanza_bytes
        self.current = 0
        self.peak = 0
        self.counters: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    async def start(self) -> tuple[str, str, str, int]:
        self._server = await asyncio.start_server(self._client, self.address, self.port, reuse_address=True)
        return ("xmpp", "tcp", self.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=3.0)

    def status(self) -> dict[str, Any]:
        return {"sessions": self.current, "sessions_peak": self.peak, "counters": dict(self.counters)}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername") or ("", 0)
        try:
            await asyncio.wait_for(self._starttls(reader, writer), HANDSHAKE_TIMEOUT_S)
        except _Refused as exc:
            self._count(f"refused_{exc.condition}")
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(exc.payload)
                await writer.drain()
            writer.close()
            if task is not None:
                self._tasks.discard(task)
            return
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as exc:
            self._count("handshake_failed")
            log.info("xmpp %s:%s: handshake failed: %s", peer[0], peer[1], exc)
            writer.close()
            if task is not None:
                self._tasks.discard(task)
            return
        self.current += 1
        self.peak = max(self.peak, self.current)
        self._count("sessions")
        try:
            await self._relay(reader, writer, f"{peer[0]}:{peer[1]}")
        finally:
            self.current -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _starttls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = XmlStreamFramer(max_stanza_bytes=4096, max_depth=4)
        header_sent = False
        while True:
            data = await reader.read(4096)
            if not data:
                raise ConnectionError("client closed before STARTTLS")
            for event in framer.receive_data(data):
                if isinstance(event, StreamErrorDetected):
                    raise _Refused(
                        event.condition, self._header() + stream_error(event.condition, event.text)
                    )
                if isinstance(event, StreamHeaderReceived):
                    to = (event.attrs.get("to") or "").lower()
                    if to != self.domain:
                        raise _Refused("host-unknown", self._header() + stream_error("host-unknown"))
                    tls = element(qn(NS_TLS, "starttls"), None, element(qn(NS_TLS, "required")))
                    writer.write(self._header() + serialize(features(tls)))
                    header_sent = True
                elif isinstance(event, StanzaReceived):
                    if not header_sent or event.element.tag != qn(NS_TLS, "starttls"):
                        # RFC 6120 §5.3.1: TLS is mandatory here; nothing else before it.
                        raise _Refused("not-authorized", stream_error("not-authorized", "STARTTLS required"))
                    writer.write(serialize(element(qn(NS_TLS, "proceed"))))
                    await writer.drain()
                    await writer.start_tls(self.ssl_context)
                    return

    def _header(self) -> bytes:
        return stream_header(None, self.domain, secrets.token_hex(8))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> None:
        try:
            stream = await self.open_stream({"kind": "xmpp", "client": client, "domain": self.domain})
        except Exception as exc:  # no link from C: the client gets a proper stream error
            self._count("next_hop_failed")
            log.warning("xmpp %s: traversal link unavailable: %s", client, exc)
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await asyncio.wait_for(reader.read(4096), 5.0)
                writer.write(self._header() + stream_error("remote-connection-failed", "traversal link down"))
                await writer.drain()
            return

        async def up() -> None:
            while True:
                data = await reader.read(65536)
                if not data:
                    stream.write_eof()
                    return
                stream.write(data)
                await stream.drain()

        async def down() -> bool:
            tail = b""
            while True:
                data = await stream.read(65536)
                if not data:
                    return tail.rstrip().endswith(b"</stream:stream>")
                tail = (tail + data)[-64:]
                writer.write(data)
                await writer.drain()

        up_task = asyncio.ensure_future(up())
        try:
            closed_cleanly = await down()
        except Exception as exc:  # link lost or stream reset: end the client's stream properly
            self._count("link_lost")
            log.info("xmpp %s: traversal stream ended: %s", client, exc)
            closed_cleanly = False
        finally:
            up_task.cancel()
            with contextlib.suppress(BaseException):
                await up_task
        if not closed_cleanly:
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(stream_error("remote-connection-failed"))
                await writer.drain()
        with contextlib.suppress(Exception):
            stream.close()


class _Refused(Exception):
    def __init__(self, condition: str, payload: bytes) -> None:
        super().__init__(condition)
        self.condition = condition
        self.payload = payload

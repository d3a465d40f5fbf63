"""Byte relay between a traversal-link stream and a connection: the pass-through part of §6.

Expressway-E relays client ↔ link stream once the client's TLS is up; Expressway-C relays link
stream ↔ IM&P once it has replayed the client's `<auth/>`. Neither parses anything after that
(authorization and stanza limits are the IM&P's, spec §6), so one relay serves both.

Shape (shared/STYLE.md "Architecture" 8): the connection side is push, fed by its protocol's
callbacks (`connection_data`, `connection_eof`, `connection_lost`, `pause_writing`,
`resume_writing`); the stream side is pulled by `run()`, the only task a held session has.
`run()` returns a `RelayEnded` saying which side ended first and whether that side had closed
its XMPP stream (`</stream:stream>`), and the owner decides what the other side is told.

Backpressure: towards the connection, `run()` waits while the transport asked us to pause;
towards the link, after every `DRAIN_EVERY_BYTES` the connection stops being read until the
stream's `drain()` returns, so a fast sender never piles data up in the link's buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from edge.xmpp.events import RelayEnded
from edge.xmpp.stanza import STREAM_CLOSE

READ_BYTES = 64 * 1024
DRAIN_EVERY_BYTES = 64 * 1024
_TAIL_BYTES = 32  # enough to hold "</stream:stream>" split across reads, plus whitespace


class RelayStream(Protocol):
    """The link stream side (`traversal.channel.LinkStream` has this shape)."""

    async def read(self, n: int = -1) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...


class RelayConnection(Protocol):
    """The connection side (a transport, e.g. `edge.xmpp.tls.TlsLayer`)."""

    def write(self, data: bytes) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def closes_stream(tail: bytes) -> bool:
    """Whether bytes ending in ``tail`` end with the XMPP stream close tag (RFC 6120 §4.4)."""
    return tail.rstrip().endswith(STREAM_CLOSE)


class StreamRelay:
    """Relays one session; see the module docstring."""

    __slots__ = (
        "_conn",
        "_conn_lost",
        "_conn_tail",
        "_drain_task",
        "_resume",
        "_stream",
        "_task",
        "_unflushed",
        "_write_paused",
    )

    def __init__(self, stream: RelayStream, connection: RelayConnection) -> None:
        self._stream = stream
        self._conn = connection
        self._task: asyncio.Task[RelayEnded] | None = None
        self._conn_tail = b""
        self._conn_lost: str | None = None
        self._unflushed = 0
        self._drain_task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._resume: asyncio.Future[None] | None = None

    # -- connection side (push) ---------------------------------------------------------------------

    def connection_data(self, data: bytes) -> None:
        self._conn_tail = (self._conn_tail + data)[-_TAIL_BYTES:]
        try:
            self._stream.write(data)
        except Exception:  # stream reset or link lost: run() sees it on its next read
            return
        self._unflushed += len(data)
        if self._unflushed >= DRAIN_EVERY_BYTES and self._drain_task is None:
            self._conn.pause_reading()
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    def connection_eof(self) -> None:
        """The connection's peer finished sending: end our side of the stream (half-close)."""
        with contextlib.suppress(Exception):
            self._stream.write_eof()

    def connection_lost(self, reason: str) -> None:
        if self._conn_lost is not None:
            return
        self._conn_lost = reason or "connection lost"
        if self._drain_task is not None:
            self._drain_task.cancel()
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # run() is waiting on the stream; it turns this into RelayEnded

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    # -- stream side (pull) -------------------------------------------------------------------------

    async def run(self) -> RelayEnded:
        """Relay stream → connection until either side ends; never raises for a peer's doing."""
        task = self._task = asyncio.current_task()
        tail = b""
        try:
            while self._conn_lost is None:
                data = await self._stream.read(READ_BYTES)
                if not data:
                    return RelayEnded(by_stream=True, clean=closes_stream(tail), reason="stream ended")
                tail = (tail + data)[-_TAIL_BYTES:]
                self._conn.write(data)
                if self._write_paused:
                    self._resume = asyncio.get_running_loop().create_future()
                    try:
                        await self._resume
                    finally:
                        self._resume = None
        except asyncio.CancelledError:
            # Cancelled by connection_lost() (swallowed) or by our owner (propagated).
            if self._conn_lost is None or task is None or task.uncancel() > 0:
                raise
        except Exception as exc:  # the stream was reset or the link lost
            return RelayEnded(by_stream=True, clean=False, reason=str(exc) or type(exc).__name__)
        finally:
            self._task = None
            if self._drain_task is not None:
                self._drain_task.cancel()
        return RelayEnded(by_stream=False, clean=closes_stream(self._conn_tail), reason=self._conn_lost)

    async def _drain(self) -> None:
        try:
            await self._stream.drain()
        except Exception:  # the stream is gone; run() reports it
            return
        finally:
            self._drain_task = None
            self._unflushed = 0
        if self._conn_lost is None:
            self._conn.resume_reading()

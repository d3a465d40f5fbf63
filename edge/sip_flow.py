"""The thin asyncio adapter for one SIP stream flow (TCP or TLS), shared by E and C.

It feeds bytes to the sans-IO framer and hands messages, STUN requests and framing errors to the
owner through callbacks; it writes bytes and closes. Nothing here knows SIP routing.

Writes are coalesced: everything sent while one batch of input is handled (a chunk often holds
many messages at load) leaves in one `transport.write` at the end of the loop iteration, so one
TLS record and one syscall carry the batch. A malformed message, whether the framer found it or a
handler's lazy parse did, is answered with its 4xx (STYLE §5), never with a traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Callable
from typing import Any

from edge.sip.errors import SipParseError
from edge.sip.events import FramingError, KeepaliveReceived, MessageFramed, MessageReceived, StunReceived
from edge.sip.framing import StreamFramer
from edge.sip.message import Request, Response, Validation, make_response, parse_message
from edge.write_batch import WriteBatch

log = logging.getLogger(__name__)

_ids = itertools.count(1)

MessageHandler = Callable[["SipFlow", Request | Response], None]
FrameHandler = Callable[["SipFlow", MessageFramed], bool]
"""A hop's byte-level fast path (edge.sip.fastpath): handles a framed message and returns True,
or returns False having changed nothing, and the message is parsed and given to on_message."""
StunHandler = Callable[["SipFlow", bytes], None]
ClosedHandler = Callable[["SipFlow", str], None]


class SipFlow(asyncio.Protocol):
    """One connection. `flow_id` is a short token usable in URIs (flow tokens, Via params)."""

    def __init__(
        self,
        *,
        on_message: MessageHandler,
        on_closed: ClosedHandler | None = None,
        on_stun: StunHandler | None = None,
        on_connected: Callable[[SipFlow], None] | None = None,
        on_frame: FrameHandler | None = None,
        max_message_bytes: int = 65535,
        name: str = "sip",
        strict: bool = True,
        validation: Validation | None = None,
    ) -> None:
        """`validation` (message.Validation) says how much of each message the framer checks:
        PROXY for untrusted clients (what a proxy needs, RFC 3261 §16.3), NONE for flows from peers
        that already validated (E's zone flow into C, UCM); `strict` is the older spelling
        (True: FULL, False: NONE). Framing and parsing stay bounded either way. `on_frame`, if
        given, sees each framed message first (FrameHandler)."""
        self.flow_id = f"f{next(_ids):x}"
        self.name = name
        self._on_message = on_message
        self._on_closed = on_closed
        self._on_stun = on_stun
        self._on_connected = on_connected
        self._on_frame = on_frame
        self.framer = StreamFramer(
            max_message_bytes, strict=strict, validation=validation, split_heads=on_frame is not None
        )
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.secure = False
        self.ssl_object: ssl.SSLObject | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        self._batch = WriteBatch(self._write_now)  # one transport write per loop iteration
        self.context: dict[str, Any] = {}
        self.messages_in = 0
        self.messages_out = 0

    @property
    def transport_name(self) -> str:
        return "TLS" if self.secure else "TCP"

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        self.local = (str(local[0]), int(local[1]))
        self.ssl_object = transport.get_extra_info("ssl_object")
        self.secure = self.ssl_object is not None
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        framer = self.framer
        for event in framer.receive_frames(data):
            if isinstance(event, MessageFramed):
                if self._on_frame is not None and self._fast(event):
                    self.messages_in += 1
                    continue
                parsed = framer.parse_frame(event)
                if isinstance(parsed, MessageReceived):
                    self.messages_in += 1
                    self._dispatch(parsed.message)
                else:
                    self._framing_error(parsed)
            elif isinstance(event, KeepaliveReceived):
                if event.pong_needed:
                    self.write(b"\r\n")
            elif isinstance(event, StunReceived):
                if self._on_stun is not None:
                    self._on_stun(self, event.data)
            elif isinstance(event, FramingError):
                self._framing_error(event)
                if event.fatal:
                    return

    def _fast(self, frame: MessageFramed) -> bool:
        assert self._on_frame is not None
        try:
            return self._on_frame(self, frame)
        except Exception:  # a fast-path bug: it changes nothing before it commits, so parse fully
            log.exception("%s %s: fast path failed", self.name, self.flow_id)
            return False

    def _dispatch(self, msg: Request | Response) -> None:
        try:
            self._on_message(self, msg)
        except SipParseError as exc:  # a header only parsed when needed was malformed
            log.info("%s %s: %d %s", self.name, self.flow_id, exc.status_code, exc.reason)
            self._answer(msg, exc.status_code, exc.reason)
        except Exception:  # one bad message must not take the flow down with a traceback
            log.exception("%s %s: handler failed", self.name, self.flow_id)
            self._answer(msg, 500, "Server Internal Error")

    def _framing_error(self, event: FramingError) -> None:
        log.info(
            "%s %s from %s:%d: %d %s", self.name, self.flow_id, *self.peer, event.status_code, event.reason
        )
        if event.fatal:
            self.close(f"framing error: {event.reason}")
        elif event.data:
            try:  # framed but invalid: answer it when enough of it parses to build a response
                msg = parse_message(event.data, strict=False)
            except SipParseError:
                return
            self._answer(msg, event.status_code, event.reason)

    def _answer(self, msg: Request | Response, status: int, reason: str) -> None:
        """A final error answer to a request (never to an ACK or a response)."""
        if not isinstance(msg, Request) or msg.method == "ACK":
            return
        try:
            if msg.top_via is None:
                return
            self.send(make_response(msg, status, reason))
        except SipParseError:
            pass  # not even Via/From/To/Call-ID/CSeq could be read: nothing to answer to

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = str(exc) if exc else "closed by peer"
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(reason)
        if self._on_closed is not None:
            self._on_closed(self, reason)

    def send(self, message: Request | Response) -> bool:
        if not self.is_open:
            return False
        self.messages_out += 1
        self._queue(message.serialize())
        return True

    def send_bytes(self, data: bytes) -> bool:
        """A whole serialized message (the fast path's output)."""
        if not self.is_open:
            return False
        self.messages_out += 1
        self._queue(data)
        return True

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._queue(data)

    def _queue(self, data: bytes) -> None:
        self._batch.add(data)

    def flush(self) -> None:
        """Write what was queued (runs by itself at the end of the loop iteration)."""
        self._batch.flush()

    def _write_now(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, reason: str = "closed") -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()
        if not self.closed.done():
            self.closed.set_result(reason)

    async def wait_closed(self) -> str:
        return await asyncio.shield(self.closed)


def host_port(text: str) -> tuple[str, int | None]:
    """'1.2.3.4:5060' → ('1.2.3.4', 5060); '[::1]:5060' → ('::1', 5060)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return text, None

"""A lean XMPP client session for load (spec §6): one asyncio stream, the sans-IO
`XmlStreamFramer` shared with E, C and the IM&P, and only what a Jabber client does to come
online — STARTTLS, SASL PLAIN, bind, roster, presence — then 1:1 chat.

slixmpp (`mra_client.xmpp`) is the reference client for single flows; at a thousand sessions in
one process its per-session plugin and handler state dominates, so `edge load` uses this, and so
does the XMPP benchmark (benchmarks/xmpp/run.py): `login(online=False)` for a bare bound session,
`on_data` to count received bytes without parsing them, `send_chats` + `drain` for batched,
flow-controlled sending.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge.xmpp.events import StanzaReceived, StreamClosed, StreamErrorDetected, StreamHeaderReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.stanza import (
    NS_BIND,
    NS_CLIENT,
    NS_ROSTER,
    NS_SASL,
    NS_STREAMS,
    NS_TLS,
    qn,
    split_tag,
    stream_header,
)
from mra_client.edge_http import StepError

MAX_STANZA_BYTES = 256 * 1024
_STEP = "XMPP sign-in"
_STREAM_ERROR = qn(NS_STREAMS, "error")


@dataclass(frozen=True, slots=True)
class ChatReceived:
    """A `<message type="chat">` with a body arrived for this session."""

    sender: str
    body: str
    stanza_id: str


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


def _condition(el: ET.Element) -> str:
    """The first child's local name: `<failure><not-authorized/></failure>` → not-authorized."""
    for child in el:
        return split_tag(child.tag)[1]
    return split_tag(el.tag)[1]


class LeanXmppSession:
    """One client session through E's xmppEdgeServer. `login()` raises `StepError` with the
    protocol condition (`SASL failure: not-authorized`, `bind error: conflict`, …)."""

    def __init__(
        self,
        *,
        username: str,
        password: str,
        domain: str,
        resource: str,
        ssl_context: ssl.SSLContext,
        on_chat: Callable[[ChatReceived], None] | None = None,
        on_closed: Callable[[str], None] | None = None,
        on_data: Callable[[bytes], None] | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.domain = domain
        self.resource = resource
        self.jid = f"{username}@{domain}/{resource}"
        self.ssl = ssl_context
        self.on_chat = on_chat
        self.on_closed = on_closed
        self.on_data = on_data
        """When set, bytes received once online go here unparsed instead of through the framer
        (`on_chat` is then never called): a benchmark counts its own markers, so the client costs
        the same whatever server is measured."""
        self.framer = XmlStreamFramer(max_stanza_bytes=MAX_STANZA_BYTES)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._pending: list[object] = []  # framer events read but not yet consumed
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._available = False
        self.closed_reason: str | None = None
        self.messages_sent = 0
        self.messages_received = 0
        self.stanza_errors = 0

    # -- sign-in -----------------------------------------------------------------------

    async def login(self, host: str, port: int, timeout_s: float = 15.0, *, online: bool = True) -> None:
        """STARTTLS, SASL PLAIN, bind; then (`online`) the roster and initial presence, as a
        Jabber client does. `online=False` stops at the bound resource (RFC 6120 §7)."""
        try:
            await asyncio.wait_for(self._login(host, port, online), timeout_s)
        except TimeoutError:
            await self.close()
            raise StepError(_STEP, f"no session within {timeout_s:.0f} s") from None
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            await self.close()
            raise StepError(_STEP, f"{host}:{port}: {exc or type(exc).__name__}") from exc
        except StepError:
            await self.close()
            raise
        self._task = asyncio.ensure_future(self._read_loop())

    async def _login(self, host: str, port: int, online: bool) -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port)
        features = await self._open_stream()
        if features.find(qn(NS_TLS, "starttls")) is None:
            raise StepError(_STEP, "the edge offers no STARTTLS")
        self._send(f"<starttls xmlns='{NS_TLS}'/>".encode())
        answer = await self._next_stanza()
        if answer.tag != qn(NS_TLS, "proceed"):
            raise StepError(_STEP, f"STARTTLS refused: {_condition(answer)}")
        # RFC 6120 §13.7.2.1: verify the certificate against the XMPP domain.
        await self.writer.start_tls(self.ssl, server_hostname=self.domain)
        await self._open_stream()
        payload = base64.b64encode(f"\0{self.username}\0{self.password}".encode()).decode()
        self._send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{payload}</auth>".encode())
        answer = await self._next_stanza()
        if answer.tag != qn(NS_SASL, "success"):
            raise StepError(_STEP, f"SASL failure: {_condition(answer)}")
        await self._open_stream()
        self._send(
            f"<iq type='set' id='bind'><bind xmlns='{NS_BIND}'>"
            f"<resource>{_escape(self.resource)}</resource></bind></iq>".encode()
        )
        answer = await self._next_stanza()
        if answer.get("type") != "result":
            raise StepError(_STEP, f"bind error: {_error_condition(answer)}")
        jid = answer.findtext(f"{qn(NS_BIND, 'bind')}/{qn(NS_BIND, 'jid')}")
        if jid:
            self.jid = jid
        if not online:
            return
        self._send(f"<iq type='get' id='roster'><query xmlns='{NS_ROSTER}'/></iq>".encode())
        answer = await self._next_stanza_where(lambda el: el.get("id") == "roster")
        if answer.get("type") != "result":
            raise StepError(_STEP, f"roster error: {_error_condition(answer)}")
        self._send(b"<presence/>")
        self._available = True

    async def _open_stream(self) -> ET.Element:
        self.framer.reset()
        self._send(stream_header(self.domain, None, None))
        while True:
            event = await self._next_event()
            if isinstance(event, StreamHeaderReceived):
                continue
            return await self._stanza_of(event)

    async def _next_event(self) -> object:
        assert self.reader is not None
        while True:
            if self._pending:
                return self._pending.pop(0)
            data = await self.reader.read(65536)
            if not data:
                raise StepError(_STEP, "stream closed by the edge")
            self._pending.extend(self.framer.receive_data(data))

    async def _stanza_of(self, event: object) -> ET.Element:
        if isinstance(event, StanzaReceived):
            if event.element.tag == _STREAM_ERROR:
                raise StepError(_STEP, f"stream error: {_condition(event.element)}")
            return event.element
        if isinstance(event, StreamErrorDetected):
            raise StepError(_STEP, f"stream error: {event.condition}")
        if isinstance(event, StreamClosed):
            raise StepError(_STEP, "stream closed by the edge")
        return await self._next_stanza()

    async def _next_stanza(self) -> ET.Element:
        return await self._stanza_of(await self._next_event())

    async def _next_stanza_where(self, match: Callable[[ET.Element], bool]) -> ET.Element:
        for _ in range(64):  # bounded: pushes (presence, offline messages) may come first
            el = await self._next_stanza()
            if match(el):
                return el
            self._handle(el)
        raise StepError(_STEP, "no answer among the first 64 stanzas")

    # -- online ------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.writer is None or self.writer.is_closing():
            raise ConnectionError("XMPP stream is closed")
        self.writer.write(data)

    def send_chat(self, to_bare: str, body: str) -> str:
        """Send a 1:1 chat; returns its id. Raises ConnectionError if the stream is gone."""
        stanza_id = f"m{next(self._ids)}"
        self._send(
            f"<message to='{_escape(to_bare)}' type='chat' id='{stanza_id}'>"
            f"<body>{_escape(body)}</body></message>".encode()
        )
        self.messages_sent += 1
        return stanza_id

    def send_chats(self, to: str, bodies: Iterable[str]) -> int:
        """Several 1:1 chats to one JID in a single write (one TLS record burst, as a client
        catching up does); returns how many. Raises ConnectionError if the stream is gone."""
        out = []
        for body in bodies:
            out.append(
                f"<message to='{_escape(to)}' type='chat' id='m{next(self._ids)}'>"
                f"<body>{_escape(body)}</body></message>"
            )
        self._send("".join(out).encode())
        self.messages_sent += len(out)
        return len(out)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark (backpressure)."""
        if self.writer is None:
            raise ConnectionError("XMPP stream is closed")
        await self.writer.drain()

    def keepalive(self) -> None:
        """RFC 6120 §4.6.1 whitespace keepalive."""
        self._send(b" ")

    async def _read_loop(self) -> None:
        assert self.reader is not None
        reason = "stream closed by the edge"
        try:
            leftover, self._pending = self._pending, []
            for event in leftover:  # pushed right after the sign-in answers, in the same read
                self._event(event)
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                if self.on_data is not None:
                    self.on_data(data)
                    continue
                for event in self.framer.receive_data(data):
                    if isinstance(event, StreamErrorDetected):
                        reason = f"stream error: {event.condition}"
                        return
                    if isinstance(event, StreamClosed):
                        return
                    if isinstance(event, StanzaReceived) and event.element.tag == _STREAM_ERROR:
                        reason = f"stream error: {_condition(event.element)}"
                        return
                    self._event(event)
        except (OSError, ConnectionError, ssl.SSLError) as exc:
            reason = str(exc) or type(exc).__name__
        finally:
            self.closed_reason = reason
            if self.on_closed is not None and not self._closing:
                self.on_closed(reason)

    def _event(self, event: object) -> None:
        if isinstance(event, StanzaReceived):
            self._handle(event.element)

    def _handle(self, el: ET.Element) -> None:
        ns, local = split_tag(el.tag)
        if ns != NS_CLIENT:
            return
        if el.get("type") == "error":
            self.stanza_errors += 1
            return
        if local == "message":
            body = el.findtext(qn(NS_CLIENT, "body"))
            if body is not None:
                self.messages_received += 1
                if self.on_chat is not None:
                    self.on_chat(ChatReceived(el.get("from", ""), body, el.get("id", "")))
        elif local == "iq" and el.get("type") in ("get", "set"):
            # RFC 6120 §8.2.3: answer every request; we implement none (ping gets a result).
            to = el.get("from", "")
            self._send(f"<iq type='result' id='{_escape(el.get('id', ''))}' to='{_escape(to)}'/>".encode())

    async def close(self, timeout_s: float = 5.0) -> None:
        """`</stream:stream>` (RFC 6120 §4.4) and close; idempotent, never raises."""
        self._closing = True
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                if not writer.is_closing():
                    bye = b"<presence type='unavailable'/>" if self._available else b""
                    writer.write(bye + b"</stream:stream>")
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def _error_condition(el: ET.Element) -> str:
    err = el.find(qn(NS_CLIENT, "error"))
    return _condition(err) if err is not None else (el.get("type") or "no answer")

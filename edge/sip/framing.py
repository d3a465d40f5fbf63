"""Incremental SIP framing for streams (TCP/TLS, RFC 3261 §18.3) and the datagram path.

One stream carries SIP messages, RFC 5626 CRLF keepalives and STUN (first byte's top two bits
00 and the magic cookie at offset 4). Work is O(n) in bytes received: a chunk holding many
messages is walked with an offset and what is left over is kept once; the header terminator
search resumes where it stopped, Content-Length is read straight from the head bytes and each
message is parsed once. Feeding one byte at a time gives the same events as feeding everything
at once.
"""

from __future__ import annotations

import re

from edge.sip import fastpath
from edge.sip.errors import SipParseError
from edge.sip.events import (
    FramingError,
    FramingEvent,
    KeepaliveReceived,
    MessageFramed,
    MessageReceived,
    StunReceived,
)
from edge.sip.message import MAX_MESSAGE_BYTES, Validation, parse_framed, parse_message

_STUN_COOKIE = b"\x21\x12\xa4\x42"
_STUN_HEADER = 20
# A Content-Length header line (long or compact form) of a head; continuation lines start with
# LWS and never match.
_CL_RE = re.compile(rb"\r\n(?:content-length|l)[ \t]*:([^\r\n]*)", re.IGNORECASE)

Buffer = bytes | bytearray
RawFramingEvent = MessageFramed | KeepaliveReceived | StunReceived | FramingError


class StreamFramer:
    """Feed bytes with `receive_data`; get framing events. After a fatal error, close the flow.

    A lone CRLF is ambiguous until the next byte arrives (pong vs. the start of a CRLFCRLF
    ping). Call `ping_sent()` after sending a ping so the next CRLF counts as the pong at once.

    `validation` says how much of each message is checked (message.Validation); `strict` is the
    older spelling (True: FULL, False: NONE). `split_heads`: see MessageFramed.head.
    """

    def __init__(
        self,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        *,
        strict: bool = True,
        validation: Validation | None = None,
        split_heads: bool = False,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.validation = validation or (Validation.FULL if strict else Validation.NONE)
        self.strict = self.validation is Validation.FULL
        # receive_frames splits each head on bytes for a hop's fast path (MessageFramed.head)
        # and reads Content-Length from that split instead of a second scan of the head.
        self.split_heads = split_heads
        self._raw: fastpath.RawHead | None = None
        self._buf: Buffer = b""  # bytes not yet framed (the tail of earlier chunks)
        self._scan = 0  # where the next search for CRLFCRLF starts, from the message start
        self._need: int | None = None  # total length of the current SIP message once known
        self._head = 0  # its head length (up to the CRLFCRLF) once known
        self._awaiting_pong = False
        self._closed = False

    def ping_sent(self) -> None:
        self._awaiting_pong = True

    def receive_data(self, data: bytes) -> list[FramingEvent]:
        """Framing events with every SIP message parsed (at this framer's validation level)."""
        return [
            self.parse_frame(event) if isinstance(event, MessageFramed) else event
            for event in self.receive_frames(data)
        ]

    def parse_frame(self, frame: MessageFramed) -> MessageReceived | FramingError:
        """Parse a message `receive_frames` cut out. A parse error leaves framing intact, so the
        flow survives it (a non-fatal FramingError carrying the bytes, to answer them)."""
        try:
            return MessageReceived(parse_framed(frame.data, 0, frame.head_end, self.validation))
        except SipParseError as exc:
            return FramingError(exc.status_code, exc.reason, False, frame.data)

    def receive_frames(self, data: bytes) -> list[RawFramingEvent]:
        """As `receive_data`, but SIP messages come unparsed (MessageFramed): the caller may
        handle one on a fast path and hands the rest to `parse_frame`."""
        if self._closed:
            return []
        if self._buf:
            buf: Buffer = self._buf if isinstance(self._buf, bytearray) else bytearray(self._buf)
            buf += data
        else:
            buf = data
        events: list[RawFramingEvent] = []
        pos = 0
        end = len(buf)
        while pos < end and not self._closed:
            event, pos = self._next_event(buf, pos)
            if event is None:
                break
            events.append(event)
        if self._closed or pos >= end:
            self._buf = b""
        elif pos:
            self._buf = bytearray(buf[pos:])
        else:
            self._buf = buf
        return events

    def _fail(self, status: int, reason: str) -> FramingError:
        self._closed = True
        self._buf = b""
        return FramingError(status, reason, True)

    def _next_event(self, buf: Buffer, pos: int) -> tuple[RawFramingEvent | None, int]:
        if self._need is None:
            first = buf[pos]
            if first == 0x0D:
                return self._keepalive(buf, pos)
            if first & 0xC0 == 0:
                return self._stun(buf, pos)
        return self._sip(buf, pos)

    def _keepalive(self, buf: Buffer, pos: int) -> tuple[RawFramingEvent | None, int]:
        if self._awaiting_pong and buf.startswith(b"\r\n", pos):
            self._awaiting_pong = False
            return KeepaliveReceived(pong_needed=False), pos + 2
        if buf.startswith(b"\r\n\r\n", pos):
            return KeepaliveReceived(pong_needed=True), pos + 4
        if len(buf) - pos < 4 and b"\r\n\r\n".startswith(bytes(buf[pos:])):
            return None, pos  # wait: could still become a ping
        if buf.startswith(b"\r\n", pos):
            return KeepaliveReceived(pong_needed=False), pos + 2
        return self._fail(400, "Garbage on stream"), pos

    def _stun(self, buf: Buffer, pos: int) -> tuple[RawFramingEvent | None, int]:
        if len(buf) - pos < 8:
            return None, pos
        if buf[pos + 4 : pos + 8] != _STUN_COOKIE:
            return self._fail(400, "Garbage on stream"), pos
        total = _STUN_HEADER + int.from_bytes(buf[pos + 2 : pos + 4], "big")
        if total > self.max_message_bytes:
            return self._fail(413, "STUN message too large"), pos
        if len(buf) - pos < total:
            return None, pos
        return StunReceived(bytes(buf[pos : pos + total])), pos + total

    def _sip(self, buf: Buffer, pos: int) -> tuple[RawFramingEvent | None, int]:
        if self._need is None:
            end = buf.find(b"\r\n\r\n", pos + self._scan)
            if end < 0:
                if len(buf) - pos > self.max_message_bytes:
                    return self._fail(413, "Message too large"), pos
                self._scan = max(0, len(buf) - pos - 3)
                return None, pos
            raw: fastpath.RawHead | None = None
            cl: int | None = None
            if self.split_heads:
                raw = fastpath.scan_head(bytes(buf[pos:end]))
                cl = raw.content_length() if raw is not None else None
            if cl is None:
                try:
                    cl = _find_content_length(buf, pos, end)
                except SipParseError as exc:
                    return self._fail(exc.status_code, exc.reason), pos
                if cl is None:
                    return self._fail(400, "Missing Content-Length on stream"), pos
            head = end - pos
            need = head + 4 + cl
            if need > self.max_message_bytes:
                return self._fail(413, "Message too large"), pos
            self._scan = 0
            if len(buf) - pos >= need:  # the usual case: the whole message is here already
                return self._framed(buf, pos, need, head, raw), pos + need
            self._need, self._head, self._raw = need, head, raw
            return None, pos
        need = self._need
        if len(buf) - pos < need:
            return None, pos
        raw = self._raw
        self._need = self._raw = None
        return self._framed(buf, pos, need, self._head, raw), pos + need

    @staticmethod
    def _framed(buf: Buffer, pos: int, need: int, head: int, raw: fastpath.RawHead | None) -> MessageFramed:
        data = bytes(buf[pos : pos + need])
        if raw is not None:
            raw.data = data
        return MessageFramed(data, head, raw)


def _find_content_length(buf: Buffer, start: int, end: int) -> int | None:
    """Content-Length from raw header lines, independent of the rest of the head's validity."""
    found: int | None = None
    for m in _CL_RE.finditer(buf, start, end):
        v = m.group(1).strip(b" \t")
        if not v.isdigit() or len(v) > 10:
            raise SipParseError(400, "Malformed Content-Length")
        if found is not None and found != int(v):
            raise SipParseError(400, "Conflicting Content-Length")
        found = int(v)
    return found


def parse_datagram(
    data: bytes, *, max_message_bytes: int = MAX_MESSAGE_BYTES, strict: bool = True
) -> FramingEvent:
    """One UDP datagram: a SIP message, a STUN message, a CRLF keepalive, or an error."""
    if not data.strip(b"\r\n"):
        return KeepaliveReceived(pong_needed=data == b"\r\n\r\n")
    if data[0] & 0xC0 == 0:
        if len(data) >= _STUN_HEADER and data[4:8] == _STUN_COOKIE:
            return StunReceived(bytes(data))
        return FramingError(400, "Not SIP or STUN", False, bytes(data))
    try:
        return MessageReceived(parse_message(data, max_message_bytes=max_message_bytes, strict=strict))
    except SipParseError as exc:
        return FramingError(exc.status_code, exc.reason, False, bytes(data))

"""Incremental SIP framing for streams (TCP/TLS, RFC 3261 §18.3) and the datagram path.

One stream carries SIP messages, RFC 5626 CRLF keepalives and STUN (first byte's top two bits
00 and the magic cookie at offset 4). Work is O(n) in bytes received: the header terminator
search resumes where it stopped and each message is parsed once. Feeding one byte at a time
gives the same events as feeding everything at once.
"""

from __future__ import annotations

from edge.sip.errors import SipParseError
from edge.sip.events import FramingError, FramingEvent, KeepaliveReceived, MessageReceived, StunReceived
from edge.sip.message import MAX_MESSAGE_BYTES, parse_message

_STUN_COOKIE = b"\x21\x12\xa4\x42"
_STUN_HEADER = 20


class StreamFramer:
    """Feed bytes with `receive_data`; get framing events. After a fatal error, close the flow.

    A lone CRLF is ambiguous until the next byte arrives (pong vs. the start of a CRLFCRLF
    ping). Call `ping_sent()` after sending a ping so the next CRLF counts as the pong at once.
    """

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES, *, strict: bool = True) -> None:
        self.max_message_bytes = max_message_bytes
        self.strict = strict
        self._buf = bytearray()
        self._scan = 0  # where the next search for CRLFCRLF starts
        self._need: int | None = None  # total length of the current SIP message once known
        self._awaiting_pong = False
        self._closed = False

    def ping_sent(self) -> None:
        self._awaiting_pong = True

    def receive_data(self, data: bytes) -> list[FramingEvent]:
        if self._closed:
            return []
        self._buf += data
        events: list[FramingEvent] = []
        while self._buf and not self._closed:
            event = self._next_event()
            if event is None:
                break
            events.append(event)
        return events

    def _fail(self, status: int, reason: str) -> FramingError:
        self._closed = True
        self._buf.clear()
        return FramingError(status, reason, True)

    def _consume(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._scan = 0
        self._need = None
        return out

    def _next_event(self) -> FramingEvent | None:
        buf = self._buf
        if self._need is None and buf[0] == 0x0D:
            return self._keepalive()
        if self._need is None and buf[0] & 0xC0 == 0:
            return self._stun()
        return self._sip()

    def _keepalive(self) -> FramingEvent | None:
        buf = self._buf
        if self._awaiting_pong and buf.startswith(b"\r\n"):
            self._awaiting_pong = False
            self._consume(2)
            return KeepaliveReceived(pong_needed=False)
        if buf.startswith(b"\r\n\r\n"):
            self._consume(4)
            return KeepaliveReceived(pong_needed=True)
        if len(buf) < 4 and b"\r\n\r\n".startswith(bytes(buf)):
            return None  # wait: could still become a ping
        if buf.startswith(b"\r\n"):
            self._consume(2)
            return KeepaliveReceived(pong_needed=False)
        return self._fail(400, "Garbage on stream")

    def _stun(self) -> FramingEvent | None:
        buf = self._buf
        if len(buf) < 8:
            return None
        if buf[4:8] != _STUN_COOKIE:
            return self._fail(400, "Garbage on stream")
        total = _STUN_HEADER + int.from_bytes(buf[2:4], "big")
        if total > self.max_message_bytes:
            return self._fail(413, "STUN message too large")
        if len(buf) < total:
            return None
        return StunReceived(self._consume(total))

    def _sip(self) -> FramingEvent | None:
        buf = self._buf
        if self._need is None:
            end = buf.find(b"\r\n\r\n", self._scan)
            if end < 0:
                if len(buf) > self.max_message_bytes:
                    return self._fail(413, "Message too large")
                self._scan = max(0, len(buf) - 3)
                return None
            try:
                cl = _find_content_length(bytes(buf[:end]))
            except SipParseError as exc:
                return self._fail(exc.status_code, exc.reason)
            if cl is None:
                return self._fail(400, "Missing Content-Length on stream")
            self._need = end + 4 + cl
            if self._need > self.max_message_bytes:
                return self._fail(413, "Message too large")
        if len(buf) < self._need:
            return None
        data = self._consume(self._need)
        try:
            return MessageReceived(
                parse_message(data, max_message_bytes=self.max_message_bytes, strict=self.strict)
            )
        except SipParseError as exc:
            # Framing stayed intact (Content-Length was readable), so the flow survives.
            return FramingError(exc.status_code, exc.reason, False, data)


def _find_content_length(head: bytes) -> int | None:
    """Content-Length from raw header lines, independent of the rest of the head's validity."""
    found: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon or line[:1] in (b" ", b"\t"):
            continue
        if name.strip().lower() in (b"content-length", b"l"):
            v = value.strip()
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

"""DNS over TCP framing (RFC 1035 §4.2.2, RFC 7766 §8): a 2-byte length, then the message.

Sans-IO and incremental: feed any slicing of the stream (one byte at a time included) and get the
same messages out. Bounded: a declared length above ``max_message_bytes`` is a protocol error,
so a peer cannot make us buffer more than one maximal message.
"""

from __future__ import annotations

LENGTH_BYTES = 2


class FrameTooLarge(ValueError):
    """The peer announced a message longer than we accept; the connection should be closed."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"DNS message of {length} bytes exceeds the {limit}-byte limit")
        self.length = length
        self.limit = limit


class TcpFramer:
    """Splits a TCP byte stream into DNS messages."""

    def __init__(self, max_message_bytes: int = 65535) -> None:
        if not 12 <= max_message_bytes <= 65535:
            raise ValueError("max_message_bytes must be within 12..65535 (a DNS header to the 2-byte limit)")
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def receive_data(self, data: bytes) -> list[bytes]:
        """Every complete message `data` finishes; raises FrameTooLarge on an oversize length."""
        self._buffer += data
        messages: list[bytes] = []
        offset = 0
        while len(self._buffer) - offset >= LENGTH_BYTES:
            length = int.from_bytes(self._buffer[offset : offset + LENGTH_BYTES], "big")
            if length > self.max_message_bytes:
                raise FrameTooLarge(length, self.max_message_bytes)
            end = offset + LENGTH_BYTES + length
            if len(self._buffer) < end:
                break
            messages.append(bytes(self._buffer[offset + LENGTH_BYTES : end]))
            offset = end
        del self._buffer[:offset]  # one compaction per call keeps this O(n) in bytes received
        return messages


def frame(message: bytes) -> bytes:
    """`message` with its 2-byte length prefix."""
    if len(message) > 65535:
        raise ValueError("a DNS message over TCP is at most 65535 bytes")
    return len(message).to_bytes(LENGTH_BYTES, "big") + message

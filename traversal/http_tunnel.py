"""HTTP requests carried over the HTTPS tunnel (one traversal-link stream per request).

E pushes each client request down a stream that C opened the link for: a head line (JSON:
method, target, headers, client address) then the body, then end-of-stream. C answers on the
same stream: a head line (status, reason, headers) then the body, then end-of-stream. Bodies
stream in both directions; heads are bounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD_BYTES = 65536
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "host",
    }
)
"""Headers that describe one hop (RFC 9110 §7.6.1) and never cross the tunnel or the proxy."""


class TunnelProtocolError(Exception):
    """A malformed or oversized head on the tunnel."""


@dataclass
class TunnelRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    client: str = ""
    edge: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def encode(self) -> bytes:
        return _encode(
            {
                "method": self.method,
                "target": self.target,
                "headers": self.headers,
                "client": self.client,
                "edge": self.edge,
                "extra": self.extra,
            }
        )

    @classmethod
    def decode(cls, line: bytes) -> TunnelRequest:
        data = _decode(line)
        try:
            return cls(
                method=str(data["method"]),
                target=str(data["target"]),
                headers=[(str(k), str(v)) for k, v in data["headers"]],
                client=str(data.get("client", "")),
                edge=str(data.get("edge", "")),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TunnelProtocolError(f"bad request head: {exc}") from exc


@dataclass
class TunnelResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]

    def encode(self) -> bytes:
        return _encode({"status": self.status, "reason": self.reason, "headers": self.headers})

    @classmethod
    def decode(cls, line: bytes) -> TunnelResponse:
        data = _decode(line)
        try:
            return cls(
                status=int(data["status"]),
                reason=str(data["reason"]),
                headers=[(str(k), str(v)) for k, v in data["headers"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TunnelProtocolError(f"bad response head: {exc}") from exc


def _encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_HEAD_BYTES:
        raise TunnelProtocolError("head too large")
    return data


def _decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_HEAD_BYTES:
        raise TunnelProtocolError("head too large")
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise TunnelProtocolError(f"head is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TunnelProtocolError("head is not an object")
    return data


class HeadReader:
    """Incremental reader of the head line; the rest of the stream is body."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """Returns (head line, leftover body bytes) once the newline arrived."""
        self._buf += data
        idx = self._buf.find(b"\n")
        if idx < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise TunnelProtocolError("head too large")
            return None
        head = bytes(self._buf[:idx])
        rest = bytes(self._buf[idx + 1 :])
        self._buf.clear()
        return head, rest

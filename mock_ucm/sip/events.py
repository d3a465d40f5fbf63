"""Outputs of the mock UCM SIP core: messages to put on the wire, and where.

The core never opens sockets; the adapter (`service.py`) performs these. Transaction keys ride
along so the adapter can report a failed send back to the right transaction (RFC 3261 §17.1.4).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.sip.errors import SipParseError
from edge.sip.events import TransactionKey
from edge.sip.message import Request, Response
from edge.sip.uri import Uri

DEFAULT_PORTS = {"tcp": 5060, "tls": 5061}


@dataclass(frozen=True, slots=True)
class Target:
    """A next hop: transport ("tcp" | "tls"), host and port (RFC 3263 without DNS)."""

    transport: str
    host: str
    port: int

    @classmethod
    def from_uri(cls, uri: Uri) -> Target:
        """`transport=` wins, then sips: → TLS; everything else TCP (this UCM speaks no UDP)."""
        if not uri.is_sip or not uri.host:
            raise SipParseError(416, "Unsupported URI Scheme")
        transport = uri.transport or ("tls" if uri.scheme == "sips" else "tcp")
        if transport not in DEFAULT_PORTS:
            raise SipParseError(503, f"Unsupported transport {transport}")
        host = uri.host[1:-1] if uri.host.startswith("[") else uri.host
        return cls(transport, host, uri.port or DEFAULT_PORTS[transport])


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """Send `request` to `target` (reuse a connection to it, else open one). `key` is None for
    an ACK to a 2xx, which has no client transaction (RFC 3261 §13.2.2.4)."""

    request: Request
    target: Target
    key: TransactionKey | None


@dataclass(frozen=True, slots=True)
class OutgoingResponse:
    """Send `response` on the flow its request came in on (`flow`), or, if that flow is gone,
    to the top Via's received/rport (RFC 3261 §18.2.2)."""

    response: Response
    flow: int | None


SipOutput = OutgoingRequest | OutgoingResponse

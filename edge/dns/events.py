"""What the DNS core reports for each datagram or TCP message it is fed."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryAnswered:
    """A response was produced; ``wire`` is what goes back to the client (without TCP framing)."""

    client_ip: str
    tcp: bool
    view: str | None
    """The view that answered; None when no view matches the client (the answer is REFUSED)."""
    qname: str | None
    qtype: str | None
    rcode: str
    truncated: bool
    wire: bytes


@dataclass(frozen=True)
class QueryDropped:
    """Nothing is sent back: no query id could be read, or the message is itself a response."""

    client_ip: str
    tcp: bool
    reason: str

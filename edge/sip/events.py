"""Events of the SIP layers: framing (stream/datagram) and transactions. Small, typed, past tense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from edge.sip.fastpath import RawHead
from edge.sip.message import Request, Response


class TransactionKey(NamedTuple):
    """§17.1.3 / §17.2.3 matching key. Client side leaves `sent_by` empty. A NamedTuple: it is
    hashed on every table lookup, and a tuple hashes and compares in C."""

    branch: str
    sent_by: str
    method: str


# -- framing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: Request | Response


@dataclass(slots=True)  # not frozen: one per message on the hot path, and frozen __init__ is slow
class MessageFramed:
    """A complete SIP message cut from a stream but not parsed yet (`StreamFramer.receive_frames`):
    `data` is exactly its bytes, `head_end` the offset of the CRLFCRLF ending its head. Lets a hop
    try a byte-level fast path (edge.sip.fastpath) before `StreamFramer.parse_frame`."""

    data: bytes
    head_end: int
    head: RawHead | None = None  # its head split on bytes, when the framer was asked to


@dataclass(frozen=True, slots=True)
class KeepaliveReceived:
    """RFC 5626 §3.5.1: CRLFCRLF ping (answer with CRLF) or a CRLF pong."""

    pong_needed: bool


@dataclass(frozen=True, slots=True)
class StunReceived:
    """A STUN message multiplexed on the SIP flow (RFC 5626 §4.4.2, MRA HA keepalives)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FramingError:
    """Malformed input. `fatal`: the stream cannot be resynchronised and must be closed.

    For a non-fatal error `data` holds the offending (correctly framed) message bytes so the
    caller may answer it, e.g. with 400, when enough of it parses.
    """

    status_code: int
    reason: str
    fatal: bool = True
    data: bytes = b""


FramingEvent = MessageReceived | KeepaliveReceived | StunReceived | FramingError


# -- transactions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestToSend:
    key: TransactionKey
    request: Request
    retransmission: bool = False


@dataclass(frozen=True, slots=True)
class ResponseToSend:
    key: TransactionKey
    response: Response
    retransmission: bool = False


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new request for the TU. `key` is None for requests handled outside any transaction
    (ACK to a 2xx); `cancelled` names the INVITE server transaction a CANCEL matches."""

    key: TransactionKey | None
    request: Request
    cancelled: TransactionKey | None = None


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response for the TU. `key` is None for a response matching no client transaction
    (a proxy forwards those statelessly, RFC 3261 §16.7 / §17.1.3)."""

    key: TransactionKey | None
    response: Response


@dataclass(frozen=True, slots=True)
class TransactionTimedOut:
    """Timer B/F (no final response), H (no ACK) or C (proxy INVITE, TU should CANCEL)."""

    key: TransactionKey
    timer: str


@dataclass(frozen=True, slots=True)
class TransportErrorOccurred:
    key: TransactionKey


@dataclass(frozen=True, slots=True)
class TransactionTerminated:
    key: TransactionKey


TransactionEvent = (
    RequestToSend
    | ResponseToSend
    | RequestReceived
    | ResponseReceived
    | TransactionTimedOut
    | TransportErrorOccurred
    | TransactionTerminated
)

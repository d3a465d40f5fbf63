"""Sans-IO SIP stack: codec (`message`, `uri`, `address`, `headers`), stream/datagram framing,
RFC 3261 §17 transactions, §12 dialogs and digest authentication. No asyncio/socket/ssl here."""

from edge.sip.address import CSeq, NameAddr, Via
from edge.sip.errors import SipParseError
from edge.sip.headers import Headers, Params
from edge.sip.message import (
    Request,
    Response,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
)
from edge.sip.uri import Uri

__all__ = [
    "CSeq",
    "Headers",
    "NameAddr",
    "Params",
    "Request",
    "Response",
    "SipParseError",
    "Uri",
    "Via",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
]

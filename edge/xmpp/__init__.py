"""XMPP building blocks shared by Expressway-E, Expressway-C and the mock IM&P (spec §6).

`framer.XmlStreamFramer` splits a byte stream into typed events (`events`); `stanza` builds and
serialises elements; `jid` parses addresses. Everything here is sans-IO.
"""

from edge.xmpp.events import (
    FramerEvent,
    StanzaReceived,
    StreamClosed,
    StreamErrorDetected,
    StreamHeaderReceived,
)
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.jid import InvalidJid, Jid

__all__ = [
    "FramerEvent",
    "InvalidJid",
    "Jid",
    "StanzaReceived",
    "StreamClosed",
    "StreamErrorDetected",
    "StreamHeaderReceived",
    "XmlStreamFramer",
]

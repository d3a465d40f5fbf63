"""Events of the XMPP stream framer (`edge.xmpp.framer.XmlStreamFramer`) and relay (`edge.xmpp.relay`).

Small typed dataclasses, past-tense names (shared/STYLE.md "Events").
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StreamHeaderReceived:
    """The peer opened (or re-opened, after a restart) its ``<stream:stream>``.

    ``attrs`` holds the header attributes by their qualified name as written on the wire
    (``to``, ``from``, ``id``, ``version``, ``xml:lang``); namespace declarations are not
    attributes here but appear in ``namespaces`` (prefix ``""`` is the default namespace).
    ``raw`` is the opening tag exactly as received, so a relay can forward it byte-exact.
    """

    attrs: dict[str, str]
    raw: bytes
    namespaces: dict[str, str] = field(default_factory=dict)

    @property
    def default_namespace(self) -> str:
        return self.namespaces.get("", "")


@dataclass(frozen=True, slots=True)
class StanzaReceived:
    """One complete first-level child of the stream (a stanza or a stream-level element).

    ``element`` uses ElementTree's Clark notation (``{jabber:client}message``); ``raw`` is the
    child's bytes exactly as received, from its ``<`` to the ``>`` of its end tag.
    """

    element: ET.Element
    raw: bytes


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The peer sent ``</stream:stream>``."""


@dataclass(frozen=True, slots=True)
class StreamErrorDetected:
    """The input broke RFC 6120; ``condition`` is a §4.9.3 stream error condition name.

    The framer is failed from here on; the owner answers with
    `edge.xmpp.stanza.stream_error(condition, text)` and closes.
    """

    condition: str
    text: str = ""


FramerEvent = StreamHeaderReceived | StanzaReceived | StreamClosed | StreamErrorDetected


@dataclass(frozen=True, slots=True)
class RelayEnded:
    """A relayed session is over (`edge.xmpp.relay.StreamRelay.run`).

    ``by_stream``: the link stream ended first (END, reset, link lost), else the connection did.
    ``clean``: the side that ended had closed its XMPP stream (its last bytes were
    ``</stream:stream>``); otherwise the owner tells the other side with a ``<stream:error/>``.
    """

    by_stream: bool
    clean: bool
    reason: str

"""Incremental, bounded XMPP stream framer on expat (sans-IO; shared by E, C and the mock IM&P).

Feed it the bytes of one direction of an XMPP stream with `XmlStreamFramer.receive_data`; it
returns `edge.xmpp.events` events: the stream header, each complete first-level child of the
stream (a stanza, ``<stream:features/>``, ``<starttls/>``...) with its raw bytes, the close, or a
stream error condition (RFC 6120 §4.9.3).

Why it is shaped this way:

* One expat parser per stream (RFC 6120 §4.2: the stream is one XML document); `reset()` throws
  it away for the stream restarts after STARTTLS (§5.4.3.3) and SASL success (§6.4.6).
* Raw bytes: expat reports the byte offset of every event (``CurrentByteIndex``). The framer
  keeps only the bytes since the start of the stanza in progress (or since the last stream-level
  event), so a relay can forward a stanza byte-exact while memory stays bounded by
  ``max_stanza_bytes`` per session.
* RFC 6120 §11.1 forbids comments, processing instructions, DTDs and entity references other
  than the predefined ones. A DOCTYPE is refused at its first token, before expat reads any
  declaration, so no entity can ever be defined and billion-laughs expands nothing.
* Input is fed to expat in slices so a peer sending megabytes in one write is cut off after at
  most one slice beyond the limit; one byte at a time gives the same events as one big write.
* An expat parser costs ~10 KiB once it has parsed a stream header and a few stanzas (buffers,
  name tables, pools), which is most of what an idle session costs a server holding thousands.
  `compact()` drops it between stanzas; the next input builds a fresh parser primed with the
  header bytes already received (another ~5 µs), so the events stay exactly the same.
  `close()` drops it for good (its handlers point back at the framer: a cycle otherwise).
"""

from __future__ import annotations

import enum
import functools
import re
import xml.etree.ElementTree as ET
from xml.parsers import expat

from edge.xmpp.events import (
    FramerEvent,
    StanzaReceived,
    StreamClosed,
    StreamErrorDetected,
    StreamHeaderReceived,
)

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_XML = "http://www.w3.org/XML/1998/namespace"
DEFAULT_CONTENT_NAMESPACES = frozenset({"jabber:client", "jabber:server"})

# Bytes handed to expat per Parse() call: bounds how far past the size limit expat can get.
_FEED_SLICE_BYTES = 8192
_SLASH = 0x2F
_START_TAG = re.compile(rb"""<(?:[^>"']|"[^"]*"|'[^']*')*>""")

# expat error codes that are not plain well-formedness errors (RFC 6120 §4.9.3, §11.1).
_EXPAT_CONDITIONS = {
    expat.errors.codes[expat.errors.XML_ERROR_UNDEFINED_ENTITY]: "restricted-xml",
    expat.errors.codes[expat.errors.XML_ERROR_RECURSIVE_ENTITY_REF]: "restricted-xml",
    expat.errors.codes[expat.errors.XML_ERROR_EXTERNAL_ENTITY_HANDLING]: "restricted-xml",
    expat.errors.codes[expat.errors.XML_ERROR_UNKNOWN_ENCODING]: "unsupported-encoding",
    expat.errors.codes[expat.errors.XML_ERROR_INCORRECT_ENCODING]: "unsupported-encoding",
}


class _State(enum.Enum):
    AWAIT_HEADER = "await-header"
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


class _Closed(Exception):
    """Raised by the end-of-stream callback: nothing after ``</stream:stream>`` is parsed."""


class _Failure(Exception):
    """Raised inside expat callbacks to stop the parse with a stream error condition."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(condition, text)
        self.condition = condition
        self.text = text


@functools.lru_cache(maxsize=4096)
def _split_name(name: str) -> tuple[str, str, str]:
    """expat's ``uri}local}prefix`` (namespace_prefixes on) → (uri, local, prefix)."""
    parts = name.split("}")
    if len(parts) == 1:
        return "", name, ""
    if len(parts) == 2:
        return parts[0], parts[1], ""
    return parts[0], parts[1], parts[2]


@functools.lru_cache(maxsize=4096)
def _clark(name: str) -> str:
    uri, local, _prefix = _split_name(name)
    return f"{{{uri}}}{local}" if uri else local


def _qname(name: str) -> str:
    _uri, local, prefix = _split_name(name)
    return f"{prefix}:{local}" if prefix else local


def _tag_end(buf: bytearray, start: int) -> int:
    """Index just past the ``>`` closing the start tag that begins at ``start`` (relative).

    Attribute values may contain a literal ``>``, so quoted values are skipped.
    """
    match = _START_TAG.match(buf, start)
    assert match is not None, "expat reported a tag whose end is not buffered"
    return match.end()


class XmlStreamFramer:
    """Splits one direction of an XMPP stream into header, stanzas and close.

    ``max_stanza_bytes`` bounds a first-level child (and anything pending between them);
    ``max_depth`` bounds element nesting inside a stanza (the stanza element is depth 1).
    ``content_namespaces`` are the default namespaces accepted on the stream header (RFC 6120
    §4.8.2); ``None`` accepts any.
    """

    __slots__ = (
        "_buf",
        "_buf_start",
        "_builder",
        "_content_namespaces",
        "_depth",
        "_events",
        "_fed",
        "_header_raw",
        "_max_depth",
        "_max_stanza_bytes",
        "_namespaces",
        "_parser",
        "_priming",
        "_stanza_empty_end",
        "_stanza_start",
        "_state",
    )

    def __init__(
        self,
        max_stanza_bytes: int = 65536,
        max_depth: int = 32,
        content_namespaces: frozenset[str] | None = DEFAULT_CONTENT_NAMESPACES,
    ) -> None:
        self._max_stanza_bytes = max_stanza_bytes
        self._max_depth = max_depth
        self._content_namespaces = content_namespaces
        self.reset()

    # -- public API ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new stream document (after STARTTLS or SASL success); drops pending input."""
        self._parser: expat.XMLParserType | None = self._new_parser()
        self._priming = False
        self._header_raw = b""
        self._buf = bytearray()
        self._buf_start = 0  # absolute stream offset of self._buf[0]
        self._fed = 0
        self._depth = 0
        self._stanza_start = -1
        self._stanza_empty_end = -1  # relative end of an empty (``<x/>``) stanza tag, else -1
        self._builder: ET.TreeBuilder | None = None
        self._namespaces: dict[str, str] = {}
        self._events: list[FramerEvent] = []
        self._state = _State.AWAIT_HEADER

    @property
    def failed(self) -> bool:
        return self._state is _State.FAILED

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the element in progress (for memory accounting and tests)."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> list[FramerEvent]:
        """Feed bytes; return the events they complete. Nothing more after a close or an error."""
        if self._state in (_State.CLOSED, _State.FAILED):
            return []
        if self._parser is None:
            self._reprime()
        for offset in range(0, len(data), _FEED_SLICE_BYTES):
            self._feed(data[offset : offset + _FEED_SLICE_BYTES])
            if self._state in (_State.CLOSED, _State.FAILED):
                break
        events, self._events = self._events, []
        return events

    def compact(self) -> bool:
        """Drop the expat parser if no stanza is in progress; True if it was dropped.

        Call it when input stops for a while (e.g. after each read): between stanzas the only
        state is the stream header, which is kept as bytes to prime the next parser.
        """
        if self._state is not _State.OPEN or self._parser is None or self._depth != 1:
            return False
        if self._buf and self._buf.strip(b" \t\r\n"):
            return False  # part of the next stanza (or of its tag) is already buffered
        self._parser = None
        self._buf = bytearray()
        return True

    def close(self) -> None:
        """Stop parsing and free the parser now; `receive_data` returns nothing afterwards."""
        if self._state is not _State.FAILED:
            self._state = _State.CLOSED
        self._parser = None
        self._buf = bytearray()
        self._builder = None

    # -- feeding -----------------------------------------------------------------------------

    def _reprime(self) -> None:
        """A new parser for the stream in progress, fed the header again without any event."""
        parser = self._parser = self._new_parser()
        self._depth = 0
        self._priming = True
        try:
            parser.Parse(self._header_raw, False)
        finally:
            self._priming = False
        # Offsets are per document: the new one starts with the header, then our input.
        self._fed = self._buf_start = len(self._header_raw)
        self._stanza_start = -1

    def _feed(self, chunk: bytes) -> None:
        assert self._parser is not None
        self._buf.extend(chunk)
        self._fed += len(chunk)
        try:
            self._parser.Parse(chunk, False)
            if self._fed - self._buf_start > self._max_stanza_bytes:
                raise _Failure("policy-violation", f"stanza exceeds {self._max_stanza_bytes} bytes")
        except _Closed:
            self._buf = bytearray()
            self._builder = None
        except _Failure as failure:
            self._fail(failure.condition, failure.text)
        except expat.ExpatError as exc:
            message = expat.errors.messages[exc.code]
            self._fail(_EXPAT_CONDITIONS.get(exc.code, "not-well-formed"), message)

    def _fail(self, condition: str, text: str) -> None:
        self._state = _State.FAILED
        self._events.append(StreamErrorDetected(condition, text))
        self._buf = bytearray()
        self._builder = None

    def _trim(self, absolute: int) -> None:
        """Forget buffered bytes before stream offset ``absolute``."""
        drop = absolute - self._buf_start
        if drop > 0:
            del self._buf[:drop]
            self._buf_start = absolute

    def _new_parser(self) -> expat.XMLParserType:
        # XMPP is UTF-8 only (RFC 6120 §11.6): force it whatever an XML declaration says.
        parser = expat.ParserCreate("UTF-8", "}")
        parser.namespace_prefixes = True
        parser.buffer_text = False
        if hasattr(parser, "SetReparseDeferralEnabled"):
            # expat >= 2.6 may hold a large token back until more data arrives; a stream
            # parser must report each stanza as soon as its last byte is in.
            parser.SetReparseDeferralEnabled(False)
        parser.StartElementHandler = self._on_start
        parser.EndElementHandler = self._on_end
        parser.CharacterDataHandler = self._on_data
        parser.StartNamespaceDeclHandler = self._on_namespace
        parser.XmlDeclHandler = self._on_xml_decl
        parser.CommentHandler = self._on_comment
        parser.ProcessingInstructionHandler = self._on_pi
        parser.StartDoctypeDeclHandler = self._on_doctype
        parser.EntityDeclHandler = self._on_entity_decl
        return parser

    # -- expat callbacks -----------------------------------------------------------------------

    def _on_start(self, name: str, attrs: dict[str, str]) -> None:
        depth = self._depth
        parser = self._parser
        assert parser is not None
        if depth == 0:
            if not self._priming:
                self._open_stream(name, attrs)
        else:
            pos = parser.CurrentByteIndex
            if depth == 1:
                self._stanza_start = pos
                self._trim(pos)
                self._builder = ET.TreeBuilder()
                # expat reports the end of ``<x/>`` *after* the tag, and of ``</x>`` at its
                # ``<``: remember where an empty stanza ends while its tag is at hand.
                tag_end = _tag_end(self._buf, 0)
                self._stanza_empty_end = tag_end if self._buf[tag_end - 2] == _SLASH else -1
            elif depth > self._max_depth:
                raise _Failure("policy-violation", f"stanza nested deeper than {self._max_depth}")
            self._check_size(pos)
            assert self._builder is not None
            self._builder.start(_clark(name), {_clark(k): v for k, v in attrs.items()})
        self._depth = depth + 1

    def _on_end(self, name: str) -> None:
        self._depth -= 1
        depth = self._depth
        if depth == 0:
            self._state = _State.CLOSED
            self._events.append(StreamClosed())
            raise _Closed
        assert self._builder is not None
        element = self._builder.end(_clark(name))
        if depth > 1:
            return
        end = self._stanza_empty_end
        if end < 0:
            end = self._buf.find(b">", self._index() - self._buf_start) + 1
        absolute_end = end + self._buf_start
        self._check_size(absolute_end)
        raw = bytes(self._buf[self._stanza_start - self._buf_start : end])
        self._builder = None
        self._trim(absolute_end)
        self._events.append(StanzaReceived(element, raw))

    def _on_data(self, text: str) -> None:
        if self._depth >= 2:
            self._check_size(self._index())
            assert self._builder is not None
            self._builder.data(text)
        elif self._depth == 1:
            # Only whitespace (keepalives, RFC 6120 §4.6.1) may sit between stanzas.
            if text.strip(" \t\r\n"):
                raise _Failure("bad-format", "character data at stream level")
            self._trim(self._index())

    def _on_namespace(self, prefix: str | None, uri: str) -> None:
        if self._depth == 0:
            self._namespaces[prefix or ""] = uri

    def _on_xml_decl(self, version: str | None, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise _Failure("unsupported-encoding", f"encoding {encoding!r}; XMPP is UTF-8")

    def _on_comment(self, data: str) -> None:
        raise _Failure("restricted-xml", "comments are not allowed (RFC 6120 §11.1)")

    def _on_pi(self, target: str, data: str) -> None:
        raise _Failure("restricted-xml", "processing instructions are not allowed (RFC 6120 §11.1)")

    def _on_doctype(self, name: str, sysid: str | None, pubid: str | None, has_internal: int) -> None:
        raise _Failure("restricted-xml", "DTDs are not allowed (RFC 6120 §11.1)")

    def _on_entity_decl(self, *args: object) -> None:  # unreachable: the DOCTYPE fails first
        raise _Failure("restricted-xml", "entity declarations are not allowed (RFC 6120 §11.1)")

    # -- helpers -----------------------------------------------------------------------------

    def _index(self) -> int:
        """expat's byte offset of the current event in this document."""
        assert self._parser is not None
        return self._parser.CurrentByteIndex

    def _check_size(self, absolute: int) -> None:
        if absolute - self._stanza_start > self._max_stanza_bytes:
            raise _Failure("policy-violation", f"stanza exceeds {self._max_stanza_bytes} bytes")

    def _open_stream(self, name: str, attrs: dict[str, str]) -> None:
        uri, local, prefix = _split_name(name)
        if local != "stream" or uri != NS_STREAMS:
            raise _Failure("invalid-namespace", f"the stream element must be {{{NS_STREAMS}}}stream")
        if prefix != "stream":
            # RFC 6120 §4.8.5: streams elements carry the prefix "stream".
            raise _Failure("bad-namespace-prefix", "the stream prefix must be 'stream'")
        default_ns = self._namespaces.get("", "")
        if self._content_namespaces is not None and default_ns not in self._content_namespaces:
            raise _Failure("invalid-namespace", f"unsupported content namespace {default_ns!r}")
        pos = self._index()
        end = _tag_end(self._buf, pos - self._buf_start) + self._buf_start
        raw = bytes(self._buf[pos - self._buf_start : end - self._buf_start])
        self._trim(end)
        self._header_raw = raw
        self._state = _State.OPEN
        header_attrs = {_qname(k): v for k, v in attrs.items()}
        self._events.append(StreamHeaderReceived(header_attrs, raw, dict(self._namespaces)))

"""Building and serialising XMPP stream elements (RFC 6120) without ElementTree's ``ns0:``.

ElementTree writes ``<ns0:message xmlns:ns0="jabber:client">``; XMPP peers expect the content
namespace as the *default* namespace inherited from the stream header. `serialize` writes
default ``xmlns`` declarations only where the namespace changes, the ``stream:`` prefix for the
streams namespace (bound by the stream header) and ``xml:lang`` as is.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_CLIENT = "jabber:client"
NS_SERVER = "jabber:server"
NS_XML = "http://www.w3.org/XML/1998/namespace"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_SESSION = "urn:ietf:params:xml:ns:xmpp-session"
NS_ROSTER = "jabber:iq:roster"
NS_PING = "urn:xmpp:ping"
NS_DELAY = "urn:xmpp:delay"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"

# RFC 6120 §8.3.3 conditions → the legacy numeric codes old clients still read (XEP-0086).
LEGACY_ERROR_CODES = {
    "bad-request": "400",
    "conflict": "409",
    "feature-not-implemented": "501",
    "forbidden": "403",
    "item-not-found": "404",
    "not-acceptable": "406",
    "not-allowed": "405",
    "not-authorized": "401",
    "policy-violation": "406",
    "recipient-unavailable": "404",
    "remote-server-not-found": "404",
    "resource-constraint": "500",
    "service-unavailable": "503",
    "internal-server-error": "500",
}

_PREFIXES = {NS_STREAMS: "stream", NS_XML: "xml"}


def qn(ns: str, local: str) -> str:
    """Clark notation: ``qn(NS_CLIENT, "iq") == "{jabber:client}iq"``."""
    return f"{{{ns}}}{local}"


def split_tag(tag: str) -> tuple[str, str]:
    """``{ns}local`` → (ns, local); an unqualified tag has namespace ``""``."""
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


def element(
    tag: str, attrib: dict[str, str] | None = None, *children: ET.Element, text: str = ""
) -> ET.Element:
    """A new element; ``attrib`` values of ``None`` are not allowed (drop the key instead)."""
    el = ET.Element(tag, attrib or {})
    el.extend(children)
    if text:
        el.text = text
    return el


# -- serialisation -------------------------------------------------------------------------------


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(text: str) -> str:
    return (
        _escape_text(text)
        .replace("'", "&apos;")
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )


def _write(el: ET.Element, default_ns: str, out: list[str]) -> None:
    ns, local = split_tag(el.tag)
    decls: list[str] = []
    if ns in _PREFIXES:
        name = f"{_PREFIXES[ns]}:{local}"
        inner_default = default_ns
    else:
        name = local
        inner_default = ns
        if ns != default_ns:
            decls.append(f" xmlns='{_escape_attr(ns)}'")
    attrs: list[str] = []
    for key, value in el.attrib.items():
        a_ns, a_local = split_tag(key)
        if not a_ns:
            attrs.append(f" {a_local}='{_escape_attr(value)}'")
        elif a_ns in _PREFIXES:
            attrs.append(f" {_PREFIXES[a_ns]}:{a_local}='{_escape_attr(value)}'")
        else:
            prefix = f"a{len(decls)}"
            decls.append(f" xmlns:{prefix}='{_escape_attr(a_ns)}'")
            attrs.append(f" {prefix}:{a_local}='{_escape_attr(value)}'")
    out.append(f"<{name}{''.join(decls)}{''.join(attrs)}")
    if not el.text and len(el) == 0:
        out.append("/>")
    else:
        out.append(">")
        if el.text:
            out.append(_escape_text(el.text))
        for child in el:
            _write(child, inner_default, out)
            if child.tail:
                out.append(_escape_text(child.tail))
        out.append(f"</{name}>")


def serialize(el: ET.Element, default_ns: str = NS_CLIENT) -> bytes:
    """UTF-8 bytes of ``el`` as a child of a stream whose default namespace is ``default_ns``."""
    out: list[str] = []
    _write(el, default_ns, out)
    return "".join(out).encode("utf-8")


# -- stream-level helpers (RFC 6120 §4) ----------------------------------------------------------


def stream_header(
    to: str | None,
    from_: str | None,
    id: str | None,
    lang: str | None = "en",
    *,
    default_ns: str = NS_CLIENT,
    version: str = "1.0",
    xml_declaration: bool = True,
) -> bytes:
    """The opening ``<stream:stream ...>`` tag (never closed here)."""
    parts = ["<?xml version='1.0'?>"] if xml_declaration else []
    attrs = [("from", from_), ("to", to), ("id", id), ("version", version), ("xml:lang", lang)]
    rendered = "".join(f" {k}='{_escape_attr(v)}'" for k, v in attrs if v is not None)
    parts.append(f"<stream:stream{rendered} xmlns='{default_ns}' xmlns:stream='{NS_STREAMS}'>")
    return "".join(parts).encode("utf-8")


STREAM_CLOSE = b"</stream:stream>"


def stream_error(condition: str, text: str | None = None) -> bytes:
    """``<stream:error>`` with a §4.9.3 condition, followed by ``</stream:stream>``."""
    err = ET.Element(qn(NS_STREAMS, "error"))
    err.append(ET.Element(qn(NS_STREAM_ERRORS, condition)))
    if text:
        err.append(element(qn(NS_STREAM_ERRORS, "text"), text=text))
    return serialize(err) + STREAM_CLOSE


def features(*children: ET.Element) -> ET.Element:
    return element(qn(NS_STREAMS, "features"), None, *children)


# -- stanza helpers (RFC 6120 §8) ----------------------------------------------------------------


def _reply_attrs(request: ET.Element, type_: str) -> dict[str, str]:
    attrs = {"type": type_}
    if "id" in request.attrib:
        attrs["id"] = request.attrib["id"]
    if "from" in request.attrib:
        attrs["to"] = request.attrib["from"]
    if "to" in request.attrib:
        attrs["from"] = request.attrib["to"]
    return attrs


def iq_result(request: ET.Element, *payload: ET.Element) -> ET.Element:
    """The ``type='result'`` answer to ``request`` (to/from swapped, same id)."""
    return element(qn(NS_CLIENT, "iq"), _reply_attrs(request, "result"), *payload)


def error_element(error_type: str, condition: str, text: str | None = None) -> ET.Element:
    """``<error type=...><condition xmlns='...stanzas'/></error>`` with the legacy code."""
    attrs = {"type": error_type}
    if condition in LEGACY_ERROR_CODES:
        attrs["code"] = LEGACY_ERROR_CODES[condition]
    err = element(qn(NS_CLIENT, "error"), attrs, ET.Element(qn(NS_STANZA_ERRORS, condition)))
    if text:
        err.append(element(qn(NS_STANZA_ERRORS, "text"), text=text))
    return err


def stanza_error(request: ET.Element, error_type: str, condition: str, text: str | None = None) -> ET.Element:
    """An error reply (``type='error'``) to any stanza, echoing its payload (RFC 6120 §8.3.1)."""
    reply = element(request.tag, _reply_attrs(request, "error"))
    reply.extend(list(request))
    for child in list(reply):
        if child.tag == qn(NS_CLIENT, "error"):
            reply.remove(child)
    reply.append(error_element(error_type, condition, text))
    return reply


def iq_error(request: ET.Element, error_type: str, condition: str, text: str | None = None) -> ET.Element:
    """``<iq type='error'>`` answering ``request`` with a §8.3.3 condition."""
    return stanza_error(request, error_type, condition, text)


def child(el: ET.Element, ns: str, local: str) -> ET.Element | None:
    return el.find(qn(ns, local))

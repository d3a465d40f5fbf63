"""Expressway-C's end of the XMPP traversal channel (spec §6).

Each stream E opens on the 7400 link is one client session, already inside E's TLS. C answers the
restarted stream with the SASL mechanisms the IM&P offers, reads the client's `<auth/>` only to
learn the user, connects to that user's IM&P node over TLS, replays the client's `<auth/>` there
and from then on relays both directions byte for byte; authorization happens on IM&P. A lost
link or a lost IM&P node ends the session with a `<stream:error/>`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import ssl
import zlib
from collections.abc import Callable
from typing import Any

from edge.config import ImpNode, LabConfig
from edge.xmpp.events import StanzaReceived, StreamErrorDetected, StreamHeaderReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.stanza import NS_SASL, element, features, qn, serialize, stream_error, stream_header

log = logging.getLogger(__name__)

MECHANISMS = ("PLAIN", "X-OAUTH2", "CISCO-VTG-TOKEN")
HANDSHAKE_TIMEOUT_S = 30.0


class XmppRefused(Exception):
    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text


def sasl_username(mechanism: str, payload_b64: str) -> str | None:
    """The user an `<auth/>` speaks for, without checking any secret (IM&P does that)."""
    try:
        text = base64.b64decode(payload_b64.strip() or "=", validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if mechanism in ("PLAIN", "X-OAUTH2"):
        parts = text.split("\0")
        user = parts[1] if len(parts) == 3 else ""
    elif mechanism == "CISCO-VTG-TOKEN":
        fields = dict(part.partition("=")[::2] for part in text.split("\0") if part)
        user = fields.get("userid", "")
    else:
        return None
    user = user.split("@", 1)[0].strip().lower()
    return user or None


class GatewayXmpp:
    def __init__(
        self,
        config: LabConfig,
        *,
        ssl_context: ssl.SSLContext,
        imp_down: Callable[[str], bool],
        local_address: str | None,
    ) -> None:
        self.config = config
        self.domain = config.lab.domain.lower()
        self.ssl_context = ssl_context
        self.imp_down = imp_down
        self.local_address = local_address
        self.current = 0
        self.peak = 0
        self.counters: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def status(self) -> dict[str, Any]:
        return {"sessions": self.current, "sessions_peak": self.peak, "counters": dict(self.counters)}

    def _node_for(self, username: str) -> ImpNode:
        """The user's IM&P node: the lab has one presence cluster; skip nodes known to be down."""
        nodes = [n for n in self.config.imp if not self.imp_down(n.fqdn)] or list(self.config.imp)
        return nodes[zlib.crc32(username.encode()) % len(nodes)]

    async def handle_stream(self, stream: Any) -> None:
        try:
            auth_raw, username = await asyncio.wait_for(self._pre_auth(stream), HANDSHAKE_TIMEOUT_S)
        except XmppRefused as exc:
            self._count(f"refused_{exc.condition}")
            with contextlib.suppress(Exception):
                stream.write(stream_error(exc.condition, exc.text or None))
                stream.write_eof()
            return
        except (TimeoutError, ConnectionError, OSError):
            self._count("handshake_failed")
            return
        except Exception as exc:  # the link or stream went away before authentication
            log.debug("xmpp: stream ended before auth: %s", exc)
            return
        self.current += 1
        self.peak = max(self.peak, self.current)
        self._count("sessions")
        try:
            await self._relay(stream, auth_raw, username)
        finally:
            self.current -= 1

    async def _pre_auth(self, stream: Any) -> tuple[bytes, str]:
        framer = XmlStreamFramer()
        while True:
            data = await stream.read(65536)
            if not data:
                raise ConnectionError("stream ended before <auth/>")
            for event in framer.receive_data(data):
                if isinstance(event, StreamErrorDetected):
                    stream.write(stream_header(None, self.domain, secrets.token_hex(8)))
                    raise XmppRefused(event.condition, event.text)
                if isinstance(event, StreamHeaderReceived):
                    if (event.attrs.get("to") or "").lower() != self.domain:
                        stream.write(stream_header(None, self.domain, secrets.token_hex(8)))
                        raise XmppRefused("host-unknown")
                    mechs = element(
                        qn(NS_SASL, "mechanisms"), None,
                        *(element(qn(NS_SASL, "mechanism"), text=m) for m in MECHANISMS),
                    )  # fmt: skip
                    stream.write(
                        stream_header(None, self.domain, secrets.token_hex(8)) + serialize(features(mechs))
                    )
                elif isinstance(event, StanzaReceived):
                    el = event.element
                    if el.tag != qn(NS_SASL, "auth"):
                        raise XmppRefused("not-authorized", "authenticate first")
                    username = sasl_username(el.get("mechanism", ""), el.text or "")
                    if username is None:
                        stream.write(
                            serialize(
                                element(
                                    qn(NS_SASL, "failure"), None, element(qn(NS_SASL, "malformed-request"))
                                )
                            )
                        )
                        continue
                    return event.raw, username

    async def _relay(self, stream: Any, auth_raw: bytes, username: str) -> None:
        node = self._node_for(username)
        # SNI and certificate check name the XMPP domain, not the node (RFC 6120 §13.7.2.1):
        # real XMPP servers (Prosody) refuse an unknown SNI with alert 112.
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    node.address,
                    node.edge_port,
                    ssl=self.ssl_context,
                    server_hostname=self.domain,
                    local_addr=(self.local_address, 0) if self.local_address else None,
                ),
                5.0,
            )
            writer.write(stream_header(self.domain, None, None))
            await asyncio.wait_for(self._await_features(reader), 10.0)
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError) as exc:
            self._count("imp_unreachable")
            log.warning("xmpp %s: IM&P %s unreachable: %s", username, node.fqdn, exc)
            with contextlib.suppress(Exception):
                stream.write(stream_error("remote-connection-failed", f"IM&P {node.fqdn} unreachable"))
                stream.write_eof()
            return
        writer.write(auth_raw)

        async def up() -> None:
            while True:
                data = await stream.read(65536)
                if not data:
                    writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        async def down() -> bool:
            tail = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    return tail.rstrip().endswith(b"</stream:stream>")
                tail = (tail + data)[-64:]
                stream.write(data)
                await stream.drain()

        up_task = asyncio.ensure_future(up())
        try:
            clean = await down()
            if not clean:
                self._count("imp_lost")
                stream.write(stream_error("remote-connection-failed", f"IM&P {node.fqdn} connection lost"))
            with contextlib.suppress(Exception):
                stream.write_eof()
        except Exception as exc:  # the traversal stream reset (link lost): close the IM&P side
            self._count("link_lost")
            log.info("xmpp %s: traversal stream ended: %s", username, exc)
        finally:
            up_task.cancel()
            with contextlib.suppress(BaseException):
                await up_task
            writer.close()

    async def _await_features(self, reader: asyncio.StreamReader) -> None:
        framer = XmlStreamFramer()
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("IM&P closed during the stream header")
            for event in framer.receive_data(data):
                if isinstance(event, StreamErrorDetected):
                    raise ConnectionError(f"IM&P stream error: {event.condition}")
                if isinstance(event, StanzaReceived) and event.element.tag.endswith("}features"):
                    return

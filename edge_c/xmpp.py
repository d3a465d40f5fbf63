"""Expressway-C's end of the XMPP traversal channel (spec §6).

Each stream E opens on the 7400 link is one client session, already inside E's TLS. C answers the
restarted stream with the SASL mechanisms the IM&P offers, reads the client's `<auth/>` only to
learn the user, connects to that user's IM&P node over TLS, replays the client's `<auth/>` there
and from then on relays both directions byte for byte; authorization happens on IM&P. A lost
link or a lost IM&P node ends the session with a `<stream:error/>`.

A held session here is the link stream, one `edge.xmpp.tls.TlsLayer` towards the node and one
`edge.xmpp.relay.StreamRelay` whose `run()` is the stream handler's task; the parsers used before
`<auth/>` and for the node's features are freed once relaying starts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import logging
import secrets
import ssl
import zlib
from collections.abc import Callable
from typing import Any

from edge.config import ImpNode, LabConfig
from edge.xmpp.events import (
    FramerEvent,
    RelayEnded,
    StanzaReceived,
    StreamErrorDetected,
    StreamHeaderReceived,
)
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.relay import StreamRelay
from edge.xmpp.stanza import NS_SASL, element, features, qn, serialize, stream_error, stream_header
from edge.xmpp.tls import TlsLayer

log = logging.getLogger(__name__)

MECHANISMS = ("PLAIN", "X-OAUTH2", "CISCO-VTG-TOKEN")
HANDSHAKE_TIMEOUT_S = 30.0  # stream opened by E → the client's <auth/>
IMP_CONNECT_TIMEOUT_S = 5.0  # TCP + TLS to the IM&P node
IMP_FEATURES_TIMEOUT_S = 10.0  # our stream header → the node's <stream:features/>
IMP_CLOSE_WAIT_S = 5.0  # the client ended its stream: how long the node may take to answer and close


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
        # One coroutine frame for the whole held session (on top of the relay's): at 10,000
        # sessions every frame kept alive costs a few MiB.
        node = self._node_for(username)
        leg = _ImpLeg()
        try:
            if await self._connect(stream, leg, node, username):
                relay = leg.start_relay(stream)
                leg.write(auth_raw)
                ended = await relay.run()
                await self._finish(stream, leg, ended, node, username)
        finally:
            self.current -= 1
            leg.abort()

    async def _pre_auth(self, stream: Any) -> tuple[bytes, str]:
        framer = XmlStreamFramer()
        try:
            while True:
                data = await stream.read(65536)
                if not data:
                    raise ConnectionError("stream ended before <auth/>")
                found = self._pre_auth_events(stream, framer.receive_data(data))
                if found is not None:
                    return found
        finally:
            framer.close()  # nothing of the pre-auth parser outlives the handshake

    def _pre_auth_events(self, stream: Any, events: list[FramerEvent]) -> tuple[bytes, str] | None:
        for event in events:
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
                    failure = element(qn(NS_SASL, "failure"), None, element(qn(NS_SASL, "malformed-request")))
                    stream.write(serialize(failure))
                    continue
                return event.raw, username
        return None

    async def _connect(self, stream: Any, leg: _ImpLeg, node: ImpNode, username: str) -> bool:
        """TLS to the node, our stream header, its features; else the client gets a stream error."""
        # SNI and certificate check name the XMPP domain, not the node (RFC 6120 §13.7.2.1):
        # real XMPP servers (Prosody) refuse an unknown SNI with alert 112.
        layer = leg.layer = TlsLayer(leg, self.ssl_context, server_side=False, server_hostname=self.domain)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(IMP_CONNECT_TIMEOUT_S):
                await loop.create_connection(
                    lambda: layer,
                    node.address,
                    node.edge_port,
                    local_addr=(self.local_address, 0) if self.local_address else None,
                )
                await leg.reach(_Stage.TLS)
            layer.write(stream_header(self.domain, None, None))
            async with asyncio.timeout(IMP_FEATURES_TIMEOUT_S):
                await leg.reach(_Stage.FEATURES)
        except (OSError, TimeoutError, ValueError) as exc:  # SSLError, ConnectionError are OSErrors
            leg.abort()
            self._count("imp_unreachable")
            log.warning("xmpp %s: IM&P %s unreachable: %s", username, node.fqdn, exc)
            with contextlib.suppress(Exception):
                stream.write(stream_error("remote-connection-failed", f"IM&P {node.fqdn} unreachable"))
                stream.write_eof()
            return False
        return True

    async def _finish(
        self, stream: Any, leg: _ImpLeg, ended: RelayEnded, node: ImpNode, username: str
    ) -> None:
        if ended.by_stream and ended.reason != "stream ended":  # link lost or stream reset
            self._count("link_lost")
            log.info("xmpp %s: traversal stream ended: %s", username, ended.reason)
        elif ended.by_stream:  # E ended the stream: the client is done or gone
            if ended.clean:  # it closed its XMPP stream: let IM&P answer (RFC 6120 §4.4), then close
                with contextlib.suppress(TimeoutError, ConnectionError):
                    async with asyncio.timeout(IMP_CLOSE_WAIT_S):
                        await leg.reach(_Stage.CLOSED)
            leg.close()
        else:
            if not ended.clean:
                self._count("imp_lost")
                with contextlib.suppress(Exception):
                    stream.write(
                        stream_error("remote-connection-failed", f"IM&P {node.fqdn} connection lost")
                    )
            with contextlib.suppress(Exception):
                stream.write_eof()


class _Stage(enum.IntEnum):
    CONNECTING = 0
    TLS = 1  # handshake done
    FEATURES = 2  # the node's <stream:features/> arrived
    CLOSED = 3  # the connection is gone


class _ImpLeg:
    """C's TLS connection to the IM&P node: waits for the node's features, then relays."""

    __slots__ = ("_error", "_framer", "_stage", "_waiter", "layer", "relay")

    def __init__(self) -> None:
        self.layer: TlsLayer | None = None
        self.relay: StreamRelay | None = None
        self._stage = _Stage.CONNECTING
        self._error: Exception | None = None
        self._framer: XmlStreamFramer | None = XmlStreamFramer()
        self._waiter: asyncio.Future[None] | None = None

    async def reach(self, stage: _Stage) -> None:
        """Wait for `stage`; the connection's error (or ConnectionError) if it ends before."""
        while self._stage < stage:  # every error comes with a stage: FEATURES or CLOSED
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if stage is not _Stage.CLOSED and (self._error is not None or self._stage is _Stage.CLOSED):
            raise self._error or ConnectionError("IM&P closed the connection")

    def start_relay(self, stream: Any) -> StreamRelay:
        assert self.layer is not None
        if self._framer is not None:
            self._framer.close()
            self._framer = None
        self.relay = StreamRelay(stream, self.layer)
        if self._stage is _Stage.CLOSED:
            self.relay.connection_lost(str(self._error or "IM&P closed the connection"))
        return self.relay

    def write(self, data: bytes) -> None:
        if self.layer is not None:
            self.layer.write(data)

    def close(self) -> None:
        if self.layer is not None:
            self.layer.close()

    def abort(self) -> None:
        """Drop the connection now, unless it is already closing (gracefully) or gone."""
        if self.layer is not None and not self.layer.is_closing():
            self.layer.abort()

    def _advance(self, stage: _Stage, error: Exception | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._stage = max(self._stage, stage)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- TlsApp --------------------------------------------------------------------------------------

    def tls_established(self, tls: TlsLayer) -> None:
        self._advance(_Stage.TLS)

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.connection_data(data)
        elif self._framer is not None:
            for event in self._framer.receive_data(data):
                if isinstance(event, StreamErrorDetected):
                    self._advance(_Stage.FEATURES, ConnectionError(f"IM&P stream error: {event.condition}"))
                    self.abort()
                elif isinstance(event, StanzaReceived) and event.element.tag.endswith("}features"):
                    self._advance(_Stage.FEATURES)

    def eof_received(self) -> bool | None:
        # The node finished sending: connection_lost follows at once (no half-close under TLS) and
        # decides, from the stream's last bytes, whether the client needs a <stream:error/>.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._framer is not None:
            self._framer.close()
            self._framer = None
        if self.relay is not None:
            self.relay.connection_lost(str(exc) if exc else "IM&P closed the connection")
        self._advance(_Stage.CLOSED, exc)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_writing()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_writing()

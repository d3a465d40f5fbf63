"""The sans-IO core of the lab IM&P XMPP server: stream negotiation for every connection.

The adapter (`mock_ucm.imp.server`) calls `connection_made`, `data_received`,
`tls_established` and `connection_lost` with a connection id and the current time; each returns
the `mock_ucm.imp.events` outputs to perform, in order, possibly on other connections (presence
and messages). Negotiation follows RFC 6120: STARTTLS (§5, mandatory on plain listeners), SASL
(§6: PLAIN, CISCO-VTG-TOKEN, X-OAUTH2; spec §6), resource binding (§7); then `Router` takes over.
A peer's bad input becomes a stream error on that connection only.
"""

from __future__ import annotations

import logging
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from edge.xmpp.events import StanzaReceived, StreamClosed, StreamErrorDetected, StreamHeaderReceived
from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.jid import InvalidJid, Jid, normalize_domain, normalize_resource
from edge.xmpp.stanza import (
    NS_BIND,
    NS_CLIENT,
    NS_SASL,
    NS_SESSION,
    NS_TLS,
    STREAM_CLOSE,
    element,
    features,
    iq_result,
    qn,
    serialize,
    stanza_error,
    stream_error,
    stream_header,
)
from mock_ucm.imp.events import CloseRequested, DataQueued, ImpOutput, TlsUpgradeRequested
from mock_ucm.imp.router import Router, StreamFault
from mock_ucm.imp.sasl import MECHANISMS, CredentialKind, SaslFailure, decode_payload, parse_credentials
from mock_ucm.imp.session import ClientSession, State

log = logging.getLogger(__name__)

AuthCheck = Callable[[str, str], bool]


class ImpCore:
    """All sessions of one IM&P node. ``users`` are localparts of the one presence domain."""

    def __init__(
        self,
        domain: str,
        *,
        authenticate_plain: AuthCheck,
        validate_token: AuthCheck,
        users: list[str],
        max_stanza_bytes: int = 65536,
        max_auth_failures: int = 3,
        max_offline_per_user: int = 100,
    ) -> None:
        self.domain = normalize_domain(domain)
        self._authenticate_plain = authenticate_plain
        self._validate_token = validate_token
        self._max_stanza_bytes = max_stanza_bytes
        self._max_auth_failures = max_auth_failures
        self._sessions: dict[int, ClientSession] = {}
        self._out: list[ImpOutput] = []
        self.router = Router(self.domain, users, self._deliver, max_offline_per_user=max_offline_per_user)
        self.sessions_peak = 0
        self.auth_failures = 0
        self.stream_errors = 0

    # -- adapter interface -------------------------------------------------------------------------

    def connection_made(self, conn_id: int, *, secure: bool, now: float) -> list[ImpOutput]:
        state = State.AWAIT_STREAM_SECURE if secure else State.AWAIT_STREAM_PLAIN
        self._sessions[conn_id] = ClientSession(conn_id, state, XmlStreamFramer(self._max_stanza_bytes))
        return self._flush()

    def data_received(self, conn_id: int, data: bytes, now: float) -> list[ImpOutput]:
        session = self._sessions.get(conn_id)
        if session is None or session.state in (State.CLOSED, State.TLS_HANDSHAKE):
            return []
        restarts = session.restarts
        for event in session.framer.receive_data(data):
            try:
                self._dispatch(session, event, now)
            except StreamFault as fault:
                self._stream_error(session, fault.condition, fault.text)
            # A restart (STARTTLS, SASL success) or a close ends this parser's input: anything
            # the peer pipelined after it belongs to no stream (RFC 6120 §5.4.3.3, §6.4.6).
            if session.state in (State.CLOSED, State.TLS_HANDSHAKE) or session.restarts != restarts:
                break
        # Between stanzas the session's parser is only memory (~10 KiB): most of what an idle
        # session costs. It is rebuilt from the kept stream header when the next bytes come.
        session.framer.compact()
        return self._flush()

    def tls_established(self, conn_id: int, now: float) -> list[ImpOutput]:
        session = self._sessions.get(conn_id)
        if session is not None and session.state is State.TLS_HANDSHAKE:
            self._restart(session, State.AWAIT_STREAM_SECURE)
        return self._flush()

    def connection_lost(self, conn_id: int, now: float) -> list[ImpOutput]:
        session = self._sessions.pop(conn_id, None)
        if session is not None:
            self._end(session)
        return self._flush()

    def shutdown(self) -> list[ImpOutput]:
        """Server stopping: every stream ends with ``<system-shutdown/>`` (RFC 6120 §4.9.3.19)."""
        for session in list(self._sessions.values()):
            if session.state is not State.CLOSED:
                self._stream_error(session, "system-shutdown", "the server is stopping")
        return self._flush()

    def status(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "connections": len(self._sessions),
            "sessions_current": self.router.bound_count(),
            "sessions_peak": self.sessions_peak,
            "messages_routed": self.router.messages_routed,
            "offline_stored": self.router.offline_stored,
            "offline_pending": self.router.offline_count(),
            "auth_failures": self.auth_failures,
            "stream_errors": self.stream_errors,
        }

    # -- output ------------------------------------------------------------------------------------

    def _flush(self) -> list[ImpOutput]:
        out, self._out = self._out, []
        return out

    def _write(self, session: ClientSession, data: bytes) -> None:
        self._out.append(DataQueued(session.conn_id, data))

    def _deliver(self, session: ClientSession, stanza: ET.Element) -> None:
        if session.state is State.ESTABLISHED:
            self._write(session, serialize(stanza))

    def _stream_error(self, session: ClientSession, condition: str, text: str = "") -> None:
        """RFC 6120 §4.9.1: open our stream if not yet done, send the error, close."""
        log.info("imp conn=%d stream error %s: %s", session.conn_id, condition, text)
        self.stream_errors += 1
        if not session.header_sent:
            self._write(session, stream_header(None, self.domain, secrets.token_hex(8)))
        self._write(session, stream_error(condition, text or None))
        self._out.append(CloseRequested(session.conn_id))
        self._end(session)

    def _end(self, session: ClientSession) -> None:
        if session.state is State.ESTABLISHED:
            session.move(State.CLOSED)
            self.router.session_ended(session)
        session.move(State.CLOSED)

    def _restart(self, session: ClientSession, state: State) -> None:
        session.framer.reset()
        session.restarts += 1
        session.header_sent = False
        session.move(state)

    # -- dispatch ----------------------------------------------------------------------------------

    def _dispatch(self, session: ClientSession, event: object, now: float) -> None:
        if session.state is State.CLOSED:
            return
        if isinstance(event, StreamHeaderReceived):
            self._handle_header(session, event)
        elif isinstance(event, StanzaReceived):
            self._handle_stanza(session, event.element, now)
        elif isinstance(event, StreamClosed):
            self._write(session, STREAM_CLOSE)
            self._out.append(CloseRequested(session.conn_id))
            self._end(session)
        elif isinstance(event, StreamErrorDetected):
            self._stream_error(session, event.condition, event.text)

    def _handle_header(self, session: ClientSession, header: StreamHeaderReceived) -> None:
        session.stream_id = secrets.token_hex(8)
        peer = header.attrs.get("from")
        self._write(session, stream_header(peer, self.domain, session.stream_id))
        session.header_sent = True
        to = header.attrs.get("to")
        try:
            wrong_host = to is not None and normalize_domain(to) != self.domain
        except InvalidJid:
            wrong_host = True
        if wrong_host:
            raise StreamFault("host-unknown", f"this server serves {self.domain}")
        if header.attrs.get("version", "0.9").split(".")[0] != "1":
            raise StreamFault("unsupported-version", "XMPP 1.0 streams only")
        if header.default_namespace != NS_CLIENT:
            raise StreamFault("invalid-namespace", "client streams are jabber:client")
        if session.state is State.AWAIT_STREAM_PLAIN:
            tls = element(qn(NS_TLS, "starttls"), None, element(qn(NS_TLS, "required")))
            self._write(session, serialize(features(tls)))
            session.move(State.AWAIT_STARTTLS)
        elif session.state is State.AWAIT_STREAM_SECURE:
            mechs = element(qn(NS_SASL, "mechanisms"))
            mechs.extend(element(qn(NS_SASL, "mechanism"), text=m) for m in MECHANISMS)
            self._write(session, serialize(features(mechs)))
            session.move(State.AWAIT_AUTH)
        else:
            bind = element(qn(NS_BIND, "bind"))
            sess = element(qn(NS_SESSION, "session"), None, element(qn(NS_SESSION, "optional")))
            self._write(session, serialize(features(bind, sess)))
            session.move(State.AWAIT_BIND)

    def _handle_stanza(self, session: ClientSession, stanza: ET.Element, now: float) -> None:
        state = session.state
        if state is State.ESTABLISHED:
            self.router.handle(session, stanza, now)
        elif state is State.AWAIT_STARTTLS:
            if stanza.tag != qn(NS_TLS, "starttls"):
                raise StreamFault("policy-violation", "STARTTLS is required")
            self._write(session, serialize(element(qn(NS_TLS, "proceed"))))
            session.move(State.TLS_HANDSHAKE)
            self._out.append(TlsUpgradeRequested(session.conn_id))
        elif state is State.AWAIT_AUTH:
            self._handle_sasl(session, stanza)
        elif state is State.AWAIT_BIND:
            self._handle_bind(session, stanza)

    # -- SASL (RFC 6120 §6) ------------------------------------------------------------------------

    def _handle_sasl(self, session: ClientSession, stanza: ET.Element) -> None:
        if stanza.tag == qn(NS_SASL, "abort"):
            session.pending_mechanism = ""
            self._sasl_failure(session, "aborted")
            return
        if stanza.tag == qn(NS_SASL, "auth"):
            mechanism = stanza.get("mechanism", "")
        elif stanza.tag == qn(NS_SASL, "response") and session.pending_mechanism:
            mechanism = session.pending_mechanism
        else:
            raise StreamFault("not-authorized", "authenticate first")
        session.pending_mechanism = ""
        try:
            if mechanism not in MECHANISMS:
                raise SaslFailure("invalid-mechanism", f"{mechanism!r} is not offered")
            payload = decode_payload(stanza.text or "")
            if not payload and stanza.tag == qn(NS_SASL, "auth"):
                # Empty initial response: ask for it with an empty challenge (§6.4.2).
                session.pending_mechanism = mechanism
                self._write(session, serialize(element(qn(NS_SASL, "challenge"))))
                return
            credentials = parse_credentials(mechanism, payload, self.domain)
            if not self._check(credentials.username, credentials.secret, credentials.kind):
                raise SaslFailure("not-authorized")
        except SaslFailure as failure:
            self._sasl_failure(session, failure.condition)
            return
        log.info("imp conn=%d authenticated %s with %s", session.conn_id, credentials.username, mechanism)
        session.username = credentials.username
        self._write(session, serialize(element(qn(NS_SASL, "success"))))
        self._restart(session, State.AWAIT_STREAM_AUTHED)

    def _check(self, username: str, secret: str, kind: CredentialKind) -> bool:
        if username not in self.router.users:
            return False
        check = self._authenticate_plain if kind is CredentialKind.PASSWORD else self._validate_token
        try:
            return bool(check(username, secret))
        except Exception:  # a faulty checker must not take the server down; it denies
            log.exception("imp credential check failed for %s", username)
            return False

    def _sasl_failure(self, session: ClientSession, condition: str) -> None:
        self._write(
            session, serialize(element(qn(NS_SASL, "failure"), None, element(qn(NS_SASL, condition))))
        )
        if condition == "aborted":
            return
        self.auth_failures += 1
        session.auth_failures += 1
        if session.auth_failures >= self._max_auth_failures:
            raise StreamFault("policy-violation", "too many authentication failures")

    # -- resource binding (RFC 6120 §7) ------------------------------------------------------------

    def _handle_bind(self, session: ClientSession, stanza: ET.Element) -> None:
        bind = stanza.find(qn(NS_BIND, "bind"))
        if stanza.tag != qn(NS_CLIENT, "iq") or bind is None:
            raise StreamFault("not-authorized", "bind a resource first")
        if stanza.get("type") != "set" or "id" not in stanza.attrib:
            self._write(session, serialize(stanza_error(stanza, "modify", "bad-request")))
            return
        requested = (bind.findtext(qn(NS_BIND, "resource")) or "").strip()
        try:
            resource = normalize_resource(requested) if requested else f"imp-{secrets.token_hex(4)}"
        except InvalidJid as exc:
            self._write(session, serialize(stanza_error(stanza, "modify", "bad-request", str(exc))))
            return
        if self.router.is_bound(session.username, resource):
            # Policy "reject the new session" (RFC 6120 §7.7.2.2); MRA clients see 409.
            self._write(session, serialize(stanza_error(stanza, "cancel", "conflict")))
            return
        session.jid = Jid(session.username, self.domain, resource)
        session.move(State.ESTABLISHED)
        self.router.session_bound(session)
        self.sessions_peak = max(self.sessions_peak, self.router.bound_count())
        log.info("imp conn=%d bound %s", session.conn_id, session.jid)
        reply = iq_result(
            stanza, element(qn(NS_BIND, "bind"), None, element(qn(NS_BIND, "jid"), text=str(session.jid)))
        )
        reply.attrib.pop("from", None)
        self._write(session, serialize(reply))

"""One client connection to the lab IM&P: its negotiation state and what presence it holds.

The states follow RFC 6120 stream negotiation (§5 STARTTLS, §6 SASL, §7 resource binding); every
transition not in `TRANSITIONS` is a bug in the core, not a peer error (peer errors are answered
before any transition is attempted).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from enum import Enum

from edge.xmpp.framer import XmlStreamFramer
from edge.xmpp.jid import Jid


class State(Enum):
    AWAIT_STREAM_PLAIN = "await-stream-plain"  # TCP up, STARTTLS mandatory (5222 style)
    AWAIT_STARTTLS = "await-starttls"
    TLS_HANDSHAKE = "tls-handshake"
    AWAIT_STREAM_SECURE = "await-stream-secure"  # TLS up (STARTTLS done or direct TLS on 7400)
    AWAIT_AUTH = "await-auth"
    AWAIT_STREAM_AUTHED = "await-stream-authed"  # SASL success, stream restart pending
    AWAIT_BIND = "await-bind"
    ESTABLISHED = "established"
    CLOSED = "closed"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.AWAIT_STREAM_PLAIN: frozenset({State.AWAIT_STARTTLS, State.CLOSED}),
    State.AWAIT_STARTTLS: frozenset({State.TLS_HANDSHAKE, State.CLOSED}),
    State.TLS_HANDSHAKE: frozenset({State.AWAIT_STREAM_SECURE, State.CLOSED}),
    State.AWAIT_STREAM_SECURE: frozenset({State.AWAIT_AUTH, State.CLOSED}),
    State.AWAIT_AUTH: frozenset({State.AWAIT_STREAM_AUTHED, State.CLOSED}),
    State.AWAIT_STREAM_AUTHED: frozenset({State.AWAIT_BIND, State.CLOSED}),
    State.AWAIT_BIND: frozenset({State.ESTABLISHED, State.CLOSED}),
    State.ESTABLISHED: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False, slots=True)
class ClientSession:
    """Per-connection state. Presence fields are meaningful once `State.ESTABLISHED`."""

    conn_id: int
    state: State
    framer: XmlStreamFramer
    stream_id: str = ""
    header_sent: bool = False
    restarts: int = 0  # stream restarts so far (STARTTLS, SASL success)
    auth_failures: int = 0
    pending_mechanism: str = ""  # mechanism awaiting a <response/> after an empty <auth/>
    username: str = ""  # localpart, after SASL success
    jid: Jid | None = None  # full JID, after bind
    available: bool = False  # sent available presence (RFC 6121 §4.2)
    presence: ET.Element | None = None  # last broadcast presence, as received
    priority: int = 0
    interested: bool = False  # requested the roster (RFC 6121 §2.1.6 roster pushes)
    directed_to: set[str] = field(default_factory=set)  # RFC 6121 §4.6 directed presence

    def move(self, new: State) -> None:
        if new is not self.state and new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"{self.state.value} -> {new.value}")
        self.state = new

"""Outputs of Expressway-C's B2BUA core (`edge_c.b2bua`): messages to put on the wire and call
status events. Small, typed, past tense for events; imperative for commands (STYLE.md)."""

from __future__ import annotations

from dataclasses import dataclass

from edge.media_hooks import Side
from edge.sip.message import Request, Response


@dataclass(frozen=True, slots=True)
class SendToZone:
    """Send `message` over the traversal zone to Expressway-E.

    `flow_hint` is the zone flow id the leg last used (a response goes back on the flow its
    request came in on); None means the caller picks a zone flow (e.g. by the Request-URI of
    a new INVITE to a client, as the proxy path does with orig-hostport)."""

    message: Request | Response
    flow_hint: str | None = None


@dataclass(frozen=True, slots=True)
class SendToUcm:
    """Send `message` to Unified CM. `node_hint` is the UCM flow id the leg last used; None
    means the caller picks the node (by the top Route or the Request-URI, like `_pick_ucm`)."""

    message: Request | Response
    node_hint: str | None = None


@dataclass(frozen=True, slots=True)
class CallStarted:
    """An initial INVITE arrived. `call_id` is the B2BUA's call key (also the MediaSession key),
    not a SIP Call-ID; `ingress` is the side the INVITE came from."""

    call_id: str
    ingress: Side
    caller: str
    callee: str


@dataclass(frozen=True, slots=True)
class CallAnswered:
    call_id: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    call_id: str
    reason: str


B2buaOutput = SendToZone | SendToUcm | CallStarted | CallAnswered | CallEnded

__all__ = ["B2buaOutput", "CallAnswered", "CallEnded", "CallStarted", "SendToUcm", "SendToZone"]

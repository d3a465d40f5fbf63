"""SIP dialogs (RFC 3261 §12): ids, CSeq spaces, remote target, route set, in-dialog requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from edge.sip.address import NameAddr, Via
from edge.sip.errors import SipParseError
from edge.sip.headers import Headers
from edge.sip.message import Request, Response, new_branch

# Methods that refresh the remote target (§12.2, RFC 3311 UPDATE, RFC 6665 SUBSCRIBE/NOTIFY).
TARGET_REFRESH = frozenset({"INVITE", "UPDATE", "SUBSCRIBE", "NOTIFY", "REFER"})


class DialogState(Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


DIALOG_TRANSITIONS: dict[DialogState, frozenset[DialogState]] = {
    DialogState.EARLY: frozenset({DialogState.CONFIRMED, DialogState.TERMINATED}),
    DialogState.CONFIRMED: frozenset({DialogState.TERMINATED}),
    DialogState.TERMINATED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class DialogId:
    call_id: str
    local_tag: str
    remote_tag: str


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local_uri: str  # From (UAC) / To (UAS) value without tag handling: kept raw
    remote_uri: str
    remote_target: str
    route_set: list[str] = field(default_factory=list)
    local_seq: int = 0
    remote_seq: int | None = None
    secure: bool = False
    state: DialogState = DialogState.EARLY
    invite_seq: int | None = None  # CSeq of the last INVITE sent, for ACK and CANCEL

    @property
    def id(self) -> DialogId:
        return DialogId(self.call_id, self.local_tag, self.remote_tag)

    def _goto(self, new: DialogState) -> None:
        if new is self.state:
            return
        if new not in DIALOG_TRANSITIONS[self.state]:
            raise ValueError(f"dialog {self.state.name} -> {new.name}")
        self.state = new

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def from_uac(cls, request: Request, response: Response) -> Dialog:
        """§12.1.2: the UAC side, from the request it sent and a 101-299 response with a To tag."""
        remote_tag = response.to_tag
        if not remote_tag or not 101 <= response.status_code < 300:
            raise ValueError("a dialog needs a 101-299 response with a To tag")
        contacts = response.contacts
        if not contacts:
            raise SipParseError(400, "No Contact in dialog-creating response")
        return cls(
            call_id=request.call_id or "",
            local_tag=request.from_tag or "",
            remote_tag=remote_tag,
            local_uri=request.headers.get("from") or "",
            remote_uri=response.headers.get("to") or "",
            remote_target=str(contacts[0].uri),
            route_set=list(reversed(response.headers.get_all("record-route"))),
            local_seq=request.cseq.seq,
            secure=request.request_uri.scheme == "sips",
            state=DialogState.CONFIRMED if response.status_code >= 200 else DialogState.EARLY,
            invite_seq=request.cseq.seq if request.method == "INVITE" else None,
        )

    @classmethod
    def from_uas(cls, request: Request, response: Response) -> Dialog:
        """§12.1.1: the UAS side, from the request received and the response it sends (with tag)."""
        local_tag = response.to_tag
        if not local_tag:
            raise ValueError("the response must carry the local To tag")
        contacts = request.contacts
        if not contacts:
            raise SipParseError(400, "No Contact in dialog-creating request")
        return cls(
            call_id=request.call_id or "",
            local_tag=local_tag,
            remote_tag=request.from_tag or "",
            local_uri=response.headers.get("to") or "",
            remote_uri=request.headers.get("from") or "",
            remote_target=str(contacts[0].uri),
            route_set=list(request.headers.get_all("record-route")),
            local_seq=0,
            remote_seq=request.cseq.seq,
            secure=request.request_uri.scheme == "sips",
            state=DialogState.CONFIRMED if response.status_code >= 200 else DialogState.EARLY,
        )

    # -- matching and updates ---------------------------------------------------------------
    def matches_request(self, request: Request) -> bool:
        """An incoming in-dialog request: its To tag is ours, its From tag the peer's."""
        return (
            request.call_id == self.call_id
            and request.to_tag == self.local_tag
            and request.from_tag == self.remote_tag
        )

    def receive_request(self, request: Request) -> int | None:
        """Process an in-dialog request (§12.2.2). Returns an error status (500) or None."""
        seq = request.cseq.seq
        if request.method not in ("ACK", "CANCEL"):
            if self.remote_seq is not None and seq <= self.remote_seq:
                return 500  # §12.2.2: lower CSeq than already seen
            self.remote_seq = seq
        if request.method in TARGET_REFRESH and request.contacts:
            self.remote_target = str(request.contacts[0].uri)
        if request.method == "BYE":
            self._goto(DialogState.TERMINATED)
        return None

    def receive_response(self, request: Request, response: Response) -> None:
        """A response to a request we sent in this dialog (§12.2.1.2, §13.2.2.4)."""
        code = response.status_code
        if 200 <= code < 300:
            if request.method == "INVITE":
                self._goto(DialogState.CONFIRMED)
            if request.method in TARGET_REFRESH and response.contacts:
                self.remote_target = str(response.contacts[0].uri)
            if request.method == "BYE":
                self._goto(DialogState.TERMINATED)
        elif code in (481, 408):
            self._goto(DialogState.TERMINATED)  # §12.2.1.2

    # -- building in-dialog requests --------------------------------------------------------
    def make_request(
        self,
        method: str,
        *,
        via: Via | None = None,
        contact: str | None = None,
        body: bytes = b"",
        content_type: str | None = None,
        max_forwards: int = 70,
    ) -> Request:
        """§12.2.1.1. ACK and CANCEL reuse the INVITE's CSeq number; others increment.

        `via` (host/port/transport of this hop) gets a fresh branch, except for ACK to 2xx
        which per §17.1.1.3 is its own transaction and also gets a fresh one.
        """
        if method in ("ACK", "CANCEL"):
            if self.invite_seq is None:
                raise ValueError(f"{method} needs a prior INVITE in this dialog")
            seq = self.invite_seq
        else:
            self.local_seq += 1
            seq = self.local_seq
            if method == "INVITE":
                self.invite_seq = seq
        ruri, routes = self._target_and_routes()
        h = Headers()
        if via is not None:
            v = via.copy()
            v.params.set("branch", new_branch())
            h.add("Via", str(v))
        h.add("Max-Forwards", str(max_forwards))
        for r in routes:
            h.add("Route", r)
        h.add("From", _with_tag(self.local_uri, self.local_tag))
        h.add("To", _with_tag(self.remote_uri, self.remote_tag))
        h.add("Call-ID", self.call_id)
        h.add("CSeq", f"{seq} {method}")
        if contact is not None:
            h.add("Contact", contact)
        if content_type is not None:
            h.add("Content-Type", content_type)
        return Request(method, ruri, h, body)

    def _target_and_routes(self) -> tuple[str, list[str]]:
        if not self.route_set:
            return self.remote_target, []
        first = NameAddr.parse(self.route_set[0])
        if first.uri.lr:
            return self.remote_target, list(self.route_set)
        # §12.2.1.1 strict routing: first route becomes the Request-URI (params kept, headers dropped).
        uri = first.uri.copy()
        uri.headers = None
        return str(uri), [*self.route_set[1:], f"<{self.remote_target}>"]


def _with_tag(value: str, tag: str) -> str:
    na = NameAddr.parse(value)
    if na.tag == tag:
        return value
    if na.tag is None:
        return f"{value};tag={tag}"
    na.params.set("tag", tag)
    return str(na)

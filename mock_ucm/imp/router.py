"""Stanza routing of the lab IM&P for established sessions (RFC 6121 subset, sans-IO).

Presence (§4): initial presence is broadcast to contacts and answered with their current
presence, unavailable goes out on disconnect, directed presence is remembered. Messages (§8.5):
to a full JID if that resource is bound, else to the highest-priority available resource, else
stored offline (bounded) and delivered with XEP-0203 delay at the next initial presence. Unknown
users bounce with ``<service-unavailable/>``; so do iqs in namespaces the server does not serve.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge.xmpp.jid import InvalidJid, Jid
from edge.xmpp.stanza import (
    NS_CLIENT,
    NS_DELAY,
    NS_DISCO_INFO,
    NS_PING,
    NS_ROSTER,
    NS_SESSION,
    element,
    iq_result,
    qn,
    split_tag,
    stanza_error,
)
from mock_ucm.imp.roster import Direction, RosterItem, RosterStore
from mock_ucm.imp.session import ClientSession

SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
SERVER_FEATURES = (NS_DISCO_INFO, NS_PING, NS_ROSTER, NS_SESSION, NS_DELAY)


class StreamFault(Exception):
    """A peer error that ends the stream (RFC 6120 §4.9.3 ``condition``)."""

    def __init__(self, condition: str, text: str = "") -> None:
        super().__init__(condition, text)
        self.condition = condition
        self.text = text


@dataclass(slots=True)
class _Offline:
    stanza: ET.Element
    stamp: float


def _delay_stamp(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Router:
    """Routes stanzas between established sessions; ``deliver`` writes one stanza to a session."""

    def __init__(
        self,
        domain: str,
        users: list[str],
        deliver: Callable[[ClientSession, ET.Element], None],
        *,
        max_offline_per_user: int = 100,
    ) -> None:
        self.domain = domain
        self.users = frozenset(users)
        self.rosters = RosterStore(domain, users)
        self._deliver = deliver
        self._max_offline = max_offline_per_user
        self._bound: dict[str, dict[str, ClientSession]] = {}
        self._offline: dict[str, deque[_Offline]] = {}
        self._push_ids = itertools.count(1)
        self.messages_routed = 0
        self.offline_stored = 0

    # -- session registry ----------------------------------------------------------------------

    def is_bound(self, user: str, resource: str) -> bool:
        return resource in self._bound.get(user, {})

    def session_bound(self, session: ClientSession) -> None:
        assert session.jid is not None
        self._bound.setdefault(session.username, {})[session.jid.resource] = session

    def session_ended(self, session: ClientSession) -> None:
        """Disconnect: unavailable to everyone who saw this resource available (RFC 6121 §4.6)."""
        if session.jid is None:
            return
        if session.available or session.directed_to:
            self._broadcast_unavailable(session, element(qn(NS_CLIENT, "presence"), {"type": "unavailable"}))
        resources = self._bound.get(session.username, {})
        if resources.get(session.jid.resource) is session:
            del resources[session.jid.resource]
            if not resources:
                del self._bound[session.username]

    def bound_count(self) -> int:
        return sum(len(r) for r in self._bound.values())

    def offline_count(self) -> int:
        return sum(len(q) for q in self._offline.values())

    def _available(self, user: str) -> list[ClientSession]:
        return [s for s in self._bound.get(user, {}).values() if s.available]

    # -- entry point -----------------------------------------------------------------------------

    def handle(self, session: ClientSession, stanza: ET.Element, now: float) -> None:
        ns, kind = split_tag(stanza.tag)
        if ns != NS_CLIENT or kind not in ("message", "presence", "iq"):
            raise StreamFault("unsupported-stanza-type", f"{stanza.tag} is not a stanza")
        self._stamp_from(session, stanza)
        try:
            to = Jid.parse(stanza.attrib["to"]) if "to" in stanza.attrib else None
        except InvalidJid as exc:
            if kind != "presence" and stanza.get("type") != "error":
                self._send(session, stanza_error(stanza, "modify", "jid-malformed", str(exc)))
            return
        if kind == "message":
            self._handle_message(session, stanza, to, now)
        elif kind == "presence":
            self._handle_presence(session, stanza, to, now)
        else:
            self._handle_iq(session, stanza, to)

    def _stamp_from(self, session: ClientSession, stanza: ET.Element) -> None:
        """RFC 6120 §8.1.2.1: the server stamps the full JID; a different 'from' is a fault."""
        assert session.jid is not None
        claimed = stanza.get("from")
        if claimed is not None:
            try:
                jid = Jid.parse(claimed)
            except InvalidJid as exc:
                raise StreamFault("invalid-from", "malformed from") from exc
            if jid not in (session.jid, session.jid.bare):
                raise StreamFault("invalid-from", f"{claimed} is not this session")
        stanza.set("from", str(session.jid))

    def _send(self, session: ClientSession, stanza: ET.Element) -> None:
        self._deliver(session, stanza)

    def _send_to(self, target: ClientSession, stanza: ET.Element) -> None:
        out = copy.copy(stanza)
        assert target.jid is not None
        out.set("to", str(target.jid))
        self._deliver(target, out)

    def _is_local_user(self, jid: Jid) -> bool:
        return jid.domain == self.domain and jid.local in self.users

    def _bounce(self, session: ClientSession, stanza: ET.Element, condition: str) -> None:
        if stanza.get("type") not in ("error", "result"):
            error_type = "cancel"
            reply = stanza_error(stanza, error_type, condition)
            reply.attrib.pop("from", None)
            if (to := stanza.get("to")) is not None:
                reply.set("from", to)
            reply.set("to", str(session.jid))
            self._send(session, reply)

    # -- messages (RFC 6121 §5, §8.5) ---------------------------------------------------------

    def _handle_message(self, session: ClientSession, msg: ET.Element, to: Jid | None, now: float) -> None:
        assert session.jid is not None
        to = to or session.jid.bare
        if to.domain != self.domain:
            self._bounce(session, msg, "remote-server-not-found")
        elif not to.local:
            return  # messages to the server itself are not served
        elif to.local not in self.users:
            self._bounce(session, msg, "service-unavailable")
        else:
            self._deliver_message(msg, to, now, bounce_to=session)

    def _deliver_message(self, msg: ET.Element, to: Jid, now: float, bounce_to: ClientSession) -> None:
        resources = self._bound.get(to.local, {})
        target = resources.get(to.resource) if to.resource else None
        if target is None:
            if msg.get("type") == "groupchat":
                self._bounce(bounce_to, msg, "service-unavailable")
                return
            candidates = [s for s in resources.values() if s.available and s.priority >= 0]
            target = max(candidates, key=lambda s: s.priority, default=None)
        if target is not None:
            self.messages_routed += 1
            self._send(target, msg)
        elif msg.get("type") not in ("headline", "error"):
            self._store_offline(to.local, msg, now, bounce_to)

    def _store_offline(self, user: str, msg: ET.Element, now: float, bounce_to: ClientSession) -> None:
        queue = self._offline.setdefault(user, deque())
        if len(queue) >= self._max_offline:
            self._bounce(bounce_to, msg, "service-unavailable")  # XEP-0160 §3: storage full
            return
        queue.append(_Offline(msg, now))
        self.offline_stored += 1

    def _flush_offline(self, session: ClientSession) -> None:
        for item in self._offline.pop(session.username, deque()):
            msg = item.stanza
            delay = element(qn(NS_DELAY, "delay"), {"from": self.domain, "stamp": _delay_stamp(item.stamp)})
            delay.text = "Offline Storage"
            msg.append(delay)
            self.messages_routed += 1
            self._send_to(session, msg)

    # -- presence (RFC 6121 §4) ---------------------------------------------------------------

    def _handle_presence(self, session: ClientSession, pres: ET.Element, to: Jid | None, now: float) -> None:
        kind = pres.get("type", "")
        if kind in SUBSCRIPTION_TYPES:
            if to is not None:
                self._handle_subscription(session, pres, kind, to.bare)
        elif kind in ("probe", "error"):
            return
        elif to is not None:
            self._handle_directed(session, pres, to, kind)
        elif kind == "unavailable":
            self._broadcast_unavailable(session, pres)
        elif kind == "":
            self._broadcast_available(session, pres)

    def _presence_targets(self, session: ClientSession) -> list[ClientSession]:
        """Available resources that receive this user's broadcasts: contacts and own others."""
        targets: list[ClientSession] = []
        for item in self.rosters.items(session.username).values():
            if item.sends_presence_to_contact:
                contact = Jid.parse(item.jid)
                if self._is_local_user(contact):
                    targets += self._available(contact.local)
        targets += [s for s in self._available(session.username) if s is not session]
        return targets

    def _broadcast_available(self, session: ClientSession, pres: ET.Element) -> None:
        initial = not session.available
        session.available = True
        session.presence = pres
        try:
            session.priority = max(-128, min(127, int(pres.findtext(qn(NS_CLIENT, "priority"), "0"))))
        except ValueError:
            session.priority = 0
        for target in self._presence_targets(session):
            self._send_to(target, pres)
        if not initial:
            return
        # RFC 6121 §4.2.2: the server probes the user's contacts and own resources for them.
        for item in self.rosters.items(session.username).values():
            contact = Jid.parse(item.jid)
            if item.receives_contact_presence and self._is_local_user(contact):
                for other in self._available(contact.local):
                    if other.presence is not None:
                        self._send_to(session, other.presence)
        for own in self._available(session.username):
            if own is not session and own.presence is not None:
                self._send_to(session, own.presence)
        self._flush_offline(session)

    def _broadcast_unavailable(self, session: ClientSession, pres: ET.Element) -> None:
        assert session.jid is not None
        pres.set("from", str(session.jid))
        targets = self._presence_targets(session) if session.available else []
        for jid in session.directed_to:
            targets += self._sessions_for(Jid.parse(jid))
        session.available = False
        session.presence = None
        session.directed_to.clear()
        for target in dict.fromkeys(targets):
            self._send_to(target, pres)

    def _sessions_for(self, to: Jid) -> list[ClientSession]:
        if not self._is_local_user(to):
            return []
        if to.resource:
            target = self._bound.get(to.local, {}).get(to.resource)
            return [target] if target is not None else []
        return self._available(to.local)

    def _handle_directed(self, session: ClientSession, pres: ET.Element, to: Jid, kind: str) -> None:
        if kind == "unavailable":
            session.directed_to.discard(str(to))
        else:
            session.directed_to.add(str(to))
        for target in self._sessions_for(to):
            self._send_to(target, pres)

    def _handle_subscription(self, session: ClientSession, pres: ET.Element, kind: str, contact: Jid) -> None:
        if not self._is_local_user(contact) or contact.local == session.username:
            return
        user_bare = f"{session.username}@{self.domain}"
        pres.set("from", user_bare)  # RFC 6121 §3.1.2: subscription stanzas carry the bare JID
        pres.set("to", str(contact))
        changed = self.rosters.apply(session.username, str(contact), kind, Direction.OUTBOUND)
        if changed is not None:
            self._push(session.username, changed)
        changed = self.rosters.apply(contact.local, user_bare, kind, Direction.INBOUND)
        if changed is not None:
            self._push(contact.local, changed)
        targets = self._available(contact.local)
        for target in targets:
            self._deliver(target, copy.copy(pres))
        if not targets and kind == "subscribe":
            self._offline.setdefault(contact.local, deque()).append(_Offline(pres, 0.0))
        if kind == "subscribed":
            # RFC 6121 §3.1.5: the new subscriber gets the approver's current presence.
            for own in self._available(session.username):
                for target in targets:
                    if own.presence is not None:
                        self._send_to(target, own.presence)

    # -- iq (RFC 6120 §8.2.3) -----------------------------------------------------------------

    def _handle_iq(self, session: ClientSession, iq: ET.Element, to: Jid | None) -> None:
        assert session.jid is not None
        kind = iq.get("type")
        if kind not in ("get", "set", "result", "error") or "id" not in iq.attrib:
            self._bounce(session, iq, "bad-request")
            return
        if to is None or to == session.jid.bare or (to.domain == self.domain and not to.local):
            if kind in ("get", "set"):
                self._handle_server_iq(session, iq)
            return
        if to.domain != self.domain:
            self._bounce(session, iq, "remote-server-not-found")
            return
        target = self._bound.get(to.local, {}).get(to.resource) if to.resource else None
        if target is not None:
            self._send(target, iq)
        elif to.local in self.users and not to.resource and kind == "get" and self._payload_ns(iq) == NS_PING:
            self._send(session, self._server_reply(iq))
        else:
            self._bounce(session, iq, "service-unavailable")

    @staticmethod
    def _payload_ns(iq: ET.Element) -> str:
        return split_tag(iq[0].tag)[0] if len(iq) == 1 else ""

    def _server_reply(self, iq: ET.Element, *payload: ET.Element) -> ET.Element:
        reply = iq_result(iq, *payload)
        reply.attrib.pop("to", None)
        reply.attrib.pop("from", None)
        if (to := iq.get("to")) is not None:
            reply.set("from", to)
        return reply

    def _handle_server_iq(self, session: ClientSession, iq: ET.Element) -> None:
        if len(iq) != 1:
            self._bounce(session, iq, "bad-request")
            return
        ns, local = split_tag(iq[0].tag)
        kind = iq.get("type")
        if (ns, local, kind) == (NS_PING, "ping", "get") or (ns, local, kind) == (
            NS_SESSION,
            "session",
            "set",
        ):
            self._send(session, self._server_reply(iq))
        elif (ns, local) == (NS_ROSTER, "query"):
            self._handle_roster(session, iq)
        elif (ns, local, kind) == (NS_DISCO_INFO, "query", "get"):
            query = element(qn(NS_DISCO_INFO, "query"))
            query.append(element(qn(NS_DISCO_INFO, "identity"), {"category": "server", "type": "im"}))
            for feature in SERVER_FEATURES:
                query.append(element(qn(NS_DISCO_INFO, "feature"), {"var": feature}))
            self._send(session, self._server_reply(iq, query))
        else:
            self._bounce(session, iq, "service-unavailable")

    # -- roster (RFC 6121 §2) -----------------------------------------------------------------

    def _handle_roster(self, session: ClientSession, iq: ET.Element) -> None:
        if iq.get("type") == "get":
            session.interested = True
            query = element(qn(NS_ROSTER, "query"))
            query.extend(item.to_element() for item in self.rosters.items(session.username).values())
            self._send(session, self._server_reply(iq, query))
            return
        items = iq[0].findall(qn(NS_ROSTER, "item"))
        try:
            if len(items) != 1:
                raise InvalidJid("a roster set carries exactly one item")
            contact = Jid.parse(items[0].get("jid", "")).bare
        except InvalidJid as exc:
            self._send(session, stanza_error(iq, "modify", "bad-request", str(exc)))
            return
        spec = items[0]
        if spec.get("subscription") == "remove":
            removed = self.rosters.remove(session.username, str(contact))
            if removed is None:
                self._send(session, stanza_error(iq, "cancel", "item-not-found"))
                return
            self._send(session, self._server_reply(iq))
            self._push(session.username, removed, removed=True)
            self._cancel_subscriptions(session.username, contact)
            return
        groups = tuple(g.text or "" for g in spec.findall(qn(NS_ROSTER, "group")))
        item = self.rosters.set_item(session.username, str(contact), spec.get("name", ""), groups)
        self._send(session, self._server_reply(iq))
        self._push(session.username, item)

    def _cancel_subscriptions(self, user: str, contact: Jid) -> None:
        """RFC 6121 §2.5.2: removing an item cancels the subscriptions both ways."""
        if not self._is_local_user(contact):
            return
        user_bare = f"{user}@{self.domain}"
        changed = None
        for kind in ("unsubscribe", "unsubscribed"):
            changed = self.rosters.apply(contact.local, user_bare, kind, Direction.INBOUND) or changed
        if changed is not None:
            self._push(contact.local, changed)

    def _push(self, user: str, item: RosterItem, removed: bool = False) -> None:
        """Roster push (RFC 6121 §2.1.6) to every interested resource of ``user``."""
        for target in self._bound.get(user, {}).values():
            if target.interested:
                push = element(qn(NS_CLIENT, "iq"), {"type": "set", "id": f"push{next(self._push_ids)}"})
                push.append(element(qn(NS_ROSTER, "query"), None, item.to_element(removed)))
                self._send_to(target, push)

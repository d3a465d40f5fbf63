"""Rosters of the lab IM&P (RFC 6121 §2-3), backed by the corporate directory.

Every configured user starts with every other user in their roster, subscription ``both``, in
the group ``Directory`` (the way IM&P presents a company directory). Roster sets and
subscription stanzas then change each user's copy.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from enum import Enum

from edge.xmpp.stanza import NS_ROSTER, element, qn

DIRECTORY_GROUP = "Directory"


class Subscription(Enum):
    NONE = "none"
    TO = "to"
    FROM = "from"
    BOTH = "both"


class Direction(Enum):
    OUTBOUND = "outbound"  # the roster owner sent the subscription stanza
    INBOUND = "inbound"  # the roster owner received it


_S = Subscription
# RFC 6121 §3.1-3.3 (tables in Appendix A): how a subscription stanza changes the roster item
# of its sender (OUTBOUND) and of its recipient (INBOUND). Pairs not listed leave it unchanged.
SUBSCRIPTION_TRANSITIONS: dict[tuple[str, Direction], dict[Subscription, Subscription]] = {
    ("subscribed", Direction.OUTBOUND): {_S.NONE: _S.FROM, _S.TO: _S.BOTH},
    ("subscribed", Direction.INBOUND): {_S.NONE: _S.TO, _S.FROM: _S.BOTH},
    ("unsubscribed", Direction.OUTBOUND): {_S.FROM: _S.NONE, _S.BOTH: _S.TO},
    ("unsubscribed", Direction.INBOUND): {_S.TO: _S.NONE, _S.BOTH: _S.FROM},
    ("unsubscribe", Direction.OUTBOUND): {_S.TO: _S.NONE, _S.BOTH: _S.FROM},
    ("unsubscribe", Direction.INBOUND): {_S.FROM: _S.NONE, _S.BOTH: _S.TO},
}


@dataclass(frozen=True, slots=True)
class RosterItem:
    jid: str  # bare JID
    name: str = ""
    subscription: Subscription = Subscription.NONE
    groups: tuple[str, ...] = ()
    ask: bool = False  # an outbound subscribe is pending (RFC 6121 §2.1.2.2)

    @property
    def sends_presence_to_contact(self) -> bool:
        return self.subscription in (Subscription.FROM, Subscription.BOTH)

    @property
    def receives_contact_presence(self) -> bool:
        return self.subscription in (Subscription.TO, Subscription.BOTH)

    def to_element(self, removed: bool = False) -> ET.Element:
        attrs = {"jid": self.jid, "subscription": "remove" if removed else self.subscription.value}
        if self.name:
            attrs["name"] = self.name
        if self.ask and not removed:
            attrs["ask"] = "subscribe"
        item = element(qn(NS_ROSTER, "item"), attrs)
        for group in self.groups:
            item.append(element(qn(NS_ROSTER, "group"), text=group))
        return item


class RosterStore:
    """Per-user rosters, created from the directory on first use."""

    def __init__(self, domain: str, users: list[str]) -> None:
        self._domain = domain
        self._users = users
        self._rosters: dict[str, dict[str, RosterItem]] = {}

    def items(self, user: str) -> dict[str, RosterItem]:
        roster = self._rosters.get(user)
        if roster is None:
            roster = {
                f"{other}@{self._domain}": RosterItem(
                    f"{other}@{self._domain}", other, Subscription.BOTH, (DIRECTORY_GROUP,)
                )
                for other in self._users
                if other != user
            }
            self._rosters[user] = roster
        return roster

    def get(self, user: str, contact: str) -> RosterItem | None:
        return self.items(user).get(contact)

    def set_item(self, user: str, jid: str, name: str, groups: tuple[str, ...]) -> RosterItem:
        """Roster set (RFC 6121 §2.3): name and groups change; subscription state is kept."""
        current = self.get(user, jid) or RosterItem(jid)
        item = replace(current, name=name, groups=groups)
        self.items(user)[jid] = item
        return item

    def remove(self, user: str, jid: str) -> RosterItem | None:
        return self.items(user).pop(jid, None)

    def apply(self, user: str, contact: str, stanza_type: str, direction: Direction) -> RosterItem | None:
        """Apply a subscription stanza to ``user``'s item for ``contact``; the item if it changed."""
        current = self.get(user, contact)
        if stanza_type == "subscribe" and direction is Direction.OUTBOUND:
            if current is not None and current.receives_contact_presence:
                return None
            item = replace(current or RosterItem(contact), ask=True)
        else:
            table = SUBSCRIPTION_TRANSITIONS.get((stanza_type, direction), {})
            if current is None or current.subscription not in table:
                return None
            item = replace(current, subscription=table[current.subscription], ask=False)
        self.items(user)[contact] = item
        return item

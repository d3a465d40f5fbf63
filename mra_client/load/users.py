"""The simulated users of a load run and the set of those online (O(1) add, remove, random pick)."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mra_client.signin import SignedIn
from mra_client.sip_ua import MraSipUa
from mra_client.xmpp_lean import LeanXmppSession

if TYPE_CHECKING:
    from mra_client.load.calls import LoadCall


class UserState(enum.Enum):
    WAITING = "waiting"
    SIGNING_IN = "signing-in"
    ONLINE = "online"
    LOST = "lost"
    FAILED = "failed"
    SIGNED_OUT = "signed-out"


@dataclass(eq=False)
class LoadUser:
    index: int
    username: str
    password: str
    state: UserState = UserState.WAITING
    session: SignedIn | None = None
    xmpp: LeanXmppSession | None = None
    dn: str = ""
    registered: bool = False
    busy: bool = False
    expecting: LoadCall | None = None
    """A call placed to this user by the run, not yet answered."""
    generation: int = 0
    """Bumped when the user goes offline: its pending periodic jobs become stale."""
    dialogs: dict[str, LoadCall] = field(default_factory=dict)
    """Call-ID → call, for requests that arrive inside a dialog (BYE)."""

    @property
    def sip(self) -> MraSipUa | None:
        return self.session.sip if self.session is not None else None


class OnlineUsers:
    """Indexes of online users in a list (random pick) plus their positions (swap-remove)."""

    def __init__(self, users: list[LoadUser], rng: random.Random) -> None:
        self.users = users
        self.rng = rng
        self._list: list[int] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._list)

    def set(self, user: LoadUser, online: bool) -> None:
        if online and user.index not in self._pos:
            self._pos[user.index] = len(self._list)
            self._list.append(user.index)
        elif not online and user.index in self._pos:
            pos = self._pos.pop(user.index)
            last = self._list.pop()
            if last != user.index:
                self._list[pos] = last
                self._pos[last] = pos

    def pick(
        self, *, idle: bool = False, xmpp: bool = False, exclude: int = -1, tries: int = 32
    ) -> LoadUser | None:
        """A random online user (not in a call / with an XMPP session if asked): a few random
        tries, then one scan, so a busy population never loops forever."""

        def fits(user: LoadUser) -> bool:
            return user.index != exclude and not (idle and user.busy) and not (xmpp and user.xmpp is None)

        if not self._list:
            return None
        for _ in range(tries):
            user = self.users[self.rng.choice(self._list)]
            if fits(user):
                return user
        return next((self.users[i] for i in self._list if fits(self.users[i])), None)

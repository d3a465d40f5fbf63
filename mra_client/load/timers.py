"""Per-user periodic work (REGISTER refresh, STUN keepalive, XMPP whitespace) as one deadline heap.

Sans-IO: the engine asks `next_deadline()`, sleeps until then, and takes `pop_due(now)`. A
thousand users cost a thousand heap entries, not a thousand sleeping tasks. Entries are never
removed early; a user that signed out simply ignores its stale entries (`generation` check).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field


class Job(enum.Enum):
    REGISTER_REFRESH = "register-refresh"
    STUN_KEEPALIVE = "stun-keepalive"
    XMPP_KEEPALIVE = "xmpp-keepalive"


@dataclass(order=True, frozen=True, slots=True)
class Due:
    at: float
    seq: int
    user: int = field(compare=False)
    job: Job = field(compare=False)
    generation: int = field(compare=False)


class Timers:
    def __init__(self) -> None:
        self._heap: list[Due] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, at: float, user: int, job: Job, generation: int) -> None:
        heapq.heappush(self._heap, Due(at, next(self._seq), user, job, generation))

    def next_deadline(self) -> float | None:
        return self._heap[0].at if self._heap else None

    def pop_due(self, now: float, limit: int = 1000) -> list[Due]:
        """Entries due at `now`, earliest first, at most `limit` (the rest stay for next time)."""
        out: list[Due] = []
        while self._heap and self._heap[0].at <= now and len(out) < limit:
            out.append(heapq.heappop(self._heap))
        return out

"""One write per event-loop turn: what a connection sends during one iteration of the loop goes
to the transport as one buffer at its end (one TLS record and one send instead of one per message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WriteBatch:
    """Collects ``add``-ed bytes and hands them to ``write`` joined, once per loop iteration.

    ``write`` decides what to do with a closed connection (usually: drop). ``flush`` may also be
    called early, e.g. right before closing.
    """

    __slots__ = ("_loop", "_out", "_write")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._write = write

    def add(self, data: bytes) -> None:
        out = self._out
        out.append(data)
        if len(out) == 1:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        out = self._out
        if out:
            self._out = []
            self._write(out[0] if len(out) == 1 else b"".join(out))

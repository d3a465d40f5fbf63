"""Reconnect delays for the links C keeps up towards E (shared/spec/MRA.md §1: "reconnect with backoff").

Pure: the caller owns the attempt counter and the random generator, so tests are deterministic.
"""

from __future__ import annotations

import random

# 2**60 times any sane initial delay already exceeds any cap; bounding the exponent avoids float
# overflow for absurd attempt counts.
_MAX_EXPONENT = 60


def backoff_delay(
    attempt: int, *, initial_s: float, max_s: float, jitter: float, rng: random.Random
) -> float:
    """Delay before reconnect attempt `attempt` (0 for the first retry).

    Capped exponential: ``d = min(max_s, initial_s * 2**attempt)``. Jitter is *proportional*
    ("equal jitter" generalised): the result is uniform in ``[d * (1 - jitter), d]``, so
    ``jitter=0`` gives the plain capped exponential, ``jitter=1`` gives AWS-style "full jitter"
    ``uniform(0, d)``, and ``jitter=0.5`` gives "equal jitter". The result never exceeds `max_s`,
    so a fleet of C nodes reconnecting after an E restart spreads out instead of stampeding.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if initial_s <= 0 or max_s < initial_s:
        raise ValueError("need 0 < initial_s <= max_s")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter must be within [0, 1]")
    delay = min(max_s, initial_s * 2.0 ** min(attempt, _MAX_EXPONENT))
    return delay * (1.0 - jitter * rng.random())

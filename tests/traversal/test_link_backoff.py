from __future__ import annotations

import random

import pytest

from traversal.backoff import backoff_delay


def test_without_jitter_it_doubles_up_to_the_cap() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, initial_s=0.5, max_s=30.0, jitter=0.0, rng=rng) for a in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_jitter_stays_within_proportional_band_and_is_deterministic() -> None:
    for attempt in range(12):
        ceiling = min(60.0, 1.0 * 2**attempt)
        for seed in range(50):
            d = backoff_delay(attempt, initial_s=1.0, max_s=60.0, jitter=0.25, rng=random.Random(seed))
            assert ceiling * 0.75 <= d <= ceiling
            assert d == backoff_delay(
                attempt, initial_s=1.0, max_s=60.0, jitter=0.25, rng=random.Random(seed)
            )


def test_full_jitter_spreads_reconnects() -> None:
    rng = random.Random(7)
    delays = {round(backoff_delay(8, initial_s=1.0, max_s=10.0, jitter=1.0, rng=rng), 6) for _ in range(100)}
    assert len(delays) > 90 and min(delays) >= 0.0 and max(delays) <= 10.0


def test_huge_attempt_does_not_overflow() -> None:
    assert backoff_delay(10**9, initial_s=1.0, max_s=300.0, jitter=0.0, rng=random.Random()) == 300.0


@pytest.mark.parametrize(
    ("attempt", "initial_s", "max_s", "jitter"),
    [(-1, 1.0, 2.0, 0.0), (0, 0.0, 2.0, 0.0), (0, 3.0, 2.0, 0.0), (0, 1.0, 2.0, 1.5)],
)
def test_bad_arguments(attempt: int, initial_s: float, max_s: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, initial_s=initial_s, max_s=max_s, jitter=jitter, rng=random.Random())

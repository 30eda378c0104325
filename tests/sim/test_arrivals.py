"""Open-loop arrival times: Poisson and fixed rate."""

from __future__ import annotations

import statistics

import pytest

from mars.core.errors import UsageError
from mars.sim.arrivals import arrival_times


def test_fixed_rate_gaps_are_exact_and_start_at_zero() -> None:
    times = arrival_times(50, rate=4.0, kind="fixed")
    assert times == [i / 4.0 for i in range(50)]
    assert times[0] == 0.0


def test_poisson_gaps_are_exponential_with_mean_one_over_rate() -> None:
    times = arrival_times(20_000, rate=4.0, seed=3)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert times[0] > 0.0  # the first arrival is the first drawn gap
    assert all(g >= 0.0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd == mean


def test_poisson_is_seeded() -> None:
    assert arrival_times(100, rate=1.0, seed=7) == arrival_times(100, rate=1.0, seed=7)
    assert arrival_times(100, rate=1.0, seed=7) != arrival_times(100, rate=1.0, seed=8)
    assert arrival_times(0, rate=1.0) == []


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"n": 3, "rate": 1.0, "kind": "bursty"}, "poisson, fixed"),
        ({"n": 3, "rate": 0.0}, "rate"),
        ({"n": 3, "rate": float("inf")}, "rate"),
        ({"n": -1, "rate": 1.0}, "sessions"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(UsageError, match=says):
        arrival_times(**kwargs)  # type: ignore[arg-type]

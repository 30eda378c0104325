"""Per-category distributions of measured tool durations, for tool steps a trace leaves undated.

DESIGN.md section 4: a tool step without `duration_s` or `duration_est_s` holds its session for a
seeded draw from the piecewise-linear inverse CDF of *measured* durations of its category
(timeouts excluded). The table ships as `mars/sim/data/tool_stats.json`, derived from the shared
traces by `scripts/derive_tool_stats.py` (whose docstring documents the format); `--tool-stats
FILE` replaces it with a file in the same format.

A category with fewer than `min_count` samples (20 unless the file says otherwise), and a category
the table does not know, is drawn from the pooled "all" distribution: a handful of points is a
worse estimate than the pool.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from itertools import pairwise
from pathlib import Path
from typing import Any

from mars.core.errors import UsageError

POOLED = "all"
DEFAULT_MIN_COUNT = 20
_DOC = (
    "Measured tool durations (s) per category. quantiles[k] is the duration at probability "
    "probabilities[k]; samples come from the piecewise-linear inverse CDF through these points. "
    "A category with count < min_count, or unknown, is sampled from 'all'."
)


@dataclass(frozen=True)
class CategoryStats:
    """The measured durations of one tool category, as quantiles on the table's probability grid."""

    count: int  # number of measured samples behind the quantiles
    quantiles: tuple[float, ...]  # seconds at each of ToolStats.probabilities, non-decreasing
    mean: float | None = None  # measured sample mean (informational; the sampler's is mean())
    cpu_heavy: bool | None = None  # whether tools of this category occupy a CPU core; None: mixed


class ToolStats:
    """Piecewise-linear inverse CDFs of measured tool durations per category and pooled ("all")."""

    def __init__(
        self,
        probabilities: Sequence[float],
        categories: Mapping[str, CategoryStats],
        min_count: int = DEFAULT_MIN_COUNT,
    ) -> None:
        _check_table(probabilities, categories, min_count)
        self.probabilities: tuple[float, ...] = tuple(probabilities)
        self.categories: dict[str, CategoryStats] = dict(categories)
        self.min_count = min_count

    @classmethod
    def default(cls) -> ToolStats:
        """The table derived from the shared traces, shipped with the package."""
        return _default()

    @classmethod
    def from_file(cls, path: str | Path) -> ToolStats:
        """Load a table in the shipped format (the `--tool-stats FILE` override)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"tool stats file {path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"tool stats file {path} cannot be read: {exc}") from None
        return cls.from_json(text, source=f"tool stats file {path}")

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any], *, source: str = "tool stats") -> ToolStats:
        """Build from JSON text or its parsed object; UsageError naming `source` when malformed."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{source}: not valid JSON ({exc})") from None
        try:
            return _parse(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise UsageError(f"{source}: {exc}; see scripts/derive_tool_stats.py") from None

    def resolve(self, category: str) -> str:
        """The category whose distribution `category` is drawn from (itself or "all")."""
        stats = self.categories.get(category)
        if stats is None or stats.count < self.min_count:
            return POOLED
        return category

    def sample(self, category: str, rng: random.Random) -> float:
        """One duration in seconds; consumes exactly one `rng.random()`."""
        quantiles = self.categories[self.resolve(category)].quantiles
        p = rng.random()
        k = min(bisect.bisect_right(self.probabilities, p), len(self.probabilities) - 1)
        p0, p1 = self.probabilities[k - 1], self.probabilities[k]
        q0, q1 = quantiles[k - 1], quantiles[k]
        return q0 + (q1 - q0) * (p - p0) / (p1 - p0)

    def mean(self, category: str) -> float:
        """The exact mean of what `sample(category, ...)` draws (not the measured sample mean)."""
        quantiles = self.categories[self.resolve(category)].quantiles
        ps = self.probabilities
        return math.fsum(
            (ps[k + 1] - ps[k]) * (quantiles[k] + quantiles[k + 1]) / 2 for k in range(len(ps) - 1)
        )

    def cpu_heavy(self, category: str) -> bool | None:
        """The table's cpu_heavy flag for `category`, None when unknown or mixed."""
        stats = self.categories.get(category)
        return None if stats is None else stats.cpu_heavy

    def to_json(self) -> dict[str, Any]:
        """The table as a JSON object in the file format; `from_json(t.to_json())` round-trips."""
        return {
            "_doc": _DOC,
            "min_count": self.min_count,
            "probabilities": list(self.probabilities),
            "categories": {
                name: {
                    "count": s.count,
                    "mean": s.mean,
                    "cpu_heavy": s.cpu_heavy,
                    "quantiles": list(s.quantiles),
                }
                for name, s in self.categories.items()
            },
        }


@functools.cache
def _default() -> ToolStats:
    text = resources.files("mars.sim").joinpath("data/tool_stats.json").read_text("utf-8")
    return ToolStats.from_json(text, source="packaged mars/sim/data/tool_stats.json")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _parse(data: object) -> ToolStats:
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    raw_ps = data["probabilities"]
    raw_cats = data["categories"]
    if not isinstance(raw_ps, list):
        raise TypeError("'probabilities' must be a list of numbers")
    if not isinstance(raw_cats, Mapping):
        raise TypeError("'categories' must be an object mapping category -> stats")
    min_count = data.get("min_count", DEFAULT_MIN_COUNT)
    if isinstance(min_count, bool) or not isinstance(min_count, int):
        raise TypeError(f"'min_count' must be an integer, got {min_count!r}")
    ps = [_number(p, "probabilities[]") for p in raw_ps]
    categories: dict[str, CategoryStats] = {}
    for name, raw in raw_cats.items():
        if not isinstance(raw, Mapping):
            raise TypeError(f"category {name!r} must be an object")
        count, quantiles = raw["count"], raw["quantiles"]
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"category {name!r}: 'count' must be an integer, got {count!r}")
        if not isinstance(quantiles, list):
            raise TypeError(f"category {name!r}: 'quantiles' must be a list of seconds")
        mean, heavy = raw.get("mean"), raw.get("cpu_heavy")
        if heavy is not None and not isinstance(heavy, bool):
            raise TypeError(f"category {name!r}: 'cpu_heavy' must be true, false or null")
        categories[str(name)] = CategoryStats(
            count=count,
            quantiles=tuple(_number(q, f"category {name!r} quantiles[]") for q in quantiles),
            mean=None if mean is None else _number(mean, f"category {name!r} mean"),
            cpu_heavy=heavy,
        )
    return ToolStats(ps, categories, min_count)


def _check_table(
    ps: Sequence[float], categories: Mapping[str, CategoryStats], min_count: int
) -> None:
    if len(ps) < 2 or ps[0] != 0.0 or ps[-1] != 1.0:
        raise ValueError("'probabilities' must run from 0 to 1 with at least two points")
    if any(b <= a for a, b in pairwise(ps)):
        raise ValueError("'probabilities' must be strictly increasing")
    if min_count < 0:
        raise ValueError(f"'min_count' must be >= 0, got {min_count}")
    if POOLED not in categories:
        raise ValueError(f"the table needs a pooled {POOLED!r} category (the fallback)")
    for name, stats in categories.items():
        qs = stats.quantiles
        if len(qs) != len(ps):
            raise ValueError(
                f"category {name!r} has {len(qs)} quantiles for {len(ps)} probabilities"
            )
        if qs[0] < 0 or any(b < a for a, b in pairwise(qs)):
            raise ValueError(f"category {name!r}: quantiles must be >= 0 and non-decreasing")
        if stats.count < 0:
            raise ValueError(f"category {name!r}: 'count' must be >= 0")

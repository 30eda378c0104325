"""Derive the tool-duration quantile table shipped as `src/mars/sim/data/tool_stats.json`.

Usage: python scripts/derive_tool_stats.py [TRACES.jsonl] [-o OUT.json]

TRACES defaults to `../shared/traces/traces.jsonl` relative to the repo root, OUT to
`src/mars/sim/data/tool_stats.json`. Standard library only.

Samples: every `tool` step whose `duration_s` is a number (a *measured* duration; in the shared
traces exactly the SWE-agent group, the Gemini group only has estimates) and that is not
`timed_out` (those hit SWE-agent's 300 s command timeout: the duration is the timeout, not the
tool). Estimated durations (`duration_est_s`) are never used: at 1 s resolution they are noise.

Output format (also stated in the file's "_doc" field):
    {"_doc": "...", "source": "<traces file name>", "min_count": 20,
     "probabilities": [0, 0.01, 0.05, 0.1, 0.2, ..., 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 1],
     "categories": {"all": {"count": N, "mean": s, "cpu_heavy": null, "quantiles": [...]},
                    "test": {"count": N, "mean": s, "cpu_heavy": true, "quantiles": [...]}, ...}}
`quantiles[k]` is the duration in seconds at probability `probabilities[k]` (linear interpolation
between order statistics, numpy's default); `mean` is the sample mean; `cpu_heavy` is the majority
flag of the category's steps (null for the pooled "all"). `mars.sim.toolstats.ToolStats` samples a
piecewise-linear inverse CDF through these points; a category with fewer than `min_count` samples
is sampled from "all" instead. The points past 0.99 keep the sampled mean near the measured mean
despite the heavy tail (pooled: 0.32 s sampled vs 0.28 s measured; with 0.99 -> 1.0 alone, 0.98 s).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACES = REPO_ROOT / ".." / "shared" / "traces" / "traces.jsonl"
DEFAULT_OUT = REPO_ROOT / "src" / "mars" / "sim" / "data" / "tool_stats.json"
# The tail points past 0.99 are there because the sampler interpolates linearly: with 0.99 -> 1.0
# alone, one 146 s outlier would be smeared over 1% of the mass and triple the pooled mean.
PROBABILITIES = (
    *(0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    *(0.995, 0.999, 0.9995, 1.0),
)
MIN_COUNT = 20
DOC = (
    "Measured tool durations (s) per category, timeouts excluded. quantiles[k] is the duration at "
    "probability probabilities[k] (linear interpolation between order statistics); the sampler "
    "draws from the piecewise-linear inverse CDF through these points. count = samples, mean = "
    "sample mean, cpu_heavy = majority flag of the category (null for the pooled 'all'). A "
    "category with count < min_count is sampled from 'all'. "
    "Derived by scripts/derive_tool_stats.py."
)


def quantile(sorted_values: list[float], p: float) -> float:
    """Linearly interpolated quantile of already sorted values (numpy's default method)."""
    h = (len(sorted_values) - 1) * p
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def collect(path: Path) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Measured durations per category and [cpu_heavy true, false] votes per category."""
    durations: dict[str, list[float]] = defaultdict(list)
    heavy_votes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            for step in json.loads(line)["steps"]:
                if step.get("kind") != "tool" or step.get("timed_out"):
                    continue
                d = step.get("duration_s")
                if not isinstance(d, int | float) or isinstance(d, bool):
                    continue
                category = str(step.get("category", "other"))
                durations[category].append(float(d))
                heavy_votes[category][0 if step.get("cpu_heavy") else 1] += 1
    return durations, heavy_votes


def entry(values: list[float], cpu_heavy: bool | None) -> dict[str, object]:
    values = sorted(values)
    return {
        "count": len(values),
        "mean": round(math.fsum(values) / len(values), 4),
        "cpu_heavy": cpu_heavy,
        "quantiles": [round(quantile(values, p), 4) for p in PROBABILITIES],
    }


def derive(path: Path) -> dict[str, object]:
    durations, heavy_votes = collect(path)
    pooled = [d for values in durations.values() for d in values]
    if not pooled:
        sys.exit(f"{path}: no measured tool durations (duration_s) found")
    categories: dict[str, object] = {"all": entry(pooled, None)}
    for category in sorted(durations):
        yes, no = heavy_votes[category]
        categories[category] = entry(durations[category], yes > no)
    return {
        "_doc": DOC,
        "source": path.name,
        "min_count": MIN_COUNT,
        "probabilities": list(PROBABILITIES),
        "categories": categories,
    }


def _one_line(match: re.Match[str]) -> str:
    return "[" + ", ".join(item.strip() for item in match.group(1).split(",")) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="?", type=Path, default=DEFAULT_TRACES)
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not args.traces.is_file():
        sys.exit(f"trace file {args.traces} not found: pass its path as the first argument")
    table = derive(args.traces)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One category per line keeps the table readable and its diffs small.
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", _one_line, json.dumps(table, indent=1))
    args.out.write_text(text + "\n", encoding="utf-8")
    cats = table["categories"]
    assert isinstance(cats, dict)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v['count']}" for k, v in cats.items()))


if __name__ == "__main__":
    main()

"""`mars timeline EVENTS.jsonl -o OUT.png|OUT.html`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mars.timeline import DEFAULT_SESSIONS, draw


def add_timeline_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "timeline",
        help="draw a run's events (mars serve/sim/bench --events) as a timeline per session",
        description=(
            "Draw the events of one run, live or simulated, as one row per session (admission "
            "wait; each LLM call's wait, prefill and decode; each tool's queue and run), with "
            "the KV tokens held and the admission window beneath. PNG (matplotlib) or a "
            "self-contained HTML page with hover text per bar."
        ),
    )
    p.add_argument("events", help="events file (JSON lines) of `mars serve|sim|bench --events`")
    p.add_argument("-o", "--out", required=True, help="output file: OUT.png or OUT.html")
    p.add_argument(
        "--sessions",
        type=_rows,
        default=DEFAULT_SESSIONS,
        metavar="N",
        help="draw the first N sessions by arrival, 0 for all (the plot says how many of how "
        "many; KV and window count every session)",
    )


def _rows(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or more, got {n}")
    return n


def run_timeline(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = Path(args.out)
    timeline = draw(Path(args.events), out, args.sessions or None)
    drawn = len(timeline.first(args.sessions or None)[0])
    notes = "".join(f"; {n}" for n in timeline.notes)
    print(
        f"wrote {out}: {drawn} of {len(timeline.rows)} sessions, "
        f"{sum(timeline.kinds.values())} events, in {time.perf_counter() - t0:.1f} s{notes}"
    )
    return 0

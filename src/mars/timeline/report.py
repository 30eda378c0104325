"""Timelines in the `mars sweep` and `mars bench` reports: one run per policy, drawn beside the
report and linked from it, so a reader sees where one policy's sessions wait and another's not."""

from __future__ import annotations

from pathlib import Path

from mars.core.errors import UsageError
from mars.timeline import DEFAULT_SESSIONS, draw


def timeline_file(policy: str) -> str:
    return f"timeline-{policy}.png"


def draw_timelines(events: dict[str, Path], out: Path) -> list[Path]:
    """`out/timeline-POLICY.png` from each policy's events file (one that cannot be drawn, e.g.
    a server that wrote nothing, is left out)."""
    paths = []
    for policy, path in events.items():
        target = out / timeline_file(policy)
        try:
            draw(path, target, DEFAULT_SESSIONS)
        except UsageError:
            continue
        paths.append(target)
    return paths


def timeline_section(events: dict[str, Path], out: Path, which: str) -> list[str]:
    """The report's links to the timelines and their events (`which`: the run drawn)."""
    if not events:
        return []
    lines = [
        "",
        "## Timelines (one run per policy)",
        "",
        f"{which}, drawn by `mars timeline` (first {DEFAULT_SESSIONS} sessions by arrival): one "
        "row per session, grey its admission wait, orange a call's wait for the engine, red its "
        "prefill, blue its decode, black a preempted stretch, lilac a tool's queue, green its "
        "run; beneath, the KV tokens held (derived from the events) and the admission window. "
        "Redraw one as a page with hover text: `mars timeline EVENTS -o timeline.html`.",
        "",
    ]
    for policy, path in events.items():
        name = path.name if path.parent.resolve() == out.resolve() else str(path)
        png = timeline_file(policy)
        lines.append(f"- **{policy}**: [`{png}`]({png}), events [`{name}`]({name})")
    for policy in events:
        lines += ["", f"![{policy} timeline]({timeline_file(policy)})"]
    return lines

"""`mars timeline`: one run's events (live or simulated) drawn as a timeline per session.

`spans` pairs the events into spans; `png` and `html` draw them.
"""

from __future__ import annotations

from pathlib import Path

from mars.core.errors import UsageError
from mars.timeline.spans import Timeline, load

DEFAULT_SESSIONS = 80  # rows drawn unless told: beyond that a row is under two pixels tall
FORMATS = (".png", ".html")

__all__ = ["DEFAULT_SESSIONS", "FORMATS", "Timeline", "draw", "load"]


def draw(events: Path, out: Path, sessions: int | None = DEFAULT_SESSIONS) -> Timeline:
    """Draw the events file `events` to `out` (.png or .html); the timeline drawn."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"-o {out}: give a file ending in .png or .html")
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise UsageError(f"-o {out}: not a file in an existing directory")
    timeline = load(events)
    if suffix == ".png":
        from mars.timeline.png import draw_png

        draw_png(timeline, out, sessions)
    else:
        from mars.timeline.html import draw_html

        draw_html(timeline, out, sessions)
    return timeline

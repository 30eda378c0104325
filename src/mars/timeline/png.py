"""A timeline as a PNG (matplotlib, Agg): sessions as rows of coloured phases, and beneath them
the derived KV tokens held (with evictions, offloads and restores as ticks) and the admission
window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mars.timeline.spans import PHASES, Row, Timeline, decimate

COLOURS = {
    "admission": "#b8b8b8",
    "call wait": "#f4a340",
    "prefill": "#d62728",
    "decode": "#1f77b4",
    "preempted": "#111111",
    "tool queue": "#c5a3d9",
    "tool run": "#2ca02c",
}
INSTANTS = {"kv_evict": "#d62728", "kv_offload": "#9467bd", "kv_restore": "#2ca02c"}


def time_label(timeline: Timeline) -> str:
    if timeline.simulated:
        return "seconds (simulated)"
    return "seconds since the server started"


def title(timeline: Timeline, shown: str) -> str:
    name = Path(timeline.source).name if timeline.source else "events"
    events = sum(timeline.kinds.values())
    return f"{name}: {shown}, {events} events, {timeline.end - timeline.start:.0f} s"


def draw_png(timeline: Timeline, path: Path, max_sessions: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    rows, shown = timeline.first(max_sessions)
    n = max(1, len(rows))
    gantt_h = min(16.0, 1.2 + 0.14 * n)
    fig, (ax, kv_ax, win_ax) = plt.subplots(
        3,
        1,
        figsize=(12, gantt_h + 3.6),
        sharex=True,
        gridspec_kw={"height_ratios": [gantt_h, 1.8, 1.3]},
    )
    _lifelines(ax, rows, timeline.end)
    for phase in PHASES:
        verts = _boxes(rows, phase)
        if verts:
            ax.add_collection(
                PolyCollection(verts, facecolors=COLOURS[phase], linewidths=0, antialiased=False)
            )
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(timeline.start, max(timeline.end, timeline.start + 1e-9))
    step = max(1, -(-n // 60))
    ax.set_yticks(range(0, len(rows), step))
    ax.set_yticklabels([r.session_id[-14:] for r in rows[::step]], fontsize=6)
    ax.set_ylabel("session")
    ax.set_title(title(timeline, shown), fontsize=10)
    handles = [
        matplotlib.patches.Patch(color=COLOURS[p], label=p)
        for p in PHASES
        if p in {s.phase for r in rows for s in r.spans}
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.0),
              ncol=len(handles) or 1, fontsize=7, frameon=False)  # fmt: skip
    _kv(kv_ax, timeline)
    _window(win_ax, timeline)
    win_ax.set_xlabel(time_label(timeline))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _boxes(rows: list[Row], phase: str) -> list[list[tuple[float, float]]]:
    h = 0.38
    return [
        [(s.start, y - h), (s.start, y + h), (s.end, y + h), (s.end, y - h)]
        for y, row in enumerate(rows)
        for s in row.spans
        if s.phase == phase
    ]


def _lifelines(ax: Any, rows: list[Row], end: float) -> None:
    """A thin line over each session's life: the gaps in it are the agent's own time."""
    ys, xmins, xmaxs = [], [], []
    for y, row in enumerate(rows):
        ys.append(y)
        xmins.append(row.first_seen)
        xmaxs.append(row.done if row.done is not None else end)
    ax.hlines(ys, xmins, xmaxs, colors="#dddddd", linewidth=0.6)


def _kv(ax: Any, timeline: Timeline) -> None:
    if timeline.kv:
        t, tokens = zip(*decimate(timeline.kv, timeline.start, timeline.end), strict=True)
        ax.step(t, tokens, where="post", linewidth=0.8, color="#1f77b4", label="KV tokens held")
    top = max((v for _, v in timeline.kv), default=1) or 1
    for kind, points in timeline.kv_instants.items():
        at = [p[0] for p in decimate(points, timeline.start, timeline.end)]
        ax.plot(at, [0.0] * len(at), "|", color=INSTANTS.get(kind, "k"), markersize=6,
                alpha=0.5, label=f"{kind} ({len(points)})")  # fmt: skip
    ax.set_ylim(-0.06 * top, 1.1 * top)
    ax.set_ylabel("KV tokens\n(derived)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncol=4, frameon=False)


def _window(ax: Any, timeline: Timeline) -> None:
    if timeline.window:
        t, w, a = zip(*timeline.window, strict=True)
        t = (*t, timeline.end)
        ax.step(t, (*w, w[-1]), where="post", linewidth=0.9, label="admission window")
        ax.step(t, (*a, a[-1]), where="post", linewidth=0.7, linestyle="--", label="active")
        ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)
    else:
        note = "no admission_window events (the policy keeps no window)"
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=8,
                color="#666666")  # fmt: skip
    ax.set_ylabel("sessions", fontsize=8)
    ax.grid(alpha=0.3)

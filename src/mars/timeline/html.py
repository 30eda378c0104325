"""A timeline as one self-contained HTML page: inline SVG, no script, no network. Every bar is a
`<rect>` whose `<title>` is its hover text; each session is one `<g class="session">` row."""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from pathlib import Path

from mars.timeline.png import COLOURS, INSTANTS, time_label, title
from mars.timeline.spans import PHASES, Timeline, decimate

WIDTH, LEFT, RIGHT, ROW_H, PANEL_H = 1200, 120, 20, 12, 90
MAX_POINTS = 1500  # time bins of a gauge drawn (each bin's peak)
Scale = Callable[[float], float]  # seconds -> pixels


def draw_html(timeline: Timeline, path: Path, max_sessions: int | None = None) -> Path:
    rows, shown = timeline.first(max_sessions)
    start, span = timeline.start, max(timeline.end - timeline.start, 1e-9)
    plot_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return round(LEFT + (t - start) / span * plot_w, 1)

    css = "".join(f".p{i}{{fill:{COLOURS[p]}}}" for i, p in enumerate(PHASES))
    top = 30
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{escape(title(timeline, shown))}</title>",
        "<style>body{font:12px sans-serif;margin:12px}svg text{font:10px sans-serif}"
        f"rect:hover{{stroke:#000;stroke-width:1}}.life{{stroke:#ddd}}{css}</style>",
        f"</head><body><h3>{escape(title(timeline, shown))}</h3>",
        "<p>" + " ".join(
            f"<span style='background:{COLOURS[p]};padding:0 8px'>&nbsp;</span> {p} &nbsp;"
            for p in PHASES
        ) + "</p>",
    ]  # fmt: skip
    if timeline.notes:
        out.append("<p>" + escape("; ".join(timeline.notes)) + "</p>")
    gantt_h = ROW_H * len(rows)
    height = top + gantt_h + 2 * (PANEL_H + 30) + 30
    out.append(f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height}'>")
    out += _axis(x, start, span, top + gantt_h + 2 * (PANEL_H + 30) + 10, top, timeline)
    for i, row in enumerate(rows):
        y = top + i * ROW_H
        end = row.done if row.done is not None else timeline.end
        sid = escape(row.session_id)
        out.append(f"<g class='session' data-session='{sid}'>")
        out.append(f"<text x='{LEFT - 4}' y='{y + ROW_H - 3}' text-anchor='end'>{sid[-16:]}</text>")
        out.append(
            f"<line class='life' x1='{x(row.first_seen)}' x2='{x(end)}' "
            f"y1='{y + ROW_H / 2}' y2='{y + ROW_H / 2}'/>"
        )
        for s in row.spans:
            w = max(0.6, x(s.end) - x(s.start))
            tip = f"{row.session_id} · {s.label} · {s.start:.2f}–{s.end:.2f} s ({s.seconds:.3g} s)"
            out.append(
                f"<rect class='p{PHASES.index(s.phase)}' x='{x(s.start)}' y='{y + 1}' "
                f"width='{w:.1f}' height='{ROW_H - 2}'><title>{escape(tip)}</title></rect>"
            )
        out.append("</g>")
    base = top + gantt_h + 30
    kv_max = max((v for _, v in timeline.kv), default=0) or 1
    out += _panel(x, base, "KV tokens held (derived)", kv_max)
    out.append(_step(x, timeline.kv, base, kv_max, "#1f77b4", timeline.end))
    for kind, points in timeline.kv_instants.items():
        marks = decimate(points, timeline.start, timeline.end)
        ticks = "".join(f"M{x(t)} {base + PANEL_H}v-6" for t, _ in marks)
        tip = f"{kind}: {len(points)} events"
        stroke = INSTANTS.get(kind, "#000")
        out.append(f"<path d='{ticks}' stroke='{stroke}' opacity='0.5'><title>{tip}</title></path>")
    base += PANEL_H + 30
    w_max = max((max(w, a) for _, w, a in timeline.window), default=0) or 1
    out += _panel(x, base, "admission window (solid) and active sessions (dashed)", w_max)
    if timeline.window:
        wins = [(t, w) for t, w, _ in timeline.window]
        act = [(t, a) for t, _, a in timeline.window]
        out.append(_step(x, wins, base, w_max, "#ff7f0e", timeline.end))
        out.append(_step(x, act, base, w_max, "#555", timeline.end, dash=True))
    else:
        out.append(
            f"<text x='{LEFT + 10}' y='{base + PANEL_H / 2}'>no admission_window events "
            "(the policy keeps no window)</text>"
        )
    out.append("</svg></body></html>\n")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


def _panel(x: Scale, base: float, label: str, vmax: float) -> list[str]:
    return [
        f"<rect x='{LEFT}' y='{base}' width='{WIDTH - LEFT - RIGHT}' height='{PANEL_H}' "
        "fill='none' stroke='#ccc'/>",
        f"<text x='{LEFT + 4}' y='{base - 4}'>{escape(label)}</text>",
        f"<text x='{LEFT - 4}' y='{base + 10}' text-anchor='end'>{vmax:g}</text>",
        f"<text x='{LEFT - 4}' y='{base + PANEL_H}' text-anchor='end'>0</text>",
    ]


def _step(
    x: Scale,
    points: list[tuple[float, int]],
    base: float,
    vmax: float,
    colour: str,
    end: float,
    dash: bool = False,
) -> str:
    if not points:
        return ""

    def y(v: float) -> float:
        return round(base + PANEL_H - v / vmax * PANEL_H, 1)

    pts = decimate(points, points[0][0], points[-1][0], MAX_POINTS)
    d = [f"M{x(pts[0][0])} {y(pts[0][1])}"]
    for t, v in pts[1:]:
        d.append(f"H{x(t)}V{y(v)}")
    d.append(f"H{x(end)}")
    style = " stroke-dasharray='4 2'" if dash else ""
    return f"<path d='{''.join(d)}' fill='none' stroke='{colour}'{style}/>"


def _axis(
    x: Scale, start: float, span: float, bottom: float, top: float, timeline: Timeline
) -> list[str]:
    """Vertical grid lines at round times (about 10), and the axis label."""
    raw = span / 10
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    out = []
    t = math.ceil(start / step) * step
    while t <= start + span:
        out.append(
            f"<line x1='{x(t)}' x2='{x(t)}' y1='{top}' y2='{bottom - 12}' stroke='#eee'/>"
            f"<text x='{x(t)}' y='{bottom}' text-anchor='middle'>{t:g}</text>"
        )
        t += step
    label = time_label(timeline)
    out.append(f"<text x='{WIDTH / 2}' y='{top - 8}' text-anchor='middle'>{label}</text>")
    return out

"""Draw a simulated step: one row per rank, forward and backward in different colours, idle visible.

    render_text(sim, width=100)   -> rich Text for the terminal
    render_svg([("predicted", sim), ("measured", run)])   -> an SVG a browser shows, one time axis
"""
from __future__ import annotations

from html import escape
from typing import Sequence

from rich.text import Text

from autopart.core.simulate import Event, Simulation, Timeline
from autopart.formats.units import plural

__all__ = ["render_text", "render_svg", "COLOURS"]

COLOURS = {"F": "#4C78A8", "B": "#54A24B", "I": "#54A24B", "W": "#B279A2", "SEND": "#BBBBBB", "TIE": "#E45756", "AR": "#9D755D",
           "OPT": "#F58518"}
_RICH = {"F": "blue", "B": "green", "I": "green", "W": "magenta", "SEND": "grey50", "TIE": "red", "AR": "yellow4",
         "OPT": "dark_orange"}
_CHARS = {"F": "█", "B": "█", "I": "▓", "W": "▒", "SEND": "░", "TIE": "▫", "AR": "▬", "OPT": "▪"}


def _cells(events: list[Event], step_ms: float, width: int) -> list[str | None]:
    """The kind of event under the middle of each of ``width`` cells of one rank's row."""
    cells: list[str | None] = [None] * width
    for e in events:
        first = int(e.start_ms / step_ms * width)
        last = max(first, int((e.end_ms / step_ms) * width - 1e-9))
        for c in range(max(first, 0), min(last, width - 1) + 1):
            mid = (c + 0.5) * step_ms / width
            if e.start_ms <= mid < e.end_ms or cells[c] is None and e.end_ms - e.start_ms < step_ms / width:
                cells[c] = e.kind
    return cells


def render_text(sim: Simulation, width: int = 100) -> Text:
    """A character timeline: one row per rank."""
    width = max(width, 10)
    out = Text()
    by_rank: dict[int, list[Event]] = {r: [] for r in range(sim.num_ranks)}
    for e in sim.events:
        by_rank[e.rank].append(e)
    for r in range(sim.num_ranks):
        out.append(f"rank {r:<3}", style="bold")
        for kind in _cells(by_rank[r], sim.step_ms, width) if sim.step_ms > 0 else []:
            if kind is None:
                out.append("·", style="grey37")
            else:
                out.append(_CHARS[kind], style=_RICH[kind])
        out.append(f"  idle {sim.bubble_fractions[r]:.0%}\n")
    from autopart.formats.units import format_ms

    end = format_ms(sim.step_ms)
    out.append(" " * 8 + "0" + " " * max(width - 1 - len(end), 1) + end + "\n", style="grey50")
    legend = Text(" " * 8)
    tied = any(e.kind == "TIE" for e in sim.events)  # named only where there is one
    for label, kind in (("F forward", "F"), ("B backward", "B"), ("I input grad", "I"), ("W weight grad", "W"),
                        ("send", "SEND"), *((("tie sum", "TIE"),) if tied else ()), ("optimizer", "OPT")):
        legend.append(_CHARS[kind] + " ", style=_RICH[kind])
        legend.append(label + "   ")
    legend.append("· idle", style="grey37")
    out.append(legend)
    return out


def render_svg(panels: Sequence[tuple[str, Timeline]], title: str = "", width_px: int = 1200) -> str:
    """An SVG picture of one or more timelines stacked on one time axis (``(label, timeline)`` each, e.g.
    predicted above measured), with action labels where they fit."""
    left, top, row_h, gap, head = 70, 30, 30, 6, 26
    plot_w = width_px - left - 20
    span = max([t.step_ms for _, t in panels] + [1e-9])
    scale = plot_w / span
    parts = ['<rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="22" font-size="14" font-weight="bold">{escape(title or panels[0][1].schedule)}'
             f'</text>']
    y = top
    for label, t in panels:
        line = f"step {t.step_ms:.4g} ms, bubble {t.bubble_fraction:.1%}, {plural(t.num_ranks, 'rank')}, " \
               f"{plural(t.microbatches, 'micro-batch')}"
        parts.append(f'<text x="{left}" y="{y + 16}" fill="#555">{escape(f"{label}: {line}" if label else line)}</text>')
        y += head
        for r in range(t.num_ranks):
            parts.append(f'<text x="8" y="{y + r * (row_h + gap) + row_h / 2 + 4}">rank {r}</text>')
            parts.append(f'<rect x="{left}" y="{y + r * (row_h + gap)}" width="{t.step_ms * scale:.2f}" '
                         f'height="{row_h}" fill="#F2F2F2"/>')
        for e in t.events:
            parts.extend(_svg_event(e, left, y + e.rank * (row_h + gap), row_h, scale))
        y += t.num_ranks * (row_h + gap) + 4
    axis_y = y + 4
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>')
    for i in range(11):
        x = left + plot_w * i / 10
        parts.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" stroke="#333"/>')
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 17}" text-anchor="middle">{span * i / 10:.4g} ms</text>')
    lx = left
    tied = any(e.kind == "TIE" for _, t in panels for e in t.events)  # named only where there is one
    averaged = any(e.kind == "AR" for _, t in panels for e in t.events)  # a measured run's replicas' all-reduce
    for label, kind in (("forward", "F"), ("backward", "B"), ("weight grad", "W"), ("send", "SEND"),
                        *((("tie sum", "TIE"),) if tied else ()), *((("all-reduce", "AR"),) if averaged else ()),
                        ("optimizer", "OPT"), ("idle", None)):
        fill = COLOURS[kind] if kind else "#F2F2F2"
        parts.append(f'<rect x="{lx}" y="{axis_y + 28}" width="12" height="12" fill="{fill}" stroke="#999"/>')
        parts.append(f'<text x="{lx + 16}" y="{axis_y + 38}">{label}</text>')
        lx += 110
    height = axis_y + 50
    head_tag = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width_px}" height="{height}" '
                f'font-family="sans-serif" font-size="11">')
    return "\n".join([head_tag] + parts + ["</svg>"]) + "\n"


def _svg_event(e: Event, left: float, y: float, row_h: float, scale: float) -> list[str]:
    x, w = left + e.start_ms * scale, max((e.end_ms - e.start_ms) * scale, 0.5)
    h = row_h if e.kind != "SEND" else row_h / 3
    out = [f'<rect x="{x:.2f}" y="{y + row_h - h:.2f}" width="{w:.2f}" height="{h:.2f}" fill="{COLOURS[e.kind]}" '
           f'stroke="white" stroke-width="0.5"><title>{escape(e.action)} {e.start_ms:.4g}-{e.end_ms:.4g} ms'
           f'</title></rect>']
    label = e.action if e.kind not in ("SEND", "OPT", "TIE", "AR") else ""
    if label and w > 7 * len(label):
        out.append(f'<text x="{x + w / 2:.2f}" y="{y + row_h / 2 + 4}" fill="white" '
                   f'text-anchor="middle">{escape(label)}</text>')
    return out

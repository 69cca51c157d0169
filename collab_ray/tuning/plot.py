"""Dependency-free SVG plots of a search (like collab_ray/eval/plot.py): objective vs trial, and each
searched value vs objective. Complete trials are blue, trials stopped early grey (their objective is
on fewer items), failed trials are left out."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

COLORS = {"complete": "#4c78a8", "stopped": "#b0b0b0"}
W, H, PAD = 300, 200, 40  # one panel: width, height, margin for labels


@dataclass
class Panel:
    title: str
    xlabel: str
    points: list[tuple[float, float, str]]  # x, y, color
    line: list[tuple[float, float]] | None = None  # e.g. the best objective so far


def objective_svg(trials, title: str, path: str | Path) -> Path:
    """Objective of every scored trial by trial number, and the best complete objective so far."""
    scored = [t for t in trials if t.status in COLORS]
    line, best = [], None
    for t in scored:
        if t.status == "complete":
            best = t.metrics["objective"] if best is None else max(best, t.metrics["objective"])
        if best is not None:
            line.append((t.index, best))
    points = [(t.index, t.metrics["objective"], COLORS[t.status]) for t in scored]
    return write_svg([Panel(f"{title}: objective by trial", "trial", points, line)], path, columns=1, width=2 * W)


def params_svg(trials, keys: list[str], title: str, path: str | Path) -> Path:
    """One panel per searched value: value (x) against the trial's objective (y)."""
    scored = [t for t in trials if t.status in COLORS and all(isinstance(t.point[k], (int, float)) for k in keys)]
    panels = [Panel(f"{title}: {k}", k, [(float(t.point[k]), t.metrics["objective"], COLORS[t.status]) for t in scored]) for k in keys]
    return write_svg(panels, path, columns=min(3, len(panels)))


def write_svg(panels: list[Panel], path: str | Path, columns: int, width: int = W) -> Path:
    rows = -(-len(panels) // columns)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{columns * width}" height="{rows * H}" font-family="sans-serif" font-size="11">']
    for i, panel in enumerate(panels):
        parts += _panel(panel, (i % columns) * width, (i // columns) * H, width)
    parts.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(parts) + "\n")
    return path


def _panel(p: Panel, ox: float, oy: float, width: int) -> list[str]:
    xs = [x for x, _, _ in p.points] or [0.0]
    ys = [y for _, y, _ in p.points] or [0.0]
    (x0, x1), (y0, y1) = _span(xs), _span(ys)
    left, right, top, bottom = ox + PAD + 10, ox + width - 10, oy + 25, oy + H - PAD
    sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)  # noqa: E731  data -> pixels
    sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)  # noqa: E731
    out = [
        f'<text x="{ox + 8}" y="{oy + 15}" font-size="12">{escape(p.title)}</text>',
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#888"/>',
        f'<text x="{(left + right) / 2:.1f}" y="{bottom + 28}" text-anchor="middle">{escape(p.xlabel)}</text>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{left - 4}" y="{bottom}" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{left}" y="{bottom + 13}" text-anchor="middle">{x0:.3g}</text>',
        f'<text x="{right}" y="{bottom + 13}" text-anchor="middle">{x1:.3g}</text>',
    ]
    if p.line:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p.line)
        out.append(f'<polyline points="{coords}" fill="none" stroke="#e45756"/>')
    out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y, c in p.points]
    return out


def _span(values: list[float]) -> tuple[float, float]:
    """[min, max] of `values`, widened when they are all equal."""
    lo, hi = min(values), max(values)
    return (lo - 0.5, hi + 0.5) if hi - lo < 1e-12 else (lo, hi)

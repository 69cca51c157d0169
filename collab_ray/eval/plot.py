"""A dependency-free SVG bar chart of pipeline accuracies with their 95% intervals."""

from __future__ import annotations

from html import escape
from pathlib import Path

from collab_ray.eval.harness import PipelineScore


def accuracy_svg(scores: list[PipelineScore], title: str, path: str | Path) -> Path:
    """One horizontal bar per pipeline (accuracy), a whisker for its interval; written to `path`."""
    left, width, bar, gap = 160, 420, 18, 8
    height = 40 + len(scores) * (bar + gap) + 30
    x = lambda v: left + v * width  # noqa: E731  accuracy in [0, 1] -> pixels
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<text x="10" y="20" font-size="14">{escape(title)}</text>',
    ]
    for i, s in enumerate(scores):
        y = 40 + i * (bar + gap)
        a = s.accuracy
        parts += [
            f'<text x="{left - 6}" y="{y + bar - 5}" text-anchor="end">{escape(s.name)}</text>',
            f'<rect x="{left}" y="{y}" width="{x(a.value) - left:.1f}" height="{bar}" fill="#4c78a8"/>',
            f'<line x1="{x(a.low):.1f}" x2="{x(a.high):.1f}" y1="{y + bar / 2}" y2="{y + bar / 2}" stroke="black"/>',
            f'<text x="{x(a.high) + 4:.1f}" y="{y + bar - 5}">{100 * a.value:.1f}%</text>',
        ]
    axis_y = height - 20
    parts.append(f'<line x1="{left}" x2="{left + width}" y1="{axis_y}" y2="{axis_y}" stroke="black"/>')
    for t in range(0, 101, 20):
        parts.append(f'<text x="{x(t / 100):.1f}" y="{axis_y + 14}" text-anchor="middle">{t}%</text>')
    parts.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(parts) + "\n")
    return path


def cost_accuracy_svg(points: list[tuple[str, float, PipelineScore]], title: str, path: str | Path) -> Path:
    """Accuracy (with its 95% interval) against cost, one labelled point per (label, cost, score); written to `path`."""
    left, top, width, height = 60, 40, 460, 300
    costs = [c for _, c, _ in points]
    lo_c, hi_c = min(costs + [0.0]), max(costs + [1.0]) * 1.1
    lo_a = max(0.0, min(s.accuracy.low for *_, s in points) - 0.05)
    hi_a = min(1.0, max(s.accuracy.high for *_, s in points) + 0.05)
    x = lambda c: left + (c - lo_c) / (hi_c - lo_c) * width  # noqa: E731  cost -> pixels
    y = lambda a: top + (hi_a - a) / (hi_a - lo_a) * height  # noqa: E731  accuracy -> pixels
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 330}" height="{max(top + height + 50, top + 12 * len(points) + 20)}" font-family="sans-serif" font-size="11">',
        f'<text x="10" y="20" font-size="14">{escape(title)}</text>',
        f'<line x1="{left}" x2="{left + width}" y1="{top + height}" y2="{top + height}" stroke="black"/>',
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + height}" stroke="black"/>',
        f'<text x="{left + width / 2}" y="{top + height + 35}" text-anchor="middle">model calls per item</text>',
    ]
    for k in range(5):
        c, a = lo_c + k * (hi_c - lo_c) / 4, lo_a + k * (hi_a - lo_a) / 4
        parts.append(f'<text x="{x(c):.1f}" y="{top + height + 15}" text-anchor="middle">{c:.1f}</text>')
        parts.append(f'<text x="{left - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{100 * a:.0f}%</text>')
    for i, (label, c, s) in enumerate(points):  # a numbered point each; the legend on the right names them
        a = s.accuracy
        parts += [
            f'<line x1="{x(c):.1f}" x2="{x(c):.1f}" y1="{y(a.low):.1f}" y2="{y(a.high):.1f}" stroke="#999"/>',
            f'<circle cx="{x(c):.1f}" cy="{y(a.value):.1f}" r="3" fill="#4c78a8"/>',
            f'<text x="{x(c) + 5 + 12 * (i % 3):.1f}" y="{y(a.value) + 4:.1f}" font-size="9">{i + 1}</text>',
            f'<text x="{left + width + 20}" y="{top + 12 * i + 4}">{i + 1}. {escape(label)}: {100 * a.value:.1f}%, {c:.2f} calls</text>',
        ]
    parts.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(parts) + "\n")
    return path

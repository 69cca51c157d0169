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

"""Pareto fronts over a results table (one row per sweep trial), the table, and the plots.

Tune has no Pareto helper: a sweep collects its trials' metrics and calls `pareto_front`. A row is
on the front when no other row is at least as good on every objective and better on one (rows
with equal objectives are all kept). Rows missing an objective, or with a NaN, are not candidates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

Objectives = Sequence[tuple[str, str]]
"""(metric, "max" | "min") pairs."""


def _values(row: dict[str, Any], objectives: Objectives) -> list[float] | None:
    """The row's objectives turned into "smaller is better", or None if one is missing."""
    out = []
    for metric, mode in objectives:
        value = row.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return None
        out.append(-float(value) if mode == "max" else float(value))
    return out


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a ≤ b everywhere and < somewhere (both in "smaller is better" form)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(rows: Sequence[dict[str, Any]], objectives: Objectives) -> list[int]:
    """Indices of the non-dominated rows, sorted by the first objective (best first)."""
    for _, mode in objectives:
        if mode not in ("max", "min"):
            raise ValueError(f"objective mode must be 'max' or 'min', got {mode!r}")
    points = {i: v for i, row in enumerate(rows) if (v := _values(row, objectives)) is not None}
    front = [i for i, v in points.items() if not any(dominates(w, v) for j, w in points.items() if j != i)]
    return sorted(front, key=lambda i: (points[i], i))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def front_table(rows: Sequence[dict[str, Any]], front: Sequence[int], columns: Sequence[str]) -> str:
    """A plain-text table of the front's rows (the columns in order)."""
    cells = [[_cell(rows[i].get(c, "")) for c in columns] for i in front]
    width = [max([len(c)] + [len(r[k]) for r in cells]) for k, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, width))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, width)) for r in cells]
    return "\n".join(lines)


def plot_front(rows: Sequence[dict[str, Any]], front: Sequence[int], objectives: Objectives, label: str,
               png: str | Path, html: str | Path, title: str = "Pareto front", reference: int | None = None) -> None:
    """The first objective against each other one (one panel per pair): every row in grey, the front
    in red and labelled by `row[label]`, the `reference` row (an uncompressed model) as a black star
    with a dashed line at its first objective. PNG with matplotlib; a self-contained interactive
    HTML with plotly whose hover shows the label and every objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if len(objectives) < 2:
        raise ValueError("a Pareto plot needs at least two objectives")
    (y_metric, y_mode), others = objectives[0], list(objectives[1:])
    ok = [i for i, row in enumerate(rows) if _values(row, objectives) is not None]
    if reference is not None and reference not in ok:
        reference = None  # it misses an objective: nothing to mark
    on_front = set(front) | ({reference} if reference is not None else set())

    fig, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4.5), squeeze=False)
    for ax, (x_metric, x_mode) in zip(axes[0], others):
        rest = [i for i in ok if i not in on_front]
        ax.scatter([rows[i][x_metric] for i in rest], [rows[i][y_metric] for i in rest], c="0.6", s=25, label="trials")
        if reference is not None:
            ref = rows[reference]
            ax.axhline(ref[y_metric], c="black", ls="--", lw=0.8)
            ax.scatter([ref[x_metric]], [ref[y_metric]], c="black", marker="*", s=140, zorder=4,
                       label=str(ref.get(label, "reference")))
        pts = sorted(front, key=lambda i: rows[i][x_metric])
        ax.scatter([rows[i][x_metric] for i in pts], [rows[i][y_metric] for i in pts], c="tab:red", s=40,
                   label="Pareto front", zorder=3)
        if len(objectives) == 2:
            ax.plot([rows[i][x_metric] for i in pts], [rows[i][y_metric] for i in pts], c="tab:red", lw=1)
        for i in pts:
            ax.annotate(str(rows[i].get(label, i)), (rows[i][x_metric], rows[i][y_metric]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{x_metric} ({'↑' if x_mode == 'max' else '↓'})")
        ax.set_ylabel(f"{y_metric} ({'↑' if y_mode == 'max' else '↓'})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

    names = [m for m, _ in objectives]
    figure = make_subplots(rows=1, cols=len(others), subplot_titles=[f"{y_metric} vs {m}" for m, _ in others])
    for col, (x_metric, _) in enumerate(others, start=1):
        groups = [("trials", "#999999", [i for i in ok if i not in on_front], "circle"),
                  ("Pareto front", "#d62728", sorted(front, key=lambda i: rows[i][x_metric]), "circle")]
        if reference is not None:
            groups.append((str(rows[reference].get(label, "reference")), "#000000", [reference], "star"))
        for group, color, members, symbol in groups:
            hover = ["<br>".join([str(rows[i].get(label, i))] + [f"{m}: {_cell(rows[i][m])}" for m in names])
                     for i in members]
            joined = group == "Pareto front" and len(objectives) == 2
            figure.add_trace(go.Scatter(x=[rows[i][x_metric] for i in members], y=[rows[i][y_metric] for i in members],
                                        mode="markers+lines" if joined else "markers",
                                        name=group, legendgroup=group, showlegend=col == 1, hovertext=hover,
                                        hoverinfo="text", marker={"color": color, "size": 14 if symbol == "star" else 9,
                                                                  "symbol": symbol}), row=1, col=col)
        figure.update_xaxes(title_text=x_metric, row=1, col=col)
        figure.update_yaxes(title_text=y_metric, row=1, col=col)
    figure.update_layout(title=title, height=480, width=520 * len(others))
    figure.write_html(str(html), include_plotlyjs=True, full_html=True)

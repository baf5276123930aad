"""Curves and tables as PNG (matplotlib, Agg; no display needed): coverage reports, engine stats."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def table_png(header: Sequence[str], rows: Sequence[Sequence[Any]], path: str | Path, *,
              title: str | None = None) -> Path:
    """Render a table (a header and rows of cells) as a PNG image.

    Returns
    -------
    Path
        The file written.
    """
    ncols = len(header)
    widths = [max(len(str(c)) for c in [h, *(r[i] for r in rows)]) for i, h in enumerate(header)]
    height = 0.45 + 0.3 * (len(rows) + 1) + (0.4 if title else 0)
    fig = _figure(max(3.0, 0.11 * sum(widths) + 0.4 * ncols), height)
    ax = fig.add_subplot()
    ax.set_axis_off()
    table = ax.table(cellText=[[str(c) for c in r] for r in rows] or [[""] * ncols], colLabels=list(header),
                     loc="center", cellLoc="left", colLoc="left",
                     colWidths=[w / max(1, sum(widths)) for w in widths])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path)


def curve_png(x: Sequence[float], curves: Mapping[str, Sequence[float]], path: str | Path, *,
              xlabel: str = "", ylabel: str = "", title: str | None = None) -> Path:
    """Plot one or more curves ``{label: ys}`` over ``x`` and write a PNG."""
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    for label, ys in curves.items():
        ax.plot(list(x), list(ys), marker="o" if len(x) <= 30 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return _save(fig, path)


def bars_png(values: Sequence[float], path: str | Path, *, labels: Sequence[str] | None = None,
             xlabel: str = "", ylabel: str = "relevance", title: str | None = None) -> Path:
    """Signed bars (red positive, blue negative), e.g. relevance per channel or neuron."""
    vals = [float(v) for v in values]
    fig = _figure(max(4.0, 0.25 * len(vals) + 1.5), 3.2)
    ax = fig.add_subplot()
    ax.bar(range(len(vals)), vals, color=["#d62728" if v >= 0 else "#1f5fbf" for v in vals])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(vals)), labels if labels is not None else [str(i) for i in range(len(vals))],
                  fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def coverage_rows(reports: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Table 6 of the paper: per model, covered nodes and unique op types covered."""
    header = ["Model", "Covered nodes", "Unique ops covered", "Uncovered ops"]
    rows = []
    for name, rep in reports.items():
        n_ops = len(rep.ops)
        missing = ", ".join(f"{k} x{v}" for k, v in sorted(rep.uncovered.items())) or "-"
        rows.append([name, f"{rep.covered_nodes:,}/{rep.total_nodes:,}",
                     f"{n_ops - len(rep.uncovered)}/{n_ops}", missing])
    return header, rows


def coverage_png(reports: Mapping[str, Any], path: str | Path, *, title: str = "Node coverage") -> Path:
    """Render ``{model name: CoverageReport}`` as a Table-6 style PNG."""
    header, rows = coverage_rows(reports)
    return table_png(header, rows, path, title=title)


def stats_png(stats: Mapping[str, Any], path: str | Path, *, title: str = "LRP engine statistics") -> Path:
    """Render an engine's ``stats`` (paper Table 4 numbers) as a two-column PNG table."""
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in stats.items()]
    return table_png(["statistic", "value"], rows, path, title=title)

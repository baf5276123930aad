"""Which autograd nodes of a graph have an op entry -- without running any rule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import ops
from .graph import _walk


@dataclass
class CoverageReport:
    """Node coverage of one graph (paper Table 6)."""

    total_nodes: int
    covered_nodes: int
    uncovered: dict[str, int] = field(default_factory=dict)
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.uncovered

    @property
    def covered_ops(self) -> int:
        """How many distinct op types of the graph have an entry."""
        return len(self.ops) - len(self.uncovered)

    def __str__(self) -> str:
        lines = [f"covered {self.covered_nodes}/{self.total_nodes} nodes, "
                 f"{len(self.ops) - len(self.uncovered)}/{len(self.ops)} op types"]
        lines += [f"  no rule: {name} x{count}" for name, count in sorted(self.uncovered.items())]
        return "\n".join(lines)

    @staticmethod
    def table(reports: Mapping[str, CoverageReport], modality: Mapping[str, str] | None = None) -> str:
        """A Markdown table with the columns of the paper's Table 6, an aggregate row, and the
        uncovered ops per model (Table 7) when there are any.

        Parameters
        ----------
        reports
            ``{model name: report}``, in the order the rows should appear.
        modality
            ``{model name: modality}`` ("Vision", "Language", ...); empty cells otherwise.

        Returns
        -------
        str
        """
        modality = modality or {}
        lines = ["| Model | Modality | Covered Nodes | Unique Ops covered |", "|---|---|---:|---:|"]
        for name, r in reports.items():
            lines.append(f"| {name} | {modality.get(name, '')} | {r.covered_nodes:,}/{r.total_nodes:,} "
                         f"| {r.covered_ops}/{len(r.ops)} |")
        covered = sum(r.covered_nodes for r in reports.values())
        total = sum(r.total_nodes for r in reports.values())
        lines.append(f"| Aggregate | - | {covered:,}/{total:,} | - |")
        missing = [(name, op, n) for name, r in reports.items() for op, n in sorted(r.uncovered.items())]
        if missing:
            lines += ["", "| Model | Uncovered Ops | Node count |", "|---|---|---:|"]
            lines += [f"| {name} | {op} | {n} |" for name, op, n in missing]
        return "\n".join(lines)


def coverage(outputs: torch.Tensor | Sequence[torch.Tensor]) -> CoverageReport:
    """Count the graph's autograd nodes (leaves excluded) and name those with no op entry."""
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    nodes = _walk([y.grad_fn for y in outputs if y.grad_fn is not None])[0]
    names = Counter(n.name for n in nodes if not n.is_leaf)
    uncovered = {name: c for name, c in names.items() if ops.lookup(name) is None}
    total = sum(names.values())
    return CoverageReport(total, total - sum(uncovered.values()), uncovered, dict(names))

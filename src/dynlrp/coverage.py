"""Which autograd nodes of a graph have an op entry -- without running any rule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
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

    def __str__(self) -> str:
        lines = [f"covered {self.covered_nodes}/{self.total_nodes} nodes, "
                 f"{len(self.ops) - len(self.uncovered)}/{len(self.ops)} op types"]
        lines += [f"  no rule: {name} x{count}" for name, count in sorted(self.uncovered.items())]
        return "\n".join(lines)


def coverage(outputs: torch.Tensor | Sequence[torch.Tensor]) -> CoverageReport:
    """Count the graph's autograd nodes (leaves excluded) and name those with no op entry."""
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    nodes, _ = _walk([y.grad_fn for y in outputs if y.grad_fn is not None])
    names = Counter(n.name for n in nodes if not n.is_leaf)
    uncovered = {name: c for name, c in names.items() if ops.lookup(name) is None}
    total = sum(names.values())
    return CoverageReport(total, total - sum(uncovered.values()), uncovered, dict(names))

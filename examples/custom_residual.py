"""Explain a custom model with a functional residual add -- no hooks, no model changes.

Module-hook LRP tools miss ``x + f(x)`` written in ``forward``; dynlrp sees the add in the
autograd graph. Shows a callable target (a logit difference), latent relevance of a block,
conservation, and saving the result. ``build()`` is a factory for the ``dynlrp`` command:
``dynlrp coverage custom_residual:build`` (run from ``examples/``).
Run: ``python examples/custom_residual.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import dynlrp


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))  # functional residual add


class ResidualMLP(nn.Module):
    def __init__(self, features: int = 12, width: int = 32, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.block = Block(width)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.block(h)))


def build() -> tuple[nn.Module, torch.Tensor]:
    """Factory for ``dynlrp coverage``: the model and an example input."""
    torch.manual_seed(0)
    return ResidualMLP(), torch.randn(1, 12)


def main(out_dir: str = "out/custom_residual", batch: int = 4) -> dynlrp.Explanation:
    model, _ = build()
    x = torch.randn(batch, 12)

    # Why class 0 rather than class 1? Explain the logit difference, and the block's output.
    e = dynlrp.explain(model, x, target=lambda y: y[:, 0] - y[:, 1], at={"block": model.block})

    for b in range(batch):
        print(f"example {b}: logit0 - logit1 = {float(e.score[b]):+.4f}, relevance sum "
              f"{float(e.relevance[b].sum()):+.4f}, "
              f"most relevant feature {int(e.relevance[b].abs().argmax())}")
    print(f"block output relevance per example: {e.latent['block'].sum(1).tolist()}")
    path = e.save(Path(out_dir) / "custom_residual.pt")
    print(f"wrote {path}; load it with dynlrp.Explanation.load")
    return e


if __name__ == "__main__":
    main(*sys.argv[1:2])

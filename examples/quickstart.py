"""Quickstart: explain a small residual CNN's prediction with dynlrp and save the relevance.

Run: ``bash scripts/quickstart.sh [OUT_DIR]`` (or ``python examples/quickstart.py OUT_DIR``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import dynlrp


class SmallResNet(nn.Module):
    """Two conv blocks with a functional residual add: the pattern module hooks miss."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.conv(h))  # residual add, functional ReLU
        return self.head(h.mean((2, 3)))


def main(out_dir: str) -> Path:
    torch.manual_seed(0)
    model = SmallResNet().eval().requires_grad_(False)
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    logits = model(x)
    target = logits.argmax(1)
    seed = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None]))
    engine = dynlrp.LRP()
    (relevance,) = engine(logits, x, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quickstart_relevance.pt"
    torch.save({"input": x.detach(), "target": target, "relevance": relevance, "stats": engine.stats}, path)
    for b in range(x.shape[0]):
        print(f"example {b}: class {target[b].item()}, logit {seed[b].sum().item():.4f}, "
              f"relevance sum {relevance[b].sum().item():.4f}")
    print(f"engine stats: {engine.stats}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out")

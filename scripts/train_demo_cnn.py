"""Train the demo CNN that ships with dynlrp (src/dynlrp/data/digits_cnn.pt).

Uses scikit-learn's bundled 8x8 digits (no download), a fixed seed and a few seconds of CPU.
Run: ``PYTHONPATH=src python scripts/train_demo_cnn.py [OUT_FILE]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dynlrp.data import DIGITS_CNN_FILE, DigitsCNN

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "dynlrp" / "data" / DIGITS_CNN_FILE


def train(out: Path = DEFAULT_OUT, epochs: int = 40, seed: int = 0) -> float:
    """Train, save weights and one held-out sample per digit to ``out``; return test accuracy."""
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=y)
    x_train, y_train, x_test, y_test = x[idx_train], y[idx_train], x[idx_test], y[idx_test]

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(y_train)).split(64):
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    first = [int((y_test == d).nonzero()[0]) for d in range(10)]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"test_accuracy": f"{accuracy:.4f}", "seed": str(seed), "epochs": str(epochs),
            "dataset": "sklearn.datasets.load_digits (80/20 split)",
            "trained_by": "scripts/train_demo_cnn.py"}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "samples": x_test[first].clone(), "labels": y_test[first].clone(),
                "meta": meta}, out)
    return accuracy


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    acc = train(target)
    print(f"test accuracy {acc:.4f}; wrote {target} ({target.stat().st_size / 1024:.1f} kB)")

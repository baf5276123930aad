"""Explain a torchvision CNN: heatmaps for a batch, and relevance per channel of a block.

Run: ``python examples/torchvision_cnn.py [OUT_DIR] [WEIGHTS.pth]``. Without weights the
network has random weights (no download); pass a state dict for a trained one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

import dynlrp
from dynlrp import viz


def main(out_dir: str = "out/torchvision_cnn", weights: str | None = None,
         size: int = 224) -> dynlrp.Explanation:
    model = torchvision.models.resnet18(weights=None)
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    images = torch.rand(2, 3, size, size)  # stand-ins for a preprocessed batch of images

    # One call: the top class of each image, plus latent relevance of layer3's channels.
    e = dynlrp.explain(model, images, at={"layer3": model.layer3})

    out = Path(out_dir)
    grid = viz.save_grid(e.relevance, out / "heatmaps.png", images=images)
    per_channel = e.latent["layer3"].sum((2, 3))  # (batch, 256 channels)
    for b in range(len(images)):
        top = per_channel[b].topk(3).indices.tolist()
        print(f"image {b}: class {int(e.target[b])}, logit {float(e.score[b]):.3f}, "
              f"relevance sum {float(e.relevance[b].sum()):.3f}, most relevant layer3 channels {top}")
    print(f"wrote {grid} ({e.mode} mode)")
    return e


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["out/torchvision_cnn"]), *(sys.argv[2:3] or [None]))

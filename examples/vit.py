"""Explain a Vision Transformer: a pixel heatmap, and relevance per patch token of a layer.

A small ViT built from its config (random weights, no download); the image goes in as the
``pixel_values`` keyword, as a Hugging Face image processor returns it.
Run: ``python examples/vit.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import ViTConfig, ViTForImageClassification

import dynlrp
from dynlrp import viz


def main(out_dir: str = "out/vit", size: int = 64, layers: int = 2) -> dynlrp.Explanation:
    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=16, hidden_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(config)
    pixel_values = torch.rand(2, 3, size, size)

    e = dynlrp.explain(model, {"pixel_values": pixel_values}, at={"layer0": model.vit.encoder.layer[0]})

    per_token = e.latent["layer0"].sum(-1)  # (batch, 1 + patches): relevance per token after layer 0
    grid = viz.save_grid(e.relevance, Path(out_dir) / "vit_heatmaps.png", images=pixel_values)
    for b in range(len(pixel_values)):
        patch = int(per_token[b, 1:].abs().argmax())
        print(f"image {b}: class {int(e.target[b])}, logit {float(e.score[b]):.3f}, relevance sum "
              f"{float(e.relevance[b].sum()):.3f}; after layer 0: [CLS] {float(per_token[b, 0]):.3f}, "
              f"most relevant patch {patch} ({float(per_token[b, 1 + patch]):.4f})")
    print(f"wrote {grid}")
    return e


if __name__ == "__main__":
    main(*sys.argv[1:2])

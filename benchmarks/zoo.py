"""The benchmark models: random weights, frozen, eval mode, with their inputs and seeds.

Every model is built from a configuration (no downloads) with a fixed seed. A
:class:`Problem` is what every method explains: ``forward(x) -> logits`` of shape
``(batch, classes)`` and an input ``x``; the relevance seed is each example's top logit
(:func:`top_logit_seed`). Text models are explained with respect to their input
embeddings (the token ids are embedded once, outside the timed region).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

IMAGE_MODELS = ("vgg16", "resnet50", "vit_b_16")
TEXT_MODELS = ("bert", "llama")
MODELS = ("vgg16", "resnet50", "bert", "llama", "vit_b_16")
LABELS = {"vgg16": "VGG16", "resnet50": "ResNet-50", "bert": "BERT", "llama": "Llama",
          "vit_b_16": "ViT-B/16"}
# dynlrp presets that apply the rules of the method each model is compared with: Zennit's
# EpsilonPlus on the CNNs, LxT's AttnLRP on BERT and Llama, LxT's CP-LRP on ViT.
MATCHED_RULES = {"vgg16": "epsilon_plus", "resnet50": "epsilon_plus", "bert": "attnlrp",
                 "llama": "attnlrp", "vit_b_16": "cp_lrp"}

# Sizes per profile: image side, text layers / width / heads / MLP / tokens.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"image": 224, "batches": [1, 8], "layers": 6, "hidden": 768, "heads": 12,
             "mlp": 3072, "tokens": 128, "repeats": 5, "warmup": 1},
    "quick": {"image": 224, "batches": [1, 2], "layers": 6, "hidden": 768, "heads": 12,
              "mlp": 3072, "tokens": 128, "repeats": 5, "warmup": 1},
    "tiny": {"image": 32, "batches": [1], "layers": 1, "hidden": 64, "heads": 2,
             "mlp": 128, "tokens": 16, "repeats": 1, "warmup": 1},
}


@dataclass
class Problem:
    """One model and one input: what every method explains."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    def fresh_input(self, seed: int) -> torch.Tensor:
        """Another input of the same shape (a new forward of the same architecture)."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.x.shape, generator=gen, dtype=self.x.dtype) * self.x.std()


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and frozen parameters: gradients flow to the input only."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def top_logit_seed(y: torch.Tensor) -> torch.Tensor:
    """The relevance seed: each example's top logit, zero elsewhere."""
    y = y.detach()
    seed = torch.zeros_like(y)
    rows = torch.arange(y.shape[0])
    top = y.argmax(1)
    seed[rows, top] = y[rows, top]
    return seed


def _image_model(name: str, cfg: dict) -> torch.nn.Module:
    import torchvision

    if name != "vit_b_16":
        return getattr(torchvision.models, name)(weights=None)
    model = torchvision.models.vit_b_16(weights=None, image_size=cfg["image"])
    # torchvision initialises the classification head to zero: every logit would be 0.
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def _text_model(name: str, cfg: dict, attn: str) -> tuple[torch.nn.Module, Callable]:
    import transformers as tf

    common = {"num_hidden_layers": cfg["layers"], "hidden_size": cfg["hidden"],
              "num_attention_heads": cfg["heads"], "intermediate_size": cfg["mlp"]}
    if name == "bert":
        config = tf.BertConfig(**common, attn_implementation=attn)
        model = tf.BertForSequenceClassification(config)

        def forward(e: torch.Tensor) -> torch.Tensor:
            return model(inputs_embeds=e).logits
    else:
        config = tf.LlamaConfig(**common, num_key_value_heads=cfg["heads"], vocab_size=32000,
                                attn_implementation=attn)
        model = tf.LlamaForCausalLM(config)

        def forward(e: torch.Tensor) -> torch.Tensor:
            return model(inputs_embeds=e, use_cache=False).logits[:, -1]
    return model, forward


def build(name: str, batch: int, cfg: dict, attn: str = "sdpa", seed: int = 0) -> Problem:
    """Build model ``name`` at the sizes of ``cfg`` (a :data:`PROFILES` entry) for ``batch``.

    Parameters
    ----------
    name
        One of :data:`MODELS`.
    batch
        Examples per call.
    cfg
        Sizes (image side, text layers, width, heads, MLP width, tokens).
    attn
        ``attn_implementation`` of the transformers models (``"sdpa"``, their default, or
        ``"eager"``).
    seed
        Seed of the random weights and inputs.

    Returns
    -------
    Problem
    """
    torch.manual_seed(seed)
    if name in IMAGE_MODELS:
        model = freeze(_image_model(name, cfg))
        x = torch.randn(batch, 3, cfg["image"], cfg["image"])
        return Problem(name, model, x, model)
    if name in TEXT_MODELS:
        model, forward = _text_model(name, cfg, attn)
        freeze(model)
        ids = torch.randint(0, model.config.vocab_size, (batch, cfg["tokens"]))
        with torch.no_grad():
            x = model.get_input_embeddings()(ids).clone()
        return Problem(name, model, x, forward)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")

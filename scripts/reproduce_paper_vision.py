"""Reproduce the DynamicLRP paper's Tables 2 and 3: ABPC on ViT-B/16 and VGG16.

Needs the torchvision ImageNet weights and the data (downloaded by torchvision from the usual
hosts on first use), ideally a GPU; it cannot run offline. ``--tiny`` runs the same pipeline
on small random models and random images instead (what the test suite does).

The paper's setting (section 5.3): 224 x 224 images, occlusion by a Gaussian-blurred copy
(kernel 51, sigma 20); VGG16 occludes 1024 pixels per step, ViT-B/16 the 4 most / least
relevant 16 x 16 patches (max-pooled relevance) per step. Table 3 (VGG16) used ImageNette-320
validation images (3,856), Table 2 (ViT-B/16) 1,000 images (its caption says CIFAR-10, the
text ImageNette). Method choices follow the paper; ``dynlrp:paper`` is its rule set
(VGG16: gamma 125 on convolutions, epsilon on dense layers; ViT-B/16: CP-LRP attention with
gamma 130 on the patch embedding).

Deliberate differences from the paper's code (see docs/faithfulness.md): every method
explains the predicted class (the paper's Zennit runs used the label), heatmaps are the
signed channel sum (``--channel-reduce abs_sum`` for the paper's ``abs().sum(channel)``) and
curves record the target logit (``--score accuracy`` for the paper's accuracy against
labels).

Examples::

    python scripts/reproduce_paper_vision.py --model vgg16 --data imagenette --limit 3856 --out out/vgg
    python scripts/reproduce_paper_vision.py --model vit_b_16 --data imagenette --limit 1000 --out out/vit
    python scripts/reproduce_paper_vision.py --model vit_b_16 --tiny        # offline smoke run
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynlrp import LRP, baselines, metrics, presets
from dynlrp import rules as R

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ImageNette's ten classes as ImageNet indices (tench, English springer, cassette player, chain saw,
# church, French horn, garbage truck, gas pump, golf ball, parachute)
IMAGENETTE_TO_IMAGENET = (0, 217, 482, 491, 497, 566, 569, 571, 574, 701)

METHODS = {
    "vgg16": ("dynlrp:paper", "dynlrp:epsilon_gamma_box", "zennit:epsilon_gamma_box", "saliency",
              "smoothgrad", "random"),
    "vit_b_16": ("dynlrp:paper", "dynlrp:cp_lrp", "dynlrp:attnlrp", "lxt", "integrated_gradients",
                 "input_x_gradient", "gradient_shap", "random"),
}


def paper_rules(model_name: str) -> presets.RuleSet:
    """The DynamicLRP paper's rules for its vision experiments."""
    if model_name == "vgg16":  # LRPEngine(use_gamma=(True, False), conv_gamma=125)
        return presets.RuleSet({"conv": R.Gamma(125.0), "dense": R.Epsilon(), "sum": R.Proportional()})
    # ViT: CP-LRP (value path only, softmax skipped) and gamma on the patch-embedding convolution
    return presets.cp_lrp().override({"conv": R.Gamma(130.0)})


def tiny_model(model_name: str, classes: int = 10) -> tuple[nn.Module, int]:
    """A small random model of the same family and its input size."""
    import torchvision

    torch.manual_seed(0)
    if model_name == "vit_b_16":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=classes)
        nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
        return model.eval(), 32
    cfg = [8, "M", 16, "M"]
    layers: list[nn.Module] = []
    channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, int(v), 3, padding=1), nn.ReLU()]
            channels = int(v)
    model = torchvision.models.VGG(nn.Sequential(*layers), num_classes=classes)
    model.avgpool = nn.AdaptiveAvgPool2d(2)
    model.classifier = nn.Sequential(nn.Linear(channels * 4, 32), nn.ReLU(), nn.Linear(32, classes))
    return model.eval(), 32


def real_model(model_name: str) -> nn.Module:
    """torchvision's ImageNet VGG16 / ViT-B/16 (weights downloaded by torchvision)."""
    import torchvision

    weights = {"vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
               "vit_b_16": torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1}[model_name]
    return getattr(torchvision.models, model_name)(weights=weights).eval()


def image_batches(args: argparse.Namespace, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, ImageNet labels or -1)`` chunks of normalised images, at most ``--limit`` in all."""
    if args.tiny:
        gen = torch.Generator().manual_seed(1)
        n = args.limit or 6
        for start in range(0, n, args.chunk):
            b = min(args.chunk, n - start)
            yield torch.rand(b, 3, size, size, generator=gen) * 2 - 1, torch.full((b,), -1)
        return
    import torchvision.transforms as T
    from torchvision import datasets

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    root = Path(args.data_root).expanduser()
    if args.data == "imagenette":
        download = not (root / "imagenette2-320").exists()
        ds = datasets.Imagenette(str(root), split="val", size="320px", download=download, transform=tf)
        relabel: Callable[[int], int] = lambda y: IMAGENETTE_TO_IMAGENET[y]
    elif args.data == "cifar10":
        ds = datasets.CIFAR10(str(root), train=False, download=True, transform=tf)
        relabel = lambda y: -1  # CIFAR-10 classes are not ImageNet classes
    else:
        ds = datasets.ImageFolder(args.data, transform=tf)
        relabel = lambda y: -1
    loader = torch.utils.data.DataLoader(ds, batch_size=args.chunk, shuffle=False, num_workers=args.workers)
    seen = 0
    for x, y in loader:
        if args.limit and seen >= args.limit:
            return
        keep = len(x) if not args.limit else min(len(x), args.limit - seen)
        seen += keep
        yield x[:keep], torch.tensor([relabel(int(v)) for v in y[:keep]])


def build_methods(model: nn.Module, model_name: str, names: list[str], low: torch.Tensor,
                  high: torch.Tensor, args: argparse.Namespace) -> dict[str, Callable[..., torch.Tensor]]:
    methods = {}
    for name in names:
        kind, _, variant = name.partition(":")
        if kind == "dynlrp":
            if variant == "paper":
                ruleset = paper_rules(model_name)
            elif variant == "epsilon_gamma_box":
                ruleset = presets.epsilon_gamma_box(low=low, high=high)
            else:
                ruleset = presets.resolve(variant or None)
            methods[name] = baselines.method("dynlrp", model, rules=LRP(ruleset), mode=args.mode)
        elif kind == "zennit":
            extra = {"low": low, "high": high} if variant == "epsilon_gamma_box" else {}
            methods[name] = baselines.method(name, model, **extra)
        elif kind in ("smoothgrad", "gradient_shap"):
            methods[name] = baselines.method(name, model, samples=args.samples)
        elif kind == "integrated_gradients":
            methods[name] = baselines.method(name, model, steps=args.ig_steps,
                                             internal_batch_size=args.attr_batch_size * 8)
        else:
            methods[name] = baselines.method(name, model)
    return methods


def main(argv: list[str] | None = None) -> metrics.FaithfulnessReport:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(METHODS), default="vgg16")
    ap.add_argument("--data", default="imagenette", help="imagenette, cifar10 or an ImageFolder path")
    ap.add_argument("--data-root", default="~/.cache/dynlrp/data")
    ap.add_argument("--limit", type=int, default=None, help="images (paper: 3856 for VGG16, 1000 for ViT)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the paper's for the model)")
    ap.add_argument("--score", default="logit", choices=metrics.SCORES,
                    help="logit (default), probability, or accuracy against labels (the paper's code)")
    ap.add_argument("--channel-reduce", default="sum", choices=metrics.features.CHANNEL_REDUCTIONS)
    ap.add_argument("--step", type=int, default=None,
                    help="pixels (VGG16: 1024) or patches (ViT: 4) per step")
    ap.add_argument("--kernel", type=int, default=51)
    ap.add_argument("--sigma", type=float, default=20.0)
    ap.add_argument("--samples", type=int, default=16, help="SmoothGrad / GradientSHAP samples")
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--mode", default="auto", choices=("auto", "promise", "record"), help="dynlrp mode")
    ap.add_argument("--chunk", type=int, default=64, help="images loaded and scored at a time")
    ap.add_argument("--batch-size", type=int, default=32, help="images per forward pass of the curves")
    ap.add_argument("--attr-batch-size", type=int, default=1, help="images per attribution call (1: it/s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small random models and images (offline test)")
    ap.add_argument("--out", default=None, help="folder for the table, JSON and plot")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.tiny:
        model, size = tiny_model(args.model)
    else:
        model, size = real_model(args.model), 224
    # parameters keep requires_grad as loaded: with all of them frozen, the Promise System cannot
    # rebuild values that depend on biases outside the graph (dynlrp then falls back to recording)
    model = model.to(device).eval()
    names = (args.methods.split(",") if args.methods else list(METHODS[args.model]))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    low, high = ((0 - mean) / std).to(device), ((1 - mean) / std).to(device)
    methods = build_methods(model, args.model, names, low, high, args)
    if args.model == "vit_b_16":
        per_step = args.step or (4 if not args.tiny else 1)  # a tiny 32 x 32 ViT has only 4 patches
        features: metrics.Features = metrics.Patches(16, "max", args.channel_reduce, step=per_step)
    else:
        features = metrics.Pixels(args.channel_reduce, step=args.step or (1024 if not args.tiny else 64))
    occlusion = metrics.Blur(args.kernel, args.sigma)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    np.random.seed(0)  # Captum's GradientSHAP draws its alphas with NumPy
    start = time.perf_counter()
    reports = []
    for x, labels in image_batches(args, size):
        use_labels = labels if args.score == "accuracy" and bool((labels >= 0).all()) else None
        if args.score == "accuracy" and use_labels is None:
            print("no ImageNet labels for this data: accuracy is measured against the predictions")
        reports.append(metrics.evaluate(
            model, x, methods, labels=use_labels, features=features, occlusion=occlusion, score=args.score,
            batch_size=args.batch_size, attribution_batch_size=args.attr_batch_size, device=device,
            progress=not args.no_progress, warmup=not reports))
    report = metrics.merge_reports(reports)
    given = sys.argv[1:] if argv is None else argv
    report.settings.update({
        "title": f"{args.model}{' (tiny, random)' if args.tiny else ''}: "
                 f"{report.settings['examples']} images",
        "command": "python scripts/reproduce_paper_vision.py " + " ".join(map(shlex.quote, given)),
        "seconds": f"{time.perf_counter() - start:.0f}"})
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        report.settings["peak_memory"] = f"{peak:.2f} GiB (all methods)"
    table = report.markdown()
    print(f"\n## {report.settings['title']}\n\n{table}")
    if args.out:
        out = Path(args.out)
        report.save_json(out / f"{args.model}.json")
        report.save_plot(out / f"{args.model}.png")
        (out / f"{args.model}.md").write_text(f"{report.settings['title']}\n\n{table}\n")
    return report


if __name__ == "__main__":
    main()

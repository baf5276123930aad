"""What the rules themselves cost: VGG16 explained by hand, against gradient x input and dynlrp.

Zennit's EpsilonPlus (z+ on convolutions, epsilon on dense layers) written out layer by layer
in plain torch, every forward activation kept: no graph traversal, no Promise System, no
checks -- the straightforward implementation a user would write for this one model. The z+
rule needs a forward convolution with ``W+`` to get its denominators and a backward one for
its relevance, where the gradient needs only the backward one: any implementation of these
rules pays about one forward pass more than gradient x input, about 1.5x its time when a
backward pass costs what a forward pass does.

The three methods run in one process, one run of each per round in rotated order (see
:func:`benchutil.interleave`); cells are medians of per-round ratios to gradient x input.

Run from the repository root::

    PYTHONPATH=src python benchmarks/floor.py [--batches 1,8] [--image 224] [--repeats 5]

Writes ``<out>/floor.json`` and prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402

EPS = 1e-6


def by_hand(model, x, seed):
    """EpsilonPlus relevance of a torchvision VGG for ``seed`` at the output (``x``'s shape)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    layers = [*model.features, model.avgpool, nn.Flatten(1), *model.classifier]
    with torch.no_grad():
        inputs, pools = [], {}
        h = x.detach()
        for i, layer in enumerate(layers):
            inputs.append(h)
            if isinstance(layer, nn.MaxPool2d):
                h, pools[i] = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding,
                                           layer.dilation, layer.ceil_mode, return_indices=True)
            else:
                h = layer(h)
        r = seed
        for i in range(len(layers) - 1, -1, -1):
            layer, a = layers[i], inputs[i]
            if isinstance(layer, nn.Conv2d):
                r = _zplus(layer, a, r)
            elif isinstance(layer, nn.Linear):
                z = F.linear(a, layer.weight, layer.bias)
                r = a * ((r / (z + torch.where(z >= 0, EPS, -EPS))) @ layer.weight)
            elif isinstance(layer, nn.MaxPool2d):
                r = F.max_unpool2d(r, pools[i], layer.kernel_size, layer.stride, layer.padding, a.shape[-2:])
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                r = _proportional(layer, a, r)
            elif isinstance(layer, nn.Flatten):
                r = r.reshape(a.shape)
            # ReLU and Dropout (eval): relevance passes unchanged
    return r


def _zplus(layer, a, r):
    """z+: ``R_i = x+_i sum_j W+_ji s_j + x-_i sum_j W-_ji s_j``, ``s = R / (W+ x+ + W- x- + b+ + eps)``."""
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_input

    kw = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
          "groups": layer.groups}
    wp = layer.weight.clamp(min=0)
    bp = None if layer.bias is None else layer.bias.clamp(min=0)
    if a.amin() >= 0:  # after a ReLU: only the positive half
        s = r / (F.conv2d(a, wp, bp, **kw) + EPS)
        return a * conv2d_input(a.shape, wp, s, **kw)
    wn = layer.weight.clamp(max=0)
    ap, an = a.clamp(min=0), a.clamp(max=0)
    s = r / (F.conv2d(ap, wp, bp, **kw) + F.conv2d(an, wn, None, **kw) + EPS)
    return ap * conv2d_input(a.shape, wp, s, **kw) + an * conv2d_input(a.shape, wn, s, **kw)


def _proportional(layer, a, r):
    import torch

    with torch.enable_grad():
        leaf = a.detach().requires_grad_(True)
        z = layer(leaf)
    s = r / torch.where(z == 0, torch.ones_like(z), z)
    return a * torch.autograd.grad(z, leaf, s)[0]


def measure(batch: int, image: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Ratios to gradient x input for one batch size (and a check that the three agree)."""
    import torch
    import zoo

    import dynlrp

    p = zoo.build("vgg16", batch, {"image": image})
    state: dict[str, Any] = {}

    def run_grad(clock):
        x = p.fresh_input(1).requires_grad_(True)
        y = p.forward(x)
        g, = torch.autograd.grad(y, x, zoo.top_logit_seed(y))
        state["grad"] = x.detach() * g

    def run_hand(clock):
        x = p.fresh_input(1)
        y = p.model(x)
        state["hand"] = by_hand(p.model, x, zoo.top_logit_seed(y))

    def run_dynlrp(clock):
        x = p.fresh_input(1).requires_grad_(True)
        y = p.forward(x)
        state["dynlrp"], = dynlrp.LRP("epsilon_plus")(y, x, zoo.top_logit_seed(y), model=p.model)

    samples = bu.interleave({"grad": run_grad, "by_hand": run_hand, "dynlrp": run_dynlrp}, repeats, warmup)
    hand, ours = state["hand"], state["dynlrp"]
    scale = float(hand.abs().max())
    return {
        "batch": batch, "image": image, "grad_s": bu.median([s["total"] for s in samples["grad"]]),
        "by_hand": bu.paired_ratio(samples["by_hand"], samples["grad"]),
        "dynlrp": bu.paired_ratio(samples["dynlrp"], samples["grad"]),
        "max_difference": float((hand - ours).abs().max()) / scale if scale else 0.0,
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | gradient x input | EpsilonPlus by hand | dynlrp epsilon_plus | "
             "dynlrp / by hand | max difference (of max relevance) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| VGG16 | {r['batch']} | {r['grad_s']:.3f} s | {r['by_hand']:.2f}× | "
                     f"{r['dynlrp']:.2f}× | {r['dynlrp'] / r['by_hand']:.2f}× | {r['max_difference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = bu.image_parser(__doc__, 5, "measured rounds", "floor.json")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each method first")
    args = ap.parse_args(argv)
    bu.use_src(args.src)
    import torch

    torch.manual_seed(0)
    rows = [measure(int(b), args.image, args.repeats, args.warmup) for b in args.batches.split(",")]
    bu.write_rows(args.out, "floor.json", rows)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

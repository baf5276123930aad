"""The adjoints of ResNet-50's convolutions: the autograd node's backward against the op entry's own.

``ctx.vjp`` applies an op's adjoint ``J^T s`` to what a rule hands it, by calling the autograd
node, or the entry's own ``vjp`` where it has one that applies (``dynlrp.ops.OpEntry.vjp``).
For a pointwise convolution (kernel 1, no padding, one group) that is one matrix product over
channels (``dynlrp.ops.linear``); the node runs oneDNN's backward-data kernel. This script times
both on every convolution of a frozen torchvision ResNet-50, on the activations of one forward
pass and a random ``s``, grouped by kind (pointwise or not, stride 1 or more), and checks that
they agree.

Each adjoint runs ``--repeats`` times after a warm-up; cells are sums over the kind's
convolutions of each one's median time.

Run from the repository root::

    PYTHONPATH=src python benchmarks/adjoints.py [--batches 1,8] [--image 224] [--repeats 20]

Writes ``<out>/adjoints.json`` and prints a Markdown table.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(batch: int, image: int, repeats: int) -> list[dict[str, Any]]:
    """Per kind of convolution: count, the nodes' and the entry's time (s), the largest difference."""
    import torch
    import torchvision

    import dynlrp
    from dynlrp.saved import saved

    model = torchvision.models.resnet50().eval().requires_grad_(False)
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(batch, 3, image, image, requires_grad=True)
    model(x)
    for h in hooks:
        h.remove()
    vjp = dynlrp.ops.lookup("ConvolutionBackward0").vjp
    kinds: dict[str, dict[str, Any]] = {}
    with torch.no_grad():  # (as the engine calls them)
        for out in outputs:
            _time_one(out, vjp, saved, repeats, kinds)
    for row in kinds.values():
        row["batch"] = batch
        row["ratio"] = row["entry_s"] / row["node_s"]
    return list(kinds.values())


def _time_one(out, vjp, saved, repeats: int, kinds: dict[str, dict[str, Any]]) -> None:
    """Time one convolution's adjoints into the row of its kind."""
    import torch

    node, s = out.grad_fn, torch.randn_like(out)
    w = saved(node, "weight")
    pointwise = all(k == 1 for k in w.shape[2:]) and all(p == 0 for p in saved(node, "padding"))
    strided = any(v != 1 for v in saved(node, "stride"))
    kind = f"{'1x1' if pointwise else 'kxk'}, stride {'2' if strided else '1'}"
    row = kinds.setdefault(kind, {"kind": kind, "convolutions": 0, "entry_used": 0, "node_s": 0.0,
                                  "entry_s": 0.0, "max_difference": 0.0})
    row["convolutions"] += 1
    by_node = _median_time(lambda: node(s), repeats)
    row["node_s"] += by_node
    found = vjp(node, [s], (0,))
    if found is None:  # declined: the node's backward runs either way
        row["entry_s"] += by_node
        return
    row["entry_used"] += 1
    row["entry_s"] += _median_time(lambda: vjp(node, [s], (0,)), repeats)
    ref = node(s)[0]
    row["max_difference"] = max(row["max_difference"],
                                float((found[0] - ref).abs().max() / ref.abs().max()))


def markdown(rows: list[dict]) -> str:
    lines = ["| batch | convolutions | count | entry's vjp used | node's backward | entry's vjp | ratio | "
             "max difference (of max) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['kind']} | {r['convolutions']} | {r['entry_used']} | "
                     f"{r['node_s'] * 1e3:.1f} ms | {r['entry_s'] * 1e3:.1f} ms | {r['ratio']:.2f}× | "
                     f"{r['max_difference']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = bu.image_parser(__doc__, 20, "timed runs of each adjoint", "adjoints.json").parse_args(argv)
    bu.use_src(args.src)
    import torch

    torch.manual_seed(0)
    rows = [row for b in args.batches.split(",") for row in measure(int(b), args.image, args.repeats)]
    bu.write_rows(args.out, "adjoints.json", rows)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-node engine overhead: graphs of ~2,000 nodes on tiny tensors, dynlrp vs gradient x input.

On tiny tensors the arithmetic is nearly free and what is left is bookkeeping: autograd's C++
engine against dynlrp's Python traversal, rule dispatch and Promise System. Two graphs
(``--graphs``):

* ``chain``: residual blocks on a ``(1, 8)`` input, five autograd nodes each::

      h = 0.97 * (h + W2 relu(W1 h))      # mm, relu, mm, add, mul

  (Llama-style linear layers without bias, so promise mode can rebuild every value). The scale
  keeps ``|h|`` between about 0.1 and 1 over 400 blocks of this initialisation: with 0.5 it
  halved at every block and was exactly 0 from block 200 on (denormal from block 130), so half
  the chain ran on zeros and its seed, the top logit, was 0.
* ``llama``: the issue's own example, a transformers Llama of 24 layers with hidden size 32
  (2 heads, MLP 64, 8 tokens, ~1,550 nodes), explained with AttnLRP at the last token.

Target of the issue: dynlrp within 2x of gradient x input.

On the chain a fifth method, ``hooks`` (:func:`hooks_sketch`), runs the same rules inside
autograd's own engine: not a dynlrp mode but a measured sketch of the design that would meet
the target, the per-node work left to C++ and only the rules' arithmetic to Python.

Besides time, each method's operators are profiled once (:class:`benchutil.OpCounter`: the
outermost aten operators of one run, forward and explanation, and the time they ran).
``op_ratio`` is a method's operator count over gradient x input's, forward included;
``alone`` is what the method would cost if nothing but its explanation's operators took time
(its forward, plus its explanation's operators' own time, over gradient x input's time): the
floor of any implementation of the same rules. The count alone does not give that floor:
autograd records the forward's operators and its engine runs the backward's, each far dearer
than an operator called under ``no_grad``.

Run from the repository root::

    PYTHONPATH=src python benchmarks/overhead.py [--graphs chain,llama] [--nodes 2000] [--repeats 9]

Writes ``<out>/overhead.json`` and prints a Markdown table per graph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402

SCRIPT = Path(__file__).resolve()
METHODS = ("grad", "dynlrp", "dynlrp_recorded", "dynlrp_cached")
GRAPHS = ("chain", "llama")
NODES_PER_BLOCK = 5
SCALE = 0.97  # see the module docstring
EPS = 1e-6  # the epsilon of dynlrp's default rule at matrix products (hooks_sketch)


def build(nodes: int, width: int = 8, seed: int = 0):
    """A residual chain with about ``nodes`` autograd nodes, as a :class:`zoo.Problem`."""
    import torch
    import zoo
    from torch import nn

    class Chain(nn.Module):
        def __init__(self, blocks: int) -> None:
            super().__init__()
            self.w1 = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
            self.w2 = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for w1, w2 in zip(self.w1, self.w2):
                h = SCALE * (h + w2(torch.relu(w1(h))))
            return h

    torch.manual_seed(seed)
    model = zoo.freeze(Chain(max(nodes // NODES_PER_BLOCK, 1)))
    return zoo.Problem(f"chain-{nodes}", model, torch.randn(1, width), model)


def hooks_sketch(p):
    """The chain's rules run by ``torch.autograd.grad``: a sketch of rules inside autograd's engine.

    Write relevance as ``R = v * g`` at every edge (``v`` its forward value). Then in the
    chain the identity rule at the ReLU and at the scale, and proportional sharing at the sum
    (paper Eq. 8), are those nodes' own backward of ``g``, and the epsilon rule at a matrix
    product (paper Eq. 4) is its backward of ``g * z / stab(z)``: LRP as a modified gradient,
    as Zennit and LxT compute it. So one ``autograd.grad`` call, with a pre-hook on each product
    node that scales its incoming ``g``, gives dynlrp's relevance (``x * g``; the smoke test
    checks the two agree). The outputs ``z`` are taped by forward hooks (recorded mode's
    source, registered and removed in each run and timed with the forward), not recovered.
    """
    import methods as M
    import torch
    from zoo import top_logit_seed

    x = p.x.detach().clone().requires_grad_(True)
    eps = torch.tensor(EPS)
    layers = [m for m in p.model.modules() if isinstance(m, torch.nn.Linear)]

    def run(clock):
        outputs: list = []
        with clock("forward"):
            taps = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in layers]
            y = p.forward(x)
            for tap in taps:
                tap.remove()
        with clock("explain"):
            handles = []
            for out in outputs:  # (the taped tensors, still in the graph: their grad_fn)
                z = out.detach()
                handles.append(out.grad_fn.register_prehook(
                    lambda g, z=z: (g[0] * z / torch.copysign(eps, z).add_(z),)))
            seed = top_logit_seed(y)
            g, = torch.autograd.grad(y, x, (seed != 0).to(seed.dtype))  # R = y * g at the output
            for handle in handles:
                handle.remove()
            return x.detach() * g

    return M.Method("hooks", run)


def build_llama(layers: int = 24, hidden: int = 32):
    """The issue's example: a Llama of ``layers`` layers of width ``hidden`` (AttnLRP rules)."""
    import zoo

    cfg = {"image": 32, "layers": layers, "hidden": hidden, "heads": 2, "mlp": 2 * hidden, "tokens": 8}
    p = zoo.build("llama", 1, cfg)
    p.extra["rules"] = "attnlrp"
    return p


def worker(args: argparse.Namespace) -> dict:
    import methods as M

    import dynlrp

    p = build(args.nodes) if args.graph == "chain" else build_llama()
    ready = {name: M.make(name, p) for name in args.methods.split(",")}
    if args.graph == "chain" and not args.no_sketch:
        ready["hooks"] = hooks_sketch(p)
    x = p.x.clone().requires_grad_(True)
    cov = dynlrp.coverage(p.forward(x))
    samples = bu.interleave({n: m.run for n, m in ready.items()}, args.repeats, args.warmup)
    profiled = {n: bu.count_ops(m.run) for n, m in ready.items()}
    stats = ready["dynlrp"].info.get("stats") if "dynlrp" in ready else None
    return {"samples": samples, "ops": {n: c for n, (c, _) in profiled.items()},
            "op_seconds": {n: t for n, (_, t) in profiled.items()}, "autograd_nodes": cov.total_nodes,
            "uncovered": cov.uncovered, "stats": stats, "machine": bu.machine(),
            "relevance_sums": {n: m.relevance_sum for n, m in ready.items()}}


def summarise(got: dict) -> dict[str, Any]:
    grad = got["samples"]["grad"]
    nodes = got["autograd_nodes"]
    out: dict[str, Any] = {"autograd_nodes": nodes, "stats": got.get("stats"), "methods": {}}
    g_explain = bu.median([s["explain"] for s in grad])
    g_total = bu.median([s["total"] for s in grad])
    ops, seconds = got.get("ops", {}), got.get("op_seconds", {})
    g_ops = sum(ops.get("grad", {}).values())
    sums = got.get("relevance_sums", {})
    for name, samples in got["samples"].items():
        explain = bu.median([s["explain"] for s in samples])
        counted, spent = ops.get(name, {}), seconds.get(name, {})
        alone = None
        if "explain" in spent and g_total:
            alone = (bu.median([s["forward"] for s in samples]) + spent["explain"]) / g_total
        out["methods"][name] = {
            "relevance_sum": sums.get(name),
            "ops": counted,
            "op_seconds": spent,
            "op_ratio": sum(counted.values()) / g_ops if counted and g_ops else None,
            "alone_ratio": alone,
            "time_s": bu.median([s["total"] for s in samples]),
            "explain_s": explain,
            "ratio": bu.paired_ratio(samples, grad),
            "explain_ratio": bu.paired_ratio(samples, grad, "explain"),
            "explain_us_per_node": 1e6 * explain / nodes,
            "extra_us_per_node": 1e6 * (explain - g_explain) / nodes,
        }
    return out


TITLES = {"chain": "the residual chain on `(1, 8)` tensors",
          "llama": "Llama, 24 layers of width 32, 8 tokens (AttnLRP)"}


LABELS = {"hooks": "sketch: the same rules as hooks in autograd's engine"}


def markdown(graph: str, summary: dict, target: float) -> str:
    """One row per method: totals, explain-only, microseconds per node, the target, operators."""
    import methods as M

    lines = [f"Graph: {TITLES[graph]}, {summary['autograd_nodes']} autograd nodes. "
             "Ratios are medians of per-round ratios to gradient x input.", "",
             f"| method | forward + explain | × grad | within {target:g}× | explain only | × autograd.grad "
             "| µs / node | extra µs / node | aten ops (forward + explain) | explain's ops alone "
             "| × grad with ops alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        ok = "" if name == "grad" else ("yes" if (m["ratio"] or 1e9) <= target else "no")
        counted = m.get("ops") or {}
        ops = f"{counted.get('forward', 0)} + {counted.get('explain', 0)}" if counted else "–"
        spent = (m.get("op_seconds") or {}).get("explain")
        alone = m.get("alone_ratio")
        lines.append(
            f"| {LABELS.get(name) or M.LABELS[name]} | {m['time_s'] * 1e3:.1f} ms | {m['ratio']:.2f}× "
            f"| {ok} | "
            f"{m['explain_s'] * 1e3:.1f} ms | {m['explain_ratio']:.2f}× | {m['explain_us_per_node']:.1f} "
            f"| {m['extra_us_per_node']:.1f} | {ops} | {'–' if spent is None else f'{spent * 1e3:.1f} ms'} "
            f"| {'–' if alone is None else f'{alone:.2f}×'} |")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated: chain, llama")
    ap.add_argument("--nodes", type=int, default=2000, help="autograd nodes in the chain (about)")
    ap.add_argument("--repeats", type=int, default=9, help="measured rounds")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    ap.add_argument("--no-sketch", action="store_true", help="leave out the chain's hooks sketch")
    ap.add_argument("--target", type=float, default=2.0, help="the ratio the issue asks for")
    ap.add_argument("--out", type=Path, default=bu.RESULTS, help="directory for overhead.json")
    ap.add_argument("--src", type=Path, help="dynlrp source tree to measure (default: src/)")
    ap.add_argument("--graph", choices=GRAPHS, default="chain", help=argparse.SUPPRESS)  # (a worker's)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bu.use_src(args.src)
    if "grad" not in args.methods.split(","):
        args.methods = "grad," + args.methods
    if args.worker:
        bu.emit(worker(args))
        return 0
    graphs = [g for g in args.graphs.split(",") if g]
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown or not graphs:
        print(f"overhead: unknown graphs {unknown}; choose from {', '.join(GRAPHS)}", file=sys.stderr)
        return 2
    settings = {"nodes": args.nodes, "repeats": args.repeats, "warmup": args.warmup, "target": args.target}
    result: dict[str, Any] = {"settings": settings, "graphs": {}}
    tables = []
    for graph in graphs:
        got = bu.run_worker(SCRIPT, ["--worker", "--graph", graph, "--nodes", str(args.nodes), "--repeats",
                                     str(args.repeats), "--warmup", str(args.warmup),
                                     "--methods", args.methods] + (["--no-sketch"] if args.no_sketch else []))
        if "error" in got:
            print(f"overhead: the {graph} worker failed: {got['error']}", file=sys.stderr)
            return 1
        result["machine"] = got["machine"]
        result["graphs"][graph] = summary = summarise(got)
        tables.append(markdown(graph, summary, args.target))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where dynlrp spends its time: cProfile of one ``lrp`` call, forward pass excluded.

Two cases: VGG16 at batch 1 (large tensors: arithmetic should dominate) and the
~2,000-node chain of :mod:`overhead` (tiny tensors: the engine's own bookkeeping is all
that is left). Each is profiled for the first call of a fresh engine (promise mode) and
for a second call of the same engine on a new forward (the plan cache, if any).

Run from the repository root::

    PYTHONPATH=src python benchmarks/hotspots.py [--top 25] [--cases vgg16,chain]

Writes ``<out>/profile_<case>[-<rules>]_<call>.txt`` (sorted by own time, then by cumulative
time). ``--rules`` picks a preset (the model is then passed to the engine as ``model=``).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402


def problem(case: str, image: int):
    """The model and input of a case (see the module docstring)."""
    import overhead
    import zoo

    if case == "vgg16":
        return zoo.build("vgg16", 1, {**zoo.PROFILES["full"], "image": image})
    if case == "chain":
        return overhead.build(2000)
    raise ValueError(f"unknown case {case!r}")


def profile_case(case: str, image: int, top: int, out: Path, rules: str | None = None) -> dict[str, str]:
    """Profile the first and a cached call; return ``{call: report text}``."""
    import torch
    import zoo

    import dynlrp

    p = problem(case, image)
    engine = dynlrp.LRP(rules)
    tag = case if rules is None else f"{case}-{rules}"
    takes_model = "model" in inspect.signature(engine.__call__).parameters
    kwargs = {"model": p.model} if takes_model and rules is not None else {}
    reports = {}
    for call, seed in (("first", 1), ("second", 2)):
        x = p.fresh_input(seed).requires_grad_(True)
        y = p.forward(x)
        seed_r = zoo.top_logit_seed(y)
        if call == "first":  # warm torch's kernels up on another engine, not this one
            dynlrp.LRP(rules)(p.forward(x), x, seed_r, **kwargs)
        prof = cProfile.Profile()
        prof.enable()
        engine(y, x, seed_r, **kwargs)
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        buf.write(f"# {tag} (rules: {rules or 'default'}), {call} call of one engine, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
                  f"total {stats.total_tt:.3f} s\n")
        buf.write(f"# engine.stats: {engine.stats}\n\n## by own time (tottime)\n")
        stats.sort_stats("tottime").print_stats(top)
        buf.write("\n## by cumulative time\n")
        stats.sort_stats("cumulative").print_stats(top)
        text = buf.getvalue()
        (out / f"profile_{tag}_{call}.txt").write_text(text)
        reports[call] = text
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="vgg16,chain", help="comma-separated: vgg16, chain")
    ap.add_argument("--image", type=int, default=224, help="VGG16 image side")
    ap.add_argument("--top", type=int, default=25, help="functions listed per table")
    ap.add_argument("--rules", help="a dynlrp preset name (default: the engine's default rules)")
    ap.add_argument("--out", type=Path, default=bu.RESULTS, help="directory for profile_*.txt")
    ap.add_argument("--src", type=Path, help="dynlrp source tree to measure (default: src/)")
    args = ap.parse_args(argv)
    bu.use_src(args.src)
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases.split(","):
        for call, text in profile_case(case, args.image, args.top, args.out, args.rules).items():
            head = "\n".join(text.splitlines()[: 12 + min(args.top, 12)])
            print(f"==== {case} / {call} call ====\n{head}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

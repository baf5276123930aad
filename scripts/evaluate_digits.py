"""Faithfulness of dynlrp and the baselines on the shipped digits CNN (offline, about a minute).

The CNN (``dynlrp.data.load_digits_cnn``, trained by ``scripts/train_demo_cnn.py``) is scored
on its held-out split of scikit-learn's 8 x 8 digits, rebuilt with the trainer's seed. Every
method explains each image's predicted class; the curves occlude pixels most / least
relevant first and record the target logit.

Run::

    PYTHONPATH=src python scripts/evaluate_digits.py [--out out/faithfulness/digits]

Writes ``<occlusion>.md`` (the table), ``<occlusion>.json`` (numbers and mean curves) and
``<occlusion>.png`` (MoRF / LeRF curves) per occlusion into ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import dynlrp
from dynlrp import baselines, metrics, presets
from dynlrp.data import digits_cnn_info, load_digits_cnn

DYNLRP_PRESETS = ("epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")
ZENNIT_COMPOSITES = ("epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")
GRADIENT_BASELINES = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "gradient_shap")


def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits CNN's held-out images ``(N, 1, 8, 8)`` in ``[0, 1]`` and labels, split as its
    trainer split them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    seed = int(digits_cnn_info().get("seed", 0))
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    _, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=y)
    return x[idx_test], y[idx_test]


def build_methods(model: torch.nn.Module, names: list[str]) -> dict[str, Callable[..., torch.Tensor]]:
    """The attribution functions, by report label."""
    methods = {}
    for name in names:
        kind, _, variant = name.partition(":")
        if kind == "dynlrp":
            # the inputs lie in [0, 1]: z^B's box for the first layer
            ruleset = presets.epsilon_gamma_box(low=0.0, high=1.0) if variant == "epsilon_gamma_box" \
                else presets.resolve(variant or None)
            methods[name] = baselines.method("dynlrp", model, rules=dynlrp.LRP(ruleset))
        elif kind == "zennit":
            extra = {"low": 0.0, "high": 1.0} if variant == "epsilon_gamma_box" else {}
            methods[name] = baselines.method(name, model, **extra)
        elif kind == "random":
            methods[name] = baselines.method("random", model)
        else:
            methods[name] = baselines.method(name, model)
    return methods


def paired_table(report: metrics.FaithfulnessReport) -> str:
    """Paired ABPC differences (mean +- SEM over images): each dynlrp preset minus the Zennit
    composite of the same name, and a few more pairs."""
    names = {r.name for r in report.results if r.curves is not None}
    lines = ["| pair (per image, same images) | ABPC difference |", "|---|---|"]
    for preset in ZENNIT_COMPOSITES:
        a, b = f"dynlrp:{preset}", f"zennit:{preset}"
        if a in names and b in names:
            mean, sem = report.paired(a, b)
            lines.append(f"| {a} - {b} | {mean:+.3f} ± {sem:.3f} |")
    for a, b in (("dynlrp:epsilon", "integrated_gradients"), ("dynlrp:epsilon", "input_x_gradient"),
                 ("dynlrp:epsilon_gamma_box", "smoothgrad")):
        if a in names and b in names:
            mean, sem = report.paired(a, b)
            lines.append(f"| {a} - {b} | {mean:+.3f} ± {sem:.3f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def default_methods() -> list[str]:
    return ([f"dynlrp:{p}" for p in DYNLRP_PRESETS] + [f"zennit:{c}" for c in ZENNIT_COMPOSITES]
            + list(GRADIENT_BASELINES) + ["random"])


def main(argv: list[str] | None = None) -> dict[str, metrics.FaithfulnessReport]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/faithfulness/digits", help="output folder")
    ap.add_argument("--occlusions", default="blur,zero", help="comma-separated: blur, zero")
    ap.add_argument("--kernel", type=int, default=51, help="blur kernel size (the paper's 51)")
    ap.add_argument("--sigma", type=float, default=20.0, help="blur sigma (the paper's 20)")
    ap.add_argument("--step", type=int, default=2, help="pixels occluded per step (of 64)")
    ap.add_argument("--score", default="logit", choices=metrics.SCORES)
    ap.add_argument("--examples", type=int, default=None, help="first N test images (default: all 360)")
    ap.add_argument("--methods", default=",".join(default_methods()), help="comma-separated method labels")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward pass of the curves")
    ap.add_argument("--attr-batch-size", type=int, default=1,
                    help="images per attribution call (1: speed in images/s as the paper's it/s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier timings on a shared machine)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _, _ = load_digits_cnn()
    model.eval()
    x, labels = test_split()
    if args.examples:
        x, labels = x[:args.examples], labels[:args.examples]
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    methods = build_methods(model, [m for m in args.methods.split(",") if m])
    out = Path(args.out)
    given = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=src python scripts/evaluate_digits.py " + " ".join(map(shlex.quote, given))
    occlusions = {}
    for occ in [o for o in args.occlusions.split(",") if o]:
        if occ not in ("blur", "zero"):
            raise SystemExit(f"unknown occlusion {occ!r}: use blur or zero")
        occlusions[occ] = metrics.Blur(args.kernel, args.sigma) if occ == "blur" else metrics.Baseline(0.0)

    start = time.perf_counter()
    targets = metrics.predict_targets(model, x)  # every method explains the predicted class
    torch.manual_seed(0)
    np.random.seed(0)  # Captum's GradientSHAP draws its alphas with NumPy
    attributions = metrics.attribute_all(methods, x, targets, batch_size=args.attr_batch_size,
                                         progress=not args.no_progress)
    print(f"attributions: {time.perf_counter() - start:.0f} s")
    reports = {}
    for occ, occlusion in occlusions.items():
        start = time.perf_counter()
        report = metrics.score_attributions(
            model, x, attributions, targets, labels=labels, features=metrics.Pixels(step=args.step),
            occlusion=occlusion, score=args.score, batch_size=args.batch_size, progress=not args.no_progress,
            settings={"title": f"digits CNN, {len(x)} test images, occlusion {occlusion!r}",
                      "model": f"dynlrp.data digits CNN (test accuracy here {accuracy:.3f})",
                      "speed": f"examples/s with {args.attr_batch_size} example(s) per attribution call",
                      "command": command, "torch": torch.__version__})
        report.save_json(out / f"{occ}.json")
        report.save_plot(out / f"{occ}.png")
        table = report.markdown() + "\n\n" + paired_table(report)
        (out / f"{occ}.md").write_text(f"{report.settings['title']}; {report.settings['features']}, "
                                       f"{args.step} pixels per step, score: {args.score}; "
                                       f"{report.settings['speed']}\n\n{table}\n")
        print(f"\n## {report.settings['title']} ({time.perf_counter() - start:.0f} s)\n\n{table}")
        reports[occ] = report
    print(f"\nwrote {out}/<occlusion>.md/.json/.png  (test accuracy {accuracy:.3f}, {len(x)} images)")
    return reports


if __name__ == "__main__":
    main()

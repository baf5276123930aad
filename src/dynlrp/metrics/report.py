"""Evaluate several attribution methods in one harness; results as a table and MoRF/LeRF plots."""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..targets import primary_output
from .features import Features
from .occlusion import Occlusion
from .perturbation import PerturbationCurves, Target, perturbation_curves, resolve_target

AttributionFn = Callable[..., torch.Tensor]
"""``fn(x_batch, target_batch, **model_kwargs_batch) -> relevance`` of one batch."""


@dataclass
class MethodResult:
    """One method's curves and speed (or why it did not run).

    Attributes
    ----------
    name
        The method's label.
    curves
        Its perturbation curves, or ``None`` when it failed.
    seconds
        Wall time of all its attribution calls.
    examples
        Examples it explained.
    error
        ``"ExceptionType: message"`` when it failed.
    """

    name: str
    curves: PerturbationCurves | None
    seconds: float
    examples: int
    error: str | None = None

    @property
    def speed(self) -> float:
        """Examples explained per second."""
        return self.examples / self.seconds if self.seconds > 0 else float("nan")

    def row(self) -> dict[str, Any]:
        """Summary numbers of this method (NaN where it failed)."""
        nan = float("nan")
        base = {"method": self.name, "speed": self.speed if self.error is None else nan,
                "seconds": self.seconds, "error": self.error}
        if self.curves is None:
            return {**base, "abpc": nan, "abpc_sem": nan, "comprehensiveness": nan, "sufficiency": nan,
                    "unperturbed": nan, "examples": float(self.examples)}
        return {**base, **self.curves.summary()}


@dataclass
class FaithfulnessReport:
    """The results of :func:`evaluate`: one :class:`MethodResult` per method.

    Attributes
    ----------
    results
        In the order the methods were given.
    settings
        What was measured (features, occlusion, score, steps, model, data), as strings.
    """

    results: list[MethodResult]
    settings: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MethodResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def rows(self) -> list[dict[str, Any]]:
        """One summary dict per method."""
        return [r.row() for r in self.results]

    def markdown(self, digits: int = 3) -> str:
        """A Markdown table: ABPC (+- standard error), comprehensiveness, sufficiency, speed."""
        lines = ["| Method | ABPC (↑) | Comprehensiveness (↑) | Sufficiency (↓) | Speed (examples/s, ↑) |",
                 "|---|---|---|---|---|"]
        for r in self.rows():
            if r["error"]:
                lines.append(f"| {r['method']} | failed: {_short(r['error'])} | | | |")
                continue
            lines.append(f"| {r['method']} | {_fmt(r['abpc'], digits)} ± {_fmt(r['abpc_sem'], digits)} | "
                         f"{_fmt(r['comprehensiveness'], digits)} | {_fmt(r['sufficiency'], digits)} | "
                         f"{_fmt(r['speed'], 1)} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Settings, summary rows and the mean curves, JSON-serialisable."""
        curves = {}
        for r in self.results:
            if r.curves is not None:
                x, morf, lerf = r.curves.mean_curves()
                curves[r.name] = {"x": x.tolist(), "morf": morf.tolist(), "lerf": lerf.tolist()}
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                for row in self.rows()]
        return {"settings": self.settings, "rows": rows, "mean_curves": curves}

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def save_plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Mean MoRF and LeRF curves of every method, side by side, as a PNG (matplotlib Agg).

        Parameters
        ----------
        path
            The PNG to write.
        title
            Figure title (default: the settings' ``title`` if any).

        Returns
        -------
        pathlib.Path
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shown = [r for r in self.results if r.curves is not None]
        fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.4), sharey=True)
        colors = plt.get_cmap("tab20" if len(shown) > 10 else "tab10")
        score = shown[0].curves.score if shown else "score"
        for i, r in enumerate(shown):
            assert r.curves is not None
            x, morf, lerf = r.curves.mean_curves()
            label = f"{r.name} (ABPC {float(r.curves.abpc().mean()):.3g})"
            dashed = r.name.startswith("random")
            style = {"color": colors(i % colors.N), "lw": 1.4, "ls": "--" if dashed else "-"}
            axes[0].plot(x.numpy(), morf.numpy(), label=label, **style)
            axes[1].plot(x.numpy(), lerf.numpy(), **style)
        for ax, name in zip(axes, ("MoRF (most relevant first)", "LeRF (least relevant first)")):
            ax.set_title(name)
            ax.set_xlabel("fraction of features occluded")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"mean target {score}")
        fig.legend(fontsize=7, loc="center left", bbox_to_anchor=(0.79, 0.5), frameon=False)
        fig.suptitle(title or self.settings.get("title", "perturbation curves"))
        fig.tight_layout(rect=(0, 0, 0.79, 1))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def paired(self, a: str, b: str) -> tuple[float, float]:
        """Mean per-example ABPC difference ``a - b`` and its standard error (same examples).

        Parameters
        ----------
        a, b
            Method labels.

        Returns
        -------
        tuple of float
            ``(mean, sem)``.
        """
        ca, cb = self[a].curves, self[b].curves
        if ca is None or cb is None:
            return float("nan"), float("nan")
        d = (ca.abpc() - cb.abpc()).double()
        sem = float(d.std(unbiased=True) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
        return float(d.mean()), sem


def merge_reports(reports: list[FaithfulnessReport]) -> FaithfulnessReport:
    """One report from reports over disjoint chunks of the data (same methods and settings).

    Curves are concatenated, times and example counts added; a method that failed in any
    chunk keeps its first error.

    Parameters
    ----------
    reports
        In data order.

    Returns
    -------
    FaithfulnessReport
    """
    if not reports:
        raise ValueError("no reports to merge")
    merged: list[MethodResult] = []
    for first in reports[0].results:
        parts = [r[first.name] for r in reports]
        error = next((p.error for p in parts if p.error), None)
        seconds = sum(p.seconds for p in parts)
        examples = sum(p.examples for p in parts)
        curves = None if error else PerturbationCurves.cat([p.curves for p in parts if p.curves is not None])
        merged.append(MethodResult(first.name, curves, seconds, examples, error))
    total = sum(int(r.settings.get("examples", 0)) for r in reports)
    return FaithfulnessReport(merged, {**reports[0].settings, "examples": str(total)})


def _fmt(v: float, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _short(error: str, limit: int = 120) -> str:
    one = " ".join(str(error).split()).replace("|", "/")
    return one if len(one) <= limit else one[:limit - 3] + "..."


def _slice_kwargs(kwargs: Mapping[str, Any], n: int, sl: slice, device: torch.device) -> dict[str, Any]:
    return {k: (v[sl].to(device) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
            for k, v in kwargs.items()}


def predict_targets(model: Callable[..., Any], inputs: torch.Tensor, target: Target = None, *,
                    model_kwargs: Mapping[str, Any] | None = None, batch_size: int = 32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The class each example is explained for: its prediction (``target=None``) or as given.

    Parameters
    ----------
    model, inputs, model_kwargs, batch_size, device
        As for :func:`~dynlrp.metrics.perturbation_curves`.
    target
        ``None``, an int or ``N`` indices.

    Returns
    -------
    torch.Tensor
        ``(N,)`` class indices, on the CPU.
    """
    n = len(inputs)
    kwargs = dict(model_kwargs or {})
    dev = torch.device(device) if device is not None else _device_of(model, inputs)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            y = primary_output(model(inputs[sl].to(dev), **_slice_kwargs(kwargs, n, sl, dev)))
            t = target[sl] if isinstance(target, torch.Tensor) and target.numel() == n else target
            out.append(resolve_target(y, t).cpu())  # type: ignore[arg-type]
    return torch.cat(out)


def _device_of(model: Any, inputs: torch.Tensor) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return inputs.device


@dataclass
class Attributions:
    """Relevance of one method over all inputs, with its wall time (or its error).

    Attributes
    ----------
    relevance
        ``(N, ...)`` on the CPU, or ``None`` when the method failed.
    seconds
        Wall time of the attribution calls (warm-up excluded).
    examples
        Examples explained.
    error
        ``"ExceptionType: message"`` when the method failed.
    """

    relevance: torch.Tensor | None
    seconds: float
    examples: int
    error: str | None = None


def attribute_all(
    methods: Mapping[str, AttributionFn],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, Attributions]:
    """Run every method on the same inputs and targets, in batches, timing each.

    Parameters
    ----------
    methods
        ``{label: fn}`` with ``fn(x_batch, target_batch, **model_kwargs_batch)`` returning the
        batch's relevance. A method that raises is recorded with its error.
    inputs
        ``(N, ...)``.
    targets
        ``(N,)`` class indices (see :func:`predict_targets`).
    model_kwargs
        More inputs, sliced per batch and passed to the methods.
    batch_size
        Examples per call.
    device
        Where inputs and targets go (default: the inputs' device).
    progress
        tqdm progress bars.
    warmup
        Run each method once on the first example before timing it (imports, caches).

    Returns
    -------
    dict
        ``{label: Attributions}``.
    """
    kwargs = dict(model_kwargs or {})
    n = len(inputs)
    dev = torch.device(device) if device is not None else inputs.device
    out: dict[str, Attributions] = {}
    for name, fn in methods.items():
        parts: list[torch.Tensor] = []
        seconds = 0.0
        error = None
        batches = range(0, n, batch_size)
        bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(batches), desc=f"attribution: {name}", leave=False)
            except ImportError:  # pragma: no cover
                bar = None
        try:
            if warmup and n:
                fn(inputs[:1].to(dev), targets[:1].to(dev), **_slice_kwargs(kwargs, n, slice(0, 1), dev))
            for start in batches:
                sl = slice(start, min(start + batch_size, n))
                xb = inputs[sl].to(dev)
                tb = targets[sl].to(dev)
                kb = _slice_kwargs(kwargs, n, sl, dev)
                t0 = time.perf_counter()
                rel = fn(xb, tb, **kb)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds += time.perf_counter() - t0
                parts.append(rel.detach().float().cpu())
                if bar is not None:
                    bar.update(1)
        except Exception as exc:  # a failing method is a result, not a crash
            error = f"{type(exc).__name__}: {exc}"
            if progress:
                traceback.print_exc(limit=3)
        finally:
            if bar is not None:
                bar.close()
        done = sum(len(p) for p in parts)
        out[name] = Attributions(torch.cat(parts) if error is None and parts else None, seconds, done, error)
    return out


def score_attributions(
    model: Callable[..., Any],
    inputs: torch.Tensor,
    attributions: Mapping[str, Attributions],
    targets: torch.Tensor,
    *,
    settings: Mapping[str, str] | None = None,
    **curve_kwargs: Any,
) -> FaithfulnessReport:
    """Perturbation curves of every method's attributions, as a report.

    Parameters
    ----------
    model, inputs
        As for :func:`~dynlrp.metrics.perturbation_curves`.
    attributions
        From :func:`attribute_all`.
    targets
        ``(N,)`` the explained classes.
    settings
        Extra strings for the report.
    **curve_kwargs
        Passed to :func:`~dynlrp.metrics.perturbation_curves` (``features``, ``occlusion``,
        ``step``, ``steps``, ``score``, ``labels``, ``model_kwargs``, ``batch_size``, ...).

    Returns
    -------
    FaithfulnessReport
    """
    results: list[MethodResult] = []
    curve_settings: dict[str, str] = {}
    for name, a in attributions.items():
        if a.error is not None or a.relevance is None:
            results.append(MethodResult(name, None, a.seconds, a.examples, a.error or "no relevance"))
            continue
        curves = perturbation_curves(model, inputs, a.relevance, targets, **curve_kwargs)
        curve_settings = curves.settings
        results.append(MethodResult(name, curves, a.seconds, a.examples))
    info = {**curve_settings, "examples": str(len(inputs)), **dict(settings or {})}
    return FaithfulnessReport(results, info)


def evaluate(
    model: Callable[..., Any],
    inputs: torch.Tensor,
    methods: Mapping[str, AttributionFn],
    target: Target = None,
    *,
    labels: torch.Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    features: Features | str = "pixel",
    occlusion: Occlusion | str | float = "blur",
    step: int | None = None,
    steps: int | None = None,
    score: str = "logit",
    batch_size: int = 32,
    attribution_batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
    warmup: bool = True,
    settings: Mapping[str, str] | None = None,
) -> FaithfulnessReport:
    """Attribute with each method on the same inputs and targets, then score the attributions.

    :func:`predict_targets`, :func:`attribute_all` and :func:`score_attributions` in one call
    (use those to score one set of attributions under several occlusions).

    Parameters
    ----------
    model
        As for :func:`~dynlrp.metrics.perturbation_curves` (it scores the occluded inputs).
    inputs
        ``(N, ...)`` the inputs the curves occlude (images, token ids).
    methods
        ``{label: fn}`` with ``fn(x_batch, target_batch, **model_kwargs_batch)`` returning
        the batch's relevance (see :func:`dynlrp.baselines.method` for the usual ones). A
        method that raises is reported with its error and the others still run.
    target
        ``None`` (each example's predicted class), an int or ``N`` indices; every method
        explains, and every curve records, the same classes.
    labels, features, occlusion, step, steps, score, seed
        As for :func:`~dynlrp.metrics.perturbation_curves`.
    model_kwargs
        More model inputs (e.g. ``attention_mask``), sliced per batch; also passed to the
        methods.
    batch_size
        Examples per forward pass of the curves.
    attribution_batch_size
        Examples per attribution call (default: ``batch_size``).
    device
        Where to run (default: the model's device).
    progress
        tqdm progress bars.
    warmup
        Run each method once on the first example before timing it (imports, caches).
    settings
        Extra strings for the report (title, model, data, command).

    Returns
    -------
    FaithfulnessReport
    """
    kwargs = dict(model_kwargs or {})
    dev = torch.device(device) if device is not None else _device_of(model, inputs)
    targets = predict_targets(model, inputs, target, model_kwargs=kwargs, batch_size=batch_size, device=dev)
    attributions = attribute_all(methods, inputs, targets, model_kwargs=kwargs,
                                 batch_size=attribution_batch_size or batch_size, device=dev,
                                 progress=progress, warmup=warmup)
    return score_attributions(model, inputs, attributions, targets, settings=settings, features=features,
                              occlusion=occlusion, step=step, steps=steps, score=score, labels=labels,
                              model_kwargs=kwargs, batch_size=batch_size, device=dev, progress=progress,
                              seed=seed)

"""Perturbation curves (MoRF / LeRF), ABPC, comprehensiveness and sufficiency.

Section 5.3 of the DynamicLRP paper: occlude the input's features step by step, most
relevant first (MoRF) or least relevant first (LeRF), and record the model's score for the
explained class after each step. With ``AUC`` the area under a curve over the fraction of
features occluded (``[0, 1]``):

* ``ABPC = AUC(LeRF) - AUC(MoRF)`` (higher is better);
* ``comprehensiveness = AUC(y = f(x)) - AUC(MoRF)`` (higher is better);
* ``sufficiency = AUC(y = f(x)) - AUC(LeRF)`` (lower is better);

where ``y = f(x)`` is the constant line at the unperturbed score (the paper's "baseline"),
so ``ABPC = comprehensiveness - sufficiency`` exactly. ``AUC`` is the trapezoidal area
divided by the length of the x range, i.e. the curve's mean height: a full curve's area over
``[0, 1]``, and scores in the units of the recorded score (logits by default) however many
steps are taken.

See ``docs/faithfulness.md`` for how these numbers relate to the paper's tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..targets import primary_output
from .features import Features, resolve_features
from .occlusion import Occlusion, resolve_occlusion

SCORES = ("logit", "probability", "accuracy")

Target = int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


# -- areas -----------------------------------------------------------------------------------


def _grid(curve: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    if x is None:
        steps = curve.shape[-1]
        x = torch.linspace(0.0, 1.0, steps, dtype=curve.dtype, device=curve.device) if steps > 1 \
            else torch.zeros(1, dtype=curve.dtype, device=curve.device)
    return x.to(curve.dtype).expand_as(curve)


def area(curve: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Mean height of a curve: the trapezoidal area divided by the length of its x range.

    Parameters
    ----------
    curve
        ``(..., S + 1)`` scores; column 0 is the unperturbed input.
    x
        The fraction of features occluded at each point, broadcastable to ``curve``;
        default: ``S + 1`` evenly spaced points on ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``(...)``. For a curve over ``[0, 1]`` this is its area; a curve of one point (or
        with an empty x range) has its only value.
    """
    x = _grid(curve, x)
    widths = x[..., 1:] - x[..., :-1]
    trapezoids = ((curve[..., 1:] + curve[..., :-1]) * 0.5 * widths).sum(-1)
    span = x[..., -1] - x[..., 0]
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, trapezoids / safe, curve[..., 0])


def abpc(morf: torch.Tensor, lerf: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Area between the perturbation curves, ``AUC(LeRF) - AUC(MoRF)``, per example.

    Parameters
    ----------
    morf, lerf
        ``(N, S + 1)`` curves (column 0: unperturbed).
    x
        Fractions occluded, as for :func:`area`.

    Returns
    -------
    torch.Tensor
        ``(N,)``; higher is better.
    """
    return area(lerf, x) - area(morf, x)


def comprehensiveness(morf: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """``AUC(y = f(x)) - AUC(MoRF)``: how much removing the most relevant features costs.

    Parameters
    ----------
    morf
        ``(N, S + 1)``; column 0 is the unperturbed score ``f(x)``.
    x
        Fractions occluded, as for :func:`area`.

    Returns
    -------
    torch.Tensor
        ``(N,)``; higher is better.
    """
    return morf[..., 0] - area(morf, x)


def sufficiency(lerf: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """``AUC(y = f(x)) - AUC(LeRF)``: how much is lost keeping only the most relevant features.

    Parameters
    ----------
    lerf
        ``(N, S + 1)``; column 0 is the unperturbed score ``f(x)``.
    x
        Fractions occluded, as for :func:`area`.

    Returns
    -------
    torch.Tensor
        ``(N,)``; lower is better.
    """
    return lerf[..., 0] - area(lerf, x)


# -- results ---------------------------------------------------------------------------------


@dataclass
class PerturbationCurves:
    """MoRF and LeRF curves of ``N`` examples.

    Attributes
    ----------
    morf, lerf
        ``(N, S + 1)`` scores; column 0 is the unperturbed input (the same in both).
    fraction
        ``(N, S + 1)``: the fraction of each example's features occluded at each point.
    target
        ``(N,)`` the explained class per example (``None`` for a callable target).
    score
        What was recorded: ``"logit"``, ``"probability"`` or ``"accuracy"``.
    features
        ``(N,)`` the number of occludable features per example.
    settings
        The features, occlusion and step settings, as strings (for reports).
    """

    morf: torch.Tensor
    lerf: torch.Tensor
    fraction: torch.Tensor
    target: torch.Tensor | None
    score: str
    features: torch.Tensor
    settings: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.morf)

    @classmethod
    def cat(cls, parts: list[PerturbationCurves]) -> PerturbationCurves:
        """Concatenate the curves of several runs with the same settings and number of steps."""
        if not parts:
            raise ValueError("nothing to concatenate")
        if len({p.morf.shape[1] for p in parts}) != 1 or len({p.score for p in parts}) != 1:
            raise ValueError("curves with different steps or scores cannot be concatenated")
        targets = [p.target for p in parts]
        return cls(morf=torch.cat([p.morf for p in parts]), lerf=torch.cat([p.lerf for p in parts]),
                   fraction=torch.cat([p.fraction for p in parts]),
                   target=torch.cat(targets) if all(t is not None for t in targets) else None,  # type: ignore[misc]
                   score=parts[0].score, features=torch.cat([p.features for p in parts]),
                   settings=dict(parts[0].settings))

    def abpc(self) -> torch.Tensor:
        """Per-example ABPC (higher is better)."""
        return abpc(self.morf, self.lerf, self.fraction)

    def comprehensiveness(self) -> torch.Tensor:
        """Per-example comprehensiveness (higher is better)."""
        return comprehensiveness(self.morf, self.fraction)

    def sufficiency(self) -> torch.Tensor:
        """Per-example sufficiency (lower is better)."""
        return sufficiency(self.lerf, self.fraction)

    def summary(self) -> dict[str, float]:
        """Means over the examples, with the standard error of the mean ABPC."""
        a = self.abpc().double()
        n = len(a)
        sem = float(a.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return {"abpc": float(a.mean()), "abpc_sem": sem,
                "comprehensiveness": float(self.comprehensiveness().double().mean()),
                "sufficiency": float(self.sufficiency().double().mean()),
                "unperturbed": float(self.morf[:, 0].double().mean()), "examples": float(n)}

    def mean_curves(self, points: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean MoRF and LeRF curves over the examples, on a common x grid.

        Parameters
        ----------
        points
            Grid size when the examples' x positions differ (default: ``S + 1``); curves are
            linearly interpolated onto it.

        Returns
        -------
        tuple of torch.Tensor
            ``(x, morf_mean, lerf_mean)``.
        """
        frac = self.fraction.double()
        if bool((frac == frac[:1]).all()):
            return frac[0], self.morf.double().mean(0), self.lerf.double().mean(0)
        grid = torch.linspace(0.0, 1.0, points or self.fraction.shape[1], dtype=torch.float64)
        morf = _interp_mean(grid, frac, self.morf.double())
        return grid, morf, _interp_mean(grid, frac, self.lerf.double())


def _interp_mean(grid: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for xs, ys in zip(x, y):
        # keep the last point of each run of equal x (the curve after the final step)
        keep = torch.ones_like(xs, dtype=torch.bool)
        keep[:-1] = xs[1:] != xs[:-1]
        xs, ys = xs[keep], ys[keep]
        if len(xs) == 1:
            rows.append(ys.expand_as(grid))
            continue
        idx = torch.searchsorted(xs, grid.clamp(xs[0], xs[-1]), right=True).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
        t = torch.where(x1 > x0, (grid.clamp(xs[0], xs[-1]) - x0) / (x1 - x0), torch.zeros_like(grid))
        rows.append(y0 + t * (y1 - y0))
    return torch.stack(rows).mean(0)


# -- curves ----------------------------------------------------------------------------------


def resolve_target(y: torch.Tensor, target: Target) -> torch.Tensor:
    """Class indices ``(B,)`` for logits ``y`` ``(B, C)``: argmax for ``None``, or as given."""
    if y.dim() != 2:
        raise ValueError(f"class targets need (B, C) logits, got {tuple(y.shape)}; pass a callable target")
    b = y.shape[0]
    if target is None:
        return y.argmax(1)
    if isinstance(target, int):
        return torch.full((b,), target, dtype=torch.long, device=y.device)
    if isinstance(target, torch.Tensor):
        if target.is_floating_point():
            raise ValueError("a tensor target holds class indices (integers)")
        t = target.to(y.device).long().reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        if t.numel() != b:
            raise ValueError(f"target has {t.numel()} indices for {b} examples")
        return t
    raise TypeError(f"target must be None, an int, a tensor or a callable, not {type(target).__name__}")


def _score(y: torch.Tensor, target: Target, idx: torch.Tensor | None, score: str,
           labels: torch.Tensor | None) -> torch.Tensor:
    if callable(target) and not isinstance(target, torch.Tensor):
        s = target(y)
        if s.shape != (y.shape[0],):
            raise ValueError(f"a callable target must return one value per example, got {tuple(s.shape)}")
        return s
    assert idx is not None
    rows = torch.arange(len(idx), device=y.device)
    if score == "logit":
        return y[rows, idx]
    if score == "probability":
        return y.float().softmax(-1)[rows, idx]
    return (y.argmax(-1) == (labels if labels is not None else idx)).to(y.dtype)


def _batch_kwargs(kwargs: Mapping[str, Any], n: int, sl: slice, device: torch.device,
                  repeat: int = 1) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            v = value[sl].to(device)
            out[key] = torch.cat([v] * repeat) if repeat > 1 else v
        else:
            out[key] = value
    return out


def _ranks(key: torch.Tensor, valid: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Rank of each feature in the occlusion order (0 first): ascending ``key``, ties at random,
    invalid features last."""
    b, f = key.shape
    finfo = torch.finfo(torch.float64)
    key = torch.nan_to_num(key.double(), nan=0.0, posinf=finfo.max, neginf=finfo.min)
    if valid is not None:
        key = key.masked_fill(~valid, float("inf"))
    perm = torch.rand(b, f, generator=generator).argsort(1).to(key.device)
    order = perm.gather(1, key.gather(1, perm).argsort(dim=1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(f, device=key.device).expand(b, f).contiguous())
    return rank


def _counts(nvalid: torch.Tensor, step: int | None, steps: int | None) -> torch.Tensor:
    """Features occluded after each step, ``(N, S + 1)``."""
    nvalid = nvalid.long()
    if step is not None:
        if step < 1:
            raise ValueError(f"step must be positive, not {step}")
        s = steps if steps is not None else max(1, math.ceil(int(nvalid.max()) / step)) if len(nvalid) else 1
        k = torch.arange(s + 1, dtype=torch.long)
        return torch.minimum(k[None, :] * step, nvalid[:, None])
    assert steps is not None
    k = torch.arange(steps + 1, dtype=torch.float64)
    return torch.round(k[None, :] / steps * nvalid[:, None].double()).long()


def _model_device(model: Any, fallback: torch.device) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return fallback


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=desc, leave=False)


def perturbation_curves(
    model: Callable[..., Any],
    inputs: torch.Tensor,
    attribution: torch.Tensor,
    target: Target = None,
    *,
    features: Features | str = "pixel",
    occlusion: Occlusion | str | float = "blur",
    step: int | None = None,
    steps: int | None = None,
    score: str = "logit",
    labels: torch.Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
) -> PerturbationCurves:
    """Most-Relevant-First and Least-Relevant-First occlusion curves.

    Parameters
    ----------
    model
        Called as ``model(x, **model_kwargs)``; its output (a tensor, or anything with
        ``.logits``) holds ``(B, C)`` logits. Runs under ``torch.no_grad()``; put it in eval
        mode yourself.
    inputs
        ``(N, ...)``: images ``(N, C, H, W)``, token ids ``(N, T)`` or any batch.
    attribution
        Relevance of ``inputs``: shaped like them, ``(N, H, W)`` for images, or ``(N, T, D)``
        per embedding for tokens (summed over ``D``).
    target
        The explained class: ``None`` (each example's predicted class on the unperturbed
        input), an int, ``N`` indices, or a callable ``f(logits) -> (B,)`` giving the
        recorded value itself (then ``score`` must be ``"logit"``).
    features
        What one feature is: ``"pixel"`` (:class:`~dynlrp.metrics.Pixels`), ``"patch"``
        (:class:`~dynlrp.metrics.Patches`, 16 x 16, max-pooled), ``"token"``
        (:class:`~dynlrp.metrics.Tokens`), ``"element"`` or an instance.
    occlusion
        ``"blur"`` (:class:`~dynlrp.metrics.Blur`, kernel 51, sigma 20), ``"baseline"``
        (zeros), a number, or an instance (:class:`~dynlrp.metrics.TokenReplace` for text).
    step
        Features occluded per step (default: the feature set's: 1024 pixels, 4 patches,
        1 token). With ``steps`` too, the curves stop after ``steps`` steps.
    steps
        Without ``step``: the number of steps, each occluding ``1 / steps`` of every
        example's features (aligned x positions when examples differ in length).
    score
        What the curve records: ``"logit"`` of the target (default), its softmax
        ``"probability"``, or ``"accuracy"`` (1 where the argmax equals ``labels``, or the
        target when no labels are given).
    labels
        ``(N,)`` true classes, for ``score="accuracy"``.
    model_kwargs
        More keyword inputs of the model; tensors with ``N`` rows are sliced per batch
        (e.g. ``attention_mask``), others passed as they are.
    batch_size
        Examples per forward pass (each step runs MoRF and LeRF together: ``2 * batch_size``).
    device
        Where the model runs (default: its parameters' device). Results are on the CPU.
    progress
        Show a tqdm progress bar.
    seed
        Seed of the random order among features with equal relevance.

    Returns
    -------
    PerturbationCurves
        With ``.abpc()``, ``.comprehensiveness()``, ``.sufficiency()`` and ``.summary()``.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    if callable(target) and not isinstance(target, torch.Tensor) and score != "logit":
        raise ValueError("a callable target gives the recorded value itself; use score='logit'")
    if len(inputs) != len(attribution):
        raise ValueError(f"{len(inputs)} inputs but {len(attribution)} attributions")
    if step is None and steps is None:
        step = resolve_features(features).default_step
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be positive, not {steps}")
    feats = resolve_features(features)
    occl = resolve_occlusion(occlusion)
    kwargs = dict(model_kwargs or {})
    n = len(inputs)
    dev = torch.device(device) if device is not None else _model_device(model, inputs.device)

    n_features = feats.scores(attribution[:1].to(dev), inputs[:1].to(dev)).shape[1]
    valid_all = feats.valid(inputs, kwargs)
    nvalid = valid_all.sum(1).cpu() if valid_all is not None else torch.full((n,), n_features)
    counts = _counts(nvalid, step, steps)
    s = counts.shape[1] - 1
    fraction = counts.double() / nvalid.clamp_min(1).double()[:, None]

    morf = torch.empty(n, s + 1, dtype=torch.float64)
    lerf = torch.empty(n, s + 1, dtype=torch.float64)
    targets = torch.empty(n, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    if labels is not None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} examples")
    index_target = not (callable(target) and not isinstance(target, torch.Tensor))
    target_all = target.reshape(-1) if isinstance(target, torch.Tensor) and target.numel() == n else target

    bar = _progress(math.ceil(n / batch_size) * (s + 1), progress, "perturbation curves")
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                sl = slice(start, min(start + batch_size, n))
                xb = inputs[sl].to(dev)
                b = len(xb)
                kw1 = _batch_kwargs(kwargs, n, sl, dev)
                kw2 = _batch_kwargs(kwargs, n, sl, dev, repeat=2)
                lab = labels[sl].to(dev) if labels is not None else None
                scores = feats.scores(attribution[sl].to(dev), xb).float()
                valid = valid_all[sl].to(dev) if valid_all is not None else None
                rank_morf = _ranks(-scores, valid, generator)
                rank_lerf = _ranks(scores, valid, generator)
                reference = occl.reference(xb)
                cnt = counts[sl].to(dev)

                y0 = primary_output(model(xb, **kw1))
                tb = target_all[sl] if isinstance(target_all, torch.Tensor) else target_all
                idx = resolve_target(y0, tb) if index_target else None  # type: ignore[arg-type]
                s0 = _score(y0, target, idx, score, lab).double().cpu()
                morf[sl, 0] = s0
                lerf[sl, 0] = s0
                if idx is not None:
                    targets[sl] = idx.cpu()
                if bar is not None:
                    bar.update(1)
                idx2 = torch.cat([idx, idx]) if idx is not None else None
                lab2 = torch.cat([lab, lab]) if lab is not None else None
                for k in range(1, s + 1):
                    if bool((cnt[:, k] == cnt[:, k - 1]).all()):
                        morf[sl, k] = morf[sl, k - 1]
                        lerf[sl, k] = lerf[sl, k - 1]
                    else:
                        c = cnt[:, k:k + 1]
                        x_morf = occl.apply(xb, reference, feats.expand(rank_morf < c, xb))
                        x_lerf = occl.apply(xb, reference, feats.expand(rank_lerf < c, xb))
                        y = primary_output(model(torch.cat([x_morf, x_lerf]), **kw2))
                        sk = _score(y, target, idx2, score, lab2).double().cpu()
                        morf[sl, k], lerf[sl, k] = sk[:b], sk[b:]
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    settings = {"features": repr(feats), "occlusion": repr(occl), "score": score,
                "step": str(step) if step is not None else f"1/{steps} of the features",
                "steps": str(s)}
    return PerturbationCurves(morf=morf, lerf=lerf, fraction=fraction,
                              target=targets if index_target else None, score=score,
                              features=nvalid.long(), settings=settings)

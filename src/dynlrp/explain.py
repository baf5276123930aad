"""Model-level convenience: explain a model's prediction in one call.

:func:`explain` owns the forward pass: it makes the input require grad (on a detached view,
never the caller's tensor), puts the model in eval mode, runs it, picks the explained score
(``target``), builds the seed and calls the engine -- then leaves the model as it found it.

Where the forward values come from (``mode=``):

``"auto"`` (default)
    The Promise System first (no copies of activations are kept), with the model passed to
    the engine so that frozen biases autograd never saw are read from their modules. If it
    still meets a value the graph cannot rebuild
    (:class:`~dynlrp.errors.UnrecoverableValueError`, e.g. a constant added inside the
    forward), the forward pass runs again inside :func:`dynlrp.record` and the tape serves
    the values.
    ``Explanation.mode`` says which one answered.
``"promise"``
    The Promise System only; raises where it cannot recover a value.
``"record"``
    One forward pass inside :func:`dynlrp.record` (more memory, never a second pass).

Inputs may be a tensor (a positional input; an integer tensor is read as token ids), or a
mapping of keyword inputs as a Hugging Face processor returns them. The explained key is the
first of ``input_ids``, ``inputs_embeds``, ``pixel_values``, ``input_values``,
``input_features`` present; the other keys are passed to the model unchanged. Token ids are
explained through the embedding: the model runs on
``inputs_embeds = model.get_input_embeddings()(input_ids)`` and relevance is summed over the
embedding dimension, one number per token.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import presets
from .engine import LRP
from .errors import GraphError, UnrecoverableValueError
from .record import record
from .targets import last_positions, primary_output

Target = int | torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None
LatentSpec = nn.Module | str | Callable[[Any], torch.Tensor]

EXPLAINED_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
MODES = ("auto", "promise", "record")


@dataclass
class Explanation:
    """The result of :func:`explain`: relevance, the explained scores and what produced them.

    Attributes
    ----------
    output
        The model's output (for a Hugging Face ``ModelOutput``: its ``logits``, else its
        first tensor), detached.
    target
        ``(B,)`` class indices that were explained, or ``None`` when the target was a
        callable or the output has no class axis.
    relevance
        Input relevance, shaped like the explained input (``(B, T)`` for token ids).
    delta
        Conservation check per example: the explained score minus the relevance sum. A
        0-d tensor when the score does not have one entry per example.
    stats
        The engine's statistics of the (last) LRP call (paper Table 4).
    score
        The explained value per example (the seed's sum).
    inputs
        The explained input values (token ids for ``input_ids``), detached.
    latent
        ``{name: relevance}`` for every ``at=`` entry, shaped like the captured tensor.
    embedding_relevance
        For token ids: relevance per token and embedding dimension, ``(B, T, D)``.
    mode
        ``"promise"`` or ``"record"``: where the forward values came from.
    meta
        Free-form string metadata, saved with the tensors.
    """

    output: torch.Tensor
    target: torch.Tensor | None
    relevance: torch.Tensor
    delta: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    score: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    latent: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding_relevance: torch.Tensor | None = None
    mode: str = "promise"
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.relevance.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the explanation under a flat name (``latent.NAME`` for latents)."""
        named = {"output": self.output, "relevance": self.relevance, "delta": self.delta,
                 "target": self.target, "score": self.score, "inputs": self.inputs,
                 "embedding_relevance": self.embedding_relevance}
        named.update({f"latent.{k}": v for k, v in self.latent.items()})
        return {k: v.detach().cpu().contiguous() for k, v in named.items() if v is not None}

    def metadata(self) -> dict[str, str]:
        """String metadata saved with the tensors: version, mode, stats (JSON) and ``meta``."""
        from . import __version__

        return {"dynlrp_version": __version__, "mode": self.mode,
                "stats": json.dumps(self.stats, default=str), **self.meta}

    def save(self, path: str | Path) -> Path:
        """Save the tensors and metadata; the format follows the suffix.

        Parameters
        ----------
        path
            ``.safetensors`` (needs the ``safetensors`` package), ``.npz`` (needs NumPy) or
            ``.pt`` (``torch.save``).

        Returns
        -------
        Path
            The file written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.tensors(), self.metadata()
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(path), metadata=meta)
        elif path.suffix == ".npz":
            import numpy as np

            arrays = {k: v.numpy() for k, v in tensors.items()}
            np.savez(path, __metadata__=np.array(json.dumps(meta)), **arrays)
        elif path.suffix == ".pt":
            torch.save({"tensors": tensors, "metadata": meta}, path)
        else:
            raise ValueError(f"cannot save an explanation as {path.suffix or 'a file without suffix'!r}; "
                             "use .safetensors, .npz or .pt")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        """Load an explanation written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        elif path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["__metadata__"]))
                tensors = {k: torch.from_numpy(data[k]) for k in data.files if k != "__metadata__"}
        elif path.suffix == ".pt":
            blob = torch.load(path, map_location="cpu", weights_only=True)
            tensors, meta = blob["tensors"], blob["metadata"]
        else:
            raise ValueError(f"cannot load an explanation from {path.suffix!r}; "
                             "use .safetensors, .npz or .pt")
        meta.pop("dynlrp_version", None)
        mode = meta.pop("mode", "promise")
        stats = json.loads(meta.pop("stats", "{}"))
        latent = {k[len("latent."):]: v for k, v in tensors.items() if k.startswith("latent.")}
        return cls(output=tensors["output"], target=tensors.get("target"), relevance=tensors["relevance"],
                   delta=tensors["delta"], stats=stats, score=tensors.get("score"),
                   inputs=tensors.get("inputs"), latent=latent,
                   embedding_relevance=tensors.get("embedding_relevance"), mode=mode, meta=meta)


def explain(
    model: nn.Module,
    inputs: torch.Tensor | Mapping[str, Any],
    target: Target = None,
    rules: Any = None,
    *,
    at: Mapping[str, LatentSpec] | None = None,
    mode: str = "auto",
    batch_size: int | None = None,
    progress: bool = False,
    eval_mode: bool = True,
    **forward_kwargs: Any,
) -> Explanation:
    """Explain ``model``'s prediction on ``inputs`` with LRP, in one call.

    Parameters
    ----------
    model
        Any ``nn.Module`` whose forward builds an autograd graph; Hugging Face models too.
    inputs
        A tensor (batch first; an integer tensor is read as token ids) or a mapping of
        keyword inputs (``input_ids``, ``inputs_embeds``, ``pixel_values``, ``input_values``
        or ``input_features`` is explained; other keys such as ``attention_mask`` are
        passed on).
    target
        What to explain, on the model output ``y`` (``logits`` for a ``ModelOutput``):

        * ``None``: each example's top class (argmax over the last axis);
        * an ``int``: that class for every example;
        * a tensor of ``B`` class indices, one per example;
        * a callable ``f(y) -> tensor``: explain that tensor's values (e.g. a logit
          difference, or a similarity of two embeddings); its ops are part of the graph.

        For outputs with more than two axes (``(B, T, V)`` sequence logits) the class axis
        is the last and the last position is explained -- a causal LM's next token; with an
        ``attention_mask`` in the inputs, each example's last real token (left or right
        padding). An output with one value per example (``(B,)``) is explained as it is.
    rules
        As for :func:`dynlrp.lrp`: a preset name, a mapping ``{op name or kind: Rule}`` or a
        RuleSet (bound to ``model`` for rules keyed by module) -- or an :class:`~dynlrp.LRP`
        engine to reuse, whose plan cache then serves later calls on the same architecture.
    at
        Latent relevance in the same pass: ``{name: where}`` with ``where`` a submodule, a
        submodule's dotted name (its output is captured with a forward hook; a module that
        runs several times gets the sum over its calls), or a callable that receives the
        model's raw output and returns an intermediate tensor of this forward pass (e.g.
        ``lambda out: out.hidden_states[2]`` with ``output_hidden_states=True``).
    mode
        ``"auto"``, ``"promise"`` or ``"record"`` (see the module docstring).
    batch_size
        Split ``inputs`` into batches of this size along the first axis (see
        :func:`explain_batches`); the results are concatenated.
    progress
        With ``batch_size``: show a tqdm progress bar.
    eval_mode
        Run the model in eval mode (dropout off, batch-norm running statistics); its
        previous mode is restored afterwards.
    **forward_kwargs
        Passed to ``model(...)`` as they are.

    Returns
    -------
    Explanation
        ``.relevance`` shaped like the inputs, ``.delta``, ``.output``, ``.target``,
        ``.stats``, ``.latent``.

    Examples
    --------
    >>> e = dynlrp.explain(model, images)                 # top class of each image
    >>> e.relevance.shape == images.shape
    True
    >>> e = dynlrp.explain(model, images, at={"block3": model.layer3})
    >>> e.latent["block3"].sum((2, 3))                    # relevance per channel
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if batch_size is not None:
        return explain_batches(model, _split(inputs, batch_size), target, rules, at=at, mode=mode,
                               progress=progress, eval_mode=eval_mode, **forward_kwargs)
    engine = rules if isinstance(rules, LRP) else LRP(_bound_rules(rules, model))
    with _ModelState(model, eval_mode):
        prepared = _prepare(model, inputs, forward_kwargs)
        if mode == "record":
            return _run(model, prepared, target, at, engine, recorded=True)
        try:
            return _run(model, prepared, target, at, engine, recorded=False)
        except UnrecoverableValueError:
            if mode == "promise":
                raise
            return _run(model, prepared, target, at, engine, recorded=True)


def explain_batches(
    model: nn.Module,
    batches: Iterable[Any],
    target: Target | str = None,
    rules: Any = None,
    *,
    at: Mapping[str, LatentSpec] | None = None,
    mode: str = "auto",
    progress: bool = True,
    total: int | None = None,
    eval_mode: bool = True,
    **forward_kwargs: Any,
) -> Explanation:
    """Explain an iterable of batches (a list, a generator, a ``DataLoader``) and concatenate.

    Parameters
    ----------
    model
        As for :func:`explain`.
    batches
        Each batch is what :func:`explain` takes as ``inputs``, or a tuple/list whose first
        item is (as a ``DataLoader`` yields ``(inputs, labels)``).
    target
        As for :func:`explain`; a tensor with one index per example of *all* batches is
        sliced batch by batch; ``"labels"`` explains each batch's second item (its labels).
    rules, at, mode, eval_mode, **forward_kwargs
        As for :func:`explain`.
    progress
        Show a tqdm progress bar (when tqdm is installed).
    total
        The number of batches, for the progress bar when ``batches`` has no ``len``.

    Returns
    -------
    Explanation
        The batches' results concatenated along the first axis; tensors whose other axes
        differ between batches (sequences of different lengths) are right-padded with zeros.
        ``stats`` are those of the last batch, with ``batches`` and ``examples`` counts.
    """
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    results: list[Explanation] = []
    offset = 0
    engine = rules if isinstance(rules, LRP) else LRP(_bound_rules(rules, model))  # one plan cache
    for batch in _progress(batches, progress, total):
        inputs, labels = batch, None
        if isinstance(batch, (tuple, list)):
            inputs, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        n = _batch_len(inputs)
        if isinstance(target, str):
            if target != "labels" or labels is None:
                raise ValueError("target='labels' needs batches of (inputs, labels); "
                                 f"got target={target!r}")
            t: Target = labels
        elif isinstance(target, torch.Tensor) and target.dim() == 1:
            t = target[offset:offset + n]
        else:
            t = target
        results.append(explain(model, inputs, t, engine, at=at, mode=mode, eval_mode=eval_mode,
                               **forward_kwargs))
        offset += n
    if not results:
        raise ValueError("explain_batches got no batches")
    return _concat(results)


# -- the forward pass ----------------------------------------------------------------------


def _bound_rules(rules: Any, model: nn.Module) -> Any:
    """The rule set, bound to ``model`` where it can be (rules keyed by module need it)."""
    ruleset = presets.resolve(rules)
    bind = getattr(ruleset, "bind", None)
    return bind(model) if callable(bind) else ruleset


class _ModelState:
    """Put the model in eval mode for the call; restore modes, grads and requires_grad after."""

    def __init__(self, model: nn.Module, eval_mode: bool) -> None:
        self.model = model
        self.eval_mode = eval_mode

    def __enter__(self) -> _ModelState:
        self.training = {m: m.training for m in self.model.modules()}
        self.params = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        if self.eval_mode:
            self.model.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.training.items():
            m.training = flag
        for p, requires_grad, grad in self.params:
            p.requires_grad_(requires_grad)
            p.grad = grad


@dataclass
class _Prepared:
    args: tuple
    kwargs: dict[str, Any]
    leaf: torch.Tensor  # the tensor relevance is requested for
    ids: torch.Tensor | None  # token ids when the leaf is their embedding
    batch: int


def _prepare(model: nn.Module, inputs: Any, forward_kwargs: dict[str, Any]) -> _Prepared:
    if isinstance(inputs, torch.Tensor):
        if inputs.is_floating_point() or inputs.is_complex():
            leaf = inputs.detach().requires_grad_(True)
            return _Prepared((leaf,), dict(forward_kwargs), leaf, None, _batch_of(inputs))
        inputs = {"input_ids": inputs}
    if not isinstance(inputs, Mapping):
        raise TypeError("inputs must be a tensor or a mapping of keyword inputs, "
                        f"not {type(inputs).__name__}")
    kwargs = {**inputs, **forward_kwargs}
    key = next((k for k in EXPLAINED_KEYS if kwargs.get(k) is not None), None)
    if key is None:
        raise ValueError(f"none of {EXPLAINED_KEYS} is in the keyword inputs {sorted(kwargs)}: "
                         "nothing to explain. Pass the input tensor itself for a plain model.")
    value = kwargs.pop(key)
    if key == "input_ids":
        if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
            raise TypeError(f"{type(model).__name__} has no get_input_embeddings(): cannot explain token "
                            "ids through the embedding. Pass inputs_embeds (float) instead.")
        with torch.no_grad():
            embeds = model.get_input_embeddings()(value)
        leaf = embeds.detach().requires_grad_(True)
        kwargs["inputs_embeds"] = leaf
        return _Prepared((), kwargs, leaf, value.detach(), _batch_of(value))
    leaf = value.detach().requires_grad_(True)
    kwargs[key] = leaf
    return _Prepared((), kwargs, leaf, None, _batch_of(value))


def _run(model: nn.Module, p: _Prepared, target: Target, at: Mapping[str, LatentSpec] | None,
         engine: LRP, recorded: bool) -> Explanation:
    latent_specs = dict(at or {})
    captures = _Captures(model, latent_specs)
    tape = record() if recorded else None
    try:
        with torch.enable_grad(), tape if tape is not None else contextlib.nullcontext():
            raw = model(*p.args, **p.kwargs)
    finally:
        captures.remove()
    y = primary_output(raw)
    latents = captures.tensors(raw)
    explained, seed, target_idx = _seed(y, target, p.batch, p.kwargs.get("attention_mask"))
    requested = [p.leaf, *[t for ts in latents.values() for t in ts]]
    try:
        rels = engine(explained, requested, seed, tape=tape, model=model)
    except GraphError as exc:
        names = ["the input", *[f"at[{k!r}]" for k, ts in latents.items() for _ in ts]]
        raise GraphError(f"{exc} (inputs here: {', '.join(names)})") from exc
    relevance, rest = rels[0], list(rels[1:])
    latent = {}
    for name, ts in latents.items():
        parts, rest = rest[:len(ts)], rest[len(ts):]
        latent[name] = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
    embedding_relevance = None
    if p.ids is not None:
        embedding_relevance, relevance = relevance, relevance.sum(-1)
    score = _per_example(seed, p.batch)
    delta = score - _per_example(relevance, p.batch) if score.dim() else score - relevance.sum()
    if tape is not None:
        tape.clear()
    return Explanation(
        output=y.detach(), target=target_idx, relevance=relevance.detach(), delta=delta.detach(),
        stats=dict(engine.stats), score=score.detach(),
        inputs=(p.ids if p.ids is not None else p.leaf.detach()), latent=latent,
        embedding_relevance=embedding_relevance, mode="record" if recorded else "promise",
    )


def _seed(
    y: torch.Tensor, target: Target, batch: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The tensor to propagate from, its seed, and the class indices explained."""
    if callable(target) and not isinstance(target, torch.Tensor):
        score = target(y)
        if not isinstance(score, torch.Tensor) or score.grad_fn is None:
            raise GraphError("the target callable must return a tensor computed from the model output "
                             "(with a grad_fn)")
        return score, score.detach(), None
    if y.dim() <= 1:
        if target is not None:
            raise ValueError(f"the model output has shape {tuple(y.shape)}: no class axis to pick "
                             f"target={target!r} from; use target=None or a callable")
        return y, y.detach(), None
    if y.shape[0] != batch:
        raise ValueError(f"the model output has {y.shape[0]} rows for {batch} examples; pass a callable "
                         "target to say what to explain")
    rows = torch.arange(batch, device=y.device)
    # the explained position of a sequence output: the last (real, with an attention mask) token
    if y.dim() == 3 and attention_mask is not None and tuple(attention_mask.shape) == tuple(y.shape[:2]):
        position: tuple = (rows, last_positions(attention_mask).to(y.device))
    else:
        position = (rows,) + (-1,) * (y.dim() - 2)
    scores = y.detach()[position]
    if target is None:
        idx = scores.argmax(-1)
    elif isinstance(target, int):
        idx = torch.full((batch,), target, dtype=torch.long, device=y.device)
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point():
            raise ValueError("a tensor target holds class indices (integers), one per example")
        idx = target.to(y.device).long().reshape(-1).expand(batch) if target.numel() == 1 \
            else target.to(y.device).long().reshape(-1)
        if idx.numel() != batch:
            raise ValueError(f"target has {idx.numel()} indices for {batch} examples")
    else:
        raise TypeError(f"target must be None, an int, a tensor or a callable, not {type(target).__name__}")
    classes = y.shape[-1]
    if ((idx < 0) | (idx >= classes)).any():
        raise ValueError(f"target indices must lie in [0, {classes}); got {idx.tolist()}")
    seed = torch.zeros_like(y.detach())
    seed[(*position, idx)] = scores[rows, idx]
    return y, seed, idx


def _per_example(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != batch:
        return t.sum()
    return t.reshape(batch, -1).sum(1)


def _batch_of(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 1


class _Captures:
    """Forward hooks and callables that capture the latent tensors requested with ``at=``."""

    def __init__(self, model: nn.Module, specs: dict[str, LatentSpec]) -> None:
        self.specs = specs
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, spec in specs.items():
            module = model.get_submodule(spec) if isinstance(spec, str) else spec
            if isinstance(module, nn.Module):
                self.seen[name] = []
                self.handles.append(module.register_forward_hook(self._hook(name)))
            elif not callable(spec):
                raise TypeError(f"at[{name!r}] must be a module, a module name or a callable, "
                                f"not {type(spec).__name__}")

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.seen[name].append(primary_output(out))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def tensors(self, raw: Any) -> dict[str, list[torch.Tensor]]:
        found: dict[str, list[torch.Tensor]] = {}
        for name, spec in self.specs.items():
            if name in self.seen:
                ts = self.seen[name]
                if not ts:
                    raise GraphError(f"at[{name!r}]: the module did not run in the forward pass")
                if len({tuple(t.shape) for t in ts}) > 1:
                    raise GraphError(f"at[{name!r}]: the module ran {len(ts)} times with different output "
                                     "shapes; capture one call with a callable instead")
            else:
                t = spec(raw)  # type: ignore[operator]
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"at[{name!r}] returned a {type(t).__name__}, not a tensor")
                ts = [t]
            found[name] = ts
        return found


# -- batches -------------------------------------------------------------------------------


def _batch_len(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return _batch_of(inputs)
    if isinstance(inputs, Mapping):
        for k in EXPLAINED_KEYS:
            if isinstance(inputs.get(k), torch.Tensor):
                return _batch_of(inputs[k])
    raise TypeError(f"a batch must be a tensor or a mapping of keyword inputs, not {type(inputs).__name__}")


def _split(inputs: Any, batch_size: int) -> list[Any]:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n = _batch_len(inputs)
    chunks = range(math.ceil(n / batch_size))
    if isinstance(inputs, torch.Tensor):
        return list(inputs.split(batch_size))
    return [{k: v[i * batch_size:(i + 1) * batch_size]
             if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
             for k, v in inputs.items()} for i in chunks]


def _progress(it: Iterable[Any], show: bool, total: int | None) -> Iterable[Any]:
    if not show:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return it
    return tqdm(it, total=total, desc="dynlrp", unit="batch")


def _pad_cat(ts: list[torch.Tensor]) -> torch.Tensor:
    if len({t.shape[1:] for t in ts}) > 1:
        if len({t.dim() for t in ts}) > 1:
            raise ValueError("cannot concatenate results whose number of axes differs between batches")
        size = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
        ts = [torch.nn.functional.pad(t, [p for d in reversed(range(1, t.dim()))
                                          for p in (0, size[d - 1] - t.shape[d])]) for t in ts]
    return torch.cat(ts)


def _concat(results: list[Explanation]) -> Explanation:
    if len(results) == 1:
        return results[0]

    def cat(get: Callable[[Explanation], torch.Tensor | None]) -> torch.Tensor | None:
        ts = [get(r) for r in results]
        if any(t is None for t in ts):
            return None
        if any(t.dim() == 0 for t in ts):
            return torch.stack(ts)
        return _pad_cat(ts)

    last = results[-1]
    return Explanation(
        output=cat(lambda r: r.output), target=cat(lambda r: r.target), relevance=cat(lambda r: r.relevance),
        delta=cat(lambda r: r.delta),
        stats={**last.stats, "batches": len(results), "examples": sum(len(r) for r in results)},
        score=cat(lambda r: r.score), inputs=cat(lambda r: r.inputs),
        latent={k: cat(lambda r, k=k: r.latent[k]) for k in last.latent},
        embedding_relevance=cat(lambda r: r.embedding_relevance),
        mode="record" if any(r.mode == "record" for r in results) else "promise", meta=dict(last.meta),
    )

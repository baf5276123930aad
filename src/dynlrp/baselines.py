"""Attribution baselines in one call, for faithfulness comparisons with dynlrp.

:func:`attribute` runs any of these on the same model, inputs and targets and returns
relevance shaped like the inputs:

==========================  ===================================================================
method                      what it computes
==========================  ===================================================================
``dynlrp[:preset]``         dynlrp (:func:`dynlrp.explain`), optionally with a preset name
                            (``"dynlrp:epsilon_plus"``) or ``rules=``
``saliency``                Captum ``Saliency``: ``|d y_t / d x|``
``input_x_gradient``        Captum ``InputXGradient``: ``x * d y_t / d x``
``smoothgrad``              Captum ``NoiseTunnel(Saliency)``: mean ``|gradient|`` over noisy copies
``integrated_gradients``    Captum ``IntegratedGradients`` from a zero baseline
``gradient_shap``           Captum ``GradientShap`` with a zero baseline
``zennit[:composite]``      Zennit LRP with a composite (default ``epsilon_plus``); module-level,
                            so functional ops get the plain gradient; not for attention models
``lxt``                     LxT's efficient AttnLRP (gradient x input on its patched model):
                            Hugging Face BERT-family encoders (CP-LRP for torchvision ViT)
``random``                  uniform noise (the floor any method should beat)
==========================  ===================================================================

Captum, Zennit and LxT are optional (the ``eval`` extra) and imported only when used. The
model is called as ``model(x, **forward_kwargs)`` and its output (a tensor or anything with
``.logits``) must hold ``(B, C)`` logits; the explained score is the target logit. Models
are used as they are (mode, device); LxT runs on a converted copy (see :func:`lxt_model`)
and its patches of ``torch.nn`` classes are undone after every call.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .metrics.perturbation import resolve_target
from .targets import primary_output

METHODS = ("dynlrp", "saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "gradient_shap",
           "zennit", "lxt", "random")

_ALIASES = {"ixg": "input_x_gradient", "inputxgrad": "input_x_gradient", "ig": "integrated_gradients",
            "gradshap": "gradient_shap", "gradientshap": "gradient_shap", "attnlrp": "lxt"}

Target = int | torch.Tensor | None


class NotApplicableError(ValueError):
    """The method does not apply to this model (e.g. LxT on a CNN, Zennit on attention)."""


def _parse(method: str) -> tuple[str, str | None]:
    name, _, variant = method.partition(":")
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return name, variant or None


def _targets(model: Callable[..., Any], x: torch.Tensor, target: Target,
             forward_kwargs: Mapping[str, Any]) -> torch.Tensor:
    if isinstance(target, torch.Tensor) and target.numel() == len(x):
        return target.to(x.device).long().reshape(-1)
    with torch.no_grad():
        y = primary_output(model(x, **forward_kwargs))
    return resolve_target(y, target)


def _onehot_seed(y: torch.Tensor, idx: torch.Tensor, scale: bool) -> torch.Tensor:
    seed = torch.zeros_like(y)
    rows = torch.arange(len(idx), device=y.device)
    seed[rows, idx] = y.detach()[rows, idx] if scale else 1.0
    return seed


def applies(method: str, model: Any) -> bool:
    """Whether :func:`attribute` can run ``method`` on ``model`` (packages installed, model kind).

    Parameters
    ----------
    method
        A method name (with an optional ``:variant``).
    model
        The model.

    Returns
    -------
    bool
    """
    name, _ = _parse(method)
    if name in ("zennit", "lxt") and not isinstance(model, nn.Module):
        return False
    try:
        if name == "zennit":
            import zennit  # noqa: F401
            return not _has_attention(model)
        if name == "lxt":
            _lxt_patches(model)
            return True
        if name in ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "gradient_shap"):
            import captum  # noqa: F401
    except (ImportError, NotApplicableError):
        return False
    return True


def attribute(
    method: str,
    model: Callable[..., Any],
    x: torch.Tensor,
    target: Target = None,
    *,
    forward_kwargs: Mapping[str, Any] | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Relevance of ``x`` for the ``target`` logit of ``model(x, **forward_kwargs)`` by ``method``.

    Parameters
    ----------
    method
        One of :data:`METHODS` (see the module docstring), optionally ``name:variant``:
        ``"dynlrp:epsilon_gamma_box"`` (a preset), ``"zennit:epsilon_plus_flat"`` (a composite).
    model
        A callable (an ``nn.Module`` for Zennit and LxT) returning ``(B, C)`` logits or an
        output with ``.logits``.
    x
        The floating point input batch to attribute to (images, or token embeddings with
        ``forward_kwargs`` such as the attention mask).
    target
        ``None`` (each example's predicted class), an int or ``B`` class indices.
    forward_kwargs
        More keyword inputs of the model (tensors with ``B`` rows are expanded along with
        ``x`` by the sampling methods).
    **kw
        Method options:

        * dynlrp: ``rules`` (a preset name, mapping, RuleSet or ``dynlrp.LRP``), ``mode``;
        * smoothgrad: ``samples`` (16), ``noise`` (0.15: the noise standard deviation as a
          fraction of the batch's value range), ``abs`` (True);
        * integrated_gradients: ``steps`` (32), ``baseline`` (0.0), ``internal_batch_size``;
        * gradient_shap: ``samples`` (16), ``baseline`` (0.0), ``stdevs`` (0.0);
        * saliency: ``abs`` (True);
        * zennit: ``composite`` (a name or a Zennit composite), ``canonizers``, and the
          composite's arguments (``low`` / ``high`` of ``epsilon_gamma_box`` default to the
          batch's minimum and maximum);
        * random: ``seed``.

    Returns
    -------
    torch.Tensor
        Shaped like ``x``, detached.
    """
    name, variant = _parse(method)
    fkw = dict(forward_kwargs or {})
    if name == "random":
        seed = kw.pop("seed", None)
        _no_options(name, kw)
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return torch.rand(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    idx = _targets(model, x, target, fkw)
    if name == "dynlrp":
        return _dynlrp(model, x, idx, fkw, variant, **kw)
    if name == "zennit":
        return _zennit(model, x, idx, fkw, variant, **kw)
    if name == "lxt":
        _no_options(name, kw)
        return _lxt(model, x, idx, fkw)
    return _captum(name, model, x, idx, fkw, **kw)


def method(name: str, model: Callable[..., Any], **kw: Any) -> Callable[..., torch.Tensor]:
    """``fn(x, target, **forward_kwargs)`` running :func:`attribute` -- a method for
    :func:`dynlrp.metrics.evaluate`.

    Parameters
    ----------
    name
        As for :func:`attribute`.
    model
        The model.
    **kw
        Options of the method, as for :func:`attribute`.

    Returns
    -------
    callable
    """
    _parse(name)

    def fn(x: torch.Tensor, target: Target = None, **forward_kwargs: Any) -> torch.Tensor:
        return attribute(name, model, x, target, forward_kwargs=forward_kwargs, **kw)

    fn.__name__ = f"attribute_{name.replace(':', '_')}"
    return fn


def _no_options(name: str, kw: Mapping[str, Any]) -> None:
    if kw:
        raise TypeError(f"{name} takes no options {sorted(kw)}")


# -- dynlrp ----------------------------------------------------------------------------------

_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _dynlrp(model: Callable[..., Any], x: torch.Tensor, idx: torch.Tensor, fkw: dict[str, Any],
            variant: str | None, rules: Any = None, mode: str = "auto") -> torch.Tensor:
    from .engine import LRP
    from .explain import explain
    from .presets import resolve

    if rules is None:
        rules = variant
    elif variant is not None:
        raise TypeError(f"dynlrp:{variant} and rules= both choose the rules; give one")
    engine = rules
    if rules is None or isinstance(rules, str):  # one engine (plan cache) per model and preset
        per_model = _ENGINES.setdefault(model, {})
        if rules not in per_model:
            per_model[rules] = LRP(resolve(rules))
        engine = per_model[rules]
    module = model if isinstance(model, nn.Module) else _Wrapped(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        e = explain(module, x, idx, rules=engine, mode=mode, eval_mode=False, **fkw)
    return e.relevance.detach()


class _Wrapped(nn.Module):
    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


# -- Captum ----------------------------------------------------------------------------------


def _captum_module() -> Any:
    try:
        import captum.attr as ca
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the gradient baselines use Captum: pip install captum (the 'eval' extra)") from exc
    return ca


def _captum(name: str, model: Callable[..., Any], x: torch.Tensor, idx: torch.Tensor, fkw: dict[str, Any],
            **kw: Any) -> torch.Tensor:
    ca = _captum_module()
    keys = list(fkw)
    extra = tuple(fkw[k] for k in keys) or None

    def forward(inp: torch.Tensor, *args: Any) -> torch.Tensor:
        return primary_output(model(inp, **dict(zip(keys, args))))

    x = x.detach().requires_grad_(True)  # Captum warns when it has to set this itself
    common = {"target": idx, "additional_forward_args": extra}
    with torch.enable_grad():
        if name == "saliency":
            absolute = kw.pop("abs", True)
            _no_options(name, kw)
            out = ca.Saliency(forward).attribute(x, abs=absolute, **common)
        elif name == "input_x_gradient":
            _no_options(name, kw)
            out = ca.InputXGradient(forward).attribute(x, **common)
        elif name == "smoothgrad":
            samples = int(kw.pop("samples", 16))
            noise = float(kw.pop("noise", 0.15))
            absolute = kw.pop("abs", True)
            batch = kw.pop("samples_batch_size", None)
            _no_options(name, kw)
            stdev = noise * float((x.detach().max() - x.detach().min()).clamp_min(1e-12))
            out = ca.NoiseTunnel(ca.Saliency(forward)).attribute(
                x, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=batch, stdevs=stdev,
                abs=absolute, **common)
        elif name == "integrated_gradients":
            steps = int(kw.pop("steps", 32))
            baseline = kw.pop("baseline", 0.0)
            internal = kw.pop("internal_batch_size", None)
            _no_options(name, kw)
            out = ca.IntegratedGradients(forward).attribute(
                x, baselines=_baseline(baseline, x), n_steps=steps, internal_batch_size=internal, **common)
        elif name == "gradient_shap":
            samples = int(kw.pop("samples", 16))
            baseline = kw.pop("baseline", 0.0)
            stdevs = float(kw.pop("stdevs", 0.0))
            _no_options(name, kw)
            base = _baseline(baseline, x)
            base = base[:1] if base.shape == x.shape else base
            out = ca.GradientShap(forward).attribute(x, baselines=base, n_samples=samples, stdevs=stdevs,
                                                     **common)
        else:  # pragma: no cover - _parse guards
            raise ValueError(name)
    return out.detach()


def _baseline(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=x.dtype).expand_as(x).contiguous()
    return torch.full_like(x, float(value))


# -- Zennit ----------------------------------------------------------------------------------


def _has_attention(model: nn.Module) -> bool:
    return any("attention" in type(m).__name__.lower() for m in model.modules())


def _zennit(model: Callable[..., Any], x: torch.Tensor, idx: torch.Tensor, fkw: dict[str, Any],
            variant: str | None, composite: Any = None, canonizers: Sequence[Any] | None = None,
            **ckw: Any) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise NotApplicableError("Zennit hooks modules: the model must be a torch.nn.Module")
    if _has_attention(model):
        raise NotApplicableError("Zennit has no rules for attention (its hooks fail on or silently pass "
                                 "through attention modules)")
    try:
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import COMPOSITES
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the Zennit baseline needs zennit (the 'eval' extra)") from exc
    if composite is None:
        composite = variant or "epsilon_plus"
    elif variant is not None:
        raise TypeError(f"zennit:{variant} and composite= both choose the composite; give one")
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise ValueError(f"unknown Zennit composite {composite!r}; known: {sorted(COMPOSITES)}")
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if canonizers is None and has_bn:
            canonizers = [SequentialMergeBatchNorm()]
        if composite == "epsilon_gamma_box":
            ckw.setdefault("low", float(x.min()))
            ckw.setdefault("high", float(x.max()))
        composite = COMPOSITES[composite](canonizers=list(canonizers) if canonizers else None, **ckw)
    elif ckw or canonizers:
        raise TypeError("options go to a composite given by name; build the composite with them instead")
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), composite.context(model) as hooked:
        y = primary_output(hooked(x, **fkw))
        (grad,) = torch.autograd.grad(y, x, _onehot_seed(y, idx, scale=True))
    return grad.detach()


# -- LxT -------------------------------------------------------------------------------------

_LXT_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _lxt_patches(model: nn.Module) -> tuple[nn.Module, list[tuple[type, Callable[[type], Any]]]]:
    """The model LxT runs (a converted copy for BERT) and its class patches."""
    try:
        import lxt.efficient.patches  # noqa: F401
    except ImportError as exc:
        raise ImportError("the LxT baseline needs lxt (the 'eval' extra)") from exc
    with contextlib.suppress(ImportError):
        from torchvision.models.vision_transformer import VisionTransformer

        if any(isinstance(m, VisionTransformer) for m in model.modules()):
            from lxt.efficient.models.vit_torch import cp_LRP

            return model, [(k, v) for k, v in cp_LRP.items() if isinstance(k, type)]
    with contextlib.suppress(ImportError):
        import transformers.models.bert.modeling_bert as hf_bert

        if any(isinstance(m, hf_bert.BertModel) for m in model.modules()):
            import lxt.efficient.models.bert as lxt_bert

            return lxt_model(model), [(k, v) for k, v in lxt_bert.attnLRP.items() if isinstance(k, type)]
    raise NotApplicableError(f"LxT has no patch for {type(model).__name__} here (supported: Hugging Face "
                             "BERT-family encoders, torchvision VisionTransformer)")


def lxt_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Hugging Face BERT modules are LxT's AttnLRP versions.

    LxT implements AttnLRP by editing model source files; its BERT is a patched copy of
    ``transformers``' ``modeling_bert``. Instead of swapping that module process-wide (LxT's
    ``monkey_patch``), the outermost ``transformers`` BERT modules of a deep copy are rebuilt
    from LxT's classes with the same config and weights. Cached per model (weights are
    copied once: re-create the model after changing them).

    Parameters
    ----------
    model
        A model containing ``transformers`` BERT modules (``BertModel``, ``BertFor...``).

    Returns
    -------
    torch.nn.Module
        The converted copy (the input model is not changed).
    """
    if model in _LXT_MODELS:
        return _LXT_MODELS[model]
    import lxt.efficient.models.bert as lxt_bert
    import transformers.models.bert.modeling_bert as hf_bert

    def convert(module: nn.Module) -> nn.Module:
        cls = type(module)
        if cls.__module__ == hf_bert.__name__ and hasattr(lxt_bert, cls.__name__):
            args = {"add_pooling_layer": module.pooler is not None} if cls is hf_bert.BertModel else {}
            new = getattr(lxt_bert, cls.__name__)(module.config, **args)
            new.load_state_dict(module.state_dict())
            p = next(module.parameters(), None)
            if p is not None:
                new = new.to(device=p.device, dtype=p.dtype)
            return new.train(module.training)
        for child_name, child in list(module.named_children()):
            new_child = convert(child)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    converted = convert(copy.deepcopy(model))
    _LXT_MODELS[model] = converted
    return converted


_PATCHED_ATTRS = ("forward", "original_forward")


@contextlib.contextmanager
def lxt_patched(patches: Sequence[tuple[type, Callable[[type], Any]]]) -> Iterator[None]:
    """Apply LxT's class patches (``{torch.nn.LayerNorm: patch, ...}`` items) and undo them on exit.

    Parameters
    ----------
    patches
        ``(class, patch)`` pairs as in LxT's patch maps; ``patch(class)`` replaces methods.
    """
    saved = [(cls, {a: cls.__dict__[a] for a in _PATCHED_ATTRS if a in cls.__dict__}) for cls, _ in patches]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for cls, patch in patches:
                patch(cls)
        yield
    finally:
        for cls, attrs in saved:
            for a in _PATCHED_ATTRS:
                if a in attrs:
                    setattr(cls, a, attrs[a])
                elif a in cls.__dict__:
                    delattr(cls, a)


def _lxt(model: Callable[..., Any], x: torch.Tensor, idx: torch.Tensor, fkw: dict[str, Any]) -> torch.Tensor:
    if not isinstance(model, nn.Module):
        raise NotApplicableError("LxT patches modules: the model must be a torch.nn.Module")
    run, patches = _lxt_patches(model)
    x = x.detach().requires_grad_(True)
    with lxt_patched(patches), torch.enable_grad():
        y = primary_output(run(x, **fkw))
        # LxT's relevance is input x gradient: a one-hot seed makes the output relevance the logit
        (grad,) = torch.autograd.grad(y, x, _onehot_seed(y, idx, scale=False))
    return (x * grad).detach()


__all__ = ["attribute", "method", "applies", "METHODS", "NotApplicableError", "lxt_model", "lxt_patched"]

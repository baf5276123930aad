"""The explanation methods the benchmarks compare, each one forward + one explanation.

A method is built for a :class:`~zoo.Problem` once (:func:`make`) and then run many times
(``method.run(clock)``); ``clock("forward")`` and ``clock("explain")`` time the two phases
where a method has them separately (Zennit, Captum and LxT run the forward inside their
own call, so only their total is comparable).

========================  ==================================================================
name                      what one run does
========================  ==================================================================
``grad``                  forward, ``torch.autograd.grad`` with the seed, times the input
``dynlrp``                forward, a *new* ``dynlrp.LRP(rules)`` on it (promise mode, first
                          call; ``rules``: ``problem.extra["rules"]``, a preset name)
``dynlrp_recorded``       forward inside ``dynlrp.record()``, ``lrp(..., tape=tape)``
``dynlrp_cached``         forward of a new input, the *same* ``LRP`` instance as every
                          earlier run (its second and later calls: a cached plan if the engine
                          keeps one)
``dynlrp_epsilon``        as ``dynlrp``, with the ``epsilon`` preset whatever the problem's rules:
                          the rules of Captum's LRP (epsilon on every layer; CNNs)
``zennit``                Zennit ``EpsilonPlus`` with the torchvision canonizers, ``Gradient``
                          attributor (CNNs)
``captum``                Captum ``LRP`` (default epsilon rules; VGG16)
``lxt``                   LxT efficient AttnLRP (CP-LRP for ViT): gradient x input on the
                          monkey-patched model; :func:`lxt_patch` must run before the model
                          is built, in its own process
========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from benchutil import Clock
from zoo import Problem, top_logit_seed

DYNLRP = ("dynlrp", "dynlrp_recorded", "dynlrp_cached")
LABELS = {
    "grad": "gradient x input",
    "dynlrp": "dynlrp promise (1st call)",
    "dynlrp_recorded": "dynlrp recorded",
    "dynlrp_cached": "dynlrp 2nd call (same engine, new forward)",
    "dynlrp_epsilon": "dynlrp epsilon (1st call)",
    "zennit": "Zennit EpsilonPlus",
    "captum": "Captum LRP",
    "lxt": "LxT AttnLRP (efficient)",
}


def applicable(method: str, model: str) -> bool:
    """Whether ``method`` is part of the comparison for ``model``."""
    if method == "zennit":
        return model in ("vgg16", "resnet50")
    if method == "captum":
        return model == "vgg16"
    if method == "dynlrp_epsilon":
        return model in ("vgg16", "resnet50")
    if method == "lxt":
        return model in ("bert", "llama", "vit_b_16")
    return True


class Method:
    """A method set up for one problem: ``run(clock)`` does one forward + explanation."""

    def __init__(self, name: str, run: Callable[[Clock], torch.Tensor]) -> None:
        self.name = name
        self._run = run
        self.info: dict[str, Any] = {}
        self.relevance_sum: float | None = None

    def run(self, clock: Clock) -> None:
        r = self._run(clock)
        self.relevance_sum = float(r.detach().sum())


def _input(p: Problem, x: torch.Tensor | None = None) -> torch.Tensor:
    return (p.x if x is None else x).detach().clone().requires_grad_(True)


def grad(p: Problem) -> Method:
    """Plain gradient x input."""
    x = _input(p)

    def run(clock: Clock) -> torch.Tensor:
        with clock("forward"):
            y = p.forward(x)
        with clock("explain"):
            g, = torch.autograd.grad(y, x, top_logit_seed(y))
            return x.detach() * g

    return Method("grad", run)


def rules_for(p: Problem) -> tuple[Any, str]:
    """The dynlrp rules of ``p`` (``p.extra["rules"]``, a preset name) and how to label them.

    A preset this dynlrp does not have falls back to the defaults, and the label says so.
    """
    from dynlrp import presets

    name = p.extra.get("rules")
    if name is None:
        return None, "default"
    if name not in presets.PRESETS:
        return None, f"default (no preset {name!r})"
    return name, name


def _engine_call(p: Problem) -> tuple[Callable[..., Any], dict[str, Any]]:
    """A fresh ``dynlrp.LRP`` for ``p`` and the keyword arguments its call accepts.

    The model is passed (``model=``) where the engine takes it: then promise mode reads the
    frozen parameters autograd did not keep instead of failing on them.
    """
    import dynlrp

    rules, label = rules_for(p)
    engine = dynlrp.LRP(rules)
    kwargs = {"model": p.model} if "model" in inspect.signature(engine.__call__).parameters else {}
    return engine, {"rules": label, "model_passed": bool(kwargs), "kwargs": kwargs}


def dynlrp_epsilon(p: Problem) -> Method:
    """dynlrp promise mode, first call of a fresh engine, with the ``epsilon`` preset."""
    method = dynlrp_promise(dataclasses.replace(p, extra={**p.extra, "rules": "epsilon"}))
    method.name = "dynlrp_epsilon"
    return method


def dynlrp_promise(p: Problem) -> Method:
    """dynlrp promise mode, first call of a fresh engine."""
    x = _input(p)
    method = Method("dynlrp", lambda clock: None)

    def run(clock: Clock) -> torch.Tensor:
        with clock("forward"):
            y = p.forward(x)
        with clock("explain"):
            engine, how = _engine_call(p)
            r, = engine(y, x, top_logit_seed(y), **how.pop("kwargs"))
        method.info = {**how, "stats": dict(engine.stats)}
        return r

    method._run = run
    return method


def dynlrp_recorded(p: Problem) -> Method:
    """dynlrp recorded mode: the forward runs under ``dynlrp.record()``."""
    import dynlrp

    x = _input(p)
    method = Method("dynlrp_recorded", lambda clock: None)

    def run(clock: Clock) -> torch.Tensor:
        with clock("forward"), dynlrp.record() as tape:
            y = p.forward(x)
        with clock("explain"):
            engine, how = _engine_call(p)
            r, = engine(y, x, top_logit_seed(y), tape=tape, **how.pop("kwargs"))
        tape.clear()
        method.info = how
        return r

    method._run = run
    return method


def dynlrp_cached(p: Problem) -> Method:
    """One engine for every run, each on a new input: its second and later calls."""
    engine, how = _engine_call(p)
    kwargs = how.pop("kwargs")
    xs = [_input(p, p.fresh_input(seed)) for seed in (1, 2)]
    method = Method("dynlrp_cached", lambda clock: None)
    calls = [0]

    def run(clock: Clock) -> torch.Tensor:
        x = xs[calls[0] % 2]
        calls[0] += 1
        with clock("forward"):
            y = p.forward(x)
        with clock("explain"):
            r, = engine(y, x, top_logit_seed(y), **kwargs)
        method.info = {**how, "calls": calls[0], **plan_cache_info(engine)}
        return r

    method._run = run
    return method


def plan_cache_info(engine: Any) -> dict[str, Any]:
    """What the engine shows of a plan cache (paper 4.4.1): its size and whether a call hit it."""
    cache = getattr(engine, "plan_cache", None)
    if cache is None:
        cache = getattr(engine, "plans", None)
    return {
        "plan_cache": None if cache is None else f"{type(cache).__name__} ({len(cache)} plans)",
        "plan_stats": {k: v for k, v in engine.stats.items() if "plan" in k or "cache" in k},
    }


def zennit(p: Problem) -> Method:
    """Zennit EpsilonPlus with the model's torchvision canonizer."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    canonizers = {"vgg16": [VGGCanonizer()], "resnet50": [ResNetCanonizer()]}[p.name]
    composite = EpsilonPlus(canonizers=canonizers)
    x = p.x.detach()

    def run(clock: Clock) -> torch.Tensor:
        with Gradient(model=p.model, composite=composite) as attributor:
            _, r = attributor(x, top_logit_seed)
        return r

    return Method("zennit", run)


def captum(p: Problem) -> Method:
    """Captum's LRP (its default epsilon rules) for each example's top class."""
    from captum.attr import LRP as CaptumLRP

    x = _input(p)
    with torch.no_grad():
        targets = p.forward(x).argmax(1).tolist()
    lrp = CaptumLRP(p.model)

    def run(clock: Clock) -> torch.Tensor:
        return lrp.attribute(x, target=targets)

    return Method("captum", run)


def lxt(p: Problem) -> Method:
    """LxT efficient: gradient x input on a model built after :func:`lxt_patch`."""
    method = grad(p)
    method.name = "lxt"
    return method


def lxt_patch(model: str) -> None:
    """Monkey-patch the library module of ``model`` with LxT's rules (process-global)."""
    from lxt.efficient import monkey_patch

    if model == "bert":
        from transformers.models.bert import modeling_bert as module
    elif model == "llama":
        from transformers.models.llama import modeling_llama as module
    elif model == "vit_b_16":
        from torchvision.models import vision_transformer as module
    else:
        raise ValueError(f"LxT has no patch for {model!r}")
    monkey_patch(module)


FACTORIES: dict[str, Callable[[Problem], Method]] = {
    "grad": grad,
    "dynlrp": dynlrp_promise,
    "dynlrp_recorded": dynlrp_recorded,
    "dynlrp_cached": dynlrp_cached,
    "dynlrp_epsilon": dynlrp_epsilon,
    "zennit": zennit,
    "captum": captum,
    "lxt": lxt,
}


def make(name: str, p: Problem) -> Method:
    """Set up method ``name`` for problem ``p``."""
    return FACTORIES[name](p)

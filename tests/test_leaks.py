"""Leaks: 1,000 consecutive explanations of a torchvision ResNet-18 and of a tiny Llama keep the
process's memory flat, and the engine holds no reference to a graph or tensor once it returns.

Each loop runs a fresh forward pass and explains it, as a user explaining a data set would:
every call goes through one shared engine (its plan cache; the cached path) and every 50th
through :func:`dynlrp.lrp` (a new engine: the promise search). Resident memory is read after
``gc.collect()`` and glibc's ``malloc_trim`` (so freed heap pages count as freed) at iteration
10 -- after the allocator and the plan cache have warmed up -- and at the end.

Inputs are small (ResNet-18 on 2 x 3 x 16 x 16: the cost per call is the traversal, not the
convolutions) so that both loops together take about a minute on one core;
``DYNLRP_LEAK_ITERATIONS`` changes the count.
"""

from __future__ import annotations

import ctypes
import gc
import os
import weakref

import pytest
import torch

import dynlrp
from models import randomize_affine, tiny_llama

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

ITERATIONS = int(os.environ.get("DYNLRP_LEAK_ITERATIONS", "1000"))
#: Growth of resident memory allowed between iteration 10 and the end, in MB. One leaked
#: ResNet-18 graph at this size holds ~1 MB of saved activations, so a leak of one graph per
#: call would grow by about 1 GB.
DRIFT_MB = 4.0


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay mapped, RSS is an upper bound
        pass


def _rss_mb() -> float:
    _trim()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _seed(y: torch.Tensor) -> torch.Tensor:
    t = y.argmax(-1, keepdim=True)
    return torch.zeros_like(y).scatter(-1, t, y.gather(-1, t)).detach()


def _resnet():
    torch.manual_seed(0)
    model = randomize_affine(torchvision.models.resnet18(num_classes=10)).eval().requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    return model, x, lambda m, xi: m(xi), None


def _llama():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.mark.parametrize("build", [_resnet, _llama], ids=["resnet18", "llama"])
def test_memory_stays_flat_over_1000_explanations(build):
    model, x, forward, rules = build()
    engine = dynlrp.LRP(rules)
    samples: dict[int, float] = {}
    for i in range(ITERATIONS):
        xi = x.clone().requires_grad_(True)
        y = forward(model, xi)
        if i % 50 == 49:
            r, = dynlrp.lrp(y, xi, _seed(y), rules=rules, model=model)
        else:
            r, = engine(y, xi, _seed(y), model=model)
        assert r.shape == x.shape
        if i in (9, ITERATIONS // 2, ITERATIONS - 1):
            del xi, y, r
            samples[i] = _rss_mb()
    drift = samples[ITERATIONS - 1] - samples[9]
    print(f"RSS MB at iterations {list(samples)}: {[round(v, 1) for v in samples.values()]}, "
          f"drift {drift:.2f}")
    assert drift < DRIFT_MB, samples
    assert len(engine.plans) == 1  # one architecture and shape: one plan, reused


def test_engine_keeps_no_reference_after_returning():
    """Weak references to the output, the input and an intermediate activation (which the
    graph saves, so it lives as long as the graph) all die once the caller drops them -- after calls in both
    promise and recorded mode, through a cached plan and through :func:`dynlrp.explain`."""
    model, x, forward, _ = _resnet()
    engine = dynlrp.LRP()
    kept: dict[str, weakref.ref] = {}

    def hook(module, args, out):
        kept["activation"] = weakref.ref(out)

    handle = model.layer2.register_forward_hook(hook)
    try:
        for mode in ("promise", "cached", "recorded", "explain"):
            xi = x.clone().requires_grad_(True)
            if mode == "recorded":
                with dynlrp.record() as tape:
                    y = forward(model, xi)
                engine(y, xi, _seed(y), tape=tape)
                del tape
            elif mode == "explain":
                e = dynlrp.explain(model, xi)
                assert e.relevance.shape == x.shape
                y = e.output
                del e
            else:
                y = forward(model, xi)
                engine(y, xi, _seed(y), model=model)
            refs = {"input": weakref.ref(xi), "output": weakref.ref(y), **kept}
            del xi, y
            kept.clear()
            gc.collect()
            alive = [name for name, ref in refs.items() if ref() is not None]
            assert not alive, f"{mode}: still referenced after the call: {alive}"
    finally:
        handle.remove()
    for plan in engine.plans.values():
        for value in vars(plan).values():
            assert not isinstance(value, torch.Tensor)


@pytest.mark.parametrize("mode", ["promise", "cached", "recorded"])
def test_a_call_leaves_no_reference_cycle(mode):
    """Everything a call makes is freed by reference counting when it returns: the engine
    pauses the cyclic collector during a call, so a cycle holding a tensor (an exception kept
    in a local: its traceback holds the frame) would hold the tensor until the collector ran --
    50 MiB more peak memory on ResNet-50. Frozen batch-norm biases exercise the path where a
    replay meets a missing operand and retries with the model's bias."""
    model = _resnet()[0]
    engine = dynlrp.LRP("epsilon_plus")
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(2 if mode == "cached" else 1):
            x = torch.randn(1, 3, 16, 16, requires_grad=True)
            with dynlrp.record() as tape:
                y = model(x)
            engine(y, x, _seed(y), model=model, tape=tape if mode == "recorded" else None)
        del x, y, tape
        gc.collect()
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
        frames = {o.f_code.co_name for o in gc.garbage if type(o).__name__ == "frame"}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    assert not tensors, f"{len(tensors)} tensors in reference cycles; frames: {sorted(frames)}"

"""Relevance propagated by autograd's engine (dynlrp.gradform) against the Python traversal.

Where every rule on the way is a gradient (``Rule.as_gradient``), a call runs on autograd's
engine with hooks; it must give the Python traversal's
relevance, leave the graph as the Python traversal does, and fall back to it wherever it does
not apply. (The other tests take the Python traversal, tests/conftest.py: here the defaults are
restored.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp import gradform
from models import (
    CNN,
    LRP0,
    MLP,
    ConvBNBlock,
    DownsampleBlock,
    ResidualCNN,
    assert_close,
    freeze,
    per_row_seed,
    randomize_affine,
)


@pytest.fixture(autouse=True)
def _autograds_engine(monkeypatch):
    """The library's defaults: graphs run on autograd's engine whatever their size."""
    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 1 << 14)
    monkeypatch.setattr(gradform, "MAX_ELEMENTS", None)


def both(fn):
    """``fn()`` on autograd's engine and on the Python traversal: (relevances, stats) of each."""
    fast, stats_fast = fn()
    gradform.ENABLED = False
    try:
        slow, stats_slow = fn()
    finally:
        gradform.ENABLED = True
    return fast, stats_fast, slow, stats_slow


class Chain(nn.Module):
    """``h = 0.9 * (h + W2 relu(W1 h))``: matrix products, a ReLU, a sum, a scale."""

    def __init__(self, blocks: int = 6, width: int = 5) -> None:
        super().__init__()
        self.w1 = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))
        self.w2 = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(blocks))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for w1, w2 in zip(self.w1, self.w2):
            h = 0.9 * (h + w2(torch.relu(w1(h))))
        return h


class Gated(nn.Module):
    """A product of two activations, a difference, a quotient by a constant and a negation."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) * self.b(x)
        return self.c(-(h - torch.relu(self.b(x))) / 2.0)


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "chain":
        return freeze(Chain()), torch.randn(3, 5)
    if name == "mlp":
        return freeze(randomize_affine(MLP(bias=True))), torch.randn(3, 6)
    if name == "cnn":
        return freeze(randomize_affine(CNN(bias=True))), torch.randn(2, 3, 8, 8)
    if name == "residual":
        return freeze(randomize_affine(ResidualCNN(bias=True))), torch.randn(2, 3, 8, 8)
    if name == "gated":
        return freeze(Gated()), torch.randn(3, 4)
    if name == "norm":  # a layer norm's rule maps by its adjoint with the statistics held constant
        model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4))
        return freeze(randomize_affine(model)), torch.randn(3, 6)
    if name == "bn":  # convolutions folded with the eval batch norms after them (epsilon presets)
        model = nn.Sequential(ConvBNBlock(3), DownsampleBlock(3, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(4, 5))
        return freeze(randomize_affine(model)).eval(), torch.randn(2, 3, 8, 8)
    if name == "silu":  # the identity at SiLU and GELU: g * f(v) / v from the input (OpEntry.quotient)
        model = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 8), nn.GELU(approximate="tanh"),
                              nn.Linear(8, 8), nn.Hardswish(), nn.Linear(8, 4))
        return freeze(randomize_affine(model)), torch.randn(3, 6)
    if name == "tanh":  # the identity at an op that is not homogeneous: g * z / v
        model = freeze(randomize_affine(MLP(bias=True)))
        model[1] = nn.Tanh()
        return model, torch.randn(3, 6)
    raise ValueError(name)


@pytest.mark.parametrize("rules", [None, "epsilon", LRP0, {"linear": dynlrp.rules.Epsilon(0.25)},
                                   {**LRP0, "norm": dynlrp.rules.ConstantDenominator(0.0)}],
                         ids=["default", "epsilon", "lrp0", "eps0.25", "norm0"])
@pytest.mark.parametrize("name", ["chain", "mlp", "cnn", "residual", "bn", "gated", "silu", "tanh", "norm"])
def test_autograds_engine_gives_the_python_traversals_relevance(name, rules):
    model, x0 = _model(name)

    def run():
        x = x0.clone().requires_grad_(True)
        y = model(x)
        engine = dynlrp.LRP(rules)
        r, = engine(y, x, per_row_seed(y, [1] * y.shape[0]), model=model)
        return r, engine.stats

    fast, stats_fast, slow, stats_slow = both(run)
    assert stats_fast["by_autograd"] and not stats_slow["by_autograd"]
    assert_close(fast, slow)


@pytest.mark.parametrize("rules", ["attnlrp", "cp_lrp"])
def test_a_small_llama_runs_on_autograds_engine(rules):
    """Attention (its rule scales the backward by ``o / stab(o)`` and shares it over query, key
    and value), RMSNorm's gate (a slot that takes nothing), SiLU (a ratio), residual sums."""
    pytest.importorskip("transformers")
    from models import tiny_llama

    torch.manual_seed(0)
    model, x0, forward, _ = tiny_llama()

    def run():
        x = x0.clone().requires_grad_(True)
        y = forward(model, x)
        engine = dynlrp.LRP(rules)
        r, = engine(y, x, per_row_seed(y, [3, 7]), model=model)
        return r, engine.stats

    fast, stats_fast, slow, _ = both(run)
    assert stats_fast["by_autograd"]
    assert_close(fast, slow)


@pytest.mark.parametrize("mode", ["promise", "recorded"])
def test_the_cached_plan_and_recorded_mode_take_autograds_engine_too(mode):
    model, x0 = _model("residual")
    engine = dynlrp.LRP("epsilon")
    results = []
    for seed in range(3):  # the first call plans, the later ones follow the plan
        x = (x0 + seed).requires_grad_(True)
        with dynlrp.record() as tape:
            y = model(x)
        r, = engine(y, x, tape=tape if mode == "recorded" else None)
        assert engine.stats["by_autograd"]
        gradform.ENABLED = False
        try:
            y = model(x)
            expected, = dynlrp.LRP("epsilon")(y, x)
        finally:
            gradform.ENABLED = True
        assert_close(r, expected)
        results.append(r)
    assert engine.stats["cached_plan"] == (mode == "promise")


def test_several_inputs_and_an_intermediate_one():
    model, x0 = _model("mlp")

    def run():
        x = x0.clone().requires_grad_(True)
        scale = torch.full((1, 6), 0.5, requires_grad=True)
        h = model[0](x * scale)
        mid = torch.relu(h)
        y = model[4](model[3](model[2](mid)))
        engine = dynlrp.LRP("epsilon")
        return engine(y, (x, scale, h)), engine.stats

    fast, stats_fast, slow, _ = both(run)
    assert stats_fast["by_autograd"]
    for a, b in zip(fast, slow):
        assert_close(a, b)


@pytest.mark.parametrize("case", ["large", "bfloat16", "z_plus", "flat_input", "seed_at_zero"])
def test_where_autograds_engine_does_not_apply_the_python_traversal_runs(monkeypatch, case):
    """A graph over the size limit (``gradform.MAX_ELEMENTS``), a dtype carried wider, a rule that
    is no gradient (z+), a rule that gives relevance to inputs of value 0 (flat: ``R = 0 * g`` has
    no ``g``), relevance on an output value of 0."""
    model, x = _model("mlp")
    rules = "epsilon"
    seed = None
    if case == "large":
        monkeypatch.setattr(gradform, "MAX_ELEMENTS", 64)
    elif case == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    elif case == "z_plus":
        rules = {"linear": dynlrp.rules.ZPlus()}
    elif case == "flat_input":
        rules = {"linear": dynlrp.rules.Flat()}
    x = x.clone().requires_grad_(True)
    with dynlrp.record() as tape:  # (the sum with a constant: its output only a tape knows)
        y = model(x)
        if case == "seed_at_zero":
            y = torch.relu(y - 10.0)  # all 0
            seed = torch.ones_like(y)
    engine = dynlrp.LRP(rules)
    r, = engine(y, x, seed, tape=tape)
    assert not engine.stats["by_autograd"]
    assert r.shape == x.shape


def test_a_hook_that_cannot_get_its_value_falls_back(monkeypatch):
    """Nothing is freed on autograd's engine, so a failed pass starts over on the Python traversal."""
    model, x0 = _model("chain")
    real = gradform._exact

    def failing(graph, resolver, edge, requester, g):
        raise dynlrp.UnrecoverableValueError("not here")

    x = x0.clone().requires_grad_(True)
    expected, = dynlrp.lrp(model(x), x)
    monkeypatch.setattr(gradform, "_exact", failing)
    engine = dynlrp.LRP()
    y = model(x)
    r, = engine(y, x)
    assert not engine.stats["by_autograd"]
    assert_close(r, expected)
    monkeypatch.setattr(gradform, "_exact", real)
    with pytest.raises(dynlrp.GraphFreedError):  # (the call used the graph up all the same)
        engine(y, x)


def test_the_graph_is_left_as_the_python_traversal_leaves_it():
    """With ``retain_graph=True`` the hooks are gone and the graph gives autograd's own gradient;
    without, it is used up: a second call and a backward fail."""
    model, x0 = _model("chain")
    x = x0.clone().requires_grad_(True)
    y = model(x)
    engine = dynlrp.LRP()
    engine(y, x, retain_graph=True)
    assert engine.stats["by_autograd"]
    grad, = torch.autograd.grad(y.sum(), x, retain_graph=True)
    expected, = torch.autograd.grad(model(x).sum(), x)
    assert torch.equal(grad, expected)
    engine(y, x)
    with pytest.raises(dynlrp.GraphFreedError, match="retain_graph=True"):
        engine(y, x)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.sum().backward()


def test_relevance_conserves_on_autograds_engine():
    """LRP-0 on a bias-free chain conserves exactly: the gradient form keeps that."""
    model, x0 = _model("chain")
    x = x0.clone().requires_grad_(True)
    y = model(x)
    engine = dynlrp.LRP(LRP0)
    r, = engine(y, x)
    assert engine.stats["by_autograd"]
    torch.testing.assert_close(r.sum(), y.sum(), rtol=1e-5, atol=1e-6)


def test_typed_errors_are_those_of_the_python_traversal():
    """A graph freed by a backward, a saved tensor modified in place, an op that produces NaN:
    autograd's pass fails or gives NaN, and the Python traversal says what went wrong."""
    model, x0 = _model("chain")
    x = x0.clone().requires_grad_(True)
    y = model(x)
    y.sum().backward()
    with pytest.raises(dynlrp.GraphFreedError):
        dynlrp.lrp(y, x)

    x = x0.clone().requires_grad_(True)
    h = torch.relu(x)
    y = torch.exp(h).sum(1, keepdim=True)  # exp saves its output
    y.grad_fn.next_functions[0][0]._saved_result.add_(1.0)  # (an in-place change of a saved output)
    with pytest.raises(dynlrp.errors.ModifiedInPlaceError):
        dynlrp.lrp(y, x)

    x = x0.clone().requires_grad_(True)
    y = model(x) * float("nan")
    with pytest.raises(dynlrp.NonFiniteRelevanceError):
        dynlrp.lrp(y, x, torch.ones_like(y))


def _op_cases():
    """Every per-op case of tests/ops (brute-force references on small tensors)."""
    from ops import test_arith, test_elementwise, test_linear, test_norm, test_pool, test_shape

    found = []
    for module in (test_arith, test_elementwise, test_linear, test_norm, test_pool, test_shape):
        name = module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
        found += [pytest.param(case, id=f"{name}-{case.id}") for case in module.CASES if not case.xfail]
    return found


@pytest.mark.parametrize("case", _op_cases())
def test_every_op_case_against_its_reference(case):
    """The op references of tests/ops, on autograd's engine where the case's rules are gradients
    (the Python traversal elsewhere). Rounding differs from the Python traversal's (``v * g``
    instead of relevance carried along), so the tolerance is float32's, not the case's."""
    from ops.helpers import detached, forward, make_seed

    inputs = case.make()
    y = forward(case, inputs)
    seed = make_seed(case, y)
    requested = [inputs[i] for i in case.requested]
    rels = dynlrp.LRP(case.rules)(y, requested, seed)
    expected = case.reference(detached(inputs), seed.detach())
    for r, e in zip(rels, expected):
        assert_close(r.to(e.dtype), e, rel=max(case.tol, 1e-5))


def test_a_graph_another_call_is_propagating_takes_the_python_traversal():
    """Hooks on a graph that another call (another thread, ``retain_graph=True``) is propagating
    on autograd's engine would fire in both: the second call takes the Python traversal."""
    model, x0 = _model("chain")
    x = x0.clone().requires_grad_(True)
    y = model(x)
    expected, = dynlrp.lrp(y, x, retain_graph=True)
    y.grad_fn.metadata[gradform._BUSY] = True  # (as during the other call)
    engine = dynlrp.LRP()
    r, = engine(y, x, retain_graph=True)
    assert not engine.stats["by_autograd"]
    assert_close(r, expected)
    del y.grad_fn.metadata[gradform._BUSY]
    engine(y, x)  # (the plan of the first call, which could not ask, learns the forms now)
    assert engine.stats["by_autograd"] and gradform._BUSY not in y.grad_fn.metadata


def test_tensor_hooks_run_on_autograds_engine_and_not_on_the_python_traversal():
    """Documented: hooks registered on the forward's tensors run during a call on autograd's
    engine (with relevance per unit of value); ``gradform.ENABLED = False`` keeps them out."""
    model, x0 = _model("mlp")
    calls = []
    for enabled in (True, False):
        gradform.ENABLED = enabled
        try:
            x = x0.clone().requires_grad_(True)
            h = model[0](x)
            h.register_hook(lambda g: calls.append(enabled))
            y = model[4](model[3](model[2](model[1](h))))
            engine = dynlrp.LRP("epsilon")
            engine(y, x, model=model)
        finally:
            gradform.ENABLED = True
        assert engine.stats["by_autograd"] == enabled
    assert calls == [True]


def test_a_large_graph_frees_its_saved_tensors_when_autograds_pass_ends(monkeypatch):
    """Autograd's pass keeps the saved tensors (its hooks read them); a call without
    ``retain_graph`` frees them when the pass ends, as the Python traversal does as it goes, and
    the hooks' values leave the memo once used."""
    from dynlrp.saved import saved

    l1 = nn.Linear(4, 1 << 14, bias=False).requires_grad_(False)
    l2 = nn.Linear(1 << 14, 3, bias=False).requires_grad_(False)
    x = torch.randn(1, 4, requires_grad=True)
    y = l2(torch.relu(l1(x)))
    relu = y.grad_fn.next_functions[0][0]
    made = []

    class Kept(dynlrp.engine.PromiseResolver):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    gradform_engine = dynlrp.LRP()
    real = dynlrp.engine.PromiseResolver
    dynlrp.engine.PromiseResolver = Kept
    try:
        r, = gradform_engine(y, x)
    finally:
        dynlrp.engine.PromiseResolver = real
    assert gradform_engine.stats["by_autograd"]
    with pytest.raises(dynlrp.GraphFreedError):
        saved(relu, "result")
    first = relu.next_functions[0][0]  # (the first product's output was asked for, and dropped)
    assert first.name() == "MmBackward0"
    assert (made[0].graph.node(first).index, 0) not in made[0].memo
    gradform.ENABLED = False
    try:
        x2 = x.detach().clone().requires_grad_(True)
        expected, = dynlrp.LRP()(l2(torch.relu(l1(x2))), x2)
    finally:
        gradform.ENABLED = True
    assert_close(r, expected)


def test_several_outputs_with_their_seeds():
    """Two outputs, one of them computed from the other's hidden layer, each with its seed."""
    model, x0 = _model("mlp")

    def run():
        x = x0.clone().requires_grad_(True)
        h = model[1](model[0](x))
        y1 = model[4](model[3](model[2](h)))
        y2 = h.sum(1, keepdim=True) * 2.0
        engine = dynlrp.LRP("epsilon")
        return engine((y1, y2), (x, h), (torch.ones_like(y1), y2.detach()), model=model), engine.stats

    fast, stats_fast, slow, _ = both(run)
    assert stats_fast["by_autograd"]
    for a, b in zip(fast, slow):
        assert_close(a, b)


def test_a_graph_over_the_settling_size_frees_as_autograds_pass_goes(monkeypatch):
    """Over ``SETTLE_ELEMENTS`` each node settles once run (a post-hook, as the Python traversal's
    ``done``): the saved tensors are freed during the pass, and the relevance is the same."""
    from dynlrp.saved import saved

    monkeypatch.setattr(gradform, "SETTLE_ELEMENTS", 64)
    monkeypatch.setattr(gradform, "SETTLE_SHARE", 0.0)
    model, x0 = _model("cnn")
    x = x0.clone().requires_grad_(True)
    y = model(x)
    relus = [fn for fn in _nodes(y) if fn.name() == "ReluBackward0"]
    freed_during = []
    real = dynlrp.values.Resolver._free_saved

    def spy(self, i):
        freed_during.append(i)
        return real(self, i)

    monkeypatch.setattr(dynlrp.values.Resolver, "_free_saved", spy)
    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 64)
    monkeypatch.setattr(dynlrp.values.Resolver, "free_all", lambda self: None)  # (only as it goes)
    engine = dynlrp.LRP("epsilon")
    r, = engine(y, x, model=model)
    assert engine.stats["by_autograd"] and freed_during
    for fn in relus:
        with pytest.raises(dynlrp.GraphFreedError):
            saved(fn, "result")
    gradform.ENABLED = False
    try:
        x2 = x0.clone().requires_grad_(True)
        expected, = dynlrp.LRP("epsilon")(model(x2), x2, model=model)
    finally:
        gradform.ENABLED = True
    assert_close(r, expected)


def _nodes(y):
    seen, stack = [], [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.append(fn)
        stack.extend(c for c, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize("op", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish()],
                         ids=["gelu", "gelu_tanh", "silu", "hardswish"])
def test_an_ops_quotient_is_its_output_over_its_input(op):
    """``OpEntry.quotient`` writes ``f(x) / x`` into the tensor it is given (at 0: ``f'(0)``, the
    limit), for x over a wide range."""
    x = torch.cat([torch.linspace(-12, 12, 97), torch.tensor([0.0, 1e-4, -1e-4])]).double()
    x.requires_grad_(True)
    y = op(x)
    node = y.grad_fn
    out = torch.empty_like(x)
    q = dynlrp.ops.lookup(node.name()).quotient(node, x.detach(), out)
    assert q is out
    nonzero = x.detach() != 0
    torch.testing.assert_close(q[nonzero], (y / x).detach()[nonzero], rtol=1e-6, atol=1e-12)
    zero = torch.zeros(1, dtype=torch.double, requires_grad=True)
    slope, = torch.autograd.grad(op(zero).sum(), zero)
    torch.testing.assert_close(q[~nonzero], slope.expand(int((~nonzero).sum())))


def test_an_input_value_of_zero_at_gelu_stays_on_autograds_engine():
    """An input value of exactly 0 at a GELU: its ``f(v) / v`` is continued there (``Phi(0) =
    1/2``), so ``g * f(v) / v`` stays finite, the relevance there is 0 and equals the Python
    traversal's."""
    lin = freeze(randomize_affine(nn.Linear(4, 3)))

    def run():
        x = torch.tensor([[0.0, 1.5, -0.5, 2.0], [0.0, 0.0, 1.0, -1.0]], requires_grad=True)
        y = lin(nn.functional.gelu(x))
        engine = dynlrp.LRP("epsilon")
        r, = engine(y, x, torch.ones_like(y))
        return r, engine.stats

    fast, stats_fast, slow, _ = both(run)
    assert stats_fast["by_autograd"]
    assert_close(fast, slow)
    assert (fast[:, 0] == 0).all()


def test_the_ratio_hook_writes_into_the_gradient_the_backward_made(monkeypatch):
    """The ratio hook holds no more memory than the backward it replaces: it writes into the
    gradient the op's backward just made, unless that shares memory with ``g`` (or a held
    value)."""
    g = torch.randn(3, 4)
    fresh = torch.empty(3, 4)
    assert gradform._scratch(fresh, g) is fresh
    for aliased in (g, g.view(4, 3).view(3, 4), None, torch.empty(4, 3), fresh.t()):
        made = gradform._scratch(aliased, g)
        assert made is not aliased and made.shape == g.shape
    assert gradform._scratch(fresh, g, fresh[0]) is not fresh
    reused = []
    real = gradform._scratch

    def spy(native, g, *held):
        found = real(native, g, *held)
        reused.append(found is native)
        return found

    monkeypatch.setattr(gradform, "_scratch", spy)
    model, x0 = _model("silu")
    x = x0.clone().requires_grad_(True)
    engine = dynlrp.LRP("epsilon")
    engine(model(x), x, model=model)
    assert engine.stats["by_autograd"] and reused == [True, True, True]


def test_relevance_at_a_second_output_of_a_hooked_node_takes_the_python_traversal():
    """The hooks scale or replace the ``g`` of a node's first output only: where relevance reaches
    another output of a node that needs a hook, the call takes the Python traversal."""

    class Halving(dynlrp.rules.Route):  # (a hook at the split: half of the backward)
        def as_gradient(self, ctx):
            return dynlrp.rules.Gradient(shares=0.5)

    lin = freeze(randomize_affine(nn.Linear(2, 3)))
    for used, on_autograd in ((0, True), (1, False)):
        x = torch.randn(4, 4, requires_grad=True)
        parts = torch.relu(x).split([2, 2], dim=1)
        y = lin(parts[used])
        engine = dynlrp.LRP({"SplitWithSizesBackward0": Halving()})
        r, = engine(y, x, torch.ones_like(y))
        assert engine.stats["by_autograd"] == on_autograd
        assert r.shape == x.shape


def _sigmoid_model() -> tuple[nn.Module, torch.Tensor]:
    """A layer whose first output is exactly 0 for every input, then a sigmoid (``f(0) = 1/2``):
    relevance on an input value of 0, which ``g * z / v`` cannot carry."""
    model = freeze(randomize_affine(nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3))))
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.0
    return model, torch.randn(5, 4)


def test_an_input_value_of_zero_at_a_ratio_keeps_the_pass_from_freeing_as_it_goes(monkeypatch):
    """Over ``SETTLE_ELEMENTS`` a pass frees as it goes, after which the Python traversal could not
    start over: it first looks for input values of 0 at the ratio hooks (which would fail it), and
    finding one frees nothing; the Python traversal then gives the relevance."""
    monkeypatch.setattr(gradform, "SETTLE_ELEMENTS", 16)
    monkeypatch.setattr(gradform, "SETTLE_SHARE", 0.0)
    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 16)
    model, x0 = _sigmoid_model()
    settles = []
    real = gradform._settles
    monkeypatch.setattr(gradform, "_settles", lambda *a: settles.append(real(*a)) or settles[-1])

    def run():
        x = x0.clone().requires_grad_(True)
        y = model(x)
        engine = dynlrp.LRP("epsilon")
        r, = engine(y, x, torch.ones_like(y))
        return r, engine.stats

    fast, stats_fast, slow, _ = both(run)
    assert settles == [False] and not stats_fast["by_autograd"]
    assert_close(fast, slow)
    with torch.no_grad():
        model[0].bias[0] = 0.5  # (no zero: the pass settles as it goes)
    fast, stats_fast, slow, _ = both(run)
    assert settles == [False, True] and stats_fast["by_autograd"]
    assert_close(fast, slow)


@pytest.mark.parametrize("failing_hook", [3, 4])
def test_a_pass_that_fails_after_freeing_recovers_or_says_so(monkeypatch, failing_hook):
    """A hook that fails after the pass freed values on the way (here: made to fail, at the third
    or the last of the four hooks' value requests): the Python traversal starts over, which the
    Promise System may still serve from what is left (the third), or which the error explains:
    what failed, and how to get the relevance (the last)."""
    monkeypatch.setattr(gradform, "SETTLE_ELEMENTS", 64)
    monkeypatch.setattr(gradform, "SETTLE_SHARE", 0.0)
    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 64)
    model, x0 = _model("cnn")
    x = x0.clone().requires_grad_(True)
    expected, = dynlrp.LRP("epsilon")(model(x), x, model=model)
    real, calls = gradform._output, []

    def late_failure(graph, resolver, i, g, clip):
        calls.append(i)
        if len(calls) == failing_hook:
            raise dynlrp.UnrecoverableValueError("not here")
        return real(graph, resolver, i, g, clip)

    monkeypatch.setattr(gradform, "_output", late_failure)
    engine = dynlrp.LRP("epsilon")
    if failing_hook == 4:
        with pytest.raises(dynlrp.GraphFreedError, match=r"could not finish the propagation \(not here\)"):
            engine(model(x), x, model=model)
    else:
        r, = engine(model(x), x, model=model)
        assert not engine.stats["by_autograd"]
        assert_close(r, expected)
    calls.clear()
    y = model(x)
    r, = engine(y, x, model=model, retain_graph=True)  # (nothing freed: it starts over)
    assert not engine.stats["by_autograd"]
    assert_close(r, expected)


def test_a_tensor_modified_in_place_is_named_after_a_pass_that_freed_on_the_way(monkeypatch):
    """Autograd's pass meets a saved tensor modified in place after freeing values on the way: the
    error is the typed one, whichever of the two paths finds it."""
    monkeypatch.setattr(gradform, "SETTLE_ELEMENTS", 64)
    monkeypatch.setattr(gradform, "SETTLE_SHARE", 0.0)
    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 64)
    model, x0 = _model("cnn")
    x = x0.clone().requires_grad_(True)
    e = torch.exp(x)
    y = model(e)
    e.add_(1.0)  # (saved by exp and by the first convolution)
    with pytest.raises(dynlrp.errors.ModifiedInPlaceError):
        dynlrp.LRP("epsilon")(y, x, model=model)


def test_a_large_graph_mostly_under_stabilising_hooks_takes_the_python_traversal(monkeypatch):
    """Over ``SMALL_ELEMENTS`` autograd's engine is taken unless the nodes whose hook stabilises
    hold more than ``STABILISED_SHARE`` of the values (a CNN under the epsilon rule): there the
    Python traversal is the faster."""
    monkeypatch.setattr(gradform, "SMALL_ELEMENTS", 64)
    model, x0 = _model("cnn")
    for rules, share, on_autograd in (("epsilon", 0.25, False), ("epsilon", 1.0, True), (LRP0, 0.25, True)):
        monkeypatch.setattr(gradform, "STABILISED_SHARE", share)
        x = x0.clone().requires_grad_(True)
        y = model(x)
        engine = dynlrp.LRP(rules)
        r, = engine(y, x, model=model)
        assert engine.stats["by_autograd"] == on_autograd
        gradform.ENABLED = False
        try:
            expected, = dynlrp.LRP(rules)(model(x), x, model=model)
        finally:
            gradform.ENABLED = True
        assert_close(r, expected)


def test_a_layers_output_is_read_from_the_relu_after_it():
    """A stabilising hook reads its layer's output from the ReLU after it (its only consumer,
    whose backward zeroes ``g`` where it clipped) instead of recomputing the layer."""
    model, x0 = _model("mlp")
    x = x0.clone().requires_grad_(True)
    engine = dynlrp.LRP("epsilon")
    r, = engine(model(x), x, model=model)
    assert engine.stats["by_autograd"]
    assert engine.stats["clipped_values"] == 2 and engine.stats["promises"] == 0
    gradform.ENABLED = False
    try:
        expected, = dynlrp.LRP("epsilon")(model(x), x, model=model)
    finally:
        gradform.ENABLED = True
    assert_close(r, expected)


def test_settling_only_where_it_lowers_the_peak(monkeypatch):
    """``may_settle``: a pass that ends on large values (a CNN near its input) settles as it goes;
    one whose steps are alike (an MLP of equal layers, as a transformer's) is freed at its end --
    settling would not lower its peak (``settling_saves`` about 0) and its hooks cost time."""
    from dynlrp.graph import build

    monkeypatch.setattr(gradform, "SETTLE_ELEMENTS", 1000)
    torch.manual_seed(0)

    def stage(c_in: int) -> list[nn.Module]:  # (VGG's: the resolution halves, the values shrink)
        return [nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.MaxPool2d(2)]

    funnel = nn.Sequential(*stage(3), *stage(8), *stage(8), nn.Flatten(), nn.Linear(8 * 16, 2)).eval()
    even = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), nn.ReLU())],
                         nn.Linear(64, 2)).eval()
    cases = [(funnel, torch.randn(2, 3, 32, 32, requires_grad=True), True),
             (even, torch.randn(32, 64, requires_grad=True), False)]
    for model, x, settles in cases:
        graph = build([model(x)], [x])
        share = gradform.settling_saves(graph) / sum(graph.elements())
        assert (share >= gradform.SETTLE_SHARE) == settles, share
        assert gradform.may_settle(graph) == settles
    monkeypatch.setattr(gradform, "SETTLE_SHARE", 0.0)  # (what the tests of settling set)
    graph = build([even(cases[1][1])], [cases[1][1]])
    assert gradform.may_settle(graph)

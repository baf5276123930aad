"""The public API contract of ``dynlrp.lrp`` / ``dynlrp.LRP`` / ``dynlrp.coverage``: shapes
and order of the result, seeds, latent relevance, statistics, no mutation, typed errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
from models import (
    CNN,
    LRP0,
    ConvBNBlock,
    Unregistered,
    assert_close,
    assert_unchanged,
    freeze,
    linear_lrp,
    randomize_affine,
    state_snapshot,
)


def two_layers() -> tuple[nn.Linear, nn.Linear]:
    """Two frozen bias-free linear layers, 4 -> 5 -> 3."""
    return (nn.Linear(4, 5, bias=False).requires_grad_(False),
            nn.Linear(5, 3, bias=False).requires_grad_(False))


# --- the result ----------------------------------------------------------------------------------


def test_returns_a_tuple_shaped_like_inputs_in_order():
    l1, l2 = two_layers()
    x = torch.randn(2, 4, requires_grad=True)
    h = torch.relu(l1(x))
    y = l2(h)
    single = dynlrp.lrp(y, x, retain_graph=True)
    assert isinstance(single, tuple) and len(single) == 1
    assert single[0].shape == x.shape and single[0].dtype == x.dtype
    r_h, r_x = dynlrp.lrp(y, [h, x], retain_graph=True)
    assert r_h.shape == h.shape and r_x.shape == x.shape
    r_x2, r_h2 = dynlrp.lrp(y, (x, h))
    assert torch.equal(r_x2, r_x) and torch.equal(r_h2, r_h)


def test_default_seed_is_the_output_value():
    l1, l2 = two_layers()
    x = torch.randn(2, 4, requires_grad=True)
    y = l2(torch.relu(l1(x)))
    default, = dynlrp.lrp(y, x, retain_graph=True)
    explicit, = dynlrp.lrp(y, x, y.detach().clone())
    assert torch.equal(default, explicit)


def test_multiple_outputs_and_inputs():
    l1, l2 = two_layers()
    head = nn.Linear(5, 2, bias=False).requires_grad_(False)
    x1 = torch.randn(2, 4, requires_grad=True)
    x2 = torch.randn(2, 5, requires_grad=True)
    h = l1(x1) + x2
    y1, y2 = l2(h), head(h)
    s1, s2 = torch.randn(2, 3), torch.randn(2, 2)
    r1, r2 = dynlrp.lrp([y1, y2], [x1, x2], [s1, s2], rules=LRP0, retain_graph=True)
    # By hand: both heads send relevance to h, the add shares it, LRP-0 through l1.
    hd, a = h.detach(), (x1 @ l1.weight.T).detach()
    r_h = linear_lrp(hd, l2.weight, None, s1) + linear_lrp(hd, head.weight, None, s2)
    assert_close(r1, linear_lrp(x1, l1.weight, None, a * r_h / hd))
    assert_close(r2, x2.detach() * r_h / hd)
    # Relevance from several outputs adds up.
    a1, a2 = dynlrp.lrp(y1, [x1, x2], s1, rules=LRP0, retain_graph=True)
    b1, b2 = dynlrp.lrp(y2, [x1, x2], s2, rules=LRP0)
    assert_close(r1, a1 + b1)
    assert_close(r2, a2 + b2)


def test_latent_relevance_at_intermediate_tensors():
    l1, l2 = two_layers()
    x = torch.randn(3, 4, requires_grad=True)
    h = torch.relu(l1(x))
    y = l2(h)
    seed = torch.randn(3, 3)
    r_h, r_x = dynlrp.lrp(y, [h, x], seed, rules=LRP0, retain_graph=True)
    expected_h = linear_lrp(h, l2.weight, None, seed)
    assert_close(r_h, expected_h)
    assert_close(r_x, linear_lrp(x, l1.weight, None, expected_h))  # the ReLU passes relevance
    alone, = dynlrp.lrp(y, h, seed, rules=LRP0)
    assert_close(alone, r_h)


def test_engine_stats_keys():
    l1, l2 = two_layers()
    x = torch.randn(2, 4, requires_grad=True)
    y = l2(l1(x) * 2)
    engine = dynlrp.LRP()
    engine(y, x)
    for key in ("nodes", "promises", "pre_promises", "promise_internal_nodes", "mean_promise_path",
                "promise_density"):
        assert key in engine.stats, key
    assert engine.stats["nodes"] >= 4
    assert engine.stats["promises"] >= 1  # the frozen l2 keeps no input
    assert 0 < engine.stats["promise_density"] <= 1


def test_repeated_calls_are_linear_in_the_seed():
    model = freeze(CNN(bias=True))
    randomize_affine(model)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    s1, s2 = torch.randn(2, 5), torch.randn(2, 5)
    engine = dynlrp.LRP("epsilon")
    r1, = engine(y, x, s1, retain_graph=True)
    r2, = engine(y, x, s2, retain_graph=True)
    r12, = engine(y, x, s1 + 2 * s2, retain_graph=True)
    assert_close(r12, r1 + 2 * r2)
    fresh, = dynlrp.LRP("epsilon")(y, x, s1, retain_graph=True)
    assert_close(r1, fresh)
    again, = engine(y, x, s1)
    assert torch.equal(again, r1)


# --- coverage ------------------------------------------------------------------------------------


def test_coverage_names_unregistered_ops():
    x = torch.randn(3, requires_grad=True)
    y = Unregistered.apply(x * 3).sum()
    report = dynlrp.coverage(y)
    assert report.total_nodes == 3  # mul, the custom op, sum (the leaf is not counted)
    assert report.covered_nodes == 2
    assert report.uncovered == {"UnregisteredBackward": 1}
    assert "UnregisteredBackward" in str(report)


def test_coverage_of_a_covered_model():
    model = freeze(CNN())
    report = dynlrp.coverage(model(torch.randn(1, 3, 8, 8, requires_grad=True)))
    assert report.uncovered == {}
    assert report.covered_nodes == report.total_nodes > 0


# --- no mutation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_nothing_is_mutated(trainable):
    model = randomize_affine(ConvBNBlock(3)).eval().requires_grad_(trainable)
    before = state_snapshot(model)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    x_before = x.detach().clone()
    with dynlrp.record() as tape:
        y = model(x)
    seed = y.detach().clone()
    seed_before = seed.clone()
    dynlrp.lrp(y, x, seed, retain_graph=True)
    dynlrp.lrp(y, x, seed, tape=tape)
    assert_unchanged(model, before)
    assert torch.equal(x.detach(), x_before) and x.requires_grad and x.grad is None
    assert torch.equal(seed, seed_before)
    assert not model.training


def test_the_garbage_collector_is_paused_during_a_call_and_restored():
    """A call pauses Python's cyclic collector (what it makes is freed by reference counting) and
    leaves it as it found it: on, off, after an error, and when a rule calls lrp itself."""
    import gc

    l1, l2 = two_layers()
    x = torch.randn(2, 4, requires_grad=True)
    y = l2(torch.relu(l1(x)))
    seen = []

    class Inner(dynlrp.rules.Epsilon):
        def __call__(self, ctx):
            seen.append(gc.isenabled())
            with torch.enable_grad():
                z = l1(x)
            dynlrp.lrp(z, x)  # a nested call (on a graph of its own)
            seen.append(gc.isenabled())
            return super().__call__(ctx)

    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            seen.clear()
            dynlrp.LRP({"linear": Inner()})(y, x, retain_graph=True)
            assert seen and not any(seen)
            assert gc.isenabled() == enabled
            with pytest.raises(dynlrp.GraphError):
                dynlrp.lrp(y, torch.randn(2, 4, requires_grad=True))
            assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_backward_still_works_after_lrp_with_retain_graph():
    model = randomize_affine(CNN(bias=True)).eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    dynlrp.lrp(y, x, retain_graph=True)
    dynlrp.lrp(y, [x, model[0].weight], retain_graph=True)
    y.sum().backward()
    grad = x.grad.clone()
    weight_grad = model[0].weight.grad.clone()
    x.grad = None
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(grad, x.grad)
    torch.testing.assert_close(weight_grad, model[0].weight.grad)


def test_saved_tensors_are_untouched_by_in_place_work():
    """Frozen model, epsilon with batch norms folded: convolution outputs are read from the
    ReLUs' saved outputs and products are written in place -- never into what autograd saved:
    a backward pass after the explanation gives the gradient of a fresh forward."""
    model = randomize_affine(CNN(bias=True)).eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    engine = dynlrp.LRP("epsilon")
    engine(y, x, retain_graph=True, model=model)
    assert engine.stats["clipped_values"] >= 1
    grad, = torch.autograd.grad(y.sum(), x)
    fresh, = torch.autograd.grad(model(x).sum(), x)
    assert torch.equal(grad, fresh)


# --- typed errors ------------------------------------------------------------------------------


def test_error_output_without_grad_fn():
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        y = x * 2
    with pytest.raises(dynlrp.GraphError, match="grad_fn"):
        dynlrp.lrp(y, x)
    with pytest.raises(dynlrp.GraphError):
        dynlrp.lrp(x, x)  # a leaf has no graph to explain


def test_error_input_not_in_graph():
    x = torch.randn(3, requires_grad=True)
    other = torch.randn(3, requires_grad=True)
    y = x * 2
    with pytest.raises(dynlrp.GraphError):
        dynlrp.lrp(y, other)
    with pytest.raises(dynlrp.GraphError):
        dynlrp.lrp(y, other * 3)  # an intermediate of another graph
    with pytest.raises(dynlrp.GraphError, match="requires_grad"):
        dynlrp.lrp(y, torch.randn(3))


def test_error_seed_with_wrong_shape_or_count():
    x = torch.randn(2, 3, requires_grad=True)
    y = x * 2
    with pytest.raises(dynlrp.GraphError, match="shape"):
        dynlrp.lrp(y, x, torch.ones(3))
    with pytest.raises(dynlrp.GraphError):
        dynlrp.lrp(y, x, [torch.ones(2, 3), torch.ones(2, 3)])
    with pytest.raises(dynlrp.GraphError):
        dynlrp.lrp([], x)


def test_error_graph_freed_by_backward():
    model = freeze(CNN())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    y.sum().backward()
    with pytest.raises(dynlrp.GraphFreedError, match="retain_graph"):
        dynlrp.lrp(y, x)
    assert issubclass(dynlrp.GraphFreedError, dynlrp.GraphError)
    assert issubclass(dynlrp.GraphError, dynlrp.LRPError)


def test_retain_graph_keeps_lrp_working():
    model = freeze(CNN())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    before, = dynlrp.lrp(y, x, retain_graph=True)
    y.sum().backward(retain_graph=True)
    after, = dynlrp.lrp(y, x)
    assert torch.equal(before, after)


# --- freeing the graph as it goes (retain_graph=False, the default) ----------------------------


def test_a_call_frees_the_graph_like_autograd_grad():
    """By default a call frees the forward activations the graph saved, as autograd.grad does:
    the graph serves one explanation, and a second call (or a backward) says what to do."""
    model = randomize_affine(CNN(bias=True)).eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    kept, = dynlrp.lrp(y, x, retain_graph=True)
    freed, = dynlrp.lrp(y, x)
    assert torch.equal(kept, freed)
    with pytest.raises(dynlrp.GraphFreedError, match="retain_graph=True"):
        dynlrp.lrp(y, x)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.sum().backward()


def test_saved_activations_are_released_during_the_call():
    """The activations autograd saved are released by the call, not when the caller drops ``y``
    (through saved-tensor hooks: autograd holds them no more; the peak memory shows it in
    benchmarks/compare.py)."""
    from dynlrp.saved import saved

    lin = nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(8, 64, requires_grad=True)
    y = lin(torch.tanh(lin(x)))
    tanh = y.grad_fn.next_functions[1][0]  # addmm(bias, tanh(...), weight.t())
    assert tanh.name() == "TanhBackward0"
    dynlrp.lrp(y, x, retain_graph=True)
    assert saved(tanh, "result") is not None
    dynlrp.lrp(y, x)
    with pytest.raises(dynlrp.GraphFreedError, match="dynlrp.lrp"):
        saved(tanh, "result")
    assert y.grad_fn is not None


@pytest.mark.parametrize("cached", [False, True], ids=["first-call", "cached-plan"])
def test_freeing_gives_the_same_relevance_on_a_residual_network(cached):
    """Values below a node may be read from its saved tensors through inverses (the residual
    sum, a ReLU's output): freeing waits for them, in the first call and with a cached plan."""
    from models import ResidualCNN

    model = randomize_affine(ResidualCNN()).eval().requires_grad_(False)
    engines = []
    for _ in range(2):
        engine = dynlrp.LRP("epsilon_plus")
        if cached:
            x0 = torch.randn(2, 3, 8, 8, requires_grad=True)
            engine(model(x0), x0, model=model)
        engines.append(engine)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = model(x)
    kept, = engines[0](y, x, retain_graph=True, model=model)
    freed, = engines[1](y, x, model=model)
    assert torch.equal(kept, freed)
    assert engines[1].stats["cached_plan"] == cached and any(engines[1].stats.values())


@pytest.mark.parametrize("hidden", [5, 1 << 14], ids=["small", "one-large-value"])
def test_a_small_graph_is_used_up_alike(monkeypatch, hidden):
    """Tensors too small to be worth freeing stay (dynlrp.values.RELEASE_MIN), but the graph
    is used up all the same: a second call and a backward fail as on a large graph. A graph
    with no large value skips the freeing bookkeeping altogether; one large value (the hidden
    layer's, RELEASE_MIN elements) brings it back, and the ReLU keeping it is freed."""
    from dynlrp.saved import saved

    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 1 << 14)
    settled: list[int] = []
    settle = dynlrp.values.Resolver._settle
    monkeypatch.setattr(dynlrp.values.Resolver, "_settle",
                        lambda self, i: settled.append(i) or settle(self, i))
    l1 = nn.Linear(4, hidden, bias=False).requires_grad_(False)
    l2 = nn.Linear(hidden, 3, bias=False).requires_grad_(False)
    x = torch.randn(1, 4, requires_grad=True)
    y = l2(torch.relu(l1(x)))
    relu = y.grad_fn.next_functions[0][0]  # mm(relu(.), weight.t())
    assert relu.name() == "ReluBackward0"
    kept, = dynlrp.lrp(y, x, retain_graph=True)
    assert settled == []  # (retain_graph: nothing to free)
    r, = dynlrp.lrp(y, x)
    assert torch.equal(r, kept)
    if hidden == 5:
        assert settled == [] and saved(relu, "result") is not None
    else:
        assert settled
        with pytest.raises(dynlrp.GraphFreedError):
            saved(relu, "result")
    with pytest.raises(dynlrp.GraphFreedError, match="retain_graph=True"):
        dynlrp.lrp(y, x)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        (y * 2).sum().backward()


def test_a_call_that_fails_before_freeing_anything_leaves_the_graph_usable():
    """Promise mode needs the model for a frozen downsample block's biases; the call that says
    so has freed nothing yet, so the same forward pass can be explained with ``model=``."""
    from models import DownsampleBlock

    block = freeze(randomize_affine(DownsampleBlock()))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = block(x)
    with pytest.raises(dynlrp.UnrecoverableValueError, match="model"):
        dynlrp.lrp(y, x)
    r, = dynlrp.lrp(y, x, model=block)
    assert torch.isfinite(r).all()
    with pytest.raises(dynlrp.GraphFreedError):
        dynlrp.lrp(y, x, model=block)

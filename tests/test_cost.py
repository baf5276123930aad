"""Where the Promise System takes a value: the cheapest source first.

A linear layer's output is needed by its epsilon rule. Its own saved tensors rebuild it
only by recomputing the product (``OpEntry.own_recomputes``), which costs as much as the
layer's forward pass. These tests check that the resolver first takes what costs nothing:

* a consumer's saved input (an activation saves what it was applied to);
* an exact inversion from saved values (a residual sum that a norm saved, minus the
  residual stream);
* a partial value (known where a ReLU passed it, or where a selection read it) when
  relevance flows only where it is known; where relevance flows outside it, the exact value
  is recomputed instead, on the first call and on a call that follows a cached plan.

Every case checks the relevance against recorded mode (the true forward values) and which
source the resolver used (``resolver.how``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp.rules import Epsilon, Flat
from models import LRP0, assert_close
from test_promise import explain


def how_of(resolver, name: str) -> list[str]:
    """How each output of the nodes named ``name`` was obtained, in graph order."""
    return [resolver.how[(i, 0)][0] for i, gn in enumerate(resolver.graph.nodes)
            if gn.name == name and (i, 0) in resolver.how]


class Gated(nn.Module):
    """``lin2(silu(lin1(x)))``: SiLU saves its input, the output of lin1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 8, bias=False)
        self.lin2 = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(nn.functional.silu(self.lin1(x)))


def test_a_consumers_saved_input_comes_before_a_recompute(resolvers):
    model = Gated().requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    out = explain(model, x, None, resolvers)
    assert how_of(out["resolver"], "MmBackward0") == ["given", "tap"]  # lin2 is the output
    assert_close(out["promise"], out["recorded"])


class Residual(nn.Module):
    """``layer_norm(x + lin(relu(x)))``: the norm saves the sum, the caller passed ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5, bias=False)
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.lin(torch.relu(x)))


def test_a_projection_output_is_the_saved_sum_minus_the_residual(resolvers):
    model = Residual().requires_grad_(False)
    x = torch.randn(3, 5, requires_grad=True)
    with dynlrp.record() as tape:
        y = model(x)
    engine = dynlrp.LRP({"linear": Epsilon(1e-6), "sum": Epsilon(1e-6), "norm": Epsilon(1e-6)})
    r_promise, = engine(y, x, retain_graph=True)  # (explained again, in recorded mode)
    r_recorded, = dynlrp.LRP(engine.rules)(y, x, tape=tape)
    resolver = resolvers[0]
    assert how_of(resolver, "MmBackward0") == ["inverse"]
    assert resolver.stats()["promise_internal_nodes"] == 0  # nothing replayed
    assert_close(r_promise, r_recorded)


class LastToken(nn.Module):
    """A language-model head read at the last position only: ``head(h)[:, -1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 7, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)))[:, -1]


def test_a_head_read_at_one_position_is_known_there_without_a_recompute(resolvers):
    model = LastToken().requires_grad_(False)
    x = torch.randn(2, 6, 4, requires_grad=True)
    out = explain(model, x, None, resolvers)
    resolver = resolvers[0]
    head = max(i for i, gn in enumerate(resolver.graph.nodes) if gn.name == "MmBackward0"
               and resolver.graph.nodes[gn.consumers[0][0]].name.endswith("ViewBackward0")
               and any(resolver.graph.nodes[c].name == "SelectBackward0"
                       for c, _ in resolver.graph.nodes[gn.consumers[0][0]].consumers))
    assert resolver.how[(head, 0)][0] == "inverse"  # the given output, placed at the last position
    assert resolver.stats()["inversions"] >= 1
    assert_close(out["promise"], out["recorded"])


class ReluThenAny(nn.Module):
    """``lin2(relu(lin1(x)))``, lin1 without a bias (an ``mm``), lin2 with one (an ``addmm``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 8, bias=False)
        self.lin2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(x)))


def test_a_partial_value_serves_where_relevance_flows_inside_it(resolvers):
    """Under epsilon, relevance reaches lin1's output only where the ReLU passed it: the ReLU's
    saved result is lin1's output there, and nothing is recomputed. The rules say so (lin2's
    epsilon gives 0 where its input, the ReLU's output, is 0; the ReLU passes relevance as it
    is), so the value serves without a test, read straight from the ReLU."""
    model = ReluThenAny().requires_grad_(False)
    x = torch.randn(5, 6, requires_grad=True)
    out = explain(model, x, None, resolvers)
    resolver = resolvers[0]
    assert (torch.relu(model.lin1(x)) == 0).any()  # the case this test is about
    assert how_of(resolver, "MmBackward0") == []  # not looked up in the graph: seen through the ReLU
    assert resolver.stats()["clipped_values"] == 1
    assert resolver.stats()["promise_internal_nodes"] == 0  # nothing replayed or recomputed
    assert_close(out["promise"], out["recorded"])


def test_a_partial_value_is_tested_where_the_rules_do_not_say_where_relevance_is(resolvers):
    """The same graph with a rule that declares nothing (:meth:`Rule.vanishes` is None) at
    lin2: lin1's output is found through the ReLU's inverse (known where positive) and tested
    against the relevance before it serves."""

    class Quiet(Epsilon):
        def vanishes(self, ctx):
            return None

    model = ReluThenAny().requires_grad_(False)
    x = torch.randn(5, 6, requires_grad=True)
    with dynlrp.record() as tape:
        y = model(x)
    rules = {"MmBackward0": Epsilon(0.0), "AddmmBackward0": Quiet(0.0)}
    r_promise, = dynlrp.LRP(rules, rebuild_costly=True)(y, x, retain_graph=True)
    r_recorded, = dynlrp.LRP(rules)(y, x, tape=tape)
    resolver = resolvers[0]
    assert how_of(resolver, "MmBackward0") == ["inverse"]
    lin1 = next(e for e in resolver.how if resolver.graph.nodes[e[0]].name == "MmBackward0")
    assert not resolver.memo[lin1].exact  # known where the ReLU passed it, and that sufficed
    assert resolver.stats()["clipped_values"] == 0
    assert_close(r_promise, r_recorded)


def promise_and_recorded(net: nn.Module, x: torch.Tensor, rules, resolvers, **kwargs) -> dict:
    """Relevance in promise mode (given the model) and in recorded mode, and the promise-mode
    stats; ``kwargs`` go to :class:`dynlrp.LRP`."""
    with dynlrp.record() as tape:
        y = net(x)
    r_promise, = dynlrp.LRP(rules, **kwargs)(y, x, retain_graph=True, model=net)
    r_recorded, = dynlrp.LRP(rules, **kwargs)(y, x, tape=tape)
    return {"promise": r_promise, "recorded": r_recorded, "stats": resolvers[0].stats()}


class Plain(nn.Module):
    """VGG's pattern: conv-ReLU-max pool-conv-ReLU-flatten-dense; or a ResNet block (convolutions
    with batch norms, the block's input added back before the last ReLU); or an op without an
    entry after the ReLUs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "vgg":
            h = torch.relu(self.conv2(nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)))
        elif self.kind == "resnet":
            h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)
            h = nn.functional.max_pool2d(h, 2)
        else:
            h = torch.relu(self.conv2(nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)))
            h = nn.functional.gelu(torch.cumprod(h, -1))  # (cumprod has no op entry: the gradient
            # fallback routes relevance by its backward; GELU saves its output, which the head needs)
        return self.head(h.flatten(1))


def _random_batch_norms(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    for bn in (model.bn1, model.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("kind, rules, clipped", [
    ("vgg", "epsilon", 2),  # both convolutions' outputs, through the max pool and the flatten
    ("vgg", None, 2),  # (the default rules)
    ("resnet", "epsilon", 2),  # the first conv + bn, and the residual sum; not the second conv + bn
    ("resnet", None, 2),  # batch norms not folded: the first bn, and the sum
    ("opaque", "epsilon", 1),  # an op without entry after the second ReLU: nothing is known
    # of the relevance it routes, so the second conv's output is tested; the first one's is not
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_a_layer_output_seen_through_its_relu_needs_no_test(resolvers, kind, rules, clipped, dtype):
    """Where the rules above a ReLU give no relevance where its output is 0, the output of the
    layer before it is read from the ReLU's saved result as it is, with no mask and no test
    (``clipped_values``), and the relevance equals recorded mode's (in float16 too: the
    stabiliser then works on a float32 copy, never on the saved output)."""
    torch.manual_seed(2)
    model = _random_batch_norms(Plain(kind)).to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fallback warns about the op without entry)
        out = promise_and_recorded(model, x, rules, resolvers, fallback="gradient")
    assert out["stats"]["clipped_values"] == clipped
    assert_close(out["promise"], out["recorded"])


@pytest.mark.parametrize("kind", ["vgg", "resnet"])
def test_a_cached_plan_reads_the_relu_outputs_too(kind):
    """Later calls of one engine follow its plan (paper 4.4.1) and read the layers' outputs
    from the ReLUs the same way, on new inputs: relevance equals recorded mode's each time."""
    torch.manual_seed(2)
    model = _random_batch_norms(Plain(kind))
    engine = dynlrp.LRP("epsilon")
    for call in range(3):
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        with dynlrp.record() as tape:
            y = model(x)
        r_promise, = engine(y, x, retain_graph=True, model=model)
        assert engine.stats["cached_plan"] == (call > 0) and not engine.stats["replanned"]
        r_recorded, = dynlrp.LRP("epsilon")(y, x, tape=tape)
        assert_close(r_promise, r_recorded)


class Split(nn.ModuleList):
    """``[1](a) + [2](b)`` for ``a, b = relu([0](x)).split(4)``: one ReLU, two consumers."""

    def __init__(self) -> None:
        super().__init__([nn.Linear(6, 8, bias=False), nn.Linear(4, 3, bias=False), nn.Linear(4, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self[0](x)).split(4, 1)
        return self[1](a) + self[2](b)


def test_what_is_known_of_one_output_of_a_split_says_nothing_of_the_others(resolvers):
    """Epsilon at lin2 gives no relevance where ``a`` is 0; the flat rule at lin3 gives some
    where ``b`` is 0. The split routes both back into the ReLU's output, so lin1's output is
    tested (and recomputed where needed), not taken as it is."""
    torch.manual_seed(6)
    model = Split().requires_grad_(False)
    x = torch.randn(5, 6, requires_grad=True)
    assert (torch.relu(model[0](x))[:, 4:] == 0).any()  # the case this test is about
    rules = {"MmBackward0": Epsilon(1e-6), "AddmmBackward0": Flat(), "sum": Epsilon(1e-6)}
    out = promise_and_recorded(model, x, rules, resolvers, rebuild_costly=True)
    assert_close(out["promise"], out["recorded"])
    assert out["stats"]["clipped_values"] == 0


def flat_rules() -> dict:
    """Epsilon at lin1 (``mm``), the flat rule at lin2 (``addmm``)."""
    return {**LRP0, "MmBackward0": Epsilon(1e-6), "AddmmBackward0": Flat()}


def test_relevance_outside_a_partial_value_gets_the_exact_value(resolvers):
    """The flat rule at lin2 gives relevance to inputs the ReLU clipped to zero: there lin1's
    output is unknown to the ReLU, so the resolver recomputes it exactly."""
    model = ReluThenAny()
    model.lin2.requires_grad_(False)  # lin1 is trainable: it keeps its input, and can recompute
    x = torch.randn(5, 6, requires_grad=True)
    with dynlrp.record() as tape:
        y = model(x)
    rules = flat_rules()
    r_promise, = dynlrp.LRP(rules)(y, x, retain_graph=True)  # (explained again, in recorded mode)
    r_recorded, = dynlrp.LRP(rules)(y, x, tape=tape)
    assert (torch.relu(model.lin1(x)) == 0).any()  # the case this test is about
    assert_close(r_promise, r_recorded)
    assert how_of(resolvers[0], "MmBackward0") == ["own"]  # partial at first, then recomputed


def test_a_cached_plan_whose_partial_value_no_longer_serves_is_replanned():
    """Call 1: every ReLU input is positive, so the ReLU knows lin1's output everywhere it
    matters. Call 2 (same structure, same engine): some are clipped, the flat rule sends
    relevance there, and the plan's partial value does not serve: the value is searched afresh
    (the call cannot start over: it has freed part of the graph), the result equals a fresh
    engine's, and the plan is dropped, so call 3 plans anew."""
    torch.manual_seed(0)
    model = ReluThenAny().requires_grad_(False)
    with torch.no_grad():
        model.lin1.weight.abs_()
    engine = dynlrp.LRP(flat_rules())
    x1 = torch.rand(5, 6).requires_grad_(True)  # positive inputs, positive weights: no clipping
    y1 = model(x1)
    assert (torch.relu(model.lin1(x1)) > 0).all()
    first, = engine(y1, x1)
    with dynlrp.record() as tape:
        y1b = model(x1)
    assert_close(first, dynlrp.LRP(flat_rules())(y1b, x1, tape=tape)[0])
    x2 = (-torch.rand(5, 6)).requires_grad_(True)  # now every ReLU input is negative
    y2 = model(x2)
    second, = engine(y2, x2)
    assert engine.stats["cached_plan"] is True and engine.stats["replanned"] is True
    fresh, = dynlrp.LRP(flat_rules())(model(x2), x2)
    assert_close(second, fresh)
    third, = engine(model(x2), x2)
    assert engine.stats["cached_plan"] is False and engine.stats["replanned"] is False
    assert_close(third, fresh)


@pytest.mark.parametrize("cached", [False, True])
def test_second_calls_take_the_same_sources(cached):
    """A cached plan follows the recipes of the first call (taps, inversions) and gives the
    same relevance as a fresh engine."""
    model = Residual().requires_grad_(False)
    rules = {"linear": Epsilon(1e-6), "sum": Epsilon(1e-6), "norm": Epsilon(1e-6)}
    engine = dynlrp.LRP(rules, cache=cached)
    for seed in range(2):
        torch.manual_seed(seed)
        x = torch.randn(3, 5, requires_grad=True)
        got, = engine(model(x), x)
        fresh, = dynlrp.LRP(rules, cache=False)(model(x), x)
        assert_close(got, fresh)
    assert engine.stats["cached_plan"] is cached



# -- values the rules can do without ----------------------------------------------------------

class BiasApart(nn.Module):
    """A frozen projection of a sequence-first view, as ``nn.MultiheadAttention`` makes at
    batch > 1: ``x.transpose(0, 1) @ W^T`` is a ``bmm`` with the weight expanded, and the
    bias is added on its own (a constant autograd never sees). SiLU saves the sum; the
    product itself is saved by nothing, so rebuilding it means recomputing the ``bmm``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x.transpose(0, 1), self.lin.weight.t()) + self.lin.bias
        return self.out(nn.functional.silu(h)).sum(0)


def _recorded(model, x, rules):
    with dynlrp.record() as tape:
        y = model(x)
    return dynlrp.lrp(y, x, rules=rules, tape=tape)[0]


def test_a_product_that_only_divides_is_not_recomputed(resolvers):
    """Under AttnLRP (epsilon 0) the product's value enters only as ``R / z``, and the sum
    with the bias only as a final factor: relevance passes per unit of it
    (:class:`dynlrp.engine.PerUnit`), so the ``bmm`` is not replayed. The result equals
    recorded mode's and the rebuilding engine's."""
    rules = "attnlrp"
    torch.manual_seed(0)
    model = BiasApart().requires_grad_(False)
    x = torch.randn(4, 5, 6, requires_grad=True)
    engine = dynlrp.LRP(rules)
    got, = engine(model(x), x)
    names = {resolvers[0].graph.nodes[i].name for i in resolvers[0].replayed}
    assert "BmmBackward0" not in names
    assert engine.stats["per_unit_values"] >= 1
    assert_close(got, _recorded(model, x, rules))
    rebuilt, = dynlrp.LRP(rules, rebuild_costly=True)(model(x), x)
    names = {resolvers[1].graph.nodes[i].name for i in resolvers[1].replayed}
    assert "BmmBackward0" in names and resolvers[1].stats()["per_unit_values"] == 0
    assert_close(got, rebuilt)


def test_a_costly_chain_ends_per_unit_at_the_convolution(resolvers):
    """D.1's chain (``linear(flatten(transpose(conv(x))))``) under LRP-0: the linear layer's
    input, past views, is a convolution's output that only a recompute rebuilds. No promise
    is made; the relevance routes per unit to the convolution, whose rule divides by the
    unit. Same relevance as the Promise System's, and conservative."""
    from test_promise import PromiseChain

    torch.manual_seed(0)
    model = PromiseChain().requires_grad_(False)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    engine = dynlrp.LRP(LRP0)
    y = model(x)
    got, = engine(y, x, retain_graph=True)
    assert engine.stats["promises"] == 0 and engine.stats["promise_internal_nodes"] == 0
    assert engine.stats["per_unit_values"] == 2  # the linear's input and the convolution's output
    assert not resolvers[0].replayed
    assert_close(got, dynlrp.LRP(LRP0, rebuild_costly=True)(y, x)[0])
    assert_close(got.sum((1, 2, 3)), y.detach().sum(1))


def test_epsilon_above_zero_rebuilds_the_value_where_it_divides(resolvers):
    """With epsilon > 0 the convolution's rule needs its true output (``R / (z + eps)``): the
    value is rebuilt there, once, and the result equals recorded mode's."""
    from test_promise import PromiseChain

    torch.manual_seed(0)
    model = PromiseChain().requires_grad_(False)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    rules = {"linear": Epsilon(1e-3)}
    got, = dynlrp.LRP(rules)(model(x), x)
    assert how_of(resolvers[0], "ConvolutionBackward0") == ["own"]
    assert_close(got, _recorded(model, x, rules))


@pytest.mark.parametrize("model_type", ["BiasApart", "PromiseChain"])
def test_the_plan_keeps_the_values_left_unbuilt(model_type):
    """A second call that follows the cached plan leaves the same values unbuilt, with the
    same statistics and relevance as a fresh engine, and does not replan."""
    import test_promise

    model = (BiasApart() if model_type == "BiasApart" else test_promise.PromiseChain()).requires_grad_(False)
    shape = (4, 5, 6) if model_type == "BiasApart" else (3, 2, 4, 4)
    rules = "attnlrp" if model_type == "BiasApart" else LRP0
    engine = dynlrp.LRP(rules)
    stats = []
    for seed in range(2):
        torch.manual_seed(seed)
        x = torch.randn(*shape, requires_grad=True)
        got, = engine(model(x), x)
        stats.append({k: v for k, v in engine.stats.items() if k != "cached_plan"})
        assert_close(got, dynlrp.LRP(rules, cache=False)(model(x), x)[0])
    assert engine.stats["cached_plan"] is True and engine.stats["replanned"] is False
    assert stats[0] == stats[1] and stats[0]["per_unit_values"] > 0

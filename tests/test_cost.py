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
    saved result is lin1's output there, and nothing is recomputed."""
    model = ReluThenAny().requires_grad_(False)
    x = torch.randn(5, 6, requires_grad=True)
    out = explain(model, x, None, resolvers)
    resolver = resolvers[0]
    assert how_of(resolver, "MmBackward0") == ["inverse"]
    lin1 = next(e for e in resolver.how if resolver.graph.nodes[e[0]].name == "MmBackward0")
    assert not resolver.memo[lin1].exact  # known where the ReLU passed it, and that sufficed
    assert_close(out["promise"], out["recorded"])


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


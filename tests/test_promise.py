"""The Promise System on the graphs of the paper's appendix D and E.

Each graph is a small hand-built module with frozen parameters, so autograd keeps no input
for its linear layers and the engine has to make promises. Every test checks

* what ``engine.stats`` says happened (promises, branches, pre-promises, internal nodes,
  path lengths, aggregations, trees), and the promise structure behind it (origins, paths,
  Arg Nodes, parent links);
* that every value the Promise System rebuilt equals the true forward value (recorded with
  ``dynlrp.record()``);
* the relevance against recorded mode and against a reference computed by hand from the
  textbook formulas (``tests/models.py``), and conservation (all layers bias-free, LRP-0).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp
import dynlrp.engine
from dynlrp.promise import PromiseResolver
from dynlrp.record import TapeResolver
from models import LRP0, assert_close, conv2d_lrp, linear_lrp


def conv() -> nn.Conv2d:
    """A bias-free 3x3 convolution, 2 -> 2 channels, same padding."""
    return nn.Conv2d(2, 2, 3, padding=1, bias=False)


def explain(model: nn.Module, x: torch.Tensor, seed: torch.Tensor | None, resolvers: list) -> dict:
    """Run one forward pass under ``dynlrp.record()``, then LRP in promise mode (a fresh
    engine) and in recorded mode on the same graph.

    Parameters
    ----------
    model
        The module to explain.
    x
        Its input (requires grad).
    seed
        Relevance seed shaped like the output, or ``None`` for the output itself.
    resolvers
        The list the ``resolvers`` fixture fills.

    Returns
    -------
    dict
        ``y``, ``tape``, ``promise`` and ``recorded`` relevance, the engine's ``stats`` and
        the promise-mode ``resolver``.
    """
    with dynlrp.record() as tape:
        y = model(x)
    engine = dynlrp.LRP(LRP0, rebuild_costly=True)
    r_promise, = engine(y, x, seed, retain_graph=True)  # (explained again, in recorded mode)
    assert len(resolvers) == 1, "promise mode made exactly one resolver"
    r_recorded, = dynlrp.lrp(y, x, seed, rules=LRP0, tape=tape)
    return {"y": y, "tape": tape, "promise": r_promise, "recorded": r_recorded, "stats": engine.stats,
            "resolver": resolvers[0]}


def structure(resolver: PromiseResolver) -> list[tuple]:
    """The promises a resolver made, by op name.

    Parameters
    ----------
    resolver
        A resolver after the call.

    Returns
    -------
    list of tuple
        One ``(origin, has parent, [(path, arg node), ...])`` per promise, in creation order;
        ``arg node`` is ``None`` for a branch that ends in a nested promise.
    """
    names = [n.name for n in resolver.graph.nodes]

    def branch(b) -> tuple:
        return [names[i] for i in b.path], None if b.arg_node is None else names[b.arg_node]

    promises = resolver.promises
    return [(names[p.origin], p.parent is not None, [branch(b) for b in p.branches]) for p in promises]


def check_rebuilt_values(out: dict, x: torch.Tensor) -> None:
    """Every value the Promise System holds equals the recorded forward value, and the
    internal nodes of distinct branches are disjoint (appendix E's claim).

    Parameters
    ----------
    out
        What :func:`explain` returned.
    x
        The model input.
    """
    resolver = out["resolver"]
    truth = TapeResolver(resolver.graph, (out["y"],), (x,), out["tape"])
    replayed_edges = [e for e in resolver.memo if e[0] in resolver.replayed]
    assert {i for i, _ in replayed_edges} == resolver.replayed
    for edge, value in resolver.memo.items():
        true = truth.value(edge, edge[0])
        assert true.exact
        if value.exact:
            torch.testing.assert_close(value.tensor, true.tensor, rtol=1e-5, atol=1e-6)
        else:  # known on a mask only (an inversion through a ReLU)
            mask = value.mask
            torch.testing.assert_close(value.tensor[mask], true.tensor[mask], rtol=1e-5, atol=1e-6)
    paths = [i for p in resolver.promises for b in p.branches for i in b.path]
    assert len(paths) == len(set(paths)), "two branches share an internal node"


def check_relevance(out: dict, reference: torch.Tensor, seed: torch.Tensor) -> None:
    """Promise mode == recorded mode == the hand reference, and relevance is conserved.

    Parameters
    ----------
    out
        What :func:`explain` returned.
    reference
        The hand-computed input relevance.
    seed
        The seed (its per-example sums are what the bias-free LRP-0 models conserve).
    """
    assert_close(out["promise"], out["recorded"])
    assert_close(out["promise"], reference)
    dims = tuple(range(1, seed.dim()))
    assert_close(out["promise"].sum(tuple(range(1, reference.dim()))), seed.sum(dims))


# --------------------------------------------------------------------------------------
# D.1: basic promise chain
# --------------------------------------------------------------------------------------


class PromiseChain(nn.Module):
    """D.1: ``linear(flatten(transpose(conv(x))))``. The frozen linear layer keeps no input;
    transpose, clone (the flatten of a non-contiguous tensor) and view keep nothing; the
    convolution rebuilds its output from its own saved tensors (the Arg Node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.lin = nn.Linear(48, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).transpose(1, 2).flatten(1))


def test_d1_basic_promise_chain(resolvers):
    model = PromiseChain().requires_grad_(False)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    seed = torch.randn(3, 5)
    out = explain(model, x, seed, resolvers)

    nodes = [n.name for n in out["resolver"].graph.nodes]
    assert sorted(nodes) == sorted(["MmBackward0", "UnsafeViewBackward0", "CloneBackward0",
                                    "TransposeBackward0", "ConvolutionBackward0",
                                    "torch::autograd::AccumulateGrad"])
    stats = out["stats"]
    assert stats["promises"] == 1
    assert stats["promise_branches"] == 1
    assert stats["pre_promises"] == 0
    assert stats["promise_internal_nodes"] == 3
    assert stats["mean_promise_path"] == pytest.approx(3.0)
    assert stats["promise_density"] == pytest.approx(1 / 6)
    assert stats["aggregations"] == 0
    assert stats["inversions"] == 0
    assert stats["promise_trees"] == 0
    assert structure(out["resolver"]) == [
        ("MmBackward0", False,
         [(["UnsafeViewBackward0", "CloneBackward0", "TransposeBackward0"], "ConvolutionBackward0")]),
    ]
    check_rebuilt_values(out, x)

    # By hand: LRP-0 through the linear layer, undo flatten and transpose, LRP-0 through the conv.
    h = F.conv2d(x.detach(), model.conv.weight, padding=1)  # (3, 3, 4, 4)
    flat = h.transpose(1, 2).flatten(1)
    r_flat = linear_lrp(flat, model.lin.weight, None, seed)
    r_h = r_flat.reshape(3, 4, 3, 4).transpose(1, 2)
    reference = conv2d_lrp(x, model.conv.weight, None, r_h, padding=1)
    check_relevance(out, reference, seed)


def test_d1_rebuilt_value_is_the_linear_input(resolvers):
    """The value the promise delivered to the Origin Node is the layer's true input."""
    model = PromiseChain().requires_grad_(False)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    out = explain(model, x, None, resolvers)
    resolver = out["resolver"]
    (branch,) = resolver.promises[0].branches
    true_input = model.conv(x).transpose(1, 2).flatten(1).detach()
    torch.testing.assert_close(resolver.memo[branch.edge].tensor, true_input)


def test_d1_trainable_layer_needs_no_promise(resolvers):
    """With a trainable linear weight autograd keeps the layer's input: no promise at all."""
    model = PromiseChain().requires_grad_(False)
    model.lin.weight.requires_grad_(True)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    out = explain(model, x, None, resolvers)
    assert out["stats"]["promises"] == 0
    assert out["stats"]["promise_internal_nodes"] == 0
    assert out["stats"]["mean_promise_path"] == 0.0
    assert_close(out["promise"], out["recorded"])


# --------------------------------------------------------------------------------------
# D.2: promise trees
# --------------------------------------------------------------------------------------


class PromiseTree(nn.Module):
    """D.2: ``linear(flatten((Ta + Tb) + Tc))`` with ``T* = transpose(conv*(x))``.

    The linear layer's promise reaches the outer add, whose two inputs are both missing: a
    nested promise; its first branch reaches the inner add, missing both inputs again: a
    third promise, two levels down the tree."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv(), conv(), conv()
        self.lin = nn.Linear(32, 3, bias=False)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m(x).transpose(2, 3) for m in (self.a, self.b, self.c)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ta, tb, tc = self.parts(x)
        return self.lin(((ta + tb) + tc).flatten(1))


def test_d2_promise_tree(resolvers):
    model = PromiseTree().requires_grad_(False)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    seed = torch.randn(3, 3)
    out = explain(model, x, seed, resolvers)

    stats = out["stats"]
    assert stats["promises"] == 3
    assert stats["promise_branches"] == 5
    assert stats["promise_trees"] == 2
    assert stats["pre_promises"] == 0
    assert stats["promise_internal_nodes"] == 7  # view, clone, 2 adds, 3 transposes
    assert stats["mean_promise_path"] == pytest.approx(7 / 5)
    assert stats["aggregations"] == 0
    assert stats["inversions"] == 0
    assert structure(out["resolver"]) == [
        ("MmBackward0", False, [(["UnsafeViewBackward0", "CloneBackward0", "AddBackward0"], None)]),
        ("AddBackward0", True, [(["AddBackward0"], None), (["TransposeBackward0"], "ConvolutionBackward0")]),
        ("AddBackward0", True, [(["TransposeBackward0"], "ConvolutionBackward0"),
                                (["TransposeBackward0"], "ConvolutionBackward0")]),
    ]
    root, outer, inner = out["resolver"].promises
    assert outer.parent is root.branches[0]  # parent links: branch -> nested promise
    assert inner.parent is outer.branches[0]
    check_rebuilt_values(out, x)

    # By hand: LRP-0 through the linear layer; each add shares in proportion to its terms.
    parts = [t.detach() for t in model.parts(x)]
    inner_sum, total = parts[0] + parts[1], parts[0] + parts[1] + parts[2]
    r_total = linear_lrp(total.flatten(1), model.lin.weight, None, seed).reshape(total.shape)
    r_inner, r_c = inner_sum * r_total / total, parts[2] * r_total / total
    r_parts = [parts[0] * r_inner / inner_sum, parts[1] * r_inner / inner_sum, r_c]
    reference = sum(conv2d_lrp(x, m.weight, None, r.transpose(2, 3), padding=1)
                    for m, r in zip((model.a, model.b, model.c), r_parts))
    check_relevance(out, reference, seed)


# --------------------------------------------------------------------------------------
# D.3: the residual deadlock and pre-promises
# --------------------------------------------------------------------------------------


class ResidualDeadlock(nn.Module):
    """4.3.3 / D.3: ``A = B + D`` with ``B = conv1(relu(E))`` (an Arg Node) and
    ``D = clone(E)``, ``E = transpose(conv0(x))``.

    A's promise for D walks through D to E while E's other consumer (the ReLU on the
    residual branch) has not propagated yet: the branch reaches past the traversal frontier
    (a pre-promise) to conv0, its Arg Node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = conv(), conv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.conv0(x).transpose(2, 3)
        a = self.conv1(torch.relu(e)) + e.clone()
        return a.flatten(1)


def test_d3_residual_deadlock_pre_promise(resolvers):
    model = ResidualDeadlock().requires_grad_(False)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    seed = torch.randn(3, 32)
    out = explain(model, x, seed, resolvers)

    stats = out["stats"]
    assert stats["pre_promises"] == 1
    # A's input D is promised. A's own output needs no promise: it is the given output y
    # before the flatten, inverted for free (a replay from B and D would cost an add).
    assert stats["promises"] == 1
    assert stats["promise_branches"] == 1
    assert stats["promise_internal_nodes"] == 2  # clone, transpose
    assert stats["mean_promise_path"] == pytest.approx(2.0)
    # A is the tensor the output y = A.flatten(1) views, so it is given (Resolver._viewed_from).
    # Inverted, each for one subtraction or a view: D = A - B, and back through the clone and
    # the transpose to conv0's output E (so conv0 is not recomputed).
    assert stats["inversions"] == 3
    assert stats["aggregations"] == 0
    assert stats["promise_trees"] == 0
    assert structure(out["resolver"]) == [
        ("AddBackward0", False, [(["CloneBackward0", "TransposeBackward0"], "ConvolutionBackward0")]),
    ]
    check_rebuilt_values(out, x)

    # By hand. E gets relevance from both consumers: once each (no deadlock, no double count).
    e = F.conv2d(x.detach(), model.conv0.weight, padding=1).transpose(2, 3)
    b = F.conv2d(torch.relu(e), model.conv1.weight, padding=1)
    r_a = seed.reshape(e.shape)
    a = b + e
    r_b, r_d = b * r_a / a, e * r_a / a
    r_e = r_d + conv2d_lrp(torch.relu(e), model.conv1.weight, None, r_b, padding=1)
    reference = conv2d_lrp(x, model.conv0.weight, None, r_e.transpose(2, 3), padding=1)
    check_relevance(out, reference, seed)


def test_d3_latent_relevance_at_the_shared_node(resolvers):
    """Relevance requested at E itself (latent relevance) is the sum over its consumers,
    and the value passed for E ends the promise branch there."""
    model = ResidualDeadlock().requires_grad_(False)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    e = model.conv0(x).transpose(2, 3)
    y = (model.conv1(torch.relu(e)) + e.clone()).flatten(1)
    engine = dynlrp.LRP(LRP0, rebuild_costly=True)
    r_e, r_x = engine(y, [e, x])
    # The caller passed E, so E is an Arg Node: the branch stops there, no reach-ahead.
    assert engine.stats["pre_promises"] == 0
    assert engine.stats["promise_internal_nodes"] == 1  # clone (A: y before the flatten, inverted)
    assert_close(r_e.sum((1, 2, 3)), y.detach().sum(1))
    assert_close(r_x.sum((1, 2, 3)), y.detach().sum(1))
    reference = conv2d_lrp(x, model.conv0.weight, None, r_e.transpose(2, 3), padding=1)
    assert_close(r_x, reference)


# --------------------------------------------------------------------------------------
# E: input aggregation
# --------------------------------------------------------------------------------------


class BranchesMeet(nn.Module):
    """Appendix E: E = transpose(conv0(x)) feeds three heads, concatenated:
    ``lin1(flatten(E))`` and ``lin2(mean(E))`` (frozen: both need promises whose branches
    meet at E) and ``lin3(conv1(relu(E)))`` (plain tensor relevance into E)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1 = conv(), conv()
        self.lin1 = nn.Linear(32, 3, bias=False)
        self.lin2 = nn.Linear(8, 3, bias=False)
        self.lin3 = nn.Linear(32, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.conv0(x).transpose(2, 3)
        a1 = self.lin1(e.flatten(1))
        a2 = self.lin2(e.mean(-1).flatten(1))
        a3 = self.lin3(self.conv1(torch.relu(e)).flatten(1))
        return torch.cat([a1, a2, a3], 1)


def test_e_branches_meet_and_tensor_relevance_aggregates(resolvers):
    model = BranchesMeet().requires_grad_(False)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    seed = torch.randn(3, 9)
    out = explain(model, x, seed, resolvers)

    stats = out["stats"]
    assert stats["aggregations"] == 1  # lin1's branch meets lin2's branch at E
    assert stats["pre_promises"] == 1  # lin2's branch reaches E before lin1's side propagated
    assert stats["promises"] == 6  # input and output of each of the three linear layers
    assert stats["promise_branches"] == 6
    assert stats["promise_internal_nodes"] == 9
    assert stats["mean_promise_path"] == pytest.approx(1.5)
    assert stats["promise_trees"] == 0
    assert stats["inversions"] == 0
    shape = structure(out["resolver"])
    meeting = [branches[0] for _, _, branches in shape if "CloneBackward0" in branches[0][0]]
    assert meeting == [(["UnsafeViewBackward0", "CloneBackward0"], "TransposeBackward0")]
    walked_to_e = [branches[0][0] for _, _, branches in shape if "MeanBackward1" in branches[0][0]]
    assert walked_to_e == [["ViewBackward0", "MeanBackward1", "TransposeBackward0"]]
    check_rebuilt_values(out, x)

    # By hand: E's relevance is the sum of what its three consumers send.
    e = F.conv2d(x.detach(), model.conv0.weight, padding=1).transpose(2, 3)
    r1, r2, r3 = seed[:, :3], seed[:, 3:6], seed[:, 6:]
    r_e = linear_lrp(e.flatten(1), model.lin1.weight, None, r1).reshape(e.shape)
    r_mean = linear_lrp(e.mean(-1).flatten(1), model.lin2.weight, None, r2).reshape(e.shape[:-1])
    r_e = r_e + e * (r_mean / e.sum(-1)).unsqueeze(-1)  # mean: each term in proportion
    c1 = F.conv2d(torch.relu(e), model.conv1.weight, padding=1)
    r_c1 = linear_lrp(c1.flatten(1), model.lin3.weight, None, r3).reshape(c1.shape)
    r_e = r_e + conv2d_lrp(torch.relu(e), model.conv1.weight, None, r_c1, padding=1)
    reference = conv2d_lrp(x, model.conv0.weight, None, r_e.transpose(2, 3), padding=1)
    check_relevance(out, reference, seed)


class TwinBranches(nn.Module):
    """Two branches of one nested promise meet: ``linear(flatten(P(E) + Q(E)))`` with
    ``P`` a permute and ``Q`` a transpose of the same ``E = clone(conv(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.lin = nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.conv(x).clone()
        return self.lin((e.permute(0, 1, 3, 2) + e.transpose(2, 3)).flatten(1))


def test_e_two_branches_of_one_promise_meet(resolvers):
    model = TwinBranches().requires_grad_(False)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    seed = torch.randn(2, 4)
    out = explain(model, x, seed, resolvers)
    stats = out["stats"]
    assert stats["promise_trees"] == 1
    assert stats["aggregations"] == 1  # the second branch finds E rebuilt by the first
    assert stats["promises"] == 2
    assert stats["promise_branches"] == 3
    # view, clone (flatten), add, permute, transpose, clone (E): each replayed once
    assert stats["promise_internal_nodes"] == 6
    shape = structure(out["resolver"])
    assert shape[1][0] == "AddBackward0" and shape[1][1]
    first, second = shape[1][2]
    assert first == (["PermuteBackward0", "CloneBackward0"], "ConvolutionBackward0")
    assert second == (["TransposeBackward0"], "CloneBackward0")
    check_rebuilt_values(out, x)

    e = F.conv2d(x.detach(), model.conv.weight, padding=1)
    p, q = e.permute(0, 1, 3, 2), e.transpose(2, 3)
    s = p + q
    r_s = linear_lrp(s.flatten(1), model.lin.weight, None, seed).reshape(s.shape)
    r_e = (p * r_s / s).permute(0, 1, 3, 2) + (q * r_s / s).transpose(2, 3)
    reference = conv2d_lrp(x, model.conv.weight, None, r_e, padding=1)
    check_relevance(out, reference, seed)


# --------------------------------------------------------------------------------------
# inversion and the limits of the graph
# --------------------------------------------------------------------------------------


class FrozenBiasConv(nn.Module):
    """``linear(flatten(relu(conv(x))))`` with a frozen conv bias: the conv cannot rebuild
    its output, the ReLU reveals it where it is positive (an inversion)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.lin = nn.Linear(48, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def test_inversion_through_relu(resolvers):
    model = FrozenBiasConv().requires_grad_(False)
    with torch.no_grad():
        model.conv.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    seed = torch.randn(2, 4)
    out = explain(model, x, seed, resolvers)
    stats = out["stats"]
    # the conv's output, seen through the ReLU where it is positive: the rules above it say that
    # relevance is 0 wherever the ReLU's output is, so it serves as it is, without an inversion
    # recorded in the graph (tests/test_cost.py has the inversion itself)
    assert stats["clipped_values"] == 1 and stats["inversions"] == 0
    check_rebuilt_values(out, x)

    h = F.conv2d(x.detach(), model.conv.weight, model.conv.bias, padding=1)
    r_h = linear_lrp(torch.relu(h).flatten(1), model.lin.weight, None, seed).reshape(h.shape)
    reference = conv2d_lrp(x, model.conv.weight, model.conv.bias, r_h, padding=1)
    assert_close(out["promise"], out["recorded"])
    assert_close(out["promise"], reference)


def test_unrecoverable_value_points_to_record():
    """A frozen bias feeding a value no consumer reveals: promise mode cannot rebuild it."""
    conv_layer = nn.Conv2d(2, 3, 3, padding=1).requires_grad_(False)
    lin = nn.Linear(48, 4, bias=False).requires_grad_(False)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    with dynlrp.record() as tape:
        y = lin(conv_layer(x).flatten(1))
    with pytest.raises(dynlrp.UnrecoverableValueError, match=r"dynlrp\.record\(\)"):
        dynlrp.lrp(y, x, retain_graph=True)
    r, = dynlrp.lrp(y, x, tape=tape)  # recorded mode has the value
    assert r.shape == x.shape and torch.isfinite(r).all()


@pytest.mark.parametrize("model_type", [PromiseChain, PromiseTree, ResidualDeadlock, BranchesMeet])
def test_second_call_reports_the_same_promises(model_type):
    """Paper 4.4.1: the same architecture resolves the same promise paths, so a second call
    (on the same engine, which may follow a cached plan) gives the same relevance and the
    same promise statistics as the first."""
    model = model_type().requires_grad_(False)
    engine = dynlrp.LRP(LRP0, rebuild_costly=True)
    results, stats = [], []
    for _ in range(2):
        x = torch.randn(2, 2, 4, 4, requires_grad=True)
        y = model(x)
        results.append((engine(y, x, retain_graph=True)[0], dynlrp.LRP(LRP0, rebuild_costly=True)(y, x)[0]))
        stats.append({k: v for k, v in engine.stats.items() if k != "cached_plan"})
    for reused, fresh in results:
        assert_close(reused, fresh)
    assert stats[0] == stats[1]
    assert stats[0]["promises"] > 0

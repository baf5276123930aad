"""What a call computes and keeps alive beyond the math: a graph freed as it goes (the rest of
``retain_graph`` is in tests/test_api.py), values taken from the tensors the outputs view,
and row-sparse relevance taken row by row. Each path must give the relevance of the plain
one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
import dynlrp.rules as rules_module
from dynlrp.rules import Epsilon
from models import assert_close, stabilized


def epsilon_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, r: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """Paper Eq. 4 for ``z = x W^T + b``, by hand: ``R_x = x * ((R / stab(z)) W)``."""
    z = x @ weight.T + bias
    return x * ((r / stabilized(z, eps)) @ weight)


@pytest.fixture
def row_calls(monkeypatch):
    """How many rows each row-wise epsilon step took."""
    taken: list[int] = []
    plain = rules_module._epsilon_rows

    def spy(ctx, rows, eps):
        taken.append(int(rows.numel()))
        return plain(ctx, rows, eps)

    monkeypatch.setattr(rules_module, "_epsilon_rows", spy)
    return taken


@pytest.mark.parametrize("bias", [False, True], ids=["mm", "addmm"])
def test_row_sparse_relevance_is_taken_row_by_row(row_calls, bias):
    """Relevance on 2 of 96 rows (a language model explained at one token): only those rows
    are divided and mapped back, and the relevance is Eq. 4's."""
    lin = nn.Linear(16, 300, bias=bias).requires_grad_(False)
    x = torch.randn(96, 16, dtype=torch.float64, requires_grad=True)
    lin = lin.double()
    y = lin(x)
    seed = torch.zeros_like(y)
    seed[3], seed[50, :7] = torch.randn(300, dtype=torch.float64), 1.0
    r, = dynlrp.lrp(y, x, seed, rules={"linear": Epsilon(1e-6)})
    b = lin.bias if bias else torch.zeros(300, dtype=torch.float64)
    assert_close(r, epsilon_reference(x.detach(), lin.weight, b, seed, 1e-6), rel=1e-10)
    assert row_calls == [2]
    assert not r[[i for i in range(96) if i not in (3, 50)]].any()


def test_one_row_in_eight_fully_live_is_still_taken_row_by_row(row_calls):
    """The quick count of nonzeros (which skips the row test for dense relevance) admits the
    boundary: 12 of 96 rows, every entry nonzero, is 1/8 of the rows."""
    lin = nn.Linear(16, 300).requires_grad_(False).double()
    x = torch.randn(96, 16, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    seed = torch.zeros_like(y)
    seed[::8] = torch.rand(12, 300, dtype=torch.float64) + 0.5
    r, = dynlrp.lrp(y, x, seed, rules={"linear": Epsilon(1e-6)})
    assert row_calls == [12]
    assert_close(r, epsilon_reference(x.detach(), lin.weight, lin.bias, seed, 1e-6), rel=1e-10)


@pytest.mark.parametrize("start,step,count,expect", [
    (0, 4, 13, []),  # every live row among the probed ones: 13 of 96 rows is more than 1/8
    (1, 4, 12, [12]),  # no live row among the probed ones: the full count decides, 12 is 1/8
    (0, 4, 12, [12]),  # all probed and live, but 12 is 1/8: the probe cannot decide
])
def test_the_probe_of_every_fourth_row_decides_as_the_full_count(row_calls, start, step, count, expect):
    """Dense relevance is told from every ROWS_PROBE-th row when those alone show more than
    1/8 of the rows live; otherwise every row is counted, so the decision is the same."""
    lin = nn.Linear(16, 300).requires_grad_(False).double()
    x = torch.randn(96, 16, dtype=torch.float64, requires_grad=True)
    y = lin(x)
    seed = torch.zeros_like(y)
    seed[start:start + step * count:step] = torch.rand(count, 300, dtype=torch.float64) + 0.5
    r, = dynlrp.lrp(y, x, seed, rules={"linear": Epsilon(1e-6)})
    assert row_calls == expect
    assert_close(r, epsilon_reference(x.detach(), lin.weight, lin.bias, seed, 1e-6), rel=1e-10)


def test_rows_are_not_split_when_many_carry_relevance(row_calls):
    lin = nn.Linear(8, 5).requires_grad_(False)
    x = torch.randn(80, 8, requires_grad=True)
    y = lin(x)
    seed = torch.zeros_like(y)
    seed[:40] = 1.0  # half the rows: the plain product is cheaper
    r, = dynlrp.lrp(y, x, seed, rules={"linear": Epsilon(1e-6)})
    assert row_calls == []
    assert_close(r, epsilon_reference(x.detach(), lin.weight, lin.bias, seed, 1e-6))


class NextToken(nn.Module):
    """A tiny language model read at its last position: ``head(relu(mix(x)))[:, -1]``."""

    def __init__(self, vocab: int = 400) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)))[:, -1]


def test_a_viewed_output_gives_the_tensor_it_views(resolvers, row_calls):
    """``logits[:, -1]`` keeps ``logits`` alive: the head's output is then known in full, from
    the output itself, without recomputing the head; the relevance is recorded mode's."""
    model = NextToken().requires_grad_(False)
    x = torch.randn(2, 40, 8, requires_grad=True)
    with dynlrp.record() as tape:
        y = model(x)
    seed = torch.zeros_like(y)
    seed[:, 5] = y.detach()[:, 5]
    recorded, = dynlrp.lrp(y, x, seed, tape=tape, retain_graph=True)
    promised, = dynlrp.lrp(y, x, seed)
    assert_close(promised, recorded)
    resolver = resolvers[0]
    select = resolver.graph.roots[0][0]
    viewed = resolver.graph.nodes[select].inputs[0]
    assert resolver.how[viewed] == ("given",)
    assert resolver.memo[viewed].exact
    nodes = resolver.graph.nodes
    recomputed = [nodes[e[0]].name for e, how in resolver.how.items() if how[0] == "own"
                  and dynlrp.ops.lookup(nodes[e[0]].name).own_recomputes]
    assert recomputed == []  # neither the head nor mix is recomputed
    assert row_calls == [2, 2] * 2  # both calls: the head, then mix (one position per example)


def test_a_view_that_is_not_the_nodes_own_is_not_taken(resolvers):
    """An output viewing a tensor other than its node's input (``y = h.view(...)[0]`` keeps
    ``h``'s base, not the view between) is not mistaken for that input."""
    lin = nn.Linear(6, 6).requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    h = lin(x)
    y = h.view(2, 12)[1]  # y's base is h, but the select's input is the (2, 12) view
    r, = dynlrp.lrp(y, x, rules={"linear": Epsilon(1e-6)})
    resolver = resolvers[0]
    select = resolver.graph.roots[0][0]
    assert resolver.how.get(resolver.graph.nodes[select].inputs[0]) != ("given",)
    seed = torch.zeros(2, 12)
    seed[1] = h.detach().view(2, 12)[1]
    assert_close(r, epsilon_reference(x.detach(), lin.weight, lin.bias, seed.view(4, 6), 1e-6))


def test_z_plus_on_a_folded_batch_norm_leaves_the_parameters_alone():
    """Under EpsilonPlus a batch norm folded into the convolution before it gives a weight made
    for the node (``Affine.owned``), which z+ turns into ``W+`` in place; the module's own
    weight must stay as it was, and a second explanation must agree with the first."""
    from models import ConvBNBlock, assert_unchanged, randomize_affine, state_snapshot

    model = randomize_affine(ConvBNBlock(3)).eval().requires_grad_(False)
    before = state_snapshot(model)
    x = torch.rand(2, 3, 6, 6, requires_grad=True)  # non-negative: z+ needs W+ only
    first, = dynlrp.lrp(model(x), x, rules="epsilon_plus", model=model)
    second, = dynlrp.lrp(model(x), x, rules="epsilon_plus", model=model)
    assert_unchanged(model, before)
    assert torch.equal(first, second)

"""Regression tests: the failures of the paper's own code (reference/paper-code-failures.md,
section 6) that apply to dynlrp. Expected values are computed by hand (``tests/models.py``),
never with dynlrp itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp
from models import (
    LRP0,
    ConvBNBlock,
    Unregistered,
    affine_lrp,
    assert_close,
    bn_affine,
    conv2d_lrp,
    freeze,
    linear_lrp,
    per_row_seed,
    randomize_affine,
    sequential_lrp,
)


def both_modes(forward, x: torch.Tensor | list, seed=None, rules=LRP0) -> tuple:
    """Run ``forward`` once under ``dynlrp.record()`` and explain it in promise mode and in
    recorded mode; assert both agree.

    Parameters
    ----------
    forward
        A callable returning the output(s).
    x
        The input(s) to explain.
    seed
        The seed, or ``None`` for the outputs' values.
    rules
        The ``rules=`` argument.

    Returns
    -------
    tuple
        ``(output, relevances)`` with the promise-mode relevances.
    """
    with dynlrp.record() as tape:
        y = forward()
    promised = dynlrp.lrp(y, x, seed, rules=rules, retain_graph=True)  # (explained again below)
    recorded = dynlrp.lrp(y, x, seed, rules=rules, tape=tape)
    for p, r in zip(promised, recorded):
        assert_close(p, r)
    return y, promised


def frozen_linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    """A frozen ``nn.Linear`` with a random (nonzero) bias.

    Parameters
    ----------
    i, o
        Input and output features.
    bias
        Whether it has a bias.

    Returns
    -------
    nn.Linear
        The layer.
    """
    return freeze(randomize_affine(nn.Linear(i, o, bias=bias)))


# --- 6.1 batched 2-d logits are seeded per row ---------------------------------------------------


def test_batched_logits_seeded_per_row():
    model = freeze(randomize_affine(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))))
    x = torch.randn(3, 6, requires_grad=True)
    targets = [0, 3, 1]
    seed = per_row_seed(model(x), targets)
    y, (r,) = both_modes(lambda: model(x), x, seed)
    assert_close(r, sequential_lrp(model, x, seed))
    for n, t in enumerate(targets):  # rows never mix: each row alone gives the same relevance
        xn = x[n:n + 1].detach().requires_grad_(True)
        yn = model(xn)
        rn, = dynlrp.lrp(yn, xn, per_row_seed(yn, [t]), rules=LRP0)
        assert_close(r[n:n + 1], rn)
    assert (r[0] != r[1]).any()


# --- 6.2 frozen models ----------------------------------------------------------------------------


def test_frozen_mlp_with_biases():
    model = freeze(randomize_affine(nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(),
                                                  nn.Linear(7, 3))))
    x = torch.randn(4, 5, requires_grad=True)
    y, (r,) = both_modes(lambda: model(x), x)
    assert_close(r, sequential_lrp(model, x, y))


# --- 6.3 a 2-d Linear output used twice -------------------------------------------------------------


def test_linear_output_used_twice():
    lin = frozen_linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def forward():
        h = lin(x)
        return h + torch.relu(h)

    y, (r,) = both_modes(forward, x)
    h = (x @ lin.weight.T + lin.bias).detach()
    s = h + torch.relu(h)
    r_h = h * y.detach() / s + torch.relu(h) * y.detach() / s  # the add's two shares, ReLU passes
    assert_close(r, linear_lrp(x, lin.weight, lin.bias, r_h))


# --- 6.5 sums and means --------------------------------------------------------------------------------


def test_full_sum():
    x = torch.randn(2, 3, requires_grad=True)
    r, = dynlrp.lrp(x.sum(), x)
    assert_close(r, x.detach())  # seed = the sum itself: each term keeps its value
    r, = dynlrp.lrp(x.sum(), x, torch.tensor(1.0))
    assert_close(r, x.detach() / x.detach().sum())


def test_full_sum_of_a_frozen_layer():
    lin = frozen_linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    y, (r,) = both_modes(lambda: lin(x).sum(), x)
    z = x.detach() @ lin.weight.T
    assert_close(r, linear_lrp(x, lin.weight, None, z))  # the sum gives each logit its value


@pytest.mark.parametrize(
    ("op", "dims", "keepdim"),
    [
        ("sum", -1, False), ("sum", (-1, -3), False), ("sum", (1, -1), True), ("mean", -2, False),
        ("mean", (2, 3), False), ("mean", (-2, -1), True), ("mean", -1, True), ("sum", (0, 2), False),
    ],
)
def test_reductions_with_negative_dims_and_keepdim(op, dims, keepdim):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    seed_shape = getattr(x.detach(), op)(dims, keepdim=keepdim).shape
    seed = torch.randn(seed_shape)
    # clone(): the reduction's input is not a leaf, so a promise has to rebuild it.
    y, (r,) = both_modes(lambda: getattr(x.clone(), op)(dims, keepdim=keepdim), x, seed)
    # sum and mean both share in proportion to each term: R_i = x_i R / sum_j x_j
    total = x.detach().sum(dims, keepdim=True)
    expected = x.detach() * seed.reshape(total.shape) / total
    assert r.shape == x.shape
    assert_close(r, expected)


# --- 6.6 silent fallbacks ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sub tensor", "add tensor", "sub scalar", "rsub tensor"])
def test_constant_operand_gives_x_all_relevance(kind):
    x = torch.randn(2, 3, requires_grad=True)
    c = torch.randn(2, 3)
    forward = {"sub tensor": lambda: x - c, "add tensor": lambda: x + c, "sub scalar": lambda: x - 0.7,
               "rsub tensor": lambda: c - x}[kind]
    seed = torch.randn(2, 3)
    y, (r,) = both_modes(forward, x, seed)
    assert_close(r, seed)


def test_difference_of_two_activations_conserves():
    a = torch.randn(2, 3, requires_grad=True)
    b = torch.randn(2, 3, requires_grad=True)
    seed = torch.randn(2, 3)
    y, (ra, rb) = both_modes(lambda: a - b, [a, b], seed)
    z = (a - b).detach()
    assert_close(ra, a.detach() * seed / z)
    assert_close(rb, -b.detach() * seed / z)


def test_index_select_relevance_has_input_shape():
    x = torch.randn(2, 6, requires_grad=True)
    index = torch.tensor([0, 2, 5, 2])
    seed = torch.randn(2, 4)
    y, (r,) = both_modes(lambda: x.clone().index_select(1, index), x, seed)
    assert r.shape == x.shape
    expected = torch.zeros(2, 6)
    for j, i in enumerate(index.tolist()):
        expected[:, i] += seed[:, j]
    assert_close(r, expected)


# --- 6.4 ResNet-style CNNs ---------------------------------------------------------------------------


def test_stride_two_convolutions_on_even_sizes():
    model = freeze(randomize_affine(nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=2, bias=False), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.Flatten(), nn.Linear(4, 3, bias=False),
    )))
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    y, (r,) = both_modes(lambda: model(x), x)
    assert r.shape == x.shape
    assert_close(r, sequential_lrp(model, x, y))


def test_eval_batchnorm_in_residual_block():
    block = freeze(randomize_affine(ConvBNBlock(3)))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y, (r,) = both_modes(lambda: block(x), x)

    # By hand: ReLU passes, the add shares in proportion, batch norm is the affine map it is.
    xd = x.detach()
    s1, t1 = bn_affine(block.bn1)
    s2, t2 = bn_affine(block.bn2)
    c1 = F.conv2d(xd, block.conv1.weight, padding=1)
    h = torch.relu(s1[:, None, None] * c1 + t1[:, None, None])
    c2 = F.conv2d(h, block.conv2.weight, padding=1)
    b2 = s2[:, None, None] * c2 + t2[:, None, None]
    a = b2 + xd
    r_a = y.detach()
    r_c2 = affine_lrp(c2, s2, t2, b2 * r_a / a)
    r_c1 = affine_lrp(c1, s1, t1, conv2d_lrp(h, block.conv2.weight, None, r_c2, padding=1))
    expected = xd * r_a / a + conv2d_lrp(xd, block.conv1.weight, None, r_c1, padding=1)
    assert_close(r, expected)


def test_maxpool_value_is_the_pooled_activation():
    """The value rebuilt for a max pool is the pooled float tensor, not its int64 indices."""
    model = freeze(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(12, 3, bias=False)))
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    y, (r,) = both_modes(lambda: model(x), x)
    assert r.dtype == x.dtype
    assert_close(r, sequential_lrp(model, x, y))


# --- 6.10 / 6.11 / 6.12 leaves and inputs ----------------------------------------------------------


def test_leaf_with_two_consumers_aggregates_and_repeats():
    l1, l2 = frozen_linear(4, 3, bias=False), frozen_linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    y = l1(x) + l2(x)
    a, b = (x @ l1.weight.T).detach(), (x @ l2.weight.T).detach()
    r_y = y.detach()
    expected = (linear_lrp(x, l1.weight, None, a * r_y / (a + b))
                + linear_lrp(x, l2.weight, None, b * r_y / (a + b)))
    engine = dynlrp.LRP(LRP0)
    first, = engine(y, x, retain_graph=True)
    second, = engine(y, x, retain_graph=True)  # the same engine again (its plan cache), then a fresh one
    third, = dynlrp.lrp(y, x, rules=LRP0)
    assert_close(first, expected)
    assert torch.equal(first, second)
    assert torch.equal(first, third)


def test_same_leaf_twice_and_two_calls_in_a_row():
    lin = frozen_linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)
    y = lin(x)
    expected = linear_lrp(x, lin.weight, lin.bias, y)
    r1, r2 = dynlrp.lrp(y, [x, x], rules=LRP0, retain_graph=True)
    assert_close(r1, expected)
    assert_close(r2, expected)
    again, = dynlrp.lrp(y, x, rules=LRP0)
    assert again is not None
    assert_close(again, expected)


def test_inputs_list_is_not_mutated_and_order_is_kept():
    l1, l2 = frozen_linear(4, 3, bias=False), frozen_linear(5, 3, bias=False)
    x1 = torch.randn(2, 4, requires_grad=True)
    x2 = torch.randn(2, 5, requires_grad=True)
    y = l1(x1) + l2(x2)
    a, b = (x1 @ l1.weight.T).detach(), (x2 @ l2.weight.T).detach()
    e1 = linear_lrp(x1, l1.weight, None, a * y.detach() / (a + b))
    e2 = linear_lrp(x2, l2.weight, None, b * y.detach() / (a + b))
    inputs = [x2, x1]
    r2, r1 = dynlrp.lrp(y, inputs, rules=LRP0, retain_graph=True)
    assert len(inputs) == 2 and inputs[0] is x2 and inputs[1] is x1
    assert_close(r1, e1)
    assert_close(r2, e2)
    s1, s2 = dynlrp.lrp(y, (x1, x2), rules=LRP0)
    assert torch.equal(s1, r1) and torch.equal(s2, r2)


def test_weight_and_input_requested_together():
    """``[weight, x]`` works (the paper's code raised on tensor equality in list.remove)."""
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    y = lin(x)
    inputs = [lin.weight, x]
    rw, rx = dynlrp.lrp(y, inputs)
    assert rw.shape == lin.weight.shape and rx.shape == x.shape
    assert len(inputs) == 2 and inputs[0] is lin.weight and inputs[1] is x
    assert torch.isfinite(rw).all() and torch.isfinite(rx).all()


# --- 6.7 products of activations ------------------------------------------------------------------------


def test_bmm_of_two_activations_does_not_double():
    wq, wk = frozen_linear(4, 3, bias=False), frozen_linear(4, 3, bias=False)
    x = torch.randn(2, 5, 4, requires_grad=True)
    y, (r,) = both_modes(lambda: torch.bmm(wq(x), wk(x).transpose(1, 2)), x)
    xd = x.detach()
    q, k, s = xd @ wq.weight.T, xd @ wk.weight.T, y.detach()
    # Uniform split between the two operands (each half), then LRP-0 through the two layers.
    r_q = 0.5 * torch.einsum("bid,bjd,bij->bid", q, k, s / s)
    r_k = 0.5 * torch.einsum("bid,bjd,bij->bjd", q, k, s / s)
    flat = xd.reshape(10, 4)
    expected = (linear_lrp(flat, wq.weight, None, r_q.reshape(10, 3))
                + linear_lrp(flat, wk.weight, None, r_k.reshape(10, 3))).reshape(x.shape)
    assert_close(r, expected)
    assert_close(r.sum(), y.detach().sum())


def test_bmm_of_two_leaves_sums_to_the_seed():
    a = torch.randn(2, 3, 4, requires_grad=True)
    b = torch.randn(2, 4, 5, requires_grad=True)
    seed = torch.randn(2, 3, 5)
    ra, rb = dynlrp.lrp(torch.bmm(a, b), [a, b], seed, rules=LRP0)
    z = torch.bmm(a, b).detach()
    assert_close(ra, 0.5 * torch.einsum("bik,bkj,bij->bik", a.detach(), b.detach(), seed / z))
    assert_close(rb, 0.5 * torch.einsum("bik,bkj,bij->bkj", a.detach(), b.detach(), seed / z))
    assert_close(ra.sum() + rb.sum(), seed.sum())


def test_gated_product_splits():
    l1, l2 = frozen_linear(4, 3, bias=False), frozen_linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    y, (r,) = both_modes(lambda: l1(x) * torch.sigmoid(l2(x)), x)
    half = y.detach() / 2  # each factor gets half; the sigmoid passes its half on
    expected = linear_lrp(x, l1.weight, None, half) + linear_lrp(x, l2.weight, None, half)
    assert_close(r, expected)
    assert_close(r.sum(), y.detach().sum())


def test_single_bias_free_linear_keeps_all_relevance():
    lin = frozen_linear(6, 4, bias=False)
    x = torch.randn(3, 6, requires_grad=True)
    y, (r,) = both_modes(lambda: lin(x), x)
    assert_close(r.sum(1), y.detach().sum(1))


# --- unknown ops ---------------------------------------------------------------------------------


def test_unknown_op_raises_naming_op_and_count():
    x = torch.randn(3, requires_grad=True)
    y = Unregistered.apply(x) + Unregistered.apply(3 * x)
    with pytest.raises(dynlrp.UnknownOpError) as info:
        dynlrp.lrp(y, x)
    message = str(info.value)
    assert "UnregisteredBackward x2" in message
    assert "register" in message  # and says how to add a rule
    assert isinstance(info.value, dynlrp.LRPError)

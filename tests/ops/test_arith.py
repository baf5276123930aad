"""Brute-force tests of the arithmetic op entries (src/dynlrp/ops/arith.py).

Sums (add, sub, rsub, sum, mean) against proportional sharing written out,
``R_i = c_i v_i R / z`` with ``z = sum_i c_i v_i`` (broadcast terms summed back);
products (mul, div) and negation against the identity rule, ``R_x = R`` (halved between two
activations, broadcast relevance summed back).
"""

from __future__ import annotations

import torch

import dynlrp

from .helpers import (
    DT,
    Case,
    case_tests,
    check_closures,
    constants,
    covered,
    leaf,
    positive,
    randn,
    run_lrp,
    stab,
)

B = 3
ATEN = torch.ops.aten


def proportional(terms: list[tuple[torch.Tensor, float]], r: torch.Tensor) -> list[torch.Tensor]:
    """Proportional sharing of ``z = sum_i c_i v_i`` (broadcasting), written out.

    Parameters
    ----------
    terms : list of (torch.Tensor, float)
        Each term's value ``v_i`` and coefficient ``c_i``.
    r : torch.Tensor
        Relevance of ``z``.

    Returns
    -------
    list of torch.Tensor
        ``R_i = sum over broadcast dims of c_i v_i R / z``, one per term.
    """
    z = sum(c * v for v, c in terms)
    share = r / stab(z, 0.0)
    return [(c * v * share).sum_to_size(v.shape) for v, c in terms]


def identity(r: torch.Tensor, shape: torch.Size, n: int = 1) -> torch.Tensor:
    """The identity rule: ``R`` summed back to ``shape``, split evenly between ``n`` operands."""
    return r.sum_to_size(shape) / n


# Constants and trainable parameters the cases close over.
const = constants(11)
C4 = const(4, positive=True)
C34 = const(3, 4, positive=True)
P4 = leaf(const(4, positive=True))  # a trainable parameter (in the graph, never requested)
P34 = leaf(const(3, 4, positive=True))


def _add_cases() -> list[Case]:
    return [
        Case("add-two-activations", ("AddBackward0",), lambda a, b: a + b,
             lambda: [randn(B, 3, 4), randn(B, 3, 4)],
             lambda v, r: proportional([(v[0], 1), (v[1], 1)], r), requested=(0, 1), in_axes=(0, 0)),
        Case("add-broadcast-alpha", ("AddBackward0",), lambda a, b: torch.add(a, b, alpha=2.5),
             lambda: [positive(B, 3, 4), positive(4)],
             lambda v, r: proportional([(v[0], 1), (v[1], 2.5)], r), requested=(0, 1), in_axes=(0, None)),
        Case("add-broadcast-both", ("AddBackward0",), lambda a, b: a + b,
             lambda: [positive(B, 3, 1), positive(B, 1, 4)],
             lambda v, r: proportional([(v[0], 1), (v[1], 1)], r), requested=(0, 1), in_axes=(0, 0)),
        # x + c: the constant is not in the graph and takes no relevance (identity rule).
        Case("add-const-tensor", ("AddBackward0",), lambda x: x + C4, lambda: [positive(B, 3, 4)],
             lambda v, r: [identity(r, v[0].shape)], replay="unrecoverable"),
        Case("add-const-first", ("AddBackward0",), lambda x: C34 + x, lambda: [positive(B, 3, 4)],
             lambda v, r: [identity(r, v[0].shape)], replay="unrecoverable"),
        Case("add-python-scalar", ("AddBackward0",), lambda x: x + 3, lambda: [positive(B, 4)],
             lambda v, r: [identity(r, v[0].shape)], replay="unrecoverable"),
        # a trainable parameter in the graph: the parameter's share leaves with it.
        Case("add-trainable-param", ("AddBackward0",), lambda x: x + P4, lambda: [positive(B, 3, 4)],
             lambda v, r: proportional([(v[0], 1), (P4.detach(), 1)], r)[:1], conserve=False),
        # the activation is the broadcast operand (its inverse must undo the broadcast)
        Case("add-param-broadcasts-x", ("AddBackward0",), lambda x: x + P34, lambda: [positive(B, 1, 4)],
             lambda v, r: proportional([(v[0], 1), (P34.detach(), 1)], r)[:1], conserve=False),
        Case("add-scalar-overload", ("AddBackward1",), lambda x: ATEN.add.Scalar(x, 3.0, alpha=2),
             lambda: [positive(B, 4)], lambda v, r: [identity(r, v[0].shape)],
             replay="unrecoverable"),
    ]


def _sub_cases() -> list[Case]:
    return [
        Case("sub-two-activations", ("SubBackward0",), lambda a, b: a - b,
             lambda: [leaf(2 * randn(B, 3, 4, away=1.0)), leaf(0.1 * randn(B, 3, 4))],
             lambda v, r: proportional([(v[0], 1), (v[1], -1)], r), requested=(0, 1), in_axes=(0, 0)),
        Case("sub-broadcast-alpha", ("SubBackward0",), lambda a, b: torch.sub(a, b, alpha=0.5),
             lambda: [leaf(positive(B, 3, 4) + 1), positive(3, 1)],
             lambda v, r: proportional([(v[0], 1), (v[1], -0.5)], r), requested=(0, 1), in_axes=(0, None)),
        Case("sub-x-minus-const", ("SubBackward0",), lambda x: x - C4, lambda: [leaf(positive(B, 4) + 2)],
             lambda v, r: [identity(r, v[0].shape)], replay="unrecoverable"),
        Case("sub-const-minus-x", ("SubBackward0",), lambda x: (C4 + 2) - x, lambda: [positive(B, 4)],
             lambda v, r: [identity(r, v[0].shape)],
             replay="unrecoverable"),
        Case("sub-python-scalar", ("SubBackward0",), lambda x: x - 3, lambda: [leaf(positive(B, 4) + 4)],
             lambda v, r: [identity(r, v[0].shape)], replay="unrecoverable"),
        Case("sub-trainable-param", ("SubBackward0",), lambda x: x - P4,
             lambda: [leaf(positive(B, 3, 4) + 2)],
             lambda v, r: proportional([(v[0], 1), (P4.detach(), -1)], r)[:1], conserve=False),
        Case("sub-param-minus-x", ("SubBackward0",), lambda x: P4 - x,
             lambda: [leaf(0.2 * positive(B, 3, 4))],
             lambda v, r: proportional([(P4.detach(), 1), (v[0], -1)], r)[1:], conserve=False),
        Case("sub-scalar-overload", ("SubBackward1",), lambda x: ATEN.sub.Scalar(x, 3.0, alpha=0.5),
             lambda: [leaf(positive(B, 4) + 2)], lambda v, r: [identity(r, v[0].shape)],
             replay="unrecoverable"),
        # rsub(a, b, alpha) = b - alpha * a
        Case("rsub-two-activations", ("RsubBackward0",), lambda a, b: torch.rsub(a, b, alpha=2.0),
             lambda: [leaf(positive(B, 4) * 0.1), leaf(positive(B, 4) + 1)],
             lambda v, r: proportional([(v[0], -2.0), (v[1], 1)], r), requested=(0, 1), in_axes=(0, 0)),
        Case("rsub-const", ("RsubBackward0",), lambda x: torch.rsub(x, C4 + 2), lambda: [positive(B, 4)],
             lambda v, r: [identity(r, v[0].shape)],
             replay="unrecoverable"),
        Case("rsub-python-scalar", ("RsubBackward1",), lambda x: 3 - x, lambda: [positive(B, 4)],
             lambda v, r: [identity(r, v[0].shape)], replay="unrecoverable"),
    ]


def _reduce(op, dim, keepdim, x):
    return getattr(x, op)() if dim is None else getattr(x, op)(dim, keepdim=keepdim)


def _reduction_case(op: str, dim, keepdim: bool, shape=(B, 3, 4)) -> Case:
    name = {("sum", True): "SumBackward0", ("sum", False): "SumBackward1",
            ("mean", True): "MeanBackward0", ("mean", False): "MeanBackward1"}[(op, dim is None)]

    def reference(v, r):
        (x,) = v
        total = x.sum() if dim is None or dim == () else x.sum(dim, keepdim=True)
        r_full = r.reshape(total.shape)  # the reduced dims as size 1
        return [x / total * r_full]      # mean: x / n / (sum / n) = x / sum

    batch_mixed = dim is None or dim == () or 0 in ((dim,) if isinstance(dim, int) else dim)
    return Case(f"{op}-dim{dim}-keepdim{keepdim}", (name,), lambda x: _reduce(op, dim, keepdim, x),
                lambda: [positive(*shape)], reference,
                in_axes=None if batch_mixed else (0,), out_axis=None if batch_mixed else 0,
                replay="skip" if dim is None or dim == () else "ok")


REDUCTIONS = [(None, False), (-1, False), (1, True), ((1, -1), False), ((-2, -1), True), (0, False),
              ((0, 2), True), ((), False)]
REDUCTION_CASES = [_reduction_case(op, dim, keepdim) for op in ("sum", "mean") for dim, keepdim in REDUCTIONS]
REDUCTION_CASES.append(Case(
    "sum-signed-values", ("SumBackward1",), lambda x: x.sum(-1), lambda: [randn(B, 5)],
    lambda v, r: [v[0] / v[0].sum(-1, keepdim=True) * r[:, None]], tol=1e-6))


def _product_cases() -> list[Case]:
    return [
        Case("mul-const-tensor", ("MulBackward0",), lambda x: x * C4, lambda: [randn(B, 3, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("mul-python-scalar", ("MulBackward0",), lambda x: x * 2.5, lambda: [randn(B, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("mul-const-first-broadcast-x", ("MulBackward0",), lambda x: C34[:, :1] * x,
             lambda: [randn(B, 1, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("mul-trainable-param", ("MulBackward0",), lambda x: x * P4, lambda: [randn(B, 3, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("mul-two-activations", ("MulBackward0",), lambda a, b: a * b,
             lambda: [randn(B, 3, 1), randn(B, 1, 4)],
             lambda v, r: [identity(r, v[0].shape, 2), identity(r, v[1].shape, 2)], requested=(0, 1),
             in_axes=(0, 0)),
        Case("mul-scalar-overload", ("MulBackward1",), lambda x: ATEN.mul.Scalar(x, -1.5),
             lambda: [randn(B, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("div-const-tensor", ("DivBackward0",), lambda x: x / C4, lambda: [randn(B, 3, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("div-python-scalar", ("DivBackward0",), lambda x: x / 4.0, lambda: [randn(B, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("div-const-by-x", ("DivBackward0",), lambda x: C4 / x, lambda: [positive(B, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("div-two-activations", ("DivBackward0",), lambda a, b: a / b,
             lambda: [randn(B, 3, 4), positive(B, 1, 4)],
             lambda v, r: [identity(r, v[0].shape, 2), identity(r, v[1].shape, 2)], requested=(0, 1),
             in_axes=(0, 0)),
        Case("div-scalar-overload", ("DivBackward1",), lambda x: ATEN.div.Scalar(x, 4.0),
             lambda: [randn(B, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
        Case("neg", ("NegBackward0",), lambda x: -x, lambda: [randn(B, 3, 4)],
             lambda v, r: [identity(r, v[0].shape)]),
    ]


CASES = _add_cases() + _sub_cases() + REDUCTION_CASES + _product_cases()

# One-input cases whose entry can invert the op (recover its input from its output and the
# other operands): the Promise System needs them after a frozen layer with a frozen bias.
INVERTIBLE = [c for c in CASES if c.id in ("add-trainable-param", "add-param-broadcasts-x",
                                           "sub-trainable-param", "sub-param-minus-x", "neg")]


test_relevance, test_replay_before_frozen_layer, test_inverse_after_frozen_layer = case_tests(
    CASES, INVERTIBLE)


def test_contracts_and_kinds():
    for name in ("AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0",
                 "RsubBackward1", "SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1"):
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("sum", "exact"), name
    for name in ("MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1"):
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("product", "exact"), name
    assert dynlrp.ops.lookup("NegBackward0").contract == "exact"


def test_absolute_proportional_rule_on_sub():
    """Eq. 9's variant: ``R_i = |v_i| |J_i| R / sum_j |J_j| |v_j|`` (shares by magnitude)."""
    a, b = randn(B, 4), randn(B, 4)
    y = a - b
    seed = torch.randn_like(y)
    ra, rb = run_lrp(y, [a, b], seed, {"sum": dynlrp.rules.Proportional(absolute=True)},
                     retain_graph=True)  # check_closures reads y's graph
    denom = a.detach().abs() + b.detach().abs()
    torch.testing.assert_close(ra, a.detach().abs() / denom * seed)
    torch.testing.assert_close(rb, b.detach().abs() / denom * seed)
    check_closures(y)


def test_mixed_dtype_add_keeps_each_input_dtype():
    a = randn(B, 4, dtype=torch.float32)
    b = randn(B, 4)
    y = a + b
    assert y.dtype == DT
    ra, rb = run_lrp(y, [a, b], torch.ones_like(y))
    assert (ra.dtype, rb.dtype) == (torch.float32, DT)
    torch.testing.assert_close(ra.double() + rb, torch.ones_like(y), rtol=1e-5, atol=1e-5)


COVERED = covered(CASES)

"""Arithmetic: sums, differences, reductions, products, negation.

Sums (``add``, ``sub``, ``sum``, ``mean``) are kind ``sum``: the default rule shares
relevance in proportion to each term's contribution (paper Eq. 8, with Eq. 9's
absolute-ratio variant as an option); contract ``exact`` -- an operand that is not in the
graph (``x + 3``) is a constant that takes no relevance.
Products are kind ``product``: with one operand in the graph they scale it (identity rule);
with two, AttnLRP's uniform rule splits relevance between them.
"""

from __future__ import annotations

from ..saved import output_meta, saved, saved_dim
from . import Value, register
from .common import has_edge, operand, out_shape, taps_from


def _alpha(node):
    alpha = saved(node, "alpha")
    return 1 if alpha is None else alpha


def _add_forward(node, xs):
    a = operand(node, xs, 0, None, "first operand")
    b = operand(node, xs, 1, None, "second operand")
    alpha = _alpha(node)
    return a + b if alpha == 1 else a + alpha * b  # (1 * b is b: one kernel fewer)


def _unbroadcast(node, index, tensor, mask):
    """An operand recovered from the (broadcast) output, back in the operand's shape and dtype:
    a broadcast operand repeats along the broadcast dims, so one slice holds it (known where
    every copy is known)."""
    child, k = node.next_functions[index]
    if child is None:
        return Value(tensor, mask)
    shape, dtype, _ = output_meta(child, k)
    while tensor.dim() > len(shape):
        tensor, mask = tensor[0], None if mask is None else mask.all(0)
    for d, size in enumerate(shape):
        if size == 1 and tensor.shape[d] != 1:
            tensor = tensor.narrow(d, 0, 1)
            mask = None if mask is None else mask.all(d, keepdim=True)
    return Value(tensor.to(dtype), mask)


def _add_inverse(node, out, xs):
    alpha = _alpha(node)
    known = {}
    if xs[1] is not None:
        known[0] = _unbroadcast(node, 0, out.tensor - (xs[1] if alpha == 1 else alpha * xs[1]), out.mask)
    if xs[0] is not None and alpha != 0:
        b = out.tensor - xs[0]
        known[1] = _unbroadcast(node, 1, b if alpha == 1 else b / alpha, out.mask)
    return known


def _sub_forward(node, xs):
    a = operand(node, xs, 0, None, "first operand")
    b = operand(node, xs, 1, None, "second operand")
    alpha = _alpha(node)
    return a - b if alpha == 1 else a - alpha * b


def _sub_inverse(node, out, xs):
    alpha = _alpha(node)
    known = {}
    if xs[1] is not None:
        known[0] = _unbroadcast(node, 0, out.tensor + alpha * xs[1], out.mask)
    if xs[0] is not None and alpha != 0:
        known[1] = _unbroadcast(node, 1, (xs[0] - out.tensor) / alpha, out.mask)
    return known


register("AddBackward0", "sum", "exact", forward=_add_forward, inverse=_add_inverse)
register("SubBackward0", "sum", "exact", forward=_sub_forward, inverse=_sub_inverse)
register("RsubBackward0", "sum", "exact",
         forward=lambda n, xs: operand(n, xs, 1, None, "minuend")
         - _alpha(n) * operand(n, xs, 0, None, "subtrahend"))
# Scalar variants: the scalar is a constant outside the graph.
register(("AddBackward1", "SubBackward1", "RsubBackward1"), "sum", "exact")


def _sum_forward(node, xs):
    dim = saved_dim(node)
    if dim is None:
        return xs[0].sum().reshape(out_shape(node))
    return xs[0].sum(dim, keepdim=bool(saved(node, "keepdim")))


def _mean_forward(node, xs):
    dim = saved_dim(node)
    if dim is None:
        return xs[0].mean().reshape(out_shape(node))
    return xs[0].mean(dim, keepdim=bool(saved(node, "keepdim")))


register(("SumBackward0", "SumBackward1"), "sum", "exact", forward=_sum_forward)
register(("MeanBackward0", "MeanBackward1"), "sum", "exact", forward=_mean_forward)


def _mul_forward(node, xs):
    return operand(node, xs, 0, "self", "first factor") * operand(node, xs, 1, "other", "second factor")


def _mul_own(node):
    a = saved(node, "self")
    if a is None:
        return None
    b = saved(node, "other")
    if b is None or not (has_edge(node, 0) or has_edge(node, 1)):
        return None
    return a * b


def _div_forward(node, xs):
    return operand(node, xs, 0, "self", "dividend") / operand(node, xs, 1, "other", "divisor")


def _div_own(node):
    a, b = saved(node, "self"), saved(node, "other")
    return None if a is None or b is None else a / b


register("MulBackward0", "product", "exact", forward=_mul_forward, own=_mul_own,
         taps=taps_from((0, "self"), (1, "other")), homogeneous=(0, 1))
register("MulBackward1", "product", "exact", forward=lambda n, xs: xs[0] * saved(n, "other"),
         homogeneous=(0,))
register("DivBackward0", "product", "exact", forward=_div_forward, own=_div_own,
         taps=taps_from((0, "self"), (1, "other")), homogeneous=(0,))  # (not in the divisor)
register("DivBackward1", "product", "exact", forward=lambda n, xs: xs[0] / saved(n, "other"),
         homogeneous=(0,))
register("NegBackward0", "elementwise", "exact", forward=lambda n, xs: -xs[0],
         inverse=lambda n, out, xs: {0: Value(-out.tensor, out.mask)}, homogeneous=(0,))

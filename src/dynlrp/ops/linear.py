"""Linear maps: matrix products and convolutions.

Kind ``linear``: the default rule is epsilon-LRP (paper Eq. 4), R_x = x * J^T (R / (z + eps)),
with the bias inside z; contract ``bias``. When both operands of a product reach the
requested inputs (activation x activation, as in attention), the rule splits uniformly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..saved import saved
from . import Affine, register
from .common import leaf_input, operand, taps_from


def _scale(node):
    alpha, beta = saved(node, "alpha"), saved(node, "beta")
    return (1 if alpha is None else alpha), (1 if beta is None else beta)


def _mm_forward(node, xs):
    return operand(node, xs, 0, "self", "first matrix") @ operand(node, xs, 1, "mat2", "second matrix")


def _mm_own(node):
    a = saved(node, "self")
    if a is None:  # (a frozen weight: autograd kept only the weight)
        return None
    b = saved(node, "mat2")
    return None if b is None else a @ b


def _addmm_forward(node, xs):
    alpha, beta = _scale(node)
    product = operand(node, xs, 1, "mat1", "input") @ operand(node, xs, 2, "mat2", "weight")
    if beta == 0:
        return alpha * product
    return beta * operand(node, xs, 0, None, "bias", owner=saved(node, "mat2")) + alpha * product


def _addmm_own(node):
    a, b = saved(node, "mat1"), saved(node, "mat2")
    alpha, beta = _scale(node)
    if a is None or b is None:
        return None
    if beta == 0:
        return alpha * (a @ b)
    bias = leaf_input(node, 0)
    return None if bias is None else beta * bias + alpha * (a @ b)


def _bmm_own(node):
    a, b = saved(node, "self"), saved(node, "mat2")
    return None if a is None or b is None else torch.bmm(a, b)


def _scale_columns(w, s):
    """The weight of ``s * (x @ w)``: one factor per output column."""
    return w * s.reshape(1, -1)


def _left_adjoint(alpha):
    """The adjoint of ``x -> alpha * (x @ w)``: ``s -> alpha * (s @ w^T)``, in ``s``'s dtype."""
    def adjoint(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        back = s @ w.to(s.dtype).mT
        return back if alpha == 1 else back.mul_(alpha)

    return adjoint


def _product_affine(w, slot, data_slot, alpha, bias=None, known=True, params=(), place_bias=None):
    # x @ w when the data is the left operand, w @ x when it is the right one.
    if w is None:
        return None
    if slot == data_slot:
        return Affine(w, lambda x, v: alpha * (x @ v), bias, known, _scale_columns, False, (w, *params),
                      place_bias, rows=w.dim() == 2, adjoint=_left_adjoint(alpha))
    return Affine(w, lambda x, v: alpha * (v @ x), bias, known, None, False, (w, *params), place_bias)


def _mm_affine(node, slot):
    if slot not in (0, 1):
        return None
    return _product_affine(saved(node, "mat2" if slot == 0 else "self"), slot, 0, 1)


def _addmm_affine(node, slot):
    if slot not in (1, 2):
        return None
    alpha, beta = _scale(node)
    bias, known, params = None, True, ()
    if beta != 0:
        b = leaf_input(node, 0)
        bias, known, params = (None, False, ()) if b is None else (beta * b, True, (b,))
    w = saved(node, "mat2" if slot == 1 else "mat1")
    place = None if known else (lambda b: beta * b)  # a frozen bias, supplied by the model
    return _product_affine(w, slot, 1, alpha, bias, known, params, place)


register("MmBackward0", "linear", "bias", forward=_mm_forward, own=_mm_own,
         taps=taps_from((0, "self"), (1, "mat2")), group="dense", affine=_mm_affine, own_recomputes=True)
register("AddmmBackward0", "linear", "bias", forward=_addmm_forward, own=_addmm_own,
         taps=taps_from((1, "mat1"), (2, "mat2")), group="dense", affine=_addmm_affine,
         own_recomputes=True)
register("BmmBackward0", "linear", "bias",
         forward=lambda n, xs: torch.bmm(operand(n, xs, 0, "self", "first batch"),
                                         operand(n, xs, 1, "mat2", "second batch")),
         own=_bmm_own, taps=taps_from((0, "self"), (1, "mat2")), own_recomputes=True)
register("MvBackward0", "linear", "bias",
         forward=lambda n, xs: torch.mv(operand(n, xs, 0, "self", "matrix"),
                                        operand(n, xs, 1, "vec", "vector")),
         taps=taps_from((0, "self"), (1, "vec")))


def _conv(node, x, w, bias):
    stride, padding, dilation = saved(node, "stride"), saved(node, "padding"), saved(node, "dilation")
    groups = saved(node, "groups")
    dims = w.dim() - 2
    if saved(node, "transposed"):
        out_pad = saved(node, "output_padding")
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(x, w, bias, stride, padding, out_pad, groups, dilation)
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    return fn(x, w, bias, stride, padding, dilation, groups)


def _conv_has_bias(node):
    sizes = saved(node, "bias_sym_sizes_opt")
    return sizes is not None and tuple(sizes) != (0,)


def _conv_forward(node, xs):
    x = operand(node, xs, 0, "input", "input")
    w = operand(node, xs, 1, "weight", "weight")
    bias = operand(node, xs, 2, None, "bias", owner=w) if _conv_has_bias(node) else None
    return _conv(node, x, w, bias)


def _conv_own(node):
    x, w = saved(node, "input"), saved(node, "weight")
    if x is None or w is None:
        return None
    bias = None
    if _conv_has_bias(node):
        bias = leaf_input(node, 2)
        if bias is None:
            return None
    return _conv(node, x, w, bias)


def _scale_conv(w, s):
    """The weight of ``s * conv(x, w)``: one factor per output channel (dim 0 of ``w``)."""
    return w * s.reshape([-1] + [1] * (w.dim() - 1))


def _scale_conv_transposed(groups):
    def scale(w, s):
        # A transposed convolution's weight is (in, out / groups, *kernel), grouped along dim 0.
        g = groups
        blocks = w.reshape(g, w.shape[0] // g, *w.shape[1:])
        factors = s.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        return (blocks * factors).reshape(w.shape)

    return scale


def _conv_affine(node, slot):
    w = saved(node, "weight")
    if slot != 0 or w is None:
        return None
    bias, known, params = None, True, (w,)
    if _conv_has_bias(node):
        b = leaf_input(node, 2)
        if b is None:
            known = False
        else:
            bias, params = b.reshape([1, -1] + [1] * (w.dim() - 2)), (w, b)
    scale = _scale_conv_transposed(saved(node, "groups")) if saved(node, "transposed") else _scale_conv
    place = None if known else (lambda b: b.reshape([1, -1] + [1] * (w.dim() - 2)))  # a frozen bias
    return Affine(w, lambda x, v: _conv(node, x, v, None), bias, known, scale, False, params, place)


def _conv_vjp(node, grads, slots):
    """``J^T g`` of a pointwise convolution (every kernel size 1, no padding, one group, not
    transposed) with respect to its input: ``W^T g`` at every output position, one matrix
    product over channels, and 0 at the input positions a stride skips. The node's own backward
    runs oneDNN's backward-data kernel, which for ResNet-50's 1x1 convolutions took 1.1-1.3x
    (stride 1) and 2.2-2.8x (stride 2) this time on the CPU (``benchmarks/adjoints.py``). None for
    any other convolution, or where another input than the data (slot 0) is asked."""
    g = grads[0]
    if (len(slots) != 1 or slots[0] != 0 or g is None or not g.is_contiguous() or saved(node, "transposed")
            or saved(node, "groups") != 1):
        return None
    w = saved(node, "weight")
    if (w is None or g.dim() != w.dim() or w.dtype != g.dtype or any(k != 1 for k in w.shape[2:])
            or any(p != 0 for p in saved(node, "padding"))):
        return None
    batch, out_channels, in_channels = g.shape[0], w.shape[0], w.shape[1]
    mapped = torch.matmul(w.reshape(out_channels, in_channels).t(), g.reshape(batch, out_channels, -1))
    stride = tuple(saved(node, "stride"))
    if all(s == 1 for s in stride):  # (the input's positions are the output's)
        return {0: mapped.reshape(batch, in_channels, *g.shape[2:])}
    x = saved(node, "input")  # (its size: a stride leaves up to stride - 1 positions at the end)
    if x is None:
        return None
    full = g.new_zeros(x.shape)
    full[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = \
        mapped.reshape(batch, in_channels, *g.shape[2:])
    return {0: full}


register("ConvolutionBackward0", "linear", "bias", forward=_conv_forward, own=_conv_own,
         taps=taps_from((0, "input"), (1, "weight")), group="conv", affine=_conv_affine,
         own_recomputes=True, vjp=_conv_vjp)


"""Linear maps: matrix products and convolutions.

Kind ``linear``: the default rule is epsilon-LRP (paper Eq. 4), R_x = x * J^T (R / (z + eps)),
with the bias inside z; contract ``bias``. When both operands of a product reach the
requested inputs (activation x activation, as in attention), the rule splits uniformly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..saved import saved
from . import register
from .common import leaf_input, operand, taps_from


def _scale(node):
    alpha, beta = saved(node, "alpha"), saved(node, "beta")
    return (1 if alpha is None else alpha), (1 if beta is None else beta)


def _mm_forward(node, xs):
    return operand(node, xs, 0, "self", "first matrix") @ operand(node, xs, 1, "mat2", "second matrix")


def _mm_own(node):
    a, b = saved(node, "self"), saved(node, "mat2")
    return None if a is None or b is None else a @ b


def _addmm_forward(node, xs):
    alpha, beta = _scale(node)
    product = operand(node, xs, 1, "mat1", "input") @ operand(node, xs, 2, "mat2", "weight")
    if beta == 0:
        return alpha * product
    return beta * operand(node, xs, 0, None, "bias") + alpha * product


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


register("MmBackward0", "linear", "bias", forward=_mm_forward, own=_mm_own,
         taps=taps_from((0, "self"), (1, "mat2")))
register("AddmmBackward0", "linear", "bias", forward=_addmm_forward, own=_addmm_own,
         taps=taps_from((1, "mat1"), (2, "mat2")))
register("BmmBackward0", "linear", "bias",
         forward=lambda n, xs: torch.bmm(operand(n, xs, 0, "self", "first batch"),
                                         operand(n, xs, 1, "mat2", "second batch")),
         own=_bmm_own, taps=taps_from((0, "self"), (1, "mat2")))
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
    bias = operand(node, xs, 2, None, "bias") if _conv_has_bias(node) else None
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


register("ConvolutionBackward0", "linear", "bias", forward=_conv_forward, own=_conv_own,
         taps=taps_from((0, "input"), (1, "weight")))


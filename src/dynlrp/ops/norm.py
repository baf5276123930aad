"""Batch normalisation as the affine map it is at inference.

Kind ``linear`` (y = (x - mean) * w / sqrt(var + eps) + b, an affine map of x per channel):
the default rule is epsilon-LRP with the bias inside z; contract ``bias``. In training mode
the batch statistics autograd saved are used (they mix examples; prefer ``model.eval()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dtypes import compute_dtype
from ..saved import saved
from . import Affine, register
from .common import has_edge, leaf_input, operand, out_shape, taps_from


def _stats(node, x):
    shape = [1, -1] + [1] * (x.dim() - 2)
    if saved(node, "training"):
        mean, invstd = saved(node, "result1"), saved(node, "result2")
    else:
        mean = saved(node, "running_mean")
        var = saved(node, "running_var")
        invstd = (var.to(compute_dtype(var.dtype)) + saved(node, "eps")).rsqrt()
    return mean.reshape(shape), invstd.reshape(shape), shape


def _batch_norm(node, x, bias):
    """``(x - mean) * invstd * weight + bias``. At inference in float32 or float64, the kernel of
    the forward pass itself (the same numbers, in half the time of a multiply-add); otherwise one
    multiply-add, ``x * scale + shift``, with the per-channel ``scale`` and ``shift`` made first.
    ``bias`` is None when there is none."""
    if not saved(node, "training") and x.dtype in (torch.float32, torch.float64):
        mean, var, weight = saved(node, "running_mean"), saved(node, "running_var"), saved(node, "weight")
        if all(t is None or t.dtype == x.dtype for t in (mean, var, weight, bias)) and mean is not None:
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, saved(node, "eps"))
    dtype = x.dtype  # float16 / bfloat16: computed in float32 and rounded once, as the kernel does
    x = x.to(compute_dtype(dtype))
    mean, invstd, shape = _stats(node, x)
    weight = saved(node, "weight")
    scale = invstd if weight is None else invstd * weight.reshape(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(shape)
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype)).to(dtype)


def _has_bias(node):
    # No weight: a bias in the graph is added; a frozen one cannot be told from none.
    return saved(node, "weight") is not None or has_edge(node, 2)


def _bn_forward(node, xs):
    x = operand(node, xs, 0, "input", "input")
    bias = operand(node, xs, 2, None, "bias", owner=saved(node, "weight")) if _has_bias(node) else None
    return _batch_norm(node, x, bias)


def _bn_own(node):
    x = saved(node, "input")
    if x is None:
        return None
    if not _has_bias(node):
        return _batch_norm(node, x, None)
    bias = leaf_input(node, 2)
    return None if bias is None else _batch_norm(node, x, bias)


def _bn_affine(node, slot):
    """At inference batch norm is ``x * s + shift`` per channel: ``s = weight / sqrt(var + eps)``,
    ``shift = bias - mean * s``. In training mode it mixes the examples of a batch: no view."""
    if slot != 0 or saved(node, "training"):
        return None
    shape = [1, -1] + [1] * (len(out_shape(node)) - 2)
    mean, weight = saved(node, "running_mean"), saved(node, "weight")
    scale = torch.add(saved(node, "running_var"), saved(node, "eps")).rsqrt_()
    params = (mean,) if weight is None else (weight, mean)
    if weight is not None:
        scale.mul_(weight)
    shift, known, place = None, True, None
    if weight is not None or has_edge(node, 2):  # as in _batch_norm: no weight, no edge -> no bias
        b = leaf_input(node, 2)
        if b is None and weight is not None:  # a frozen bias: the model has it (Affine.place_bias)
            def place(bias: torch.Tensor) -> torch.Tensor:
                return torch.addcmul(bias, mean, scale, value=-1).reshape(shape)
        shift, known = (None, False) if b is None else (torch.addcmul(b, mean, scale, value=-1), True)
    else:
        shift = torch.mul(mean, scale).neg_()
    return Affine(scale, lambda x, v: x * v.reshape(shape), None if shift is None else shift.reshape(shape),
                  known, lambda w, s: w * s, True, params, place)


register(("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"),
         "linear", "bias", forward=_bn_forward, own=_bn_own, taps=taps_from((0, "input")),
         group="batchnorm", affine=_bn_affine)

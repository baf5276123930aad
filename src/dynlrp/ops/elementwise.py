"""Single-input elementwise ops: nonlinearities, copies, dropout.

Kind ``elementwise``: the default rule is the identity (relevance passes unchanged, paper
7.1; AttnLRP's identity rule for activations). Contract ``exact``. Their forward closures
let Promise branches replay them; ``own`` rebuilds the output where autograd kept enough.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..saved import output_meta, saved
from . import ClippedValue, Value, register
from .common import scalar, taps_from


def _result(node):
    return saved(node, "result")


def _identity_forward(node, xs):
    return xs[0]


def _identity_inverse(node, out, xs):
    return {0: Value(out.tensor, out.mask)}  # (a Value of its own: values.merge may fill an owned one in)


def _relu_inverse(node, out, xs):
    # relu(x) = out: x is known exactly where out > 0 and unknown where it was clipped.
    if out.exact:
        return {0: ClippedValue(out.tensor)}
    mask = out.tensor.gt(scalar(0, out.tensor))
    return {0: Value(out.tensor, mask & out.mask)}


register("ReluBackward0", "elementwise", "exact", forward=lambda n, xs: torch.relu(xs[0]),
         own=_result, inverse=_relu_inverse, homogeneous=(0,))
register("TanhBackward0", "elementwise", "exact", forward=lambda n, xs: torch.tanh(xs[0]), own=_result)
register("SigmoidBackward0", "elementwise", "exact", forward=lambda n, xs: torch.sigmoid(xs[0]), own=_result)
register("ExpBackward0", "elementwise", "exact", forward=lambda n, xs: torch.exp(xs[0]), own=_result)


def _gelu(node, x):
    return F.gelu(x, approximate=saved(node, "approximate") or "none")


def _gelu_quotient(node, x, out):
    """``gelu(x) / x``: the normal CDF, or its tanh approximation."""
    if (saved(node, "approximate") or "none") == "none":  # Phi(x) = erfc(-x / sqrt(2)) / 2, in place
        return torch.mul(x, -math.sqrt(0.5), out=out).erfc_().mul_(0.5)
    # 0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), in place
    return (torch.pow(x, 3, out=out).mul_(0.044715).add_(x).mul_(math.sqrt(2 / math.pi))
            .tanh_().add_(1).mul_(0.5))


def _softplus(node, x):
    return F.softplus(x, beta=saved(node, "beta"), threshold=saved(node, "threshold"))


def _elu(node, x):
    alpha, scale, input_scale = saved(node, "alpha"), saved(node, "scale"), saved(node, "input_scale")
    return scale * torch.where(x > 0, x, alpha * (torch.exp(x * input_scale) - 1))


def _hardtanh(node, x):
    return F.hardtanh(x, saved(node, "min_val"), saved(node, "max_val"))


_SELF_FUNCS = {
    "GeluBackward0": _gelu,
    "SiluBackward0": lambda n, x: F.silu(x),
    "SoftplusBackward0": _softplus,
    "EluBackward0": _elu,
    "LeakyReluBackward0": lambda n, x: F.leaky_relu(x, saved(n, "negative_slope")),
    "HardtanhBackward0": _hardtanh,
    "HardswishBackward0": lambda n, x: F.hardswish(x),
    "HardsigmoidBackward0": lambda n, x: F.hardsigmoid(x),
    "MishBackward0": lambda n, x: F.mish(x),
    "ClampBackward1": lambda n, x: torch.clamp(x, saved(n, "min"), saved(n, "max")),
    "ClampMinBackward0": lambda n, x: torch.clamp_min(x, saved(n, "min")),
}


# f(x) / x of the ops above with f(0) = 0 (see OpEntry.quotient)
_QUOTIENTS = {
    "GeluBackward0": _gelu_quotient,
    "SiluBackward0": lambda n, x, out: torch.sigmoid(x, out=out),
    "HardswishBackward0": lambda n, x, out: torch.add(x, 3, out=out).clamp_(0, 6).div_(6),
}
# positively homogeneous: f(t x) = t f(x) for t > 0
_HOMOGENEOUS = {"LeakyReluBackward0"}


def _register_self_func(name, func):
    register(
        name, "elementwise", "exact",
        forward=lambda n, xs: func(n, xs[0]),
        own=lambda n: None if saved(n, "self") is None else func(n, saved(n, "self")),
        taps=taps_from((0, "self")),
        quotient=_QUOTIENTS.get(name),
        homogeneous=(0,) if name in _HOMOGENEOUS else (),
    )


for _name, _func in _SELF_FUNCS.items():
    _register_self_func(_name, _func)

# Copies: relevance and values pass unchanged (a routing op that moves every value in place).
register(("CloneBackward0", "AliasBackward0", "ContiguousBackward0", "LiftFreshBackward0"),
         "route", "route", forward=_identity_forward, inverse=_identity_inverse, homogeneous=(0,))
register("ToCopyBackward0", "elementwise", "exact",
         forward=lambda n, xs: xs[0].to(output_meta(n, 0)[1]),
         inverse=lambda n, out, xs: {0: Value(out.tensor.to(_input_dtype(n)), out.mask)}, homogeneous=(0,))


def _input_dtype(node):
    child, index = node.next_functions[0]
    return output_meta(child, index)[1]
register("NativeDropoutBackward0", "elementwise", "exact", homogeneous=(0,))

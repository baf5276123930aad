"""Layer and group normalisation, with the denominator as a constant.

``y = (x - mean(x)) * rstd * w + b`` over the normalised dimensions. Kind ``norm``; the
default rule (:class:`dynlrp.rules.ConstantDenominator`) is AttnLRP's treatment: the
normalising denominator ``rstd`` is a constant (autograd saved it), so the layer is an affine
map of ``x`` -- centring, scaling, the weight -- and epsilon-LRP shares relevance through it,
the bias taking its share. Contract ``bias``. :class:`dynlrp.rules.Identity` is the other
choice (LxT's rule for RMSNorm): relevance passes unchanged.

Each entry's ``affine`` view is that map (``linear(x, w)`` with ``rstd`` from the saved
statistics); its ``forward`` closure replays the layer with the same saved ``rstd``, which
equals the true output whenever ``x`` is the true input.

RMSNorm as models write it (``x * rsqrt(mean(x ** 2) + eps) * w``) is not one node but a
``pow -> mean -> add -> rsqrt -> mul`` chain (:mod:`dynlrp.ops.math`); the product rules
see that ``rsqrt(...)`` is a gate of ``x`` and treat it as the constant. Instance norm runs as
batch norm in training mode (:mod:`dynlrp.ops.norm`).
"""

from __future__ import annotations

import torch

from ..saved import saved
from . import Affine, MissingOperand, register
from .common import leaf_input, operand, taps_from


def _param(node, xs, slot: int, name: str | None):
    """A weight or bias: its graph value, the saved tensor, or the leaf behind the edge."""
    if xs is not None and xs[slot] is not None:
        return xs[slot]
    value = saved(node, name) if name else None
    if value is None:
        value = leaf_input(node, slot)
    return value


# -- layer norm ---------------------------------------------------------------------------
def _ln_linear(node):
    dims = tuple(range(-len(saved(node, "normalized_shape")), 0))
    rstd = saved(node, "result2")

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(dims, keepdim=True)) * rstd * w

    return linear


def _ln_adjoint(node):
    """The adjoint of :func:`_ln_linear`'s map: centring is its own adjoint, so
    ``J^T s = centre(s * w * rstd)`` (four passes, no autograd)."""
    dims = tuple(range(-len(saved(node, "normalized_shape")), 0))
    rstd = saved(node, "result2")

    def adjoint(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t = s * w.to(s.dtype)
        t.mul_(rstd.to(s.dtype))
        return t.sub_(t.mean(dims, keepdim=True))

    return adjoint


def _ln_weight(node, xs=None):
    w = _param(node, xs, 1, "weight")
    return torch.ones(tuple(saved(node, "normalized_shape")), dtype=saved(node, "result2").dtype,
                      device=saved(node, "result2").device) if w is None else w


def _ln_forward(node, xs):
    """``(x - mean) * rstd * w + b`` with the saved statistics: without grad and where every
    tensor has one dtype, in one new tensor and four passes (the saved mean, not one
    recomputed), else as :func:`_ln_linear`'s map plus the bias."""
    x, w = operand(node, xs, 0, "input", "input"), _ln_weight(node, xs)
    b = _param(node, xs, 2, "bias")
    mean, rstd = saved(node, "result1"), saved(node, "result2")
    if (mean is not None and not torch.is_grad_enabled()
            and all(t is None or t.dtype == x.dtype for t in (mean, rstd, w, b))):
        y = (x - mean).mul_(rstd).mul_(w)
        return y if b is None else y.add_(b)
    y = _ln_linear(node)(x, w)
    return y if b is None else y + b


def _ln_own(node):
    return None if saved(node, "input") is None else _ln_forward(node, [None, None, None])


def _ln_affine(node, slot):
    if slot != 0:
        return None
    w, b = _ln_weight(node), _param(node, None, 2, "bias")
    params = tuple(p for p in (_param(node, None, 1, "weight"), b) if p is not None)
    return Affine(w, _ln_linear(node), b, True, None, False, params, adjoint=_ln_adjoint(node))


register("NativeLayerNormBackward0", "norm", "bias", forward=_ln_forward, own=_ln_own,
         taps=taps_from((0, "input")), affine=_ln_affine)


# -- group norm ---------------------------------------------------------------------------
def _gn_linear(node):
    n, c, groups = saved(node, "N"), saved(node, "C"), saved(node, "group")
    rstd = saved(node, "result2")  # (N, groups)

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g = x.reshape(n, groups, -1)
        g = (g - g.mean(-1, keepdim=True)) * rstd.unsqueeze(-1)
        return g.reshape(x.shape) * w.reshape(1, c, *([1] * (x.dim() - 2)))

    return linear


def _gn_adjoint(node):
    """The adjoint of :func:`_gn_linear`'s map: ``J^T s = centre_group(s * w) * rstd``."""
    n, c, groups = saved(node, "N"), saved(node, "C"), saved(node, "group")
    rstd = saved(node, "result2")

    def adjoint(s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        g = (s * w.to(s.dtype).reshape(1, c, *([1] * (s.dim() - 2)))).reshape(n, groups, -1)
        g.mul_(rstd.to(s.dtype).unsqueeze(-1))
        return g.sub_(g.mean(-1, keepdim=True)).reshape(s.shape)

    return adjoint


def _gn_weight(node, xs=None):
    w = _param(node, xs, 1, "weight")
    if w is None:
        rstd = saved(node, "result2")
        return torch.ones(saved(node, "C"), dtype=rstd.dtype, device=rstd.device)
    return w


def _gn_bias(node, xs=None):
    """The bias, or ``None`` when the layer has none. Autograd does not save a group norm's
    bias; a frozen bias is not in the graph either. An affine layer (a weight is saved) is
    taken to have one -- unknown then."""
    b = _param(node, xs, 2, None)
    if b is None and _param(node, xs, 1, "weight") is not None:
        raise MissingOperand(f"the bias of {node.name()} (a frozen parameter autograd did not keep)")
    return b


def _gn_forward(node, xs):
    y = _gn_linear(node)(operand(node, xs, 0, "input", "input"), _gn_weight(node, xs))
    b = _gn_bias(node, xs)
    return y if b is None else y + b.reshape(1, -1, *([1] * (y.dim() - 2)))


def _gn_own(node):
    try:
        return None if saved(node, "input") is None else _gn_forward(node, [None, None, None])
    except MissingOperand:
        return None


def _gn_affine(node, slot):
    if slot != 0:
        return None
    w = _gn_weight(node)
    try:
        b, known = _gn_bias(node), True
    except MissingOperand:
        b, known = None, False
    if b is not None:
        b = b.reshape(1, -1, *([1] * (len(saved(node, "input").shape) - 2)))
    params = tuple(p for p in (_param(node, None, 1, "weight"), _param(node, None, 2, None)) if p is not None)
    return Affine(w, _gn_linear(node), b, known, None, False, params, adjoint=_gn_adjoint(node))


register("NativeGroupNormBackward0", "norm", "bias", forward=_gn_forward, own=_gn_own,
         taps=taps_from((0, "input")), affine=_gn_affine)

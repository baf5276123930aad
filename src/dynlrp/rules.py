"""The math of LRP rules, independent of ops.

A rule answers one question for one autograd node: given the relevance ``R`` of the node's
output(s), how much relevance goes to each input? Ops say *how inputs combine*
(:mod:`dynlrp.ops`); rules say *how relevance is shared*. Every rule is a small class with
its formula in the docstring, the forward values it :meth:`Rule.needs`, and ``__call__``.

Notation: ``z`` is the node's forward output, ``v_i`` its input values, ``J_i`` the
Jacobian of the output with respect to input ``i`` (for the linear maps rules apply to,
``J_i^T s`` is what the autograd node itself computes from ``s``), ``n`` the number of
inputs that lead to a requested input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RuleContext


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``: the epsilon stabiliser of paper Eq. 4."""
    if eps == 0:
        return torch.where(z == 0, torch.ones_like(z), z)
    return z + torch.where(z >= 0, eps, -eps).to(z.dtype)


def sum_to(r: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast relevance tensor back to an operand's ``shape`` by summing."""
    if r.shape == shape:
        return r
    return r.sum_to_size(shape)


@dataclass(frozen=True)
class Needs:
    """Which forward values a rule needs: input indices and/or the output."""

    inputs: tuple[int, ...] = ()
    output: bool = False


class Rule:
    """Base class. Subclasses define :meth:`needs` and :meth:`__call__`."""

    def needs(self, ctx: RuleContext) -> Needs:
        return Needs()

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Epsilon(Rule):
    """Epsilon-LRP (paper Eq. 4; Bach et al. 2015), for linear and affine maps.

    ``R_i = (1/n) * v_i * J_i^T (R / (z + eps * sign(z)))`` for each input ``i`` that leads
    to a requested input. ``z`` includes the bias, so the bias (and ``eps``) absorb their
    share: conservation holds up to them. With ``n = 2`` (a product of two activations,
    such as attention scores) this is AttnLRP's uniform epsilon rule (paper Eq. 6).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def needs(self, ctx: RuleContext) -> Needs:
        return Needs(inputs=ctx.reaching, output=True)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        s = ctx.relevance / stabilize(ctx.output, self.eps)
        grads = ctx.vjp(s)
        share = 1.0 / max(len(ctx.reaching), 1) if ctx.kind != "sum" else 1.0
        out: list[torch.Tensor | None] = [None] * ctx.num_inputs
        for i in ctx.reaching:
            out[i] = ctx.input(i) * grads[i] * share
        return out


class Proportional(Epsilon):
    """Proportional sharing for sums (paper Eq. 8; Zennit's ``Norm``).

    ``R_i = v_i * J_i^T (R / z)``: each term of a sum gets relevance in proportion to its
    contribution; exact conservation (``eps`` only guards ``z = 0``). With
    ``absolute=True`` the paper's Eq. 9 variant shares by magnitude:
    ``R_i = |v_i| * |J_i|^T (R / sum_j |J_j| |v_j|)``.
    """

    def __init__(self, eps: float = 0.0, absolute: bool = False) -> None:
        super().__init__(eps)
        self.absolute = bool(absolute)

    def needs(self, ctx: RuleContext) -> Needs:
        if self.absolute:
            return Needs(inputs=ctx.graph_inputs, output=False)
        return super().needs(ctx)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        if not self.absolute:
            return super().__call__(ctx)
        signs = ctx.vjp(torch.ones_like(ctx.relevance))
        mags = [None if signs[i] is None else ctx.input(i).abs() * torch.sign(signs[i])
                for i in range(ctx.num_inputs)]
        denom = ctx.forward(mags)
        grads = ctx.vjp(ctx.relevance / stabilize(denom, self.eps))
        out: list[torch.Tensor | None] = [None] * ctx.num_inputs
        for i in ctx.reaching:
            out[i] = ctx.input(i).abs() * torch.sign(signs[i]) * grads[i]
        return out


class Identity(Rule):
    """The identity ("pass") rule: ``R_in = R`` (paper 7.1; Zennit ``Pass``; AttnLRP's rule
    for activations). Broadcast relevance is summed back to the input's shape. With ``n``
    inputs leading to requested inputs, each gets ``R / n`` -- AttnLRP's uniform rule for
    elementwise products of activations."""

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * ctx.num_inputs
        n = len(ctx.reaching)
        for i in ctx.reaching:
            r = sum_to(ctx.relevance, ctx.input_shape(i))
            out[i] = r / n if n > 1 else r
        return out


class Route(Rule):
    """Exact routing for shape, indexing and selection ops: ``R_in = J^T R``.

    For these 0/1 maps the adjoint moves each relevance value to where its forward value
    came from (summing copies), so relevance is permuted, never created. For max pooling
    this is winner-take-all.
    """

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        grads = ctx.vjp_all(ctx.relevances)
        return [grads[i] if i in ctx.reaching else None for i in range(ctx.num_inputs)]


DEFAULT_RULES: dict[str, Rule] = {
    "linear": Epsilon(1e-6),
    "sum": Proportional(),
    "product": Identity(),
    "elementwise": Identity(),
    "route": Route(),
}


def default_rule(kind: str) -> Rule | None:
    return DEFAULT_RULES.get(kind)



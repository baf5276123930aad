"""The math of LRP rules, independent of ops.

A rule answers one question for one autograd node: given the relevance ``R`` of the node's
output(s), how much relevance goes to each input? Ops say *how inputs combine*
(:mod:`dynlrp.ops`); rules say *how relevance is shared*. Every rule is a small class with
its formula in the docstring, the forward values it :meth:`Rule.needs`, and ``__call__``.

Notation: ``z`` is the node's forward output, ``v_i`` its input values, ``J_i`` the
Jacobian of the output with respect to input ``i`` (for the linear maps rules apply to,
``J_i^T s`` is what the autograd node itself computes from ``s``), ``n`` the number of
inputs that lead to a requested input.

Rules that modify weights (:class:`Gamma`, :class:`ZPlus`, :class:`AlphaBeta`,
:class:`ZBox`, :class:`Flat`, :class:`WSquare`) see the op as ``z = W x + b`` through
``ctx.affine()`` (the op entry's :class:`~dynlrp.ops.Affine` view) and run its linear map
again with modified weights. There ``x+ = max(x, 0)``, ``x- = min(x, 0)``, likewise ``W+``,
``W-``, ``b+``, ``b-``; ``stab(z) = z + eps * sign(z)`` with ``sign(0) = +1``; sums run over
the output neurons ``j`` a neuron ``i`` feeds. The formulas are the generalized forms of
Zennit 0.5.1 (Anders et al. 2021), valid for inputs and weights of either sign.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.autograd.graph import get_gradient_edge

from .dtypes import compute_dtype
from .ops.common import scalar

if TYPE_CHECKING:  # pragma: no cover
    from .engine import RuleContext
    from .ops import Affine


def stabilize(z: torch.Tensor, eps: float, nonnegative: bool = False, owned: bool = False,
              zeros_idle: bool = False) -> torch.Tensor:
    """The epsilon stabiliser of paper Eq. 4, ``z + eps * sign(z)`` with ``sign(0) = +1``,
    scaled to the dtype ``d`` that ``z`` was computed in.

    The result is in ``c = compute_dtype(d)`` (float32 for float16 and bfloat16, else ``d``),
    the dtype the engine carries relevance in, so ``R / stab(z)`` neither overflows nor loses
    the stabiliser to rounding::

        stab(z) = sign(z) * max(|z| + eps, tiny_d)      (eps > 0, sign(0) = +1)
        stab(z) = z,  with z = 0 replaced by 1            (eps = 0)

    where ``tiny_d = torch.finfo(d).tiny`` is the smallest normal number of ``d``: the
    denominator's magnitude is floored there. Below it a value of ``d`` is subnormal or flushed
    to zero: it has lost its relative precision, so a smaller denominator would only divide by
    rounding noise (and for float16 ``eps = 1e-6`` is itself subnormal: ``R / eps`` overflowed
    float16's range of 65504 before relevance was carried in float32). The floor is ``6.1e-5``
    for float16, and only denominators below it change; for bfloat16 (``1.2e-38``), float32
    and float64 it is far below any usual ``eps`` and ``stab`` is the textbook formula
    ``z + eps * sign(z)``, as it is for every dtype once ``eps >= tiny_d``. ``eps = 0`` (LRP-0, proportional
    sharing) is left exact: in ``c`` the ratio stays finite, and relevance is cast back to the
    input's dtype only at the end (:class:`dynlrp.LRP` raises
    :class:`~dynlrp.errors.NonFiniteRelevanceError` if it does not fit).

    Parameters
    ----------
    z
        Denominators, any floating dtype.
    eps
        The stabiliser (``>= 0``).
    nonnegative
        ``z >= 0`` is known (the positive part of z+ and alpha-beta): ``sign(z) = +1`` everywhere,
        so ``stab(z) = max(z + eps, tiny_d)`` without a sign test (the same numbers).
    owned
        ``z`` is a temporary of the caller's, which it may overwrite: with ``nonnegative`` and
        ``z`` already in the compute dtype, the result is written into ``z``.
    zeros_idle
        The relevance to be divided is 0 wherever ``z`` is 0 (the engine knows it from the rules:
        :meth:`Rule.vanishes`), so the sign a zero gets changes nothing but the sign of a zero
        quotient: ``-0.0`` may take ``-eps``, which saves a pass.

    Returns
    -------
    torch.Tensor
        The stabilised denominators, in ``compute_dtype(z.dtype)``: a new tensor, or ``z``
        itself when ``owned`` allows.
    """
    dtype = z.dtype
    key = (dtype, z.device, eps)
    how = _STABILIZERS.get(key)
    if how is None:
        c, tiny = compute_dtype(dtype), torch.finfo(dtype).tiny
        zc = z.to(c) if dtype != c else z  # (0 and eps, or 0 and 1 for eps = 0, as 0-d tensors)
        how = (c, tiny, eps >= tiny, scalar(0.0, zc), scalar(eps if eps != 0 else 1.0, zc))
        if len(_STABILIZERS) < 256:
            _STABILIZERS[key] = how
    c, tiny, textbook, zero, pos = how
    if dtype != c:
        z = z.to(c)
    if nonnegative and eps > 0:  # (pos: eps as a 0-d tensor, which adds in half the time of a number)
        den = z.add_(pos) if owned or dtype != c else z + pos  # (z.to(c) is a new tensor too)
        return den if eps >= tiny else den.clamp_(min=tiny)
    if eps == 0:
        return torch.where(z.eq(zero), pos, z)  # (pos is 1 here): zeros become ones
    if textbook:  # float32 and float64 with any usual eps: the textbook formula, as
        # z + copysign(eps, z + 0) -- the same sums as z + where(z >= 0, eps, -eps) (z + 0 makes
        # -0.0 into +0.0, so sign(-0.0) = +1 too) in three fast kernels; on the CPU `where` and
        # `masked_fill` take about five times as long as all three (they read a boolean mask)
        if zeros_idle:
            return torch.copysign(pos, z).add_(z)
        den = z.add(zero)
        return torch.copysign(pos, den, out=den).add_(z)
    return torch.where(z >= 0, (z + eps).clamp(min=tiny), (z - eps).clamp(max=-tiny))


# (dtype, device, eps) -> (compute dtype, tiny, eps >= tiny, 0, eps or 1): what stabilize works out once
_STABILIZERS: dict[tuple, tuple] = {}


def divide(r: torch.Tensor, z: torch.Tensor, eps: float, nonnegative: bool = False,
           owned: bool = False, zeros_idle: bool = False) -> torch.Tensor:
    """``r / stab(z)`` (:func:`stabilize`): relevance per unit of the stabilised denominator, the
    ``s`` of paper Eq. 4. The quotient is written into the denominator's new tensor when the shapes
    and dtypes allow, so it costs one allocation, not two; with ``owned`` (``z`` is the caller's
    temporary) and ``nonnegative``, into ``z`` itself, so it costs none. With ``eps = 0``, on the CPU
    (where reading a number back costs no device sync), ``r / z`` at once when ``z`` has no zero:
    ``r / 0`` is infinite or NaN, so a finite sum of the quotients says so (a sum is one fast pass,
    about a fifth of the quotient's time and a seventh of a count of zeros; a sum that is not
    finite for any other reason only takes the general path, which gives the same numbers).
    ``zeros_idle``: ``r`` is 0 wherever ``z`` is (:func:`stabilize`)."""
    if eps == 0 and not nonnegative and z.is_cpu and compute_dtype(z.dtype) == z.dtype:
        quotient = r / z
        if math.isfinite(quotient.sum()):
            return quotient
        del quotient
    den = stabilize(z, eps, nonnegative, owned, zeros_idle)
    if den.shape == r.shape and den.dtype == r.dtype and den.device == r.device:
        return torch.div(r, den, out=den)
    return r / den


def linear_in(dtypes: torch.dtype | Sequence[torch.dtype], fn: Callable[..., Any], grads: Sequence) -> tuple:
    """Apply ``fn``, a linear map that computes in narrower ``dtypes`` (an autograd node's
    backward, the adjoint of a layer), to ``grads`` carried in a wider dtype
    (:func:`compute_dtype`); floating results come back in that wider dtype.

    The grads are divided by one common power of two ``2^k`` (exact) that brings their largest
    magnitude into ``[1, 2)``, cast, mapped, and multiplied back in the wide dtype:
    ``J^T g = 2^k J^T (g / 2^k)``, so float16's range of 65504 cannot overflow on the way.
    When every grad already has its dtype, ``fn`` simply runs.

    Parameters
    ----------
    dtypes
        The dtype ``fn`` takes, one for all grads or one per grad.
    fn
        ``fn(*grads) -> tensor or tuple of tensors (or None)``, linear in ``grads``.
    grads
        Tensors (or ``None``).

    Returns
    -------
    tuple
        ``fn``'s outputs.
    """
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(grads)
    floats = [g is not None and g.is_floating_point() for g in grads]
    wide = next((g.dtype for g, d, f in zip(grads, dtypes, floats)
                 if f and g.dtype != d and d.is_floating_point), None)
    if wide is None:
        out = fn(*grads)
        return out if isinstance(out, tuple) else (out,)
    top = torch.stack([g.detach().abs().amax().to(wide) for g, f in zip(grads, floats) if f]).amax()
    scale = torch.exp2(torch.floor(torch.log2(top)))
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    out = fn(*[(g / scale).to(d) if f else g for g, d, f in zip(grads, dtypes, floats)])
    out = out if isinstance(out, tuple) else (out,)
    return tuple(o.to(wide) * scale if o is not None and o.is_floating_point() else o for o in out)


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


_NEEDS: dict[tuple, Needs] = {}


def _needs(inputs: tuple[int, ...] = (), output: bool = False) -> Needs:
    """``Needs(inputs, output)``, made once per value (rules ask for it at every node)."""
    if type(inputs) is not tuple:
        inputs = tuple(inputs)
    key = (inputs, output)
    found = _NEEDS.get(key)
    if found is None:
        found = Needs(inputs, bool(output))
        if len(_NEEDS) < 1024:
            _NEEDS[key] = found
    return found


@dataclass(frozen=True)
class Gradient:
    """A rule written as the node's own backward (:meth:`Rule.as_gradient`).

    With relevance written ``R = v * g`` on every edge (``v`` the edge's forward value)::

        g_i = shares[i] * J_i^T (g * z / stab(z))       (the backward, scaled)
        g_i = g * z / v_i                                (ratio: the identity, elementwise)

    ``eps``: the stabiliser of ``stab`` (:func:`stabilize`), or None where ``z / stab(z)`` is 1
    (``eps = 0``, and rules that are the backward itself). ``shares``: one number for every
    input, or one per input slot (0: the slot takes nothing). ``ratio``: the identity rule at an
    op that is not homogeneous (``tanh``, SiLU, ``x + c``), which needs the input and the output."""

    eps: float | None = None
    shares: float | tuple[float, ...] = 1.0
    ratio: bool = False
    #: the op's affine adjoint (:attr:`~dynlrp.ops.Affine.adjoint`, statistics held constant) in
    #: place of its backward, for input 0: ``g_0 = J_c^T (g * z / stab(z))`` (``J_c^T g`` without eps)
    adjoint: bool = False
    #: a rule that explains the op and the channel-wise affine op after it as one map
    #: (:class:`Folded`): the graph index of that op, whose output is the ``z`` of ``g * z /
    #: stab(z)``; the scaling is done there, before its backward (the adjoint of its map), and
    #: this node's backward carries the rest
    at: int | None = None

    def __post_init__(self) -> None:
        shares = self.shares
        object.__setattr__(self, "shares", tuple(map(float, shares)) if isinstance(shares, (tuple, list))
                           else float(shares))

    def share(self, slot: int) -> float:
        shares = self.shares
        return shares if type(shares) is float else shares[slot]

    @property
    def native(self) -> bool:
        """The backward as it is: autograd's engine needs no hook at the node."""
        return self.eps is None and self.shares == 1.0 and not (self.ratio or self.adjoint)


NATIVE = Gradient()  # (the backward as it is; `Gradient.native` tells an equal one made elsewhere)


class Rule:
    """Base class. Subclasses define :meth:`needs` and :meth:`__call__`.

    ``fused`` is set only on :class:`Folded` rules: the graph node (an eval batch norm)
    whose map the engine folds into this node's map.

    Two optional declarations let the engine explain past values that nothing can rebuild (a
    sum with a constant autograd never saw: an attention mask, a position table, a frozen
    bias added on its own), or that only a recomputed matrix product would rebuild.
    Relevance may then travel *per unit of value*: ``G`` on an edge means ``R = v * G`` for
    the edge's forward value ``v``, known or not (see :mod:`dynlrp.engine`).

    * :meth:`factors`: the inputs whose value enters the rule's result only as a final
      factor, ``R_i = v_i * H_i`` with ``H_i`` independent of ``v_i``. Where ``v_i`` is
      unknown, the rule runs with ``v_i = 1`` and its result for ``i`` is per unit.
    * :meth:`per_unit`: what the rule does with relevance given per unit of its *output*.
      ``"divides"``: the output enters only as ``R / z`` (epsilon 0), so ``R / z = G`` and the
      rule runs with ``z = 1`` and ``R = G``. ``"routes"``: the op only moves values (a view,
      a selection, a concatenation), so routing ``v * G`` is ``v_in * route(G)``: the rule
      routes ``G`` and its results are per unit. ``None``: neither.

    A third lets the engine skip work (no rule's result depends on it): :meth:`vanishes`, where
    the relevance the rule gives its inputs is known to be 0. The engine carries that fact along
    the edges; where it shows that relevance is 0 wherever a ReLU after a layer is 0, the layer's
    output seen through that ReLU (:class:`~dynlrp.ops.ClippedValue`) serves without a test.
    """

    fused: int | None = None
    #: The rule hands the relevance it receives, unchanged, to its one input that leads to a
    #: requested input when that input is shaped like the output (the identity): the engine then
    #: moves it along without calling the rule. Trusted like :meth:`vanishes` (:func:`passes_of`).
    passes: bool = False

    def vanishes(self, ctx: RuleContext) -> str | None:
        """Where the relevance this rule gives each input is 0 whatever the numbers (the engine
        asks :func:`vanishes_of`, which trusts a declaration only from the class that defines
        ``__call__`` or one below it: a subclass that changes the rule says nothing until it says
        so itself):

        * ``"inputs"``: wherever that input's forward value is 0 (``R_i = v_i * H_i``, the
          epsilon family and the rules that modify weights);
        * ``"output"``: wherever the relevance the rule received is 0, position by position
          (the identity, for inputs shaped like the output);
        * ``"routes"``: the op moves values and the rule moves relevance with them, so where an
          input's value is 0 its relevance is, if that holds for the output;
        * ``None``: nothing is known (the default: a rule that says nothing loses nothing)."""
        return None

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs()

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        """The rule written as the node's own backward, where it can be (:class:`Gradient`).

        With relevance written ``R = v * g`` on every edge (``v`` the edge's forward value), a
        rule of the epsilon family, ``R_i = share_i * v_i * J_i^T (R / stab(z))``, is
        ``g_i = share_i * J_i^T (g * z / stab(z))``: the node's backward of ``g``, scaled; a
        route, the identity at a homogeneous op and proportional sharing at a sum are the
        backward itself. Then autograd's engine can propagate the relevance
        (:mod:`dynlrp.gradform`). None (the default): the rule has no such form at this node.
        Trusted like :meth:`vanishes` (:func:`as_gradient_of`).

        (At an exact 0 of a sum with ``eps = 0`` the gradient form takes the limit ``R / z =
        g``, where the rule reads ``0 / 0`` as 0: the operands of ``a + (-a)`` then take ``a * g``
        and ``-a * g``, which still sum to the 0 relevance the sum received.)"""
        return None

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return ()

    def per_unit(self, ctx: RuleContext) -> str | None:
        return None

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
        return _needs(ctx.reaching, True)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return ctx.reaching

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "divides" if self.eps == 0 else None

    def vanishes(self, ctx: RuleContext) -> str | None:
        return "inputs"

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        if ctx.gn.num_outputs != 1:
            return None
        return Gradient(self.eps or None, _epsilon_share(ctx), at=ctx.fused)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        rows = live_rows(ctx)
        if rows is not None:
            return _only(ctx, ctx.data_slot, _epsilon_rows(ctx, rows, self.eps))
        z = ctx.output
        s = divide(ctx.relevance, z, self.eps, nonnegative=ctx.output_nonnegative,
                   zeros_idle=ctx.relevance_vanishes_with_output)
        grads = ctx.vjp(s, owned=True)
        return _only_slots(ctx, _inputs_times(ctx, grads, ctx.reaching, _epsilon_share(ctx), scratch=s))


def _epsilon_share(ctx: RuleContext) -> float:
    """``1/n`` over the ``n`` inputs that lead to a requested input (paper Eq. 6), 1 at a sum."""
    return 1.0 / max(len(ctx.reaching), 1) if ctx.kind != "sum" else 1.0


#: Row-sparse relevance is taken row by row from this many rows on, when at most 1 / ROWS_SPARSE
#: of them carry relevance (:func:`live_rows`); every ROWS_PROBE-th row is looked at first.
ROWS_MIN, ROWS_SPARSE, ROWS_PROBE = 64, 8, 4


def live_rows(ctx: RuleContext) -> torch.Tensor | None:
    """The rows of the relevance that are not all zero, where they are few and the op maps rows
    to rows (:attr:`~dynlrp.ops.Affine.rows`, ``x @ W``), else None.

    A language model explained at one token sends relevance to one row of its head, and of
    every per-token layer below it up to the last attention: the other rows of ``R / z``
    are zero, and so is what they contribute. Dividing and mapping only the live rows gives
    the same relevance for a fraction of the time and memory (the head of a 32,000-token
    vocabulary: one row of 32,000 instead of 128)."""
    r = ctx.relevance
    rows = r.shape[0] if r.dim() == 2 else 0
    if rows < ROWS_MIN or ctx.entry.affine is None or len(ctx.reaching) != 1:
        return None
    # A row whose largest entry is not 0 is live: a lower bound on the live rows, first on every
    # ROWS_PROBE-th row (dense relevance, the usual case, is told in a quarter of a pass), then on
    # all, in one quick pass each (a count of nonzeros over all entries takes 3-5x as long).
    if int(torch.count_nonzero(r[::ROWS_PROBE].amax(1))) * ROWS_SPARSE > rows:
        return None
    top = r.amax(1)
    if int(torch.count_nonzero(top)) * ROWS_SPARSE > rows:
        return None
    live = (top != 0) | (r.amin(1) != 0)  # exactly the rows that are not all zero
    if int(live.sum()) * ROWS_SPARSE > rows or not ctx.affine(bias=False).rows:
        return None
    return live.nonzero().squeeze(1)


def _epsilon_rows(ctx: RuleContext, rows: torch.Tensor, eps: float) -> torch.Tensor:
    """Paper Eq. 4, ``R_x = x * W^T (R / stab(z))``, on the given rows of ``x @ W``; the other
    rows of ``R`` are zero and get zero."""
    slot, affine = ctx.data_slot, ctx.affine(bias=False)
    x = ctx.input(slot)
    z = ctx.output
    s = divide(ctx.relevance.index_select(0, rows), z.index_select(0, rows), eps,
               nonnegative=ctx.output_nonnegative)
    x_rows = x.index_select(0, rows)
    if affine.adjoint is not None:
        back = affine.adjoint(s, affine.weight.detach())
    else:
        back = _linear_with_adjoint(affine, x_rows, affine.weight)[1](s)
    out = torch.zeros(x.shape, dtype=s.dtype, device=s.device)
    return out.index_copy_(0, rows, back.mul_(x_rows))


class Proportional(Epsilon):
    """Proportional sharing for sums (paper Eq. 8; Zennit's ``Norm``).

    ``R_i = v_i * J_i^T (R / z)``: each term of a sum gets relevance in proportion to its
    contribution; exact conservation (``eps`` only guards ``z = 0``). With
    ``absolute=True`` the paper's Eq. 9 variant shares by magnitude:
    ``R_i = |v_i| * |J_i|^T (R / sum_j |J_j| |v_j|)``. A constant operand outside the graph
    (``x - 3``, ``x + c``) is not a term that takes relevance: the one graph operand gets all
    of it (the identity rule).
    """

    def __init__(self, eps: float = 0.0, absolute: bool = False) -> None:
        super().__init__(eps)
        self.absolute = bool(absolute)

    @staticmethod
    def _has_constant(ctx: RuleContext) -> bool:
        return len(ctx.graph_inputs) < ctx.num_inputs or ctx.entry.forward is None

    def needs(self, ctx: RuleContext) -> Needs:
        if self._has_constant(ctx):
            return _needs()
        if self.absolute:
            return _needs(inputs=ctx.graph_inputs, output=False)
        return super().needs(ctx)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return () if self._has_constant(ctx) or self.absolute else ctx.reaching

    def per_unit(self, ctx: RuleContext) -> str | None:
        return None if self._has_constant(ctx) or self.absolute else super().per_unit(ctx)

    def vanishes(self, ctx: RuleContext) -> str | None:
        return "output" if self._has_constant(ctx) else "inputs"

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        if self.absolute:
            return None
        return _identity_gradient(ctx) if self._has_constant(ctx) else super().as_gradient(ctx)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        if self._has_constant(ctx):
            return Identity()(ctx)
        if not self.absolute:
            return super().__call__(ctx)
        signs = ctx.vjp(torch.ones_like(ctx.relevance))
        mags = [None if signs[i] is None else ctx.input(i).abs() * torch.sign(signs[i])
                for i in range(ctx.num_inputs)]
        denom = ctx.forward(mags)
        grads = ctx.vjp(divide(ctx.relevance, denom, self.eps))
        out: list[torch.Tensor | None] = [None] * ctx.num_inputs
        for i in ctx.reaching:
            out[i] = ctx.input(i).abs() * torch.sign(signs[i]) * grads[i]
        return out


class Identity(Rule):
    """The identity ("pass") rule: ``R_in = R`` (paper 7.1; Zennit ``Pass``; AttnLRP's rule
    for activations). Broadcast relevance is summed back to the input's shape. With ``n``
    inputs leading to requested inputs, each gets ``R / n`` -- AttnLRP's uniform rule for
    elementwise products of activations."""

    passes = True

    def vanishes(self, ctx: RuleContext) -> str | None:
        return "output"

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        return _identity_gradient(ctx)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * ctx.num_inputs
        n = len(ctx.reaching)
        for i in ctx.reaching:
            r = sum_to(ctx.relevance, ctx.input_shape(i))
            out[i] = r / n if n > 1 else r
        return out


_DECLARES: dict[tuple[type, str], bool] = {}


def _trusted(cls: type, name: str) -> bool:
    """Whether the class that declares ``name`` is the one that defines ``cls.__call__`` or a
    subclass of it (worked out once per class and declaration)."""
    key = (cls, name)
    trusted = _DECLARES.get(key)
    if trusted is None:
        mro = cls.__mro__
        calls = next(i for i, c in enumerate(mro) if "__call__" in vars(c))
        says = next(i for i, c in enumerate(mro) if name in vars(c))
        trusted = _DECLARES[key] = says <= calls
    return trusted


def vanishes_of(rule: Rule, ctx: RuleContext) -> str | None:
    """``rule.vanishes(ctx)`` where the class that declares it is the one that defines the rule's
    ``__call__`` or a subclass of it; None where a subclass changed ``__call__`` and inherited a
    declaration made for another rule."""
    return rule.vanishes(ctx) if _trusted(type(rule), "vanishes") else None


def passes_of(rule: Rule) -> bool:
    """:attr:`Rule.passes`, trusted as :func:`vanishes_of` trusts ``vanishes`` (a subclass of
    :class:`Identity` with its own ``__call__`` is called)."""
    return rule.passes and _trusted(type(rule), "passes")


def as_gradient_of(rule: Rule, ctx: RuleContext) -> Gradient | None:
    """:meth:`Rule.as_gradient`, trusted as :func:`vanishes_of` trusts ``vanishes``."""
    return rule.as_gradient(ctx) if _trusted(type(rule), "as_gradient") else None


def _shared(ctx: RuleContext, carriers: Sequence[int]) -> Gradient | None:
    """``R_i = R / n`` for ``n`` carriers (the other inputs take nothing) as a gradient: the
    backward, where the op is positively homogeneous in each carrier
    (:attr:`~dynlrp.ops.OpEntry.homogeneous`: then ``v_i * J_i^T g = z * g``, Euler's
    identity); None elsewhere."""
    homogeneous = ctx.entry.homogeneous
    if not carriers or ctx.gn.num_outputs != 1 or any(i not in homogeneous for i in carriers):
        return None
    return _spread(ctx, carriers)


def _spread(ctx: RuleContext, slots: Sequence[int], eps: float | None = None) -> Gradient:
    """``1/n`` of the backward to each of ``n`` slots and nothing to the other inputs, after a
    stabiliser ``eps``: one share for all where ``slots`` are all the inputs that lead to a
    requested input, else one per input."""
    share = 1.0 / max(len(slots), 1)
    if slots and len(slots) == len(ctx.reaching):
        return Gradient(eps, share)
    return Gradient(eps, tuple(share if i in slots else 0.0 for i in range(ctx.num_inputs)))


def _identity_gradient(ctx: RuleContext) -> Gradient | None:
    """The identity rule as a gradient: shared (:func:`_shared`) at a homogeneous op, else a
    ratio ``g * z / v`` for one input shaped like the output (:class:`Gradient`)."""
    found = _shared(ctx, ctx.reaching)
    if found is not None or len(ctx.reaching) != 1 or ctx.gn.num_outputs != 1:
        return found
    if ctx.input_shape(ctx.reaching[0]) != ctx.gn.meta(0)[0]:
        return None
    return Gradient(ratio=True)


def _moves_values(ctx: RuleContext) -> bool:
    """Whether the op only moves values: a route whose contract says so, not an op without an
    entry that the gradient fallback routes by its backward (``cumprod``, say)."""
    return ctx.kind == "route" and ctx.entry.contract == "route"


class Route(Rule):
    """Exact routing for shape, indexing and selection ops: ``R_in = J^T R``.

    For these 0/1 maps the adjoint moves each relevance value to where its forward value
    came from (summing copies), so relevance is permuted, never created. For max pooling
    this is winner-take-all.
    """

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "routes" if _moves_values(ctx) else None

    def vanishes(self, ctx: RuleContext) -> str | None:
        return "routes" if _moves_values(ctx) else None

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        # moving values, J^T (v * g) = v_in * J^T g: the backward itself
        return NATIVE if _moves_values(ctx) else None

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        grads = ctx.vjp_all(ctx.relevances)
        return [grads[i] if i in ctx.reaching else None for i in range(ctx.num_inputs)]


Pass = Identity
"""Zennit's name for the identity rule: relevance passes unchanged."""

Norm = Proportional
"""Zennit's name for proportional sharing (epsilon without weights, for sums and average pools)."""


# -- rules that modify weights --------------------------------------------------------------------

def _linear_with_adjoint(affine: Affine, x: torch.Tensor, weight: torch.Tensor):
    """``affine.linear(x, weight)`` and the adjoint ``s -> weight^T s`` of that linear map.

    The output is a new tensor the caller owns (it may overwrite it): the adjoint keeps only
    the map's autograd node, not the output, and returns a new tensor too."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = affine.linear(leaf, weight.detach())
    edge, dtype = get_gradient_edge(out), out.dtype

    def adjoint(s: torch.Tensor) -> torch.Tensor:
        a = linear_in(dtype, lambda g: torch.autograd.grad(edge, leaf, g, retain_graph=True)[0], [s])[0]
        # (the adjoints of products, convolutions and scalings are new tensors; anything else
        # that hands back its argument, or a view of it, is copied so the caller may overwrite it)
        return a.clone() if a.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() else a

    return out.detach(), adjoint


def _bias(ctx: RuleContext, affine: Affine, x: torch.Tensor | None, zero_bias: bool) -> torch.Tensor | float:
    """The bias of ``z = W x + b`` (0 when there is none or ``zero_bias``); a bias autograd did not
    keep is recovered as ``z - W x``, the bias spread over the output."""
    if zero_bias:
        return 0.0
    if not affine.bias_known:
        return ctx.output - affine.linear(x, affine.weight.detach())
    return 0.0 if affine.bias is None else affine.bias.detach()


def _bias_needs_values(ctx: RuleContext, zero_bias: bool) -> bool:
    return not zero_bias and not ctx.affine().bias_known


def _only(ctx: RuleContext, slot: int, r: torch.Tensor) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = [None] * ctx.num_inputs
    out[slot] = r
    return out


def _has_negative(x: torch.Tensor) -> bool:
    """Whether ``x`` has a negative entry (not after a ReLU): one pass, asked once per node."""
    return bool(x.numel()) and bool(x.amin() < 0)


def _split(affine: Affine, x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, mixed: bool):
    """``W_a x+ + W_b x-`` and the adjoints that give back ``x+ * W_a^T s + x- * W_b^T s``.

    ``mixed`` is :func:`_has_negative` of ``x``: without a negative entry (after a ReLU) the
    negative half is skipped, as it is 0, and ``x+`` is ``x`` itself. ``wb`` may be a function
    that makes ``W_b`` (called only when needed). Both results are new tensors the caller owns."""
    if not mixed:
        zp, adj_p = _linear_with_adjoint(affine, x, wa)
        return zp, lambda s: adj_p(s).mul_(x)
    xp = x.clamp(min=0)
    zp, adj_p = _linear_with_adjoint(affine, xp, wa)
    xn = x.clamp(max=0)
    zn, adj_n = _linear_with_adjoint(affine, xn, wb() if callable(wb) else wb)
    # (both sums in place: the terms are the adjoints' and _linear_with_adjoint's new tensors)
    return zp.add_(zn), lambda s: adj_p(s).mul_(xp).addcmul_(xn, adj_n(s))


class Gamma(Rule):
    """LRP-gamma, generalized to inputs and weights of either sign (the LRP-gamma rule of
    Montavon et al. 2019, "Layer-wise relevance propagation: an overview"; generalization of
    Andeol et al. 2021; Zennit ``Gamma``).

    With ``W^up = W + gamma W+`` and ``W^dn = W + gamma W-``, neurons with ``z_j > 0`` share by
    ``z^up = W^up x+ + W^dn x- + (b + gamma b+)`` and neurons with ``z_j < 0`` by
    ``z^dn = W^dn x+ + W^up x- + (b + gamma b-)``::

        R_i = x+_i sum_j W^up_ji s_j + x-_i sum_j W^dn_ji s_j     s_j = [z_j > 0] R_j / stab(z^up_j)
            + x+_i sum_j W^dn_ji t_j + x-_i sum_j W^up_ji t_j     t_j = [z_j < 0] R_j / stab(z^dn_j)

    For ``x >= 0`` and ``z > 0`` this is the textbook rule
    ``R_i = sum_j x_i (w_ij + gamma w_ij+) R_j / sum_i' x_i' (w_i'j + gamma w_i'j+)``; ``gamma = 0``
    gives LRP-0 and large ``gamma`` approaches z+. Conservation up to the bias share.

    Parameters
    ----------
    gamma
        How much the positive (for ``z > 0``) or negative (``z < 0``) contributions are favoured.
    eps
        Stabiliser of the denominators (Zennit's ``stabilizer``).
    zero_bias
        Leave the bias out (Zennit's ``zero_params='bias'``).
    """

    def __init__(self, gamma: float = 0.25, eps: float = 1e-6, zero_bias: bool = False) -> None:
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.zero_bias = bool(zero_bias)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=(ctx.data_slot,), output=True)

    def vanishes(self, ctx: RuleContext) -> str | None:
        return "inputs"

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        slot, affine = ctx.data_slot, ctx.affine()
        x, z = ctx.input(slot), ctx.output
        w = affine.weight.detach()
        w_up, w_dn = w + self.gamma * w.clamp(min=0), w + self.gamma * w.clamp(max=0)
        b = _bias(ctx, affine, x, self.zero_bias)
        b = torch.as_tensor(b, dtype=z.dtype, device=z.device)
        mixed = _has_negative(x)
        z_up, back_up = _split(affine, x, w_up, w_dn, mixed)
        z_dn, back_dn = _split(affine, x, w_dn, w_up, mixed)
        s = ctx.relevance * (z > 0) / stabilize(z_up + b + self.gamma * b.clamp(min=0), self.eps)
        t = ctx.relevance * (z < 0) / stabilize(z_dn + b + self.gamma * b.clamp(max=0), self.eps)
        return _only(ctx, slot, back_up(s) + back_dn(t))


class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015, "On pixel-wise explanations for non-linear classifier
    decisions by layer-wise relevance propagation"; Zennit ``AlphaBeta``), generalized to inputs
    of either sign.

    Positive contributions ``z^+ = W+ x+ + W- x- + b+`` and negative ones
    ``z^- = W- x+ + W+ x- + b-`` are normalised separately::

        R_i = alpha (x+_i sum_j W+_ji s_j + x-_i sum_j W-_ji s_j)     s_j = R_j / stab(z^+_j)
            - beta  (x+_i sum_j W-_ji t_j + x-_i sum_j W+_ji t_j)     t_j = R_j / stab(z^-_j)

    ``alpha - beta = 1`` (both non-negative) keeps the total: ``alpha - beta`` of the relevance
    (up to the bias share) reaches the inputs.

    Parameters
    ----------
    alpha, beta
        Weights of the positive and negative shares; non-negative with ``alpha - beta = 1``
        (``ValueError`` otherwise).
    eps
        Stabiliser of the denominators (Zennit's ``stabilizer``).
    zero_bias
        Leave the bias out (Zennit's ``zero_params='bias'``).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, eps: float = 1e-6,
                 zero_bias: bool = False) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be non-negative, got alpha={alpha}, beta={beta}")
        if abs((alpha - beta) - 1.0) > 1e-9:
            raise ValueError(f"alpha - beta must equal 1, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.eps = float(eps)
        self.zero_bias = bool(zero_bias)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=(ctx.data_slot,), output=_bias_needs_values(ctx, self.zero_bias))

    def vanishes(self, ctx: RuleContext) -> str | None:
        return "inputs"

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        slot, affine = ctx.data_slot, ctx.affine()
        x = ctx.input(slot)
        w = affine.weight.detach()
        bias = _bias(ctx, affine, x, self.zero_bias)  # (before the weight may be overwritten)
        mixed = _has_negative(x)
        # W- is only needed for inputs with negative entries, or beta > 0; otherwise a weight made
        # for this node (a folded batch norm's) becomes W+ in place: no second weight-sized tensor
        if affine.owned and not mixed and self.beta == 0:
            w_pos, made = w.clamp_(min=0), []
        else:
            w_pos, made = w.clamp(min=0), []

        def w_neg() -> torch.Tensor:
            if not made:
                made.append(w.clamp(max=0))
            return made[0]

        b = torch.as_tensor(bias, dtype=x.dtype, device=x.device)
        z_pos, back_pos = _split(affine, x, w_pos, w_neg, mixed)
        if isinstance(bias, torch.Tensor):  # (no bias is the 0.0 of `_bias`)
            z_pos = z_pos.add_(b.clamp(min=0))
        # W+ x+ + W- x- + b+ >= 0: the stabiliser needs no sign test, and z_pos is ours to
        # overwrite: stabiliser and quotient take no new tensor of the output's size
        r = back_pos(divide(ctx.relevance, z_pos, self.eps, nonnegative=True, owned=True))
        del z_pos
        r = r if self.alpha == 1.0 else self.alpha * r  # (1.0 * r is r)
        if self.beta != 0:
            z_neg, back_neg = _split(affine, x, w_neg(), w_pos, mixed)
            r = r - self.beta * back_neg(divide(ctx.relevance, z_neg + b.clamp(max=0), self.eps))
        return _only(ctx, slot, r)


class ZPlus(AlphaBeta):
    """LRP-z+ (the z+-rule of Montavon et al. 2017, "Explaining nonlinear classification decisions
    with deep Taylor decomposition"; Zennit ``ZPlus``): :class:`AlphaBeta` with ``alpha = 1``,
    ``beta = 0``, so for inputs of either sign::

        R_i = x+_i sum_j W+_ji s_j + x-_i sum_j W-_ji s_j,    s_j = R_j / stab(W+ x+ + W- x- + b+)_j

    For ``x >= 0``: ``R_i = sum_j x_i w_ij+ R_j / sum_i' x_i' w_i'j+`` (positive part only).

    Parameters
    ----------
    eps
        Stabiliser of the denominators (Zennit's ``stabilizer``).
    zero_bias
        Leave the bias out (Zennit's ``zero_params='bias'``).
    """

    def __init__(self, eps: float = 1e-6, zero_bias: bool = False) -> None:
        super().__init__(1.0, 0.0, eps, zero_bias)


def _bound(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like)


class ZBox(Rule):
    """LRP-z^B for a bounded input domain ``low <= x <= high`` (the z^B-rule of Montavon et al.
    2017, "Explaining nonlinear classification decisions with deep Taylor decomposition"; Zennit
    ``ZBox``), the rule for the input layer of image models::

        R_i = x_i sum_j W_ji s_j - l_i sum_j W+_ji s_j - h_i sum_j W-_ji s_j,
        s_j = R_j / stab(W x - W+ l - W- h)_j

    ``low`` and ``high`` are scalars or tensors that broadcast to the input (per channel:
    shape ``(1, C, 1, 1)``). The bias cancels from the denominator. Conservation is exact
    (up to ``eps``).

    Parameters
    ----------
    low, high
        Lowest and highest possible input values: scalars or tensors broadcasting to the input.
    eps
        Stabiliser of the denominators (Zennit's ``stabilizer``).
    """

    def __init__(self, low: float | torch.Tensor = -3.0, high: float | torch.Tensor = 3.0,
                 eps: float = 1e-6) -> None:
        self.low = low
        self.high = high
        self.eps = float(eps)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=(ctx.data_slot,))

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        slot, affine = ctx.data_slot, ctx.affine()
        x = ctx.input(slot)
        low, high = _bound(self.low, x), _bound(self.high, x)
        w = affine.weight.detach()
        zx, back_x = _linear_with_adjoint(affine, x, w)
        zl, back_l = _linear_with_adjoint(affine, low, w.clamp(min=0))
        zh, back_h = _linear_with_adjoint(affine, high, w.clamp(max=0))
        s = divide(ctx.relevance, zx - zl - zh, self.eps)
        return _only(ctx, slot, x * back_x(s) - low * back_l(s) - high * back_h(s))


class WSquare(Rule):
    """LRP-w^2 (the w^2-rule of Montavon et al. 2017, "Explaining nonlinear classification decisions
    with deep Taylor decomposition"; Zennit ``WSquare``): relevance by squared weights,
    independent of the input values (for unbounded inputs)::

        R_i = sum_j W_ji^2 R_j / stab(sum_i' W_i'j^2 + b_j^2)

    As in Zennit the squared bias takes its share unless ``zero_bias``.

    Parameters
    ----------
    eps
        Stabiliser of the denominators (Zennit's ``stabilizer``).
    zero_bias
        Leave the bias out (Zennit's ``zero_params='bias'``).
    """

    def __init__(self, eps: float = 1e-6, zero_bias: bool = False) -> None:
        self.eps = float(eps)
        self.zero_bias = bool(zero_bias)

    def needs(self, ctx: RuleContext) -> Needs:
        if _bias_needs_values(ctx, self.zero_bias):
            return _needs(inputs=(ctx.data_slot,), output=True)
        return _needs()

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        slot, affine = ctx.data_slot, ctx.affine()
        x = ctx.input(slot) if _bias_needs_values(ctx, self.zero_bias) else None
        ones = torch.ones(ctx.input_shape(slot), dtype=affine.weight.dtype, device=ctx.relevance.device)
        z, back = _linear_with_adjoint(affine, ones, affine.weight.detach() ** 2)
        b = _bias(ctx, affine, x, self.zero_bias)
        return _only(ctx, slot, back(divide(ctx.relevance, z + b ** 2, self.eps)))


class Flat(Rule):
    """LRP-flat (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors ...", methods; Zennit
    ``Flat``): every input a neuron is connected to gets an equal share, whatever its value
    or weight (w^2 with all weights 1 and no bias)::

        R_i = sum_j [i -> j] R_j / stab(#{i' -> j})

    Parameters
    ----------
    eps
        Stabiliser of the denominators (Zennit's ``stabilizer``).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        slot, affine = ctx.data_slot, ctx.affine()
        ones = torch.ones(ctx.input_shape(slot), dtype=affine.weight.dtype, device=ctx.relevance.device)
        z, back = _linear_with_adjoint(affine, ones, torch.ones_like(affine.weight))
        return _only(ctx, slot, back(divide(ctx.relevance, z, self.eps)))


class Folded(Rule):
    """Graph-level canonization: ``rule`` applied to this op and the eval batch norm after it
    as one affine map (what Zennit's ``MergeBatchNorm`` canonizers do by editing the model).

    The rule sees the merged weight ``W * s`` and bias ``s * b + shift`` through
    ``ctx.affine()``, the batch norm's output as ``ctx.output`` and the merged adjoint as
    ``ctx.vjp``; the batch norm itself passes relevance unchanged. Rule sets insert it.

    Parameters
    ----------
    rule
        The rule of the op (any rule; weight rules see the merged weight).
    fused
        The graph index of the batch-norm node folded into the op.
    """

    def __init__(self, rule: Rule, fused: int) -> None:
        self.rule = rule
        self.fused = fused

    def needs(self, ctx: RuleContext) -> Needs:
        return self.rule.needs(ctx)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return self.rule.factors(ctx)

    def vanishes(self, ctx: RuleContext) -> str | None:
        return vanishes_of(self.rule, ctx)

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        form = as_gradient_of(self.rule, ctx)
        return form if form is not None and form.at == self.fused else None  # (a rule that saw the fold)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        return self.rule(ctx)


DEFAULT_RULES: dict[str, Rule] = {
    "linear": Epsilon(1e-6),
    "sum": Proportional(),
    "product": Identity(),
    "elementwise": Identity(),
    "route": Route(),
}


def default_rule(kind: str) -> Rule | None:
    return DEFAULT_RULES.get(kind)




# == Transformers: AttnLRP and CP-LRP ============================================================
# Rules for the op kinds "softmax", "attention" and "norm" (dynlrp.ops.attention,
# dynlrp.ops.normalization) and for products of activations. References: AttnLRP = Achtibat et
# al. 2024, "AttnLRP: Attention-aware layer-wise relevance propagation for transformers" (ICML);
# CP-LRP = Ali et al. 2022, "XAI for transformers: better explanations through conservative
# propagation" (ICML); "paper" = the DynamicLRP paper (Eqs. 6 and 7 restate AttnLRP's rules).


def _inputs_times(ctx: RuleContext, grads: Sequence, slots: Sequence[int], share: float = 1.0,
                  scratch: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """``share * v_i * grads[i]`` for each input slot ``i``, the last step of the epsilon family
    (new tensors, so the share is applied in place).

    A large grad takes the product itself where that is safe -- a new tensor of an activation's
    size costs as much again as the product, in page faults: a grad that shares its memory with
    no other (the new tensor of a product's or a convolution's adjoint), or ``scratch`` itself,
    the caller's temporary the grads were computed from (the ``s`` of Eq. 4, which a sum hands
    to every operand), for the last operand that reads it."""
    out = {}
    slots = tuple(slots)
    for n, i in enumerate(slots):
        x, g = ctx.input(i), grads[i]
        r = g.mul_(x) if _writable(g, x, grads, [grads[j] for j in slots[n + 1:]], scratch) else x * g
        out[i] = r.mul_(share) if share != 1.0 else r
    return out


#: Grads from this many elements on are overwritten where :func:`_writable` allows.
WRITE_MIN = 1 << 14


def _writable(g: torch.Tensor, x: torch.Tensor, grads: Sequence, later: Sequence,
              scratch: torch.Tensor | None) -> bool:
    """Whether ``g * x`` may be written into ``g``: a large dense tensor of the product's shape
    and dtype that is not a view, and either shares its memory with no other grad, or is
    ``scratch`` and no grad still to be read (``later``) shares it."""
    if (g.numel() < WRITE_MIN or g.shape != x.shape or g._is_view() or g.requires_grad
            or not g.is_contiguous() or torch.result_type(g, x) != g.dtype):
        return False
    at = g.untyped_storage().data_ptr()
    if sum(1 for h in grads if isinstance(h, torch.Tensor) and h.untyped_storage().data_ptr() == at) == 1:
        return True
    return (scratch is not None and g.data_ptr() == scratch.data_ptr() and g.shape == scratch.shape
            and g.stride() == scratch.stride()
            and not any(isinstance(h, torch.Tensor) and h.untyped_storage().data_ptr() == at for h in later))


def _only_slots(ctx: RuleContext, values: dict[int, torch.Tensor]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = [None] * ctx.num_inputs
    for slot, r in values.items():
        out[slot] = r
    return out


class SoftmaxDT(Rule):
    """AttnLRP's softmax rule, a Deep Taylor decomposition with a bias term (AttnLRP Prop. 3.1;
    paper Eq. 7). For ``s = softmax(x)`` along its dimension::

        R_x = x * (R - s * sum(R))

    computed as ``x * J^T (R / s)`` with the node's own backward. Positions where ``s = 0``
    (masked out) get no relevance. Conserves up to the bias term: the relevances sum to
    ``sum(x * R) - sum(x * s) * sum(R)``, and a constant added to ``x`` along the dimension
    changes single relevances but not their sum.
    """

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(ctx.reaching, True)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return ctx.reaching  # x enters only as the final factor: eager attention's `scores + mask`

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        if not ctx.reaching:
            return [None] * ctx.num_inputs
        s = ctx.output
        dead = s == 0  # (masked out: R / s and x * grad may be inf or nan there, and become 0)
        ratio = (ctx.relevance / s).masked_fill_(dead, 0)
        grad = ctx.vjp(ratio)[0]
        return _only_slots(ctx, {0: (ctx.input(0) * grad).masked_fill_(dead, 0)})


class SumWithConstants(Rule):
    """Proportional sharing of a sum in which constants are terms too -- the epsilon rule of a
    sum, and what gradient x input gives (LxT). For ``z = sum_i c_i v_i + c`` with graph
    operands ``v_i`` and a constant ``c`` that autograd never saw (an attention mask, a
    position table, a bias added on its own)::

        R_i = c_i v_i * (R / (z + eps * sign(z)))        (summed back over broadcast dims)

    and ``c`` keeps ``c * R / z``, which leaves the graph like a layer's bias share under
    :class:`Epsilon`. (:class:`Proportional` gives the graph operand everything instead.)
    A sum whose value cannot be known -- a Python scalar added, whose node keeps nothing
    (``x + 3``) -- gets the identity rule.
    """

    def __init__(self, eps: float = 0.0) -> None:
        self.eps = float(eps)

    def needs(self, ctx: RuleContext) -> Needs:
        if ctx.entry.forward is None:
            return _needs()
        return _needs(ctx.reaching, True)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return () if ctx.entry.forward is None else ctx.reaching

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "divides" if self.eps == 0 and ctx.entry.forward is not None else None

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        if ctx.entry.forward is None:
            return _identity_gradient(ctx)
        return Gradient(self.eps or None) if ctx.gn.num_outputs == 1 else None

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        if ctx.entry.forward is None:
            return Identity()(ctx)
        grads = ctx.vjp(divide(ctx.relevance, ctx.output, self.eps))
        return _only_slots(ctx, _inputs_times(ctx, grads, ctx.reaching))


class StopRelevance(Rule):
    """No relevance passes this op: its inputs are treated as constants.

    CP-LRP's rule for the softmax of attention (Ali et al. 2022): the attention
    probabilities are constants, so relevance flows through the values only (the paper's ViT
    setting "routing relevance only through the final matrix multiplication ... and skipping
    the softmax").
    """

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "routes"  # nothing passes, whatever the unit

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        return [None] * ctx.num_inputs


class UniformProduct(Rule):
    """AttnLRP's uniform rule for elementwise products of activations (AttnLRP Prop. 3.2, the
    uniform rule): for ``z = a * b * ...`` with ``n`` factors that lead to a requested input::

        R_i = R / n

    summed back to factor ``i``'s shape where it was broadcast. A factor that is a constant
    (not in the graph) takes nothing: one activation times constants gets the identity rule.

    A factor that is a *gate* of another -- computed from the other's own input by a short
    chain of pointwise ops and reductions that passes no weighted map
    (:func:`dynlrp.ops.math.gate_factors`) -- is a constant too, and the rest get all of ``R``:

    * ``x * rsqrt(mean(x ** 2) + eps)`` (RMSNorm) and ``(x - m) / sqrt(v + eps)`` (a layer norm
      written out): the normalising denominator is a constant, AttnLRP's identity rule for
      normalisation layers (LxT: ``stop_gradient`` on the denominator);
    * ``x * sigmoid(x)``, ``0.5 * x * (1 + tanh(...))`` (SiLU, GPT-2's GELU written out): the
      activation function as a whole gets AttnLRP's identity rule.

    ``silu(W1 x) * (W2 x)`` (SwiGLU) and ``q * cos`` are products of two activations: uniform.
    With ``activation_gates=True`` a factor that is the output of a nonlinearity is also a gate
    of one that is not: relevance then skips the gate of a gated MLP (LxT's ``cp_LRP``).
    """

    def __init__(self, activation_gates: bool = False) -> None:
        self.activation_gates = bool(activation_gates)

    def _carriers(self, ctx: RuleContext) -> list[int]:
        from .ops.math import gate_factors

        reaching = ctx.reaching
        if len(reaching) < 2:
            return list(reaching)
        gates = gate_factors(ctx.node, reaching, self.activation_gates, ctx.rank)
        return [i for i in reaching if i not in gates]

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        return _shared(ctx, self._carriers(ctx))  # (a gate takes nothing)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        carriers = self._carriers(ctx)
        n = len(carriers)
        shares: dict[torch.Size, torch.Tensor] = {}  # one tensor per operand shape (never mutated)
        for i in carriers:
            shape = ctx.input_shape(i)
            if shape not in shares:
                r = sum_to(ctx.relevance, shape)
                shares[shape] = r if n == 1 else r / n
        return _only_slots(ctx, {i: shares[ctx.input_shape(i)] for i in carriers})


class ValuePathEpsilon(Rule):
    """Epsilon-LRP in which attention probabilities are constants (CP-LRP, Ali et al. 2022; the
    paper's ViT setting): for ``z = P v`` with ``P`` the output of a softmax (past views,
    copies and expansions, :func:`dynlrp.ops.math.softmax_factors`)::

        R_v = v * J_v^T (R / (z + eps * sign(z)))        R_P = 0

    Every other product is plain :class:`Epsilon`, ``R_i = (1/n) v_i J_i^T (R / stab(z))``.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def _kept(self, ctx: RuleContext) -> tuple[int, ...]:
        from .ops.math import softmax_factors

        if len(ctx.reaching) < 2:
            return ctx.reaching
        probs = softmax_factors(ctx.node, ctx.reaching)
        return tuple(i for i in ctx.reaching if i not in probs)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=self._kept(ctx), output=True)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return self._kept(ctx)

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "divides" if self.eps == 0 else None

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        if ctx.fused is not None or ctx.gn.num_outputs != 1:
            return None
        return _spread(ctx, self._kept(ctx), self.eps or None)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        kept = self._kept(ctx)
        if not kept:
            return [None] * ctx.num_inputs
        grads = ctx.vjp(divide(ctx.relevance, ctx.output, self.eps))
        return _only_slots(ctx, _inputs_times(ctx, grads, kept, 1.0 / len(kept)))


class ConstantDenominator(Rule):
    """AttnLRP's treatment of normalisation layers: the normalising denominator is a constant,
    so ``y = (x - mean(x)) * rstd * w + b`` is an affine map of ``x`` and epsilon-LRP applies
    (AttnLRP on normalisation layers; LxT's ``layer_norm_forward``, ``stop_gradient`` on the std)::

        R_x = x * J_c^T (R / (y + eps * sign(y)))

    ``J_c`` is the Jacobian with ``rstd`` held at its saved value: the op entry's ``affine``
    view (layer norm, group norm, batch norm at inference), else its forward closure, which
    replays with the saved statistics (batch norm in training mode, i.e. instance norm, holds
    the mean constant too). Conservation up to the bias and the mean's share.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=ctx.graph_inputs if 0 in ctx.reaching else (), output=0 in ctx.reaching)

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        if ctx.reaching != (0,) or ctx.gn.num_outputs != 1 or ctx.entry.affine is None:
            return None
        affine = ctx.entry.affine(ctx.node, 0)
        if affine is None or affine.adjoint is None:
            return None
        return Gradient(self.eps or None, adjoint=True)

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        from .ops import MissingOperand

        if 0 not in ctx.reaching:
            return [None] * ctx.num_inputs
        x = ctx.input(0)
        s = divide(ctx.relevance, ctx.output, self.eps)
        affine = ctx.entry.affine(ctx.node, 0) if ctx.entry.affine is not None else None
        if affine is not None and affine.adjoint is not None:
            return _only_slots(ctx, {0: affine.adjoint(s, affine.weight.detach()).mul_(x)})
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            try:
                if affine is not None:
                    y = affine.linear(leaf, affine.weight.detach())
                else:
                    xs = [ctx.input(i) if i in ctx.graph_inputs else None for i in range(ctx.num_inputs)]
                    y = ctx.forward([leaf, *xs[1:]])
            except MissingOperand:
                y = None
            if y is not None and y.requires_grad:
                grad = linear_in(y.dtype, lambda g: torch.autograd.grad(y, leaf, g)[0], [s])[0]
            else:  # no replay: the node's own backward (statistics not held constant)
                grad = ctx.vjp(s)[0]
        return _only_slots(ctx, {0: x * grad})


def _attention_shares(ctx: RuleContext) -> tuple[float, float, float]:
    """Uniform shares of query, key, value: ``1/n`` at each of the two products of attention,
    ``softmax(q k^T) v``, over the factors that lead to a requested input."""
    q, k, v = (i in ctx.reaching for i in range(3))
    n_qk = int(q) + int(k)
    n_pv = int(q or k) + int(v)
    if n_pv == 0:
        return 0.0, 0.0, 0.0
    qk = 1.0 / (n_pv * n_qk) if n_qk else 0.0
    return (qk if q else 0.0), (qk if k else 0.0), (1.0 / n_pv if v else 0.0)


class AttnLRPAttention(Rule):
    """AttnLRP for a fused scaled-dot-product attention node,
    ``o = softmax(q k^T * scale + mask) v``: epsilon-LRP with the uniform rule at both
    products (AttnLRP Prop. 3.3; paper Eq. 6) and the softmax rule between them (Prop. 3.1;
    paper Eq. 7). In closed form, with ``s = R / (o + eps * sign(o))`` and the node's own
    backward ``J^T s`` (any backend, mask, causal mask or grouped-query layout)::

        R_v = v * J_v^T s / 2        R_q = q * J_q^T s / 4        R_k = k * J_k^T s / 4

    (the halves are ``1/n`` over the factors that lead to a requested input). The mask takes
    its share like a bias; so does the softmax's bias term.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=tuple(i for i in ctx.reaching if i < 3), output=True)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return tuple(i for i in ctx.reaching if i < 3)

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "divides" if self.eps == 0 else None

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        q, k, v = _attention_shares(ctx)
        return Gradient(self.eps or None, (q, k, v) + (0.0,) * (ctx.num_inputs - 3))

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        shares = _attention_shares(ctx)
        grads = ctx.vjp(divide(ctx.relevance, ctx.output, self.eps))
        out: dict[int, torch.Tensor] = {}
        for i in range(3):  # (q, k, v: each with its share, the products in place where safe)
            if shares[i]:
                out.update(_inputs_times(ctx, grads, (i,), shares[i]))
        return _only_slots(ctx, out)


class CPAttention(Rule):
    """CP-LRP for a fused scaled-dot-product attention node (Ali et al. 2022; the paper's ViT
    setting): the attention probabilities are constants, so relevance reaches the values only::

        R_v = v * J_v^T (R / (o + eps * sign(o)))        R_q = R_k = 0
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def needs(self, ctx: RuleContext) -> Needs:
        return _needs(inputs=(2,) if 2 in ctx.reaching else (), output=2 in ctx.reaching)

    def factors(self, ctx: RuleContext) -> tuple[int, ...]:
        return (2,) if 2 in ctx.reaching else ()

    def per_unit(self, ctx: RuleContext) -> str | None:
        return "divides" if self.eps == 0 else None

    def as_gradient(self, ctx: RuleContext) -> Gradient | None:
        return Gradient(self.eps or None, (0.0, 0.0, 1.0) + (0.0,) * (ctx.num_inputs - 3))

    def __call__(self, ctx: RuleContext) -> list[torch.Tensor | None]:
        if 2 not in ctx.reaching:
            return [None] * ctx.num_inputs
        grads = ctx.vjp(divide(ctx.relevance, ctx.output, self.eps))
        return _only_slots(ctx, {2: ctx.input(2) * grads[2]})


DEFAULT_RULES.update({"softmax": SoftmaxDT(), "attention": AttnLRPAttention(), "norm": ConstantDenominator()})
# == end of the transformers section ===============================================================

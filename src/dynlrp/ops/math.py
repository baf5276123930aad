"""Pointwise math, running sums, selections by value -- and which factor of a product is a gate.

Transformers spell many layers out of small ops: RMSNorm is ``x * rsqrt(mean(x ** 2) + eps)``,
GPT-2's GELU is ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x ** 3)))``, attention masks go in
with ``where`` / ``masked_fill``. The entries here:

* pointwise functions of one tensor (``pow``, ``sqrt``, ``rsqrt``, ``log``, ``erf``, ``sin`` ...):
  kind ``elementwise`` (identity rule, paper 7.1), contract ``exact``;
* ``x ** y`` with two tensors: kind ``product`` (both are factors);
* running and norm reductions (``cumsum``, ``linalg.vector_norm``): kind ``sum``. ``cumsum``
  is a sum, so the proportional rule conserves exactly; a p-norm is positively homogeneous
  of degree one, so ``sum_i x_i * d|x|/dx_i = |x|`` and the same rule conserves exactly too;
* selections by value (``where``, ``masked_fill``, ``max``/``amax``, ``maximum``): kind
  ``route``, contract ``route`` -- relevance goes where the value came from (winner takes all).

:func:`gate_factors` answers a question the product rules ask: in ``a * b``, is ``b`` computed
from ``a``'s own input by a short pointwise or normalising chain (a normaliser
``1 / sqrt(mean(a ** 2))``, an activation's gate ``sigmoid(a)``, ``1 + tanh(...)``)? Such a
factor is a *gate* of ``a``; AttnLRP treats it as a constant (its identity rule for
normalisation layers and activation functions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..saved import output_meta, saved, saved_dim
from . import MissingOperand, Value, lookup, register
from .common import operand, out_shape, taps_from


def _self_op(names, func, *, own_from: str = "self", inverse=None):
    """Register pointwise ``func(node, x)``; ``own_from`` is the saved tensor that rebuilds
    the output: ``"self"`` (the input, replayed) or ``"result"`` (the output itself)."""
    if own_from == "result":
        own = lambda n: saved(n, "result")  # noqa: E731
        taps = None
    else:
        own = lambda n: None if saved(n, "self") is None else func(n, saved(n, "self"))  # noqa: E731
        taps = taps_from((0, "self"))
    kwargs = {"taps": taps} if taps is not None else {}
    register(names, "elementwise", "exact", forward=lambda n, xs: func(n, xs[0]), own=own,
             inverse=inverse, **kwargs)


def _pow_inverse(node, out, xs):
    # x ** (1/p) is exact for odd integer p and for positive x; only the first is safe.
    p = saved(node, "exponent")
    if isinstance(p, int) and p % 2 == 1:
        t = out.tensor
        return {0: Value(t.sign() * t.abs().pow(1.0 / p), out.mask)}
    return {}


_self_op("PowBackward0", lambda n, x: x.pow(saved(n, "exponent")), inverse=_pow_inverse)
_self_op("SqrtBackward0", lambda n, x: x.sqrt(), own_from="result",
         inverse=lambda n, out, xs: {0: Value(out.tensor.square(), out.mask)})
_self_op("RsqrtBackward0", lambda n, x: x.rsqrt(), own_from="result",
         inverse=lambda n, out, xs: {0: Value(out.tensor.square().reciprocal(), out.mask)})
_self_op("ReciprocalBackward0", lambda n, x: x.reciprocal(), own_from="result",
         inverse=lambda n, out, xs: {0: Value(out.tensor.reciprocal(), out.mask)})
_self_op("Exp2Backward0", lambda n, x: x.exp2(), own_from="result",
         inverse=lambda n, out, xs: {0: Value(out.tensor.log2(), out.mask)})
_self_op("Expm1Backward0", lambda n, x: x.expm1(), own_from="result",
         inverse=lambda n, out, xs: {0: Value(out.tensor.log1p(), out.mask)})
_self_op("LogBackward0", lambda n, x: x.log(),
         inverse=lambda n, out, xs: {0: Value(out.tensor.exp(), out.mask)})
_self_op("Log2Backward0", lambda n, x: x.log2())
_self_op("Log10Backward0", lambda n, x: x.log10())
_self_op("Log1PBackward0", lambda n, x: x.log1p())
_self_op("SinBackward0", lambda n, x: x.sin())
_self_op("CosBackward0", lambda n, x: x.cos())
_self_op("ErfBackward0", lambda n, x: torch.erf(x))
_self_op("ErfinvBackward0", lambda n, x: torch.erfinv(x))
_self_op("AbsBackward0", lambda n, x: x.abs())
_self_op("SgnBackward0", lambda n, x: x.sgn(), own_from="result")
_self_op("SignBackward0", lambda n, x: x.sign())
_self_op("AtanBackward0", lambda n, x: x.atan())
_self_op("LogSigmoidBackward0", lambda n, x: torch.nn.functional.logsigmoid(x))
register("PowBackward2", "elementwise", "exact",  # scalar ** tensor
         forward=lambda n, xs: torch.pow(saved(n, "self"), xs[0]), own=lambda n: saved(n, "result"))


def _pow_tensor(node, xs):
    return operand(node, xs, 0, "self", "base").pow(operand(node, xs, 1, "exponent", "exponent"))


register("PowBackward1", "product", "exact", forward=_pow_tensor, own=lambda n: saved(n, "result"),
         taps=taps_from((0, "self"), (1, "exponent")))


# -- running and norm reductions: sums ------------------------------------------------------
register("CumsumBackward0", "sum", "exact", forward=lambda n, xs: xs[0].cumsum(saved_dim(n)))


def _vector_norm(node, x):
    dim = saved_dim(node)
    return torch.linalg.vector_norm(x, saved(node, "ord"), dim, bool(saved(node, "keepdim")))


register("LinalgVectorNormBackward0", "sum", "exact", forward=lambda n, xs: _vector_norm(n, xs[0]),
         own=lambda n: saved(n, "result"), taps=taps_from((0, "self")))


# -- selections by value: routes ------------------------------------------------------------
def _where(node, xs):
    cond = saved(node, "condition")
    if xs[0] is None or xs[1] is None:
        raise MissingOperand(f"a branch of {node.name()} that is a constant autograd did not keep")
    return torch.where(cond, xs[0], xs[1])


def _masked_fill(node, xs):
    raise MissingOperand(f"the fill value of {node.name()} (autograd keeps only the mask)")


def _masked_fill_tensor(node, xs):
    if xs[1] is None:
        raise MissingOperand(f"the fill value of {node.name()}")
    return xs[0].masked_fill(saved(node, "mask"), xs[1])


register("WhereBackward0", "route", "route", forward=_where)
register("MaskedFillBackward0", "route", "route", forward=_masked_fill)
register("MaskedFillBackward1", "route", "route", forward=_masked_fill_tensor)
register("MaskedScatterBackward0", "route", "route")


def _max_dim(node, xs):
    values = xs[0].gather(saved_dim(node), _keep(node, saved(node, "indices")))
    return values if saved(node, "keepdim") else values.squeeze(saved_dim(node))


def _keep(node, idx):
    return idx if saved(node, "keepdim") else idx.unsqueeze(saved_dim(node))


register(("MaxBackward0", "MinBackward0"), "route", "route", forward=_max_dim)
register(("MaxBackward1", "MinBackward1"), "route", "route",
         forward=lambda n, xs: (xs[0].max() if "Max" in n.name() else xs[0].min()).reshape(out_shape(n)),
         own=lambda n: saved(n, "result"), taps=taps_from((0, "self")))
register(("AmaxBackward0", "AminBackward0"), "route", "route",
         forward=lambda n, xs: (xs[0].amax if "Amax" in n.name() else xs[0].amin)(
             saved_dim(n), bool(saved(n, "keepdim"))),
         own=lambda n: saved(n, "result"), taps=taps_from((0, "self")))
register(("MaximumBackward0", "MinimumBackward0"), "route", "route",
         forward=lambda n, xs: (torch.maximum if "Max" in n.name() else torch.minimum)(
             operand(n, xs, 0, "self", "first operand"), operand(n, xs, 1, "other", "second operand")),
         taps=taps_from((0, "self"), (1, "other")))


# -- which factor of a product is a gate --------------------------------------------------
#: Copies and views: the value passes through unchanged (up to layout, dtype or a constant factor).
_COPIES = frozenset({
    "CloneBackward0", "AliasBackward0", "ContiguousBackward0", "LiftFreshBackward0", "ToCopyBackward0",
    "NativeDropoutBackward0", "NegBackward0",
})
#: Kinds a gate's chain never passes: weighted maps, attention, normalisation layers.
_OPAQUE = frozenset({"linear", "attention", "norm", "leaf"})
_GATE_DEPTH = 16


def _graph_inputs(fn: Any) -> list[tuple[Any, int]]:
    return [(c, k) for c, k in fn.next_functions if c is not None]


def _numel(fn: Any, k: int) -> int:
    shape = output_meta(fn, k)[0]
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _transparent(fn: Any) -> bool:
    """One graph input whose values pass unchanged or by a constant: a view, a copy, a
    product or sum with a constant. Selections (slice, split, gather) and reductions are not."""
    entry = lookup(fn.name()) if hasattr(fn, "name") else None
    inputs = _graph_inputs(fn)
    if entry is None or len(inputs) != 1:
        return False
    if entry.kind == "elementwise":
        return fn.name() in _COPIES
    if entry.kind not in ("route", "product", "sum"):
        return False
    child, k = inputs[0]
    return _numel(fn, 0) >= _numel(child, k)


def source(edge: tuple[Any, int]) -> tuple[Any, int]:
    """The edge an operand's value comes from, past views, copies and constant factors."""
    fn, k = edge
    for _ in range(_GATE_DEPTH):
        if fn is None or not _transparent(fn):
            break
        fn, k = _graph_inputs(fn)[0]
    return fn, k


def _reaches(edge: tuple[Any, int], target: tuple[Any, int],
             rank: Callable[[Any], int | None] | None = None) -> bool:
    """Whether ``target`` lies on a short chain below ``edge`` that passes no weighted map.

    ``rank(fn)``: where a node comes in an order that puts every node before its inputs (None
    where unknown); a node ranked after ``target`` cannot have it below, and is not walked."""
    stack = [(edge, 0)]
    seen = set()
    last = None if rank is None or target[0] is None else rank(target[0])
    while stack:
        (fn, k), depth = stack.pop()
        if fn is target[0] and k == target[1]:
            return True
        if fn is None or (id(fn), k) in seen or depth >= _GATE_DEPTH:
            continue
        if last is not None and (at := rank(fn)) is not None and at > last:
            continue
        seen.add((id(fn), k))
        entry = lookup(fn.name()) if hasattr(fn, "name") else None
        if entry is None or entry.kind in _OPAQUE:
            continue
        stack.extend((e, depth + 1) for e in _graph_inputs(fn))
    return False


def _is_activation(edge: tuple[Any, int]) -> bool:
    fn = edge[0]
    entry = lookup(fn.name()) if fn is not None and hasattr(fn, "name") else None
    return entry is not None and entry.kind == "elementwise" and fn.name() not in _COPIES


def gate_factors(node: Any, slots: tuple[int, ...], activations: bool = False,
                 rank: Callable[[Any], int | None] | None = None) -> set[int]:
    """The factors of the product ``node`` (among input ``slots``) that are gates of another.

    Factor ``i`` is a gate of factor ``j`` when ``i`` is computed from ``j``'s source by a
    short chain of pointwise ops, constants and reductions that passes no weighted map
    (``rsqrt(mean(x ** 2) + eps)`` of ``x``; ``sigmoid(x)`` of ``x``), while ``j`` is not one
    of ``i``. With ``activations=True`` a factor that is the output of a nonlinearity (the
    SiLU of a SwiGLU gate) is a gate of a factor that is not (CP-LRP's gated MLPs). Factors
    computed from distinct projections (``silu(W1 x) * (W2 x)``) are never gates: the chain
    stops at the weighted maps. ``rank`` (see :func:`_reaches`) only saves walking.
    """
    edges = {s: node.next_functions[s] for s in slots}
    sources = {s: source(e) for s, e in edges.items()}
    gates = set()
    for i in slots:
        for j in slots:
            if i == j or sources[i] == sources[j]:
                continue
            # (the test that fails fast first: a factor's chain seldom reaches its gate's source)
            if not _reaches(edges[j], sources[i], rank) and _reaches(edges[i], sources[j], rank):
                gates.add(i)
    if activations and not gates and len(slots) == 2:
        act = [s for s in slots if _is_activation(sources[s])]
        if len(act) == 1:
            gates.add(act[0])
    if len(gates) == len(slots):  # every factor a gate of another: no constant to pick
        return set()
    return gates


def softmax_factors(node: Any, slots: tuple[int, ...]) -> set[int]:
    """The operands of ``node`` among ``slots`` whose source is a softmax (attention
    probabilities), seen past views, copies, expansions and dropout."""
    found = set()
    for s in slots:
        fn, _ = source(node.next_functions[s])
        if fn is not None and lookup(fn.name()) is not None and lookup(fn.name()).kind == "softmax":
            found.add(s)
    return found


# -- exact inverses of invertible activations ----------------------------------------------
def _with_inverse(name: str, inverse) -> None:
    """Give the existing entry ``name`` an inverse, keeping everything else it declares."""
    entry = lookup(name)
    if entry is None or entry.inverse is not None:
        return
    register(name, entry.kind, entry.contract, forward=entry.forward, own=entry.own, taps=entry.taps,
             inverse=inverse, doc=entry.doc, group=entry.group, affine=entry.affine,
             own_recomputes=entry.own_recomputes)


def _open_interval(out: Value, low: float, high: float, fn) -> dict[int, Value]:
    # Saturated outputs (tanh = +-1, sigmoid = 0 or 1 in floating point) do not determine x.
    inside = (out.tensor > low) & (out.tensor < high)
    mask = inside if out.mask is None else inside & out.mask
    return {0: Value(fn(out.tensor.clamp(low, high)), None if bool(mask.all()) else mask)}


_with_inverse("TanhBackward0", lambda n, out, xs: _open_interval(out, -1.0, 1.0, torch.atanh))
_with_inverse("SigmoidBackward0", lambda n, out, xs: _open_interval(out, 0.0, 1.0, torch.logit))
_with_inverse("ExpBackward0", lambda n, out, xs: _open_interval(out, 0.0, float("inf"), torch.log))

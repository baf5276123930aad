"""The op registry: one entry per autograd node type.

An op entry says *how its inputs combine* -- never how relevance is shared; that is the
rule's job (:mod:`dynlrp.rules`). Each entry declares:

``kind``
    The family of combination (``"linear"``, ``"sum"``, ``"product"``, ``"elementwise"``,
    ``"route"``, ``"leaf"``). The rule set picks a rule per kind (and per op or module).
``contract``
    Its conservation contract, checked by the tests: ``"exact"`` (input relevance sums to the
    output relevance), ``"bias"`` (exact up to what a bias and the stabiliser absorb) or
    ``"route"`` (relevance is moved, never created: a permutation, copy-sum or selection).
``own(node)``
    The node's forward output rebuilt from its *own* saved tensors, or ``None``: a node
    whose ``own`` succeeds is an *Arg Node* of the Promise System (paper 4.3.1).
``own_recomputes``
    ``True`` when ``own`` recomputes the op (a matrix product, a convolution) rather than
    reading a saved result: resolvers then first look where the value costs nothing (a
    consumer's saved input, an inversion from saved values) and recompute only if needed.
``taps(node)``
    The forward *inputs* the node saved, as ``{input index: tensor}``.
``forward(node, xs)``
    The forward closure: the output (a tensor, or a tuple for multi-output nodes) from input
    values ``xs`` aligned with ``node.next_functions`` (``None`` where an input is not in
    the graph; the closure then uses what the node saved). Raises :class:`MissingOperand`
    when an operand was neither saved nor is in the graph (a frozen bias).
``inverse(node, out, xs)``
    Optional: input values recovered exactly from the output and the other inputs, as
    ``{input index: Value}`` (a :class:`Value` may be known on a mask only).
``group``
    Optional: a finer family than ``kind`` that rule sets can address, like Zennit's layer
    types: ``"conv"`` (convolutions), ``"dense"`` (fully connected layers), ``"batchnorm"``.
``homogeneous``
    Optional: the input slots in which the op is positively homogeneous of degree 1, the
    others fixed (``f(t x) = t f(x)`` for ``t > 0``: a ReLU, a product's factors, the dividend
    of a quotient, a copy). There the op's own backward of ``g`` is the identity rule written
    as a gradient (``x * J^T g = f(x) * g``), which lets :mod:`dynlrp.gradform` leave the node
    to autograd's engine.
``quotient(node, x, out)``
    Optional, for an elementwise op with ``f(0) = 0``: ``f(x) / x`` (continued at 0) written
    into ``out``, a tensor of ``x``'s shape, and returned (GELU: the normal CDF ``Phi(x)``; SiLU:
    ``sigmoid(x)``). :mod:`dynlrp.gradform` then carries the identity rule as ``g * f(x) / x``
    from the input alone, without rebuilding the output.
``vjp(node, grads, slots)``
    Optional: the node's backward ``J^T g`` computed another way, for the input ``slots`` that
    lead to a requested input, as ``{slot: tensor}``; or ``None`` where it does not apply (the
    node's own backward then runs). The same numbers up to rounding, in less time: a pointwise
    convolution's adjoint as one matrix product over channels (:mod:`dynlrp.ops.linear`).
``affine(node, slot)``
    Optional: the op as an affine map of input ``slot`` with a weight, as an :class:`Affine`
    (or ``None`` when it is not one, e.g. batch norm in training mode). Rules that modify
    weights (gamma, z+, alpha-beta, z-box, flat, w-square) and graph-level canonization
    (:func:`fold`) use it.

Register with :func:`register`; the engine only ever calls :func:`lookup`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("linear", "sum", "product", "elementwise", "route", "leaf", "attention", "softmax", "norm")
CONTRACTS = ("exact", "bias", "route", "none")


class MissingOperand(Exception):
    """A forward closure needs an operand autograd neither saved nor put in the graph.

    ``slot`` is the operand's input index; ``owner`` a tensor of the same module (its
    weight), by which a model's parameters can supply it (a frozen bias; see
    :class:`dynlrp.values.Parameters`).
    """

    def __init__(self, message: str, slot: int | None = None, owner: torch.Tensor | None = None):
        super().__init__(message)
        self.slot = slot
        self.owner = owner


class Value:
    """A forward value, known everywhere or only where ``mask`` is true. Treat it as immutable.

    ``owned`` serves :func:`dynlrp.values.merge` only: ``tensor`` and ``mask`` are new tensors
    nobody else holds, which a merge may fill in (the value is then used up).

    (A slotted class rather than a frozen dataclass: one is made per forward value, and a
    frozen dataclass costs three times as much to make.)"""

    __slots__ = ("tensor", "mask", "owned")

    #: Every entry is ``>= 0`` (where known; 0 where not): a stabiliser needs no sign test.
    nonnegative = False

    def __init__(self, tensor: torch.Tensor, mask: torch.Tensor | None = None, owned: bool = False) -> None:
        self.tensor = tensor
        self.mask = mask
        self.owned = owned

    @property
    def exact(self) -> bool:
        return self.mask is None

    def __repr__(self) -> str:
        return f"Value(tensor={self.tensor!r}, mask={self.mask!r})"


class NonnegativeValue(Value):
    """A value known everywhere with no negative entry (:attr:`Value.nonnegative`)."""

    __slots__ = ()
    nonnegative = True


class ClippedValue(Value):
    """An input seen through a clipping op (``relu``): ``tensor`` is the op's output ``out``
    (``>= 0``), which is the input where ``out > 0``; where ``out`` is 0 the input is unknown.

    The mask ``out > 0`` is made on first use: a rule whose relevance is known to vanish where
    ``out`` is 0 needs none (:attr:`source`, set by :func:`dynlrp.values.inverse`: the edge
    ``(consumer, 0)`` whose value ``out`` is)."""

    __slots__ = ("source", "_mask")
    nonnegative = True

    def __init__(self, out: torch.Tensor) -> None:
        self.tensor = out
        self.owned = False
        self.source = None
        self._mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:  # type: ignore[override]
        if self._mask is None:
            from .common import scalar  # (ops.common imports this module)

            self._mask = self.tensor.gt(scalar(0, self.tensor))
        return self._mask

    @property
    def exact(self) -> bool:
        return False


class PlacedValue(Value):
    """A selection's inverse: ``part`` (known where ``part_mask`` is, everywhere if None) placed
    where ``view(t)`` lies in a tensor ``t`` of shape ``size``, known nowhere else.

    The full-size tensor and mask are made on first use: :func:`dynlrp.values.merge` copies the
    part alone into the tensor it gathers parts in, so the query, key and value read back from a
    fused projection make one tensor of the projection's size, not three."""

    __slots__ = ("place", "_shape", "_full")

    def __init__(self, size: torch.Size, view: Callable[[torch.Tensor], torch.Tensor], part: torch.Tensor,
                 part_mask: torch.Tensor | None = None) -> None:
        self.owned = True
        self.place = (view, part, part_mask)  # what values.merge copies
        self._shape = size
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def _made(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._full is None:
            view, part, part_mask = self.place
            tensor = part.new_zeros(self._shape)
            mask = torch.zeros(self._shape, dtype=torch.bool, device=part.device)
            view(tensor).copy_(part)
            view(mask).copy_(True if part_mask is None else part_mask)
            self._full = (tensor, mask)
        return self._full

    @property
    def tensor(self) -> torch.Tensor:  # type: ignore[override]
        return self._made()[0]

    @property
    def mask(self) -> torch.Tensor:  # type: ignore[override]
        return self._made()[1]

    @property
    def exact(self) -> bool:
        return False  # (known on the part only, even when the part is all of it: as a mask says)


def _none(*_: Any) -> None:
    return None


def _no_taps(_: Any) -> dict[int, torch.Tensor]:
    return {}


@dataclass(frozen=True)
class Affine:
    """An op seen as an affine map of one input: ``z = linear(x, weight) + bias``.

    ``linear`` must be linear in ``x`` and accept any tensor shaped like ``weight`` (rules
    call it with modified weights such as ``weight.clamp(min=0)``). ``bias`` broadcasts to
    the output; modifying it elementwise (``bias.clamp(min=0)``) modifies each channel's
    bias. With ``bias_known=False`` the op has a bias that autograd did not keep (a frozen
    parameter); rules then use ``z - linear(x, weight)``, the bias spread over the output.
    ``scale_out(weight, s)`` returns the weight of ``s * map`` for one factor ``s[c]`` per
    output channel (dim 1), or is ``None`` when the op cannot absorb such a scale.
    ``channelwise`` marks ``z = x * weight[c] + bias[c]`` per channel of dim 1 (batch norm
    at inference): such an op can be folded into the op before it (:func:`fold`).
    ``params`` are the parameter tensors behind the weight and bias (to find their module).
    ``place_bias(b)``, for an op whose bias autograd did not keep, is the bias term of the output
    for the module's bias parameter ``b`` (found from ``params[0]``, the weight parameter, by
    :class:`dynlrp.values.Parameters`), or ``None``.
    ``rows`` marks a map of 2-D inputs that takes each row of ``x`` to the same row of the
    output (``x @ W``): rules may then run it on the rows that carry relevance only.
    ``owned`` marks a ``weight`` made for this view alone (a folded weight): the rule that asked
    for the view may overwrite it once it needs it no more.
    ``adjoint(s, weight)``, where the entry knows it in closed form, is the adjoint of
    ``linear(., weight)``, ``J^T s`` (rules otherwise take it by autograd through ``linear``).
    """

    weight: torch.Tensor
    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    bias: torch.Tensor | None = None
    bias_known: bool = True
    scale_out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    channelwise: bool = False
    params: tuple[torch.Tensor, ...] = ()
    place_bias: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: bool = False
    owned: bool = False
    adjoint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def fold(first: Affine, channel: Affine) -> Affine:
    """The affine map ``channel(first(x))`` as one :class:`Affine` of ``x``.

    This is batch-norm folding (Zennit's ``MergeBatchNorm`` canonizer) done on the maps,
    not on a model: the weight becomes ``weight * s`` per output channel and the bias
    ``s * bias + shift``, where ``channel`` is ``x * s + shift``.
    """
    if first.scale_out is None or not channel.channelwise:
        raise ValueError("fold needs an op that can scale its output channels and a channel-wise op")
    weight = first.scale_out(first.weight, channel.weight)
    known = first.bias_known and channel.bias_known
    bias = None
    if known and first.bias is not None:
        bias = channel.linear(first.bias, channel.weight)
        bias = bias if channel.bias is None else bias + channel.bias
    elif known:
        bias = channel.bias
    return Affine(weight, first.linear, bias, known, None, False, first.params, owned=True,
                  adjoint=first.adjoint)


@dataclass(frozen=True)
class OpEntry:
    """How one autograd node type combines its inputs (see the module docstring)."""

    name: str
    kind: str
    contract: str
    forward: Callable[..., Any] | None = None
    own: Callable[[Any], torch.Tensor | None] = _none
    taps: Callable[[Any], dict[int, torch.Tensor]] = _no_taps
    inverse: Callable[..., dict[int, Value]] | None = None
    doc: str = field(default="", compare=False)
    group: str = ""
    affine: Callable[[Any, int], Affine | None] | None = None
    own_recomputes: bool = False
    homogeneous: tuple[int, ...] = ()
    quotient: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    vjp: Callable[[Any, list, tuple[int, ...]], dict[int, torch.Tensor] | None] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r}; expected one of {KINDS}")
        if self.contract not in CONTRACTS:
            raise ValueError(f"unknown contract {self.contract!r}; expected one of {CONTRACTS}")


_REGISTRY: dict[str, OpEntry] = {}


def register(
    names: str | tuple[str, ...],
    kind: str,
    contract: str,
    *,
    forward: Callable[..., Any] | None = None,
    own: Callable[[Any], torch.Tensor | None] = _none,
    taps: Callable[[Any], dict[int, torch.Tensor]] = _no_taps,
    inverse: Callable[..., dict[int, Value]] | None = None,
    doc: str = "",
    group: str = "",
    affine: Callable[[Any, int], Affine | None] | None = None,
    own_recomputes: bool = False,
    homogeneous: tuple[int, ...] = (),
    quotient: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    vjp: Callable[[Any, list, tuple[int, ...]], dict[int, torch.Tensor] | None] | None = None,
) -> None:
    """Register an op entry for one or more autograd node type names.

    Names are autograd node type names as ``grad_fn.name()`` prints them
    (``"AddmmBackward0"``); a custom ``torch.autograd.Function`` subclass ``F`` appears as
    ``"FBackward"``. Registering a name twice replaces the earlier entry.
    """
    for name in (names,) if isinstance(names, str) else names:
        _REGISTRY[name] = OpEntry(name, kind, contract, forward, own, taps, inverse, doc, group, affine,
                                   own_recomputes, tuple(homogeneous), quotient, vjp)


def lookup(name: str) -> OpEntry | None:
    """The entry for an autograd node type name, or ``None``."""
    return _REGISTRY.get(name)


def registered() -> dict[str, OpEntry]:
    """A copy of the registry (name -> entry)."""
    return dict(_REGISTRY)


# Importing the families registers their entries.
from . import (  # noqa: E402,F401
    arith,
    attention,
    custom,
    elementwise,
    embedding,
    linear,
    math,
    norm,
    normalization,
    pool,
    shape,
)
from .custom import register_function, unregister_function  # noqa: E402,F401

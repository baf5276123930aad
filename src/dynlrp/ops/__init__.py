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
    """A forward closure needs an operand autograd neither saved nor put in the graph."""


@dataclass(frozen=True)
class Value:
    """A forward value, known everywhere or only where ``mask`` is true."""

    tensor: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def exact(self) -> bool:
        return self.mask is None


def _none(*_: Any) -> None:
    return None


def _no_taps(_: Any) -> dict[int, torch.Tensor]:
    return {}


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
) -> None:
    """Register an op entry for one or more autograd node type names.

    Names are autograd node type names as ``grad_fn.name()`` prints them
    (``"AddmmBackward0"``); a custom ``torch.autograd.Function`` subclass ``F`` appears as
    ``"FBackward"``. Registering a name twice replaces the earlier entry.
    """
    for name in (names,) if isinstance(names, str) else names:
        _REGISTRY[name] = OpEntry(name, kind, contract, forward, own, taps, inverse, doc)


def lookup(name: str) -> OpEntry | None:
    """The entry for an autograd node type name, or ``None``."""
    return _REGISTRY.get(name)


def registered() -> dict[str, OpEntry]:
    """A copy of the registry (name -> entry)."""
    return dict(_REGISTRY)


# Importing the families registers their entries.
from . import arith, elementwise, linear, norm, pool, shape  # noqa: E402,F401

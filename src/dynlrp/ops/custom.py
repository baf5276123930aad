"""Custom ``torch.autograd.Function`` nodes: register an op entry by the Function's class.

A Function ``MyFn`` appears in the graph as a node named ``"MyFnBackward"``; the node is
also the ``ctx`` the Function's ``forward`` saw, so attributes set there (``ctx.k = 3``) and
``ctx.saved_tensors`` are readable from the op entry's closures::

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

    dynlrp.ops.register_function(Scale, kind="elementwise", forward=lambda node, xs: xs[0] * node.k)

The ``kind`` picks the rule family (``"linear"``: epsilon through the Function's own
backward, ``"elementwise"``: identity, ``"route"``: relevance moved by the backward,
``"sum"``: proportional, ``"product"``: uniform). ``forward(node, xs)`` replays the
Function from input values ``xs`` (aligned with the node's inputs) so that the Promise
System can rebuild values through it; ``own(node)`` rebuilds its output from what it saved.
A graph holding an unregistered Function raises :class:`dynlrp.UnknownOpError`, which names
it and shows this call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import Value, register

_CLASSES: dict[str, type] = {}


def function_node_name(function: type) -> str:
    """The autograd node name of a custom Function class: ``MyFn -> "MyFnBackward"``."""
    if not (isinstance(function, type) and issubclass(function, torch.autograd.Function)):
        raise TypeError(f"expected a torch.autograd.Function subclass, got {function!r}")
    return function._backward_cls.__name__


def register_function(
    function: type,
    kind: str,
    contract: str = "exact",
    *,
    forward: Callable[[Any, list], Any] | None = None,
    own: Callable[[Any], torch.Tensor | None] | None = None,
    taps: Callable[[Any], dict[int, torch.Tensor]] | None = None,
    inverse: Callable[..., dict[int, Value]] | None = None,
    doc: str = "",
    replace: bool = False,
    own_recomputes: bool = False,
) -> str:
    """Register an op entry for a custom ``torch.autograd.Function`` by its class.

    Parameters
    ----------
    function
        The ``torch.autograd.Function`` subclass.
    kind, contract
        As for :func:`dynlrp.ops.register`: which rule family applies and the conservation
        contract (``"exact"``, ``"bias"``, ``"route"``, ``"none"``).
    forward, own, taps, inverse
        The entry's closures (see :mod:`dynlrp.ops`). ``node`` is the Function's ``ctx``.
    doc
        A line saying what the Function computes.
    replace
        Allow replacing an entry registered for another Function class of the same name.
    own_recomputes
        ``own`` recomputes the Function (costly) rather than reading a saved result: the
        resolver then looks for the output where it costs nothing first.

    Returns
    -------
    str
        The node name the entry is registered under (``"MyFnBackward"``).

    Raises
    ------
    ValueError
        When another Function class with the same name is registered (two classes named
        ``MyFn`` in different modules give nodes of one name) and ``replace`` is false.
    """
    name = function_node_name(function)
    prior = _CLASSES.get(name)
    if prior is not None and prior is not function and not replace:
        raise ValueError(
            f"{name} is already registered for {prior.__module__}.{prior.__qualname__}; autograd names "
            f"the nodes of {function.__module__}.{function.__qualname__} the same. Rename one Function "
            "or pass replace=True."
        )
    extra: dict[str, Any] = {}
    if own is not None:
        extra["own"] = own
    if taps is not None:
        extra["taps"] = taps
    register(name, kind, contract, forward=forward, inverse=inverse, doc=doc, own_recomputes=own_recomputes,
             **extra)
    _CLASSES[name] = function
    return name


def unregister_function(function: type) -> None:
    """Remove the entry :func:`register_function` made for ``function`` (nothing if none)."""
    from . import _REGISTRY

    name = function_node_name(function)
    if _CLASSES.get(name) is function:
        del _CLASSES[name]
        _REGISTRY.pop(name, None)


def registered_function(name: str) -> type | None:
    """The Function class registered under node name ``name``, if any."""
    return _CLASSES.get(name)


def custom_function_hint(names: Iterable[str]) -> str:
    """A sentence for the unknown-op error when some names look like custom Functions."""
    custom = sorted({n for n in names if n.endswith("Backward") and n[: -len("Backward")]})
    if not custom:
        return ""
    fns = ", ".join(n[: -len("Backward")] for n in custom)
    return (
        f" {', '.join(custom)} {'is' if len(custom) == 1 else 'are'} the node(s) of custom "
        f"torch.autograd.Function(s) {fns}: register each by its class, e.g. "
        f"`dynlrp.ops.register_function({custom[0][: -len('Backward')]}, kind='elementwise', "
        "forward=lambda node, xs: ...)` (node is the Function's ctx)."
    )

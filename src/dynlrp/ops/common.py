"""Small helpers the op families share."""

from __future__ import annotations

from typing import Any

import torch

from ..saved import leaf_variable, output_meta, saved
from . import MissingOperand


def operand(node: Any, xs: list, index: int, saved_name: str | None, what: str,
            owner: torch.Tensor | None = None) -> torch.Tensor:
    """Input ``index``: its graph value when given, else the value the node saved.

    Raises :class:`MissingOperand` naming ``what`` when neither exists; ``owner`` (a tensor
    of the same module, e.g. its weight) lets a model's parameters supply the operand.
    """
    if xs[index] is not None:
        return xs[index]
    value = saved(node, saved_name) if saved_name else None
    if value is None:
        raise MissingOperand(f"{what} of {node.name()} (not saved by autograd and not in the graph)",
                             index, owner)
    return value


def leaf_input(node: Any, index: int) -> torch.Tensor | None:
    """The leaf tensor behind input ``index`` when it is an ``AccumulateGrad`` edge."""
    child = node.next_functions[index][0]
    return None if child is None else leaf_variable(child)


def has_edge(node: Any, index: int) -> bool:
    nexts = node.next_functions
    return index < len(nexts) and nexts[index][0] is not None


def out_shape(node: Any, index: int = 0) -> torch.Size:
    return output_meta(node, index)[0]


_SCALARS: dict[tuple, torch.Tensor] = {}


def scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype and device, made once. (An operation with a
    Python number wraps it in a new tensor every time, which on small tensors costs more than the
    operation: ``t.gt(scalar(0, t))`` is ``t > 0``, in a third of the time.)"""
    key = (value, like.dtype, like.device)
    found = _SCALARS.get(key)
    if found is None:
        found = torch.tensor(value, dtype=like.dtype, device=like.device)
        if len(_SCALARS) < 256:
            _SCALARS[key] = found
    return found


def taps_from(*pairs: tuple[int, str]):
    """A ``taps`` function reading input ``i`` from saved attribute ``name``."""

    def taps(node: Any) -> dict[int, torch.Tensor]:
        found = {}
        nexts = node.next_functions  # (read once: has_edge for every pair)
        for index, name in pairs:
            value = saved(node, name)
            if isinstance(value, torch.Tensor) and index < len(nexts) and nexts[index][0] is not None:
                found[index] = value
        return found

    return taps


def scalar_or_tensor(value: Any) -> Any:
    return value

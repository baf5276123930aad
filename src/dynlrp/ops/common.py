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
    return index < len(node.next_functions) and node.next_functions[index][0] is not None


def out_shape(node: Any, index: int = 0) -> torch.Size:
    return output_meta(node, index)[0]


def taps_from(*pairs: tuple[int, str]):
    """A ``taps`` function reading input ``i`` from saved attribute ``name``."""

    def taps(node: Any) -> dict[int, torch.Tensor]:
        found = {}
        for index, name in pairs:
            value = saved(node, name)
            if isinstance(value, torch.Tensor) and has_edge(node, index):
                found[index] = value
        return found

    return taps


def scalar_or_tensor(value: Any) -> Any:
    return value

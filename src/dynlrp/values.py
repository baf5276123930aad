"""Where forward values come from: the sources both modes share, and the resolver interface.

A rule asks for the forward value of an *edge* -- output ``k`` of node ``i``. Two resolvers
answer: :class:`dynlrp.promise.PromiseResolver` (the Promise System: from what autograd
saved) and :class:`dynlrp.record.TapeResolver` (recorded mode: from the tape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .graph import Edge, Graph
from .ops import MissingOperand, Value, lookup


class Resolver:
    """Answers forward-value requests for one graph; subclasses implement :meth:`value`."""

    def __init__(self, graph: Graph, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                 params: Parameters | None = None):
        self.graph = graph
        self.params = params
        self.processed = [False] * len(graph.nodes)
        self.memo: dict[Edge, Value] = {}
        for y, edge in zip(outputs, graph.roots):
            self.memo[edge] = Value(y.detach())
        for x, edge in zip(inputs, graph.targets):
            self.memo.setdefault(edge, Value(x.detach()))

    def value(self, edge: Edge, requester: int) -> Value:  # pragma: no cover
        raise NotImplementedError

    def output(self, i: int, k: int = 0) -> Value:
        return self.value((i, k), i)

    def input(self, i: int, slot: int) -> Value:
        edge = self.graph.nodes[i].inputs[slot]
        return self.value(edge, i)

    def stats(self) -> dict[str, float]:
        return {}


def tap_value(graph: Graph, consumer: int, slot: int) -> torch.Tensor | None:
    """The value of input ``slot`` of node ``consumer`` if that node saved it, else None."""
    cn = graph.nodes[consumer]
    entry = lookup(cn.name)
    if entry is None:
        return None
    value = entry.taps(cn.fn).get(slot)
    return None if value is None else value.detach()


class Parameters:
    """A model's parameters by the storage they live in: supplies operands autograd did not keep.

    Autograd never sees a frozen layer's bias, yet it saves the layer's weight. Given the
    model, the weight identifies the module, and the module holds the bias. The model is
    only read.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._by_ptr: dict[int, torch.nn.Module] = {}
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.numel():
                self._by_ptr[weight.data_ptr()] = module

    def bias_for(self, owner: torch.Tensor | None) -> torch.Tensor | None:
        """The bias of the module whose weight is ``owner`` (or a view of it), or None."""
        if owner is None:
            return None
        module = self._by_ptr.get(owner.data_ptr())
        bias = getattr(module, "bias", None)
        return bias.detach() if isinstance(bias, torch.Tensor) else None


def replay(entry, node, xs: list, params: Parameters | None):
    """Run an op's forward closure; operands autograd did not keep come from ``params``."""
    xs = list(xs)
    for _ in range(len(xs) + 1):
        try:
            return entry.forward(node, xs)
        except MissingOperand as missing:
            found = None if params is None or missing.slot is None else params.bias_for(missing.owner)
            if found is None or xs[missing.slot] is not None:
                raise
            xs[missing.slot] = found
    raise MissingOperand(f"operands of {node.name()}")

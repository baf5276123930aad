"""Where forward values come from: the sources both modes share, and the resolver interface.

A rule asks for the forward value of an *edge* -- output ``k`` of node ``i``. Two resolvers
answer: :class:`dynlrp.promise.PromiseResolver` (the Promise System: from what autograd
saved) and :class:`dynlrp.record.TapeResolver` (recorded mode: from the tape).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .graph import Edge, Graph
from .ops import Value, lookup


class Resolver:
    """Answers forward-value requests for one graph; subclasses implement :meth:`value`."""

    def __init__(self, graph: Graph, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
        self.graph = graph
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

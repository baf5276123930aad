"""Recorded mode: capture the true forward values during the forward pass.

``with dynlrp.record() as tape: y = model(x)`` runs the forward under a
``TorchFunctionMode`` that stores a detached copy of every tensor a torch call returns,
keyed by the autograd node that produced it. ``dynlrp.lrp(y, x, tape=tape)`` then reads
forward values from the tape instead of making promises. It is the independent check of
the Promise System, and a way to trade memory for speed.

One Python-level call can make several autograd nodes (``x @ w`` on 3-d input is
view -> mm -> view); only the last node's output is on the tape. The values of the inner
nodes are derived from recorded values with the ops' forward closures (from the recorded
inputs) or their exact inverses (from the recorded output) -- never through the Promise
System.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .errors import UnrecoverableValueError
from .graph import Edge
from .ops import MissingOperand, Value, lookup
from .saved import leaf_variable
from .values import Resolver, invert_by_consumers, replay, saved_value


class Tape(TorchFunctionMode):
    """Forward values captured during a forward pass: ``{(grad_fn, output_nr): tensor}``."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[Any, int], torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                self.values[(t.grad_fn, t.output_nr)] = t.detach().clone()
        return out

    def __len__(self) -> int:
        return len(self.values)

    def clear(self) -> None:
        """Drop every recorded value (and with them the references to the graph)."""
        self.values.clear()


def record() -> Tape:
    """Record the forward values of the torch calls made inside the ``with`` block.

    Returns
    -------
    Tape
        A context manager; pass it as ``tape=`` to :func:`dynlrp.lrp`.
    """
    return Tape()


class TapeResolver(Resolver):
    """Forward values from a tape; unrecorded inner nodes are derived, never promised."""

    def __init__(self, graph, outputs, inputs, tape: Tape, params=None):
        super().__init__(graph, outputs, inputs, params)
        self.tape = tape
        self._busy: set[Edge] = set()

    def value(self, edge: Edge, requester: int) -> Value:
        got = self._get(edge)
        if got is None:
            gn = self.graph.nodes[edge[0]]
            raise UnrecoverableValueError(
                f"the tape holds no value for the output of {gn.name} and it cannot be derived "
                "from recorded values. Was the forward pass run inside `dynlrp.record()`?"
            )
        return got

    def _get(self, edge: Edge) -> Value | None:
        if edge in self.memo:
            return self.memo[edge]
        if edge in self._busy:
            return None
        i, k = edge
        gn = self.graph.nodes[i]
        var = leaf_variable(gn.fn)
        recorded = var.detach() if var is not None else self.tape.values.get((gn.fn, k))
        if recorded is None:  # what autograd saved is as exact as the tape (inside functions
            recorded = saved_value(self.graph, edge)[0]  # that hide their inner calls from it)
        if recorded is not None:
            self.memo[edge] = Value(recorded)
            return self.memo[edge]
        self._busy.add(edge)
        try:
            got = self._from_inputs(gn, k) or self._from_consumers(edge)
        finally:
            self._busy.discard(edge)
        if got is not None:
            self.memo[edge] = got
        return got

    def _from_inputs(self, gn, k: int) -> Value | None:
        entry = lookup(gn.name)
        if entry is None or entry.forward is None:
            return None
        xs: list = []
        for e in gn.inputs:
            v = None if e is None else self._get(e)
            if e is not None and (v is None or not v.exact):
                return None
            xs.append(None if v is None else v.tensor)
        try:
            out = replay(entry, gn.fn, xs, self.params)
        except MissingOperand:
            return None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return Value(outs[k].detach())

    def _from_consumers(self, edge: Edge) -> Value | None:
        return invert_by_consumers(self.graph, edge, lambda out, _: self._get(out),
                                   lambda e, _c, _s: self._get(e))[0]

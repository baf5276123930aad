"""The plan cache (paper 4.4.1).

Repeated calls on the same architecture walk the same graph and resolve the same promise
paths. A :class:`Plan` keeps, per graph structure, what the first call found: the
traversal order, the op entry and rule of every node, and how every forward value was
obtained (given, leaf, own saved tensors, a consumer's tap, a replayed forward closure, an
inversion). A later call whose graph has the same structure -- checked every time, never
assumed -- follows the plan: no promise search, and the same statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import GraphFreedError, UnrecoverableValueError
from .graph import Edge
from .ops import MissingOperand, Value
from .promise import PromiseResolver
from .saved import leaf_variable
from .values import Resolver, inverse, merge, replay, replay_output, tap_value


class PlanMismatch(Exception):
    """A cached recipe did not apply to this graph (the value is then searched for afresh)."""


@dataclass
class Plan:
    """What one call learned about a graph structure."""

    signature: tuple
    entries: dict[int, Any]
    rules: dict[int, Any]
    how: dict[Edge, tuple]
    stats: dict[str, float]
    units: frozenset[Edge] = frozenset()  # values the first call left unbuilt (costly)
    #: the rules as gradients (:mod:`dynlrp.gradform`): the nodes whose rule is not the backward as
    #: it is; False where some rule has no such form or autograd's pass failed; None: not asked yet
    gradients: dict[int, Any] | bool | None = None


class PlannedResolver(Resolver):
    """Resolves forward values by following the recipes of a :class:`Plan`."""

    def __init__(self, graph, outputs, inputs, plan: Plan, params=None):
        super().__init__(graph, outputs, inputs, params)
        self.plan = plan
        #: a recipe failed on this call: the engine drops the plan, and the next call plans anew
        self.stale = False
        self._args = (outputs, inputs)
        self._search: PromiseResolver | None = None

    def value(self, edge: Edge, requester: int) -> Value:
        try:
            return self._get(edge)
        except (PlanMismatch, MissingOperand, KeyError, TypeError, IndexError, GraphFreedError):
            pass  # (searched outside the handler: no exception kept alive meanwhile)
        return self._searcher().value(edge, requester)

    def exact(self, edge: Edge, requester: int) -> Value:
        v = self.value(edge, requester)
        if v.exact:
            return v
        return self._searcher().exact(edge, requester)  # the first call needed only part of it

    def seen_through(self, edge: Edge, consumer: int) -> Value | None:
        try:
            out = self._get((consumer, 0))
        except (PlanMismatch, MissingOperand, KeyError, TypeError, IndexError, GraphFreedError):
            return None
        return self._clipped(edge, consumer, out)

    def costly(self, edge: Edge) -> bool:
        if self._search is not None:
            return self._search.costly(edge)
        return edge not in self.memo and edge in self.plan.units

    def _searcher(self) -> PromiseResolver:
        """A recipe does not apply to this graph (a value now needed in full, an operand no
        longer saved): the Promise System searches from here on, sharing this call's values.
        The call goes on -- its saved tensors may already be freed, so it cannot start over."""
        self.stale = True
        if self._search is None:
            search = self._search = PromiseResolver(self.graph, *self._args, self.params)
            search.memo, search.processed = self.memo, self.processed
            search.units = set(self.plan.units)  # (the same answers to costly as so far)
        return self._search

    def _get(self, edge: Edge) -> Value:
        memo = self.memo
        value = memo.get(edge)
        if value is not None:
            return value
        how = self.plan.how.get(edge)
        if how is None:
            raise PlanMismatch(f"no recipe for {edge}")
        gn = self.graph.nodes[edge[0]]
        kind = how[0]
        if kind == "replay":  # (the most common recipe first)
            xs = []
            for e in gn.inputs:
                if e is None:
                    xs.append(None)
                    continue
                v = memo.get(e) or self._get(e)
                if v.mask is not None:
                    raise PlanMismatch("a replay needs an exact value")
                xs.append(v.tensor)
            out = replay(gn.entry, gn.fn, xs, self.params)
            i = gn.index
            if isinstance(out, (tuple, list)):
                for j, o in enumerate(out):
                    if (i, j) not in memo:
                        memo[(i, j)] = Value(replay_output(o))
                return memo[edge]
            if (i, 0) not in memo:
                memo[(i, 0)] = Value(replay_output(out))
            return memo[edge]
        if kind == "leaf":
            value = Value(leaf_variable(gn.fn).detach())
        elif kind == "own":
            own = gn.entry.own(gn.fn)
            if own is None:
                raise PlanMismatch(f"{gn.name} no longer rebuilds its output")
            value = Value(own.detach())
        elif kind == "tap":
            tapped = tap_value(self.graph, how[1], how[2])
            if tapped is None:
                raise PlanMismatch(f"{self.graph.nodes[how[1]].name} no longer saves its input")
            value = Value(tapped)
        elif kind == "inverse":
            value = None
            for consumer, slot in how[1]:
                cn = self.graph.nodes[consumer]
                out = self._get((consumer, 0))
                xs = [None if (e is None or s == slot) else self._exact(e) for s, e in enumerate(cn.inputs)]
                got = inverse(cn, slot, out, xs)
                if got is None:
                    raise PlanMismatch(f"{cn.name} could not be inverted")
                value = merge(value, got)
        elif kind == "unknown":  # no source: relevance goes per unit there (dynlrp.engine)
            raise UnrecoverableValueError(f"the output of {gn.name} cannot be rebuilt (as planned)")
        else:  # "given": the caller's tensors (and the tensors its outputs view) are in the memo
            raise PlanMismatch(f"the plan expects a tensor the caller did not pass: {edge}")
        self.memo[edge] = value
        return value

    def _exact(self, edge: Edge):
        v = self._get(edge)
        if not v.exact:
            raise PlanMismatch("a replay needs an exact value")
        return v.tensor

    def stats(self) -> dict[str, float]:
        return dict(self.plan.stats)

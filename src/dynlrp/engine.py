"""The traversal: relevance from the outputs to the requested inputs, node by node.

:class:`LRP` builds the auxiliary graph (:mod:`dynlrp.graph`), checks that every node on
the way has an op entry, then visits the nodes in the order of paper 4.2. At each node it
sums the relevance that arrived (appendix E), asks the rule set for the node's rule, gets
the forward values the rule needs from a resolver -- the Promise System
(:mod:`dynlrp.promise`) or a tape (:mod:`dynlrp.record`) -- and passes the rule's output on
to the node's inputs. The engine never names an op.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from . import ops, presets
from .errors import GraphError, LRPError, NonFiniteRelevanceError, UnknownOpError, UnrecoverableValueError
from .graph import GNode, Graph, build
from .ops import Value
from .plan import Plan, PlanMismatch, PlannedResolver
from .promise import PromiseResolver
from .record import Tape, TapeResolver
from .saved import apply_node, num_outputs, output_meta
from .values import Parameters, Resolver


class RuleContext:
    """What a rule sees at one node: relevance, forward values on demand, the adjoint."""

    def __init__(self, gn: GNode, entry: ops.OpEntry, graph: Graph, relevances: list, resolver: Resolver,
                 fused: int | None = None):
        self.gn = gn
        self.node = gn.fn
        self.entry = entry
        self.kind = entry.kind
        self.relevances = relevances
        self.relevance = relevances[0]
        self.num_inputs = len(gn.inputs)
        self._graph = graph
        self._resolver = resolver
        self.graph_inputs = tuple(s for s, e in enumerate(gn.inputs) if e is not None)
        self.reaching = tuple(s for s in self.graph_inputs if graph.nodes[gn.inputs[s][0]].reaches)
        self._values: dict[Any, Value] = {}
        self.fused = fused  # canonization: the channel-wise affine node folded into this one

    def value_of_input(self, slot: int) -> Value:
        if slot not in self._values:
            self._values[slot] = self._resolver.input(self.gn.index, slot)
        return self._values[slot]

    def value_of_output(self) -> Value:
        if "out" not in self._values:
            node = self.gn.index if self.fused is None else self.fused
            self._values["out"] = self._resolver.output(node, 0)
        return self._values["out"]

    def input(self, slot: int) -> torch.Tensor:
        return self.value_of_input(slot).tensor

    @property
    def output(self) -> torch.Tensor:
        return self.value_of_output().tensor

    def input_shape(self, slot: int) -> torch.Size:
        child, k = self.gn.inputs[slot]
        return output_meta(self._graph.nodes[child].fn, k)[0]

    def forward(self, xs: list) -> torch.Tensor:
        out = self.entry.forward(self.node, xs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def vjp_all(self, grads: list) -> tuple:
        """``J^T g``: the autograd node applied to ``grads`` (one per forward output)."""
        if self.fused is not None:  # a channel-wise map is diagonal: it is its own adjoint
            fused = self._fused_affine()
            grads = [fused.linear(grads[0], fused.weight), *grads[1:]]
        out = apply_node(self.node, grads)
        # Called directly, a node does not sum a broadcast gradient back to its operand's
        # shape (autograd's engine does that): do it here.
        return tuple(
            g if g is None or self.gn.inputs[s] is None or g.shape == (shape := self.input_shape(s))
            else g.sum_to_size(shape)
            for s, g in enumerate(out)
        )

    def vjp(self, grad: torch.Tensor) -> tuple:
        grads = [grad] + [None] * (len(self.relevances) - 1)
        return self.vjp_all(grads)

    # -- the op as an affine map with a weight (rules that modify weights; canonization) --------
    @property
    def data_slot(self) -> int:
        """The one input that leads to a requested input (the ``x`` of ``z = W x + b``)."""
        if len(self.reaching) != 1:
            raise LRPError(
                f"a rule that modifies weights needs {self.gn.name} to be a map of one requested "
                f"input, but inputs {list(self.reaching)} lead to requested inputs; use Epsilon here"
            )
        return self.reaching[0]

    def affine(self) -> ops.Affine:
        """The op as ``z = linear(x, weight) + bias`` of :attr:`data_slot`, asked of its op entry.
        With canonization, the batch norm folded into this op is part of the map."""
        view = self.entry.affine(self.node, self.data_slot) if self.entry.affine is not None else None
        if view is None:
            raise LRPError(
                f"{self.gn.name} is not an affine map with a weight (its op entry has no `affine` view "
                "for this input), so rules that modify weights do not apply; use Epsilon or Norm here"
            )
        return view if self.fused is None else ops.fold(view, self._fused_affine())

    def _fused_affine(self) -> ops.Affine:
        fn = self._graph.nodes[self.fused]
        entry = ops.lookup(fn.name)
        view = None if entry is None or entry.affine is None else entry.affine(fn.fn, 0)
        if view is None or not view.channelwise:
            raise LRPError(f"{fn.name} can no longer be folded into {self.gn.name} (training mode?); "
                           "use a new LRP engine or `cache=False`")
        return view


def _as_tuple(x: Any, what: str) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)) and x:
        return tuple(x)
    raise GraphError(f"{what} must be a tensor or a non-empty sequence of tensors")


class LRP:
    """An LRP engine with a rule set; call it like :func:`dynlrp.lrp`.

    Parameters
    ----------
    rules
        A preset name (``"epsilon"``), a mapping ``{op name or kind: Rule}`` or a
        :class:`~dynlrp.presets.RuleSet`. ``None`` uses the defaults.
    check_finite
        Raise :class:`~dynlrp.errors.NonFiniteRelevanceError` when the seed or the result
        holds NaN or inf, naming the first op that produced it (found by a second, checked
        pass that only runs when something is wrong, so the check costs nothing otherwise).
    cache
        Keep a plan per graph structure (paper 4.4.1): later calls on the same architecture
        skip the promise search. A plan is used only when the graph's structure matches it.
    fallback
        What to do with ops that have no entry. ``None`` (default): raise
        :class:`~dynlrp.errors.UnknownOpError` listing them. ``"pass"``: the identity rule
        (relevance split evenly over the op's inputs); ``"gradient"``: relevance routed by the
        op's gradient (gradient x input behaviour). Both warn, naming the ops.

    An engine may be shared by several threads: calls keep their state on the stack, and
    the plan cache is locked. ``stats`` then describes whichever call finished last.

    Attributes
    ----------
    stats
        After a call: ``nodes``, ``promises``, ``pre_promises``, ``promise_internal_nodes``,
        ``mean_promise_path``, ``promise_density`` (paper Table 4) and more.
    """

    max_plans = 8

    def __init__(
        self, rules: Any = None, *, check_finite: bool = True, cache: bool = True, fallback: str | None = None
    ) -> None:
        if fallback not in (None, "pass", "gradient"):
            raise ValueError(f"fallback must be None, 'pass' or 'gradient', not {fallback!r}")
        self.rules = presets.resolve(rules)
        self.check_finite = check_finite
        self.cache = cache
        self.fallback = fallback
        self.stats: dict[str, float] = {}
        self.plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._lock = threading.Lock()  # guards `plans`; calls themselves share no state

    def __call__(
        self,
        outputs: torch.Tensor | Sequence[torch.Tensor],
        inputs: torch.Tensor | Sequence[torch.Tensor],
        relevance: torch.Tensor | Sequence[torch.Tensor] | None = None,
        *,
        tape: Tape | None = None,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if model is None:
            model = getattr(self.rules, "model", None)  # a rule set bound to a model
        params = Parameters(model) if model is not None else None
        outputs = _as_tuple(outputs, "outputs")
        inputs = _as_tuple(inputs, "inputs")
        seeds = self._seeds(outputs, relevance)
        graph = build(outputs, inputs)
        signature = graph.signature() if self.cache and tape is None else None
        with self._lock:
            plan = self.plans.get(signature) if signature is not None else None
        entries = plan.entries if plan is not None else self._entries(graph)
        rules = plan.rules if plan is not None else {}

        def run(check_each: bool, plan: Plan | None) -> tuple[list, Resolver]:
            if tape is not None:
                resolver: Resolver = TapeResolver(graph, outputs, inputs, tape)
            elif plan is not None:
                resolver = PlannedResolver(graph, outputs, inputs, plan, params)
            else:
                resolver = PromiseResolver(graph, outputs, inputs, params)
            return self._propagate(graph, entries, rules, seeds, resolver, check_each), resolver

        with torch.no_grad(), _deep_recursion(len(graph.nodes)):
            try:
                result, resolver = run(False, plan)
            except PlanMismatch:  # the structure matched but a recipe did not: plan again
                with self._lock:
                    self.plans.pop(signature, None)
                plan = None
                result, resolver = run(False, None)
            if self.check_finite and any(r is not None and not torch.isfinite(r).all() for r in result):
                run(True, None)  # raises, naming the first op whose relevance is not finite
                raise NonFiniteRelevanceError("the relevance contains NaN or inf")
        self.stats = {"nodes": len(graph.order), "graph_nodes": len(graph.nodes), **resolver.stats(),
                      "cached_plan": plan is not None}
        if signature is not None and plan is None:
            with self._lock:
                self.plans[signature] = Plan(signature, entries, rules, resolver.how, resolver.stats())
                while len(self.plans) > self.max_plans:
                    self.plans.popitem(last=False)
        return tuple(
            torch.zeros_like(x) if r is None else r.to(x.dtype) for x, r in zip(inputs, result)
        )

    def _seeds(self, outputs: tuple, relevance: Any) -> list[torch.Tensor]:
        if relevance is None:
            return [y.detach() for y in outputs]
        seeds = _as_tuple(relevance, "relevance")
        if len(seeds) != len(outputs):
            raise GraphError(f"got {len(seeds)} relevance seeds for {len(outputs)} outputs")
        for pos, (y, r) in enumerate(zip(outputs, seeds)):
            if r.shape != y.shape:
                raise GraphError(
                    f"relevance[{pos}] has shape {tuple(r.shape)} but outputs[{pos}] has shape "
                    f"{tuple(y.shape)}; the seed must be shaped like the output (like grad_outputs)."
                )
            if self.check_finite and not torch.isfinite(r).all():
                raise NonFiniteRelevanceError(f"relevance[{pos}] (the seed) contains NaN or inf")
        return [r.detach().to(y.dtype) for y, r in zip(outputs, seeds)]

    def _entries(self, graph: Graph) -> dict[int, ops.OpEntry]:
        entries: dict[int, ops.OpEntry] = {}
        missing: Counter = Counter()
        for i in graph.order:
            gn = graph.nodes[i]
            if gn.is_leaf:
                continue
            entry = ops.lookup(gn.name)
            if entry is None:
                missing[gn.name] += 1
                if self.fallback is not None:
                    kind = "elementwise" if self.fallback == "pass" else "route"
                    entry = ops.OpEntry(gn.name, kind, "none")
            entries[i] = entry
        if missing and self.fallback is None:
            raise UnknownOpError(unknown_ops_message(missing))
        if missing:
            listing = ", ".join(f"{name} x{count}" for name, count in missing.most_common())
            warnings.warn(f"dynlrp: no LRP rule for {listing}; using the {self.fallback!r} fallback",
                          stacklevel=3)
        return entries

    def _propagate(self, graph: Graph, entries: dict, rules: dict, seeds: list, resolver: Resolver,
                   check_each: bool) -> list:
        pending: dict[tuple[int, int], torch.Tensor] = {}
        for edge, seed in zip(graph.roots, seeds):
            _accumulate(pending, edge, seed)
        found: dict[tuple[int, int], torch.Tensor] = {}
        wanted = set(graph.targets)
        nodes = graph.nodes
        for i in graph.order:
            gn = nodes[i]
            rels = [pending.pop((i, k), None) for k in range(_num_outputs(gn))]
            for k, r in enumerate(rels):
                if (i, k) in wanted:
                    found[(i, k)] = r
            if gn.is_leaf or all(r is None for r in rels):
                resolver.processed[i] = True
                continue
            rels = [r if r is not None else _zeros(gn, k) for k, r in enumerate(rels)]
            entry = entries[i]
            rule = rules.get(i)
            if rule is None:
                rule = rules[i] = self.rules.rule_at(graph, gn, entry)
            ctx = RuleContext(gn, entry, graph, rels, resolver, fused=rule.fused)
            out = self._apply(rule, ctx, gn, check_each)
            resolver.processed[i] = True
            for slot, r in enumerate(out):
                e = gn.inputs[slot]
                if r is None or e is None or not nodes[e[0]].reaches:
                    continue
                dtype = output_meta(nodes[e[0]].fn, e[1])[1]
                _accumulate(pending, e, r if r.dtype == dtype else r.to(dtype))
        return [found.get(t) for t in graph.targets]

    def _apply(self, rule, ctx: RuleContext, gn: GNode, check_each: bool) -> list:
        needs = rule.needs(ctx)
        partial = []
        for slot in needs.inputs:
            v = ctx.value_of_input(slot)
            if not v.exact:
                partial.append(v.mask)
        if needs.output:
            v = ctx.value_of_output()
            if not v.exact:
                partial.append(v.mask)
        if partial:
            _check_partial(ctx, partial, gn)
        out = rule(ctx)
        if check_each:
            for slot, r in enumerate(out):
                if r is not None and not torch.isfinite(r).all():
                    raise NonFiniteRelevanceError(
                        f"the {type(rule).__name__} rule at {gn.name} produced NaN or inf "
                        f"relevance for its input {slot}"
                    )
        return list(out)


def _check_partial(ctx: RuleContext, masks: list, gn: GNode) -> None:
    """A value known only on a mask serves where no relevance flows outside it."""
    r = ctx.relevance
    for mask in masks:
        if mask.shape != r.shape or (r[~mask] != 0).any():
            raise _partial_error(gn)
    # Fill the unknown positions so that rules see finite numbers (their relevance is 0).
    for key, v in list(ctx._values.items()):
        if not v.exact:
            ctx._values[key] = Value(torch.where(v.mask, v.tensor, torch.ones_like(v.tensor)))


def _partial_error(gn: GNode) -> UnrecoverableValueError:
    return UnrecoverableValueError(
        f"the rule at {gn.name} needs forward values that the graph only partly recovers (a "
        "layer's output seen through a ReLU), and relevance flows where they are unknown. "
        "Record the forward pass with `dynlrp.record()` and pass `tape=`."
    )


def _num_outputs(gn: GNode) -> int:
    return num_outputs(gn.fn)


def _zeros(gn: GNode, k: int) -> torch.Tensor:
    shape, dtype, device = output_meta(gn.fn, k)
    return torch.zeros(shape, dtype=dtype, device=device)


_recursion_lock = threading.Lock()
_recursion_users = [0, 0]  # active calls, the limit to restore when the last one ends


@contextmanager
def _deep_recursion(nodes: int):
    """Value walks may follow the whole depth of a graph (a residual stream): raise the
    recursion limit for the call, and restore it when the last concurrent call ends."""
    with _recursion_lock:
        if _recursion_users[0] == 0:
            _recursion_users[1] = sys.getrecursionlimit()
        _recursion_users[0] += 1
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000 + 12 * nodes))
    try:
        yield
    finally:
        with _recursion_lock:
            _recursion_users[0] -= 1
            if _recursion_users[0] == 0:
                sys.setrecursionlimit(_recursion_users[1])


def _accumulate(pending: dict, edge: tuple[int, int], r: torch.Tensor) -> None:
    prev = pending.get(edge)
    pending[edge] = r if prev is None else prev + r


def unknown_ops_message(missing: Counter) -> str:
    listing = ", ".join(f"{name} x{count}" for name, count in missing.most_common())
    return (
        f"no LRP rule for {sum(missing.values())} node(s) of {len(missing)} op type(s): {listing}. "
        "Register an op entry for each, e.g. "
        "`dynlrp.ops.register('MyOpBackward0', kind='elementwise', contract='exact', "
        "forward=lambda node, xs: my_op(xs[0]))`; see dynlrp.ops for the fields."
    ) + ops.custom.custom_function_hint(missing)

"""The traversal: relevance from the outputs to the requested inputs, node by node.

:class:`LRP` builds the auxiliary graph (:mod:`dynlrp.graph`), checks that every node on
the way has an op entry, then visits the nodes in the order of paper 4.2. At each node it
sums the relevance that arrived (appendix E), asks the rule set for the node's rule, gets
the forward values the rule needs from a resolver -- the Promise System
(:mod:`dynlrp.promise`) or a tape (:mod:`dynlrp.record`) -- and passes the rule's output on
to the node's inputs. The engine never names an op.

**Relevance per unit of value.** Some forward values nothing can rebuild: a sum with a
constant autograd never saw (eager attention's ``scores + mask``, BERT's ``embeddings +
positions + token types``, a frozen bias added on its own) has an output that no node saved.
Rules of the epsilon family use such a value only as a final factor of their result
(``R_i = v_i * H_i``) or only to divide the relevance they receive (``R / z``). So where a
value is unknown, the rule at its consumer passes ``G = H_i``, relevance *per unit* of the
value (:class:`PerUnit`); ops that only move values route ``G`` on; and the rule at the
producer, which would compute ``R / z = v * G / v``, uses ``G`` itself. The unknown value
cancels exactly (Rule.factors, Rule.per_unit); wherever it is known, or at a requested
input, ``R = v * G`` is formed. A rule that declares neither gets the usual
:class:`~dynlrp.errors.UnrecoverableValueError`. Values that could be rebuilt, but only by
recomputing a matrix product or a convolution, go the same way (:meth:`Resolver.costly
<dynlrp.values.Resolver.costly>`; ``LRP(rebuild_costly=True)`` rebuilds them instead).
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from . import gradform, ops, presets
from .dtypes import compute_dtype
from .errors import (
    GraphError,
    GraphFreedError,
    LRPError,
    ModifiedInPlaceError,
    NonFiniteRelevanceError,
    UnknownOpError,
    UnrecoverableValueError,
)
from .graph import GNode, Graph, build
from .ops import ClippedValue, NonnegativeValue, Value
from .ops.common import scalar
from .plan import Plan, PlannedResolver
from .promise import PromiseResolver
from .record import Tape, TapeResolver
from .rules import NATIVE, Gradient, as_gradient_of, linear_in, passes_of, vanishes_of
from .saved import apply_node, consume, consumed, consumed_error, translate_error
from .values import Parameters, Resolver


class RuleContext:
    """What a rule sees at one node: relevance, forward values on demand, the adjoint."""

    __slots__ = ("gn", "node", "entry", "kind", "relevances", "relevance", "num_inputs", "_graph",
                 "_resolver", "graph_inputs", "reaching", "_values", "fused", "_affine", "zeros_of",
                 "partial_inputs")

    def __init__(self, gn: GNode, entry: ops.OpEntry, graph: Graph, relevances: list, resolver: Resolver,
                 fused: int | None = None):
        self.gn = gn
        self.node = gn.fn
        self.entry = entry
        self.kind = entry.kind
        self.relevances = relevances
        self.relevance = relevances[0]
        self.num_inputs = gn.num_inputs
        self._graph = graph
        self._resolver = resolver
        self.graph_inputs = gn.graph_inputs
        self.reaching = gn.reaching
        self._values: dict[Any, Value] = {}
        self.fused = fused  # canonization: the channel-wise affine node folded into this one
        self._affine: ops.Affine | None = None
        #: An edge such that the relevance received is 0 wherever that edge's forward value is 0
        #: (or None): what the rules upstream declared (:meth:`~dynlrp.rules.Rule.vanishes`).
        self.zeros_of: tuple[int, int] | None = None
        self.partial_inputs = False  # an input value the rule got was known on a mask only

    def value_of_input(self, slot: int) -> Value:
        values = self._values
        v = values.get(slot)
        if v is None:  # (every resolver answers from its memo first)
            edge = self.gn.inputs[slot]
            resolver = self._resolver
            v = resolver.memo.get(edge) or resolver.value(edge, self.gn.index)
            values[slot] = v
        return v

    @property
    def _out_edge(self) -> tuple[int, int]:
        """The edge whose value the rule sees as its output: with canonization, the folded map's."""
        return (self.gn.index if self.fused is None else self.fused, 0)

    def value_of_output(self) -> Value:
        values = self._values
        v = values.get("out")
        if v is None:
            edge = self._out_edge
            resolver = self._resolver
            v = resolver.memo.get(edge)
            if v is None and self.zeros_of is not None:  # (a ReLU's output, free, before a replay)
                v = resolver.seen_through(edge, self.zeros_of[0])
            if v is None:
                v = resolver.output(*edge)
            values["out"] = v
        return v

    def exact_value(self, key: int | str) -> Value:
        """Input ``key`` (or the output, ``"out"``) known everywhere, even at a recomputation's cost."""
        edge = self._out_edge if key == "out" else self.gn.inputs[key]
        v = self._values[key] = self._resolver.exact(edge, self.gn.index)
        return v

    def input(self, slot: int) -> torch.Tensor:
        v = self.value_of_input(slot)
        return (v if v.exact else self.exact_value(slot)).tensor

    def assume_unit(self, key: int | str) -> None:
        """Make input ``key`` (or the output, ``"out"``) read as ones: see :class:`PerUnit`."""
        shape, dtype, device = self.gn.meta(0) if key == "out" else self._edge_meta(key)
        self._values[key] = Value(torch.ones(shape, dtype=dtype, device=device))

    def _edge_meta(self, slot: int) -> tuple:
        child, k = self.gn.inputs[slot]
        return self._graph.nodes[child].meta(k)

    @property
    def output(self) -> torch.Tensor:
        v = self.value_of_output()
        return (v if v.exact else self.exact_value("out")).tensor

    @property
    def relevance_vanishes_with_output(self) -> bool:
        """Whether the relevance received is 0 wherever the output value is 0 (the rules upstream
        say so: :meth:`~dynlrp.rules.Rule.vanishes`)."""
        return self.zeros_of is not None and self.zeros_of == self._out_edge

    @property
    def output_nonnegative(self) -> bool:
        """Whether the output value the rule got has no negative entry (a stabiliser then needs
        no sign test); asked after :attr:`output`."""
        v = self._values.get("out")
        return v is not None and v.nonnegative

    def input_shape(self, slot: int) -> torch.Size:
        return self._edge_meta(slot)[0]

    def rank(self, fn: Any) -> int | None:
        """Where autograd node ``fn`` comes in the traversal (every node before its inputs), or
        None outside it: a node ranked after another cannot have it among its inputs' inputs."""
        return self._graph.rank(fn)

    def forward(self, xs: list) -> torch.Tensor:
        out = self.entry.forward(self.node, xs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def vjp_all(self, grads: list, owned: bool = False) -> tuple:
        """``J^T g``: the autograd node applied to ``grads`` (one per forward output). With
        ``owned``, ``grads[0]`` is the caller's temporary, which a folded channel-wise map scales
        in place (``x * weight[c]`` per channel of dim 1, as :class:`~dynlrp.ops.Affine` says)."""
        if self.fused is not None:  # a channel-wise map is diagonal: it is its own adjoint
            fused = self._fused_affine(bias=False)
            g, w = grads[0], fused.weight
            if owned and g.dim() >= 2 and w.dim() == 1 and torch.result_type(g, w) == g.dtype:
                scaled = g.mul_(w.reshape([1, -1] + [1] * (g.dim() - 2)))
            else:
                scaled = fused.linear(g, w)
            grads = [scaled, *grads[1:]]
        gn = self.gn
        if len(grads) == 1:
            g = grads[0]
            same = g is None or g.dtype == gn.meta(0)[1]
        else:
            meta = gn.meta
            same = all(g is None or g.dtype == meta(k)[1] for k, g in enumerate(grads))
        if same:
            out = self._backward(grads)
        else:  # float16 nodes, float32 grads
            dtypes = [gn.meta(k)[1] for k in range(len(grads))]
            out = linear_in(dtypes, lambda *g: self._backward(list(g)), grads)
        # Called directly, a node does not sum a broadcast gradient back to its operand's
        # shape (autograd's engine does that): do it here.
        inputs, nodes = gn.inputs, self._graph.nodes
        fixed = None
        for s, g in enumerate(out):
            if g is None or (e := inputs[s]) is None:
                continue
            shape = nodes[e[0]].meta(e[1])[0]
            if g.shape != shape:
                if fixed is None:
                    fixed = list(out)
                fixed[s] = g.sum_to_size(shape)
        return out if fixed is None else tuple(fixed)

    def _backward(self, grads: list) -> tuple:
        """The node's backward on ``grads``, or the entry's own ``vjp`` where it has one that
        applies (:class:`~dynlrp.ops.OpEntry`): the same numbers up to rounding."""
        fast = self.entry.vjp
        if fast is not None:
            found = fast(self.node, grads, self.reaching)
            if found is not None:
                return tuple([found.get(s) for s in range(len(self.gn.inputs))])
        return apply_node(self.node, grads)

    def vjp(self, grad: torch.Tensor, owned: bool = False) -> tuple:
        """``J^T grad`` for the first output (see :meth:`vjp_all`)."""
        n = len(self.relevances)
        return self.vjp_all([grad] if n == 1 else [grad] + [None] * (n - 1), owned)

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

    def affine(self, bias: bool = True) -> ops.Affine:
        """The op as ``z = linear(x, weight) + bias`` of :attr:`data_slot`, asked of its op entry.
        With canonization, the batch norm folded into this op is part of the map. Made once per
        node (folding scales the weight). ``bias=False``: a rule that uses the linear part only
        (``linear``, ``adjoint``, ``rows``) does not need a frozen bias looked up in the model."""
        if self._affine is not None:
            return self._affine
        view = self.entry.affine(self.node, self.data_slot) if self.entry.affine is not None else None
        if view is None:
            raise LRPError(
                f"{self.gn.name} is not an affine map with a weight (its op entry has no `affine` view "
                "for this input), so rules that modify weights do not apply; use Epsilon or Norm here"
            )
        if not bias and self.fused is None:
            return view
        view = self._with_bias(view)
        self._affine = view if self.fused is None else ops.fold(view, self._fused_affine())
        return self._affine

    def _with_bias(self, view: ops.Affine) -> ops.Affine:
        """``view`` with a frozen bias autograd never saw, read from the model when it is passed
        (``model=``); without it rules use ``z - W x``, which needs the output ``z``."""
        params = self._resolver.params
        if view.bias_known or view.place_bias is None or params is None:
            return view
        bias = params.bias_for(view.params[0] if view.params else view.weight)
        if bias is None:
            return view
        return dataclasses.replace(view, bias=view.place_bias(bias), bias_known=True,
                                   params=(*view.params, bias), place_bias=None)

    def _fused_affine(self, bias: bool = True) -> ops.Affine:
        """The channel-wise map folded into this op; ``bias=False``: its weight is all the caller
        reads (the adjoint), so a frozen bias is not looked up in the model."""
        fn = self._graph.nodes[self.fused]
        view = fn.affine(0)
        if view is None or not view.channelwise:
            raise LRPError(f"{fn.name} can no longer be folded into {self.gn.name} (training mode?); "
                           "use a new LRP engine or `cache=False`")
        return self._with_bias(view) if bias else view


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
        pass that only runs when something is wrong, so the check costs nothing otherwise;
        it needs the graph, so with a freed graph the error says to call with
        ``retain_graph=True``).
    cache
        Keep a plan per graph structure (paper 4.4.1): later calls on the same architecture
        skip the promise search. A plan is used only when the graph's structure matches it.
    fallback
        What to do with ops that have no entry. ``None`` (default): raise
        :class:`~dynlrp.errors.UnknownOpError` listing them. ``"pass"``: the identity rule
        (relevance split evenly over the op's inputs); ``"gradient"``: relevance routed by the
        op's gradient (gradient x input behaviour). Both warn, naming the ops.
    rebuild_costly
        ``False`` (default): a value that nothing saved and that would cost recomputing a
        matrix product or a convolution (the output of a frozen layer whose bias is added on
        its own, of a patch embedding) is not rebuilt where the rules can do without it:
        rules of the epsilon family at epsilon 0 take relevance *per unit* of it, and the
        value cancels exactly (:class:`PerUnit`; ``stats["per_unit_values"]`` counts them).
        ``True``: the Promise System rebuilds every value the rules read, as in the paper.
        The two agree up to rounding (and where such a value is exactly 0, where ``R / 0``
        counts as 0 while per unit it does not).

    Calling the engine takes the arguments of :func:`dynlrp.lrp`, ``retain_graph`` included:
    by default a call frees the forward pass's saved tensors as it goes, like
    ``torch.autograd.grad``.

    An engine may be shared by several threads: calls keep their state on the stack, and
    the plan cache is locked. ``stats`` then describes whichever call finished last.

    Attributes
    ----------
    stats
        After a call: ``nodes``, ``promises``, ``pre_promises``, ``promise_internal_nodes``,
        ``mean_promise_path``, ``promise_density`` (paper Table 4) and more; ``by_autograd``:
        whether autograd's engine propagated (where the rules are all gradients:
        :mod:`dynlrp.gradform`; the Promise System statistics then count only the values its
        hooks asked for).
    """

    max_plans = 8

    def __init__(
        self, rules: Any = None, *, check_finite: bool = True, cache: bool = True,
        fallback: str | None = None, rebuild_costly: bool = False,
    ) -> None:
        if fallback not in (None, "pass", "gradient"):
            raise ValueError(f"fallback must be None, 'pass' or 'gradient', not {fallback!r}")
        self.rules = presets.resolve(rules)
        self.check_finite = check_finite
        self.cache = cache
        self.fallback = fallback
        self.rebuild_costly = rebuild_costly
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
        retain_graph: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        with _paused_gc():  # (resumed once the call's objects are gone: see _paused_gc)
            return self._call(outputs, inputs, relevance, tape, model, retain_graph)

    def _call(self, outputs: Any, inputs: Any, relevance: Any, tape: Tape | None,
              model: torch.nn.Module | None, retain_graph: bool) -> tuple[torch.Tensor, ...]:
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
        late: dict[int, int] = {}  # a folded norm's output is read at the layer before it
        if not retain_graph:
            folds = ({i: r.fused for i, r in rules.items() if r.fused is not None} if plan is not None
                     else self.rules.folds(graph))
            late = {f: p for p, f in folds.items()}

        def resolver_for(check_each: bool, plan: Plan | None) -> Resolver:
            if tape is not None:
                resolver: Resolver = TapeResolver(graph, outputs, inputs, tape, params)
            elif plan is not None:
                resolver = PlannedResolver(graph, outputs, inputs, plan, params)
            else:
                resolver = PromiseResolver(graph, outputs, inputs, params)
            resolver.skip_costly = not self.rebuild_costly
            if not (retain_graph or check_each):
                resolver.release_saved = True
                resolver.defer(late)
            return resolver

        roots = [graph.nodes[i].fn for i, _ in graph.roots]
        for fn in roots:
            if consumed(fn):
                raise consumed_error(fn)
        with torch.no_grad(), _deep_recursion(len(graph.nodes)):
            resolver = resolver_for(False, plan)
            forms = self._gradient_forms(graph, entries, rules, resolver, plan, outputs, seeds)
            result = failed = None
            if forms is not None:  # autograd's engine propagates (a failure starts over)
                settle = resolver.release_saved and gradform.may_settle(graph)
                try:
                    result = gradform.propagate(graph, forms, seeds, outputs, inputs, resolver, settle)
                except gradform.Failed as exc:
                    failed = exc
                if result is None:
                    resolver = resolver_for(False, plan)
                    if failed is not None:
                        forms = False  # (and later calls with this plan do not try again)
                        if plan is not None:
                            plan.gradients = False
            by_autograd = result is not None
            marks = [] if retain_graph else [consume(fn) for fn in roots]  # (after autograd's pass)
            if by_autograd and not retain_graph:
                resolver.free_all()  # (autograd's pass kept them: its hooks read them)
            try:
                if not by_autograd:
                    result = self._propagate(graph, entries, rules, seeds, resolver, False)
            except GraphFreedError as exc:
                if failed is not None and any(graph.freed):  # (freed by autograd's pass as it went)
                    raise _restart_error(failed) from exc
                raise
            except Exception:
                if not any(graph.freed):  # it failed before freeing anything: the graph serves again
                    for undo in marks:
                        undo()
                raise
            stale = getattr(resolver, "stale", False)
            if stale:  # a recipe did not apply (searched afresh): plan anew next time
                with self._lock:
                    self.plans.pop(signature, None)
            if self.check_finite and any(r is not None and not torch.isfinite(r).all() for r in result):
                if not any(graph.freed):  # raises, naming the first op whose relevance is not finite
                    self._propagate(graph, entries, rules, seeds, resolver_for(True, None), True)
                raise NonFiniteRelevanceError(
                    "the relevance contains NaN or inf. To find the op that produced it, run the "
                    "forward pass again and call with `retain_graph=True`.")
        found = resolver.stats()
        self.stats = {"nodes": len(graph.order), "graph_nodes": len(graph.nodes), **found,
                      "cached_plan": plan is not None, "replanned": stale, "by_autograd": by_autograd}
        if signature is not None and plan is None:
            with self._lock:
                self.plans[signature] = Plan(signature, entries, rules, resolver.how, dict(found),
                                             frozenset(resolver.units), forms)
                while len(self.plans) > self.max_plans:
                    self.plans.popitem(last=False)
        out = tuple(torch.zeros_like(x) if r is None else r.to(x.dtype) for x, r in zip(inputs, result))
        if self.check_finite and any(not torch.isfinite(r).all() for r, x in zip(out, result) if x is not None
                                     and r.dtype != x.dtype):
            raise NonFiniteRelevanceError(
                "the relevance does not fit the inputs' dtype (it was computed in float32 and overflows "
                "when cast back); explain float32 inputs, or scale the seed down")
        return out

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
        return [r.detach().to(compute_dtype(y.dtype)) for y, r in zip(outputs, seeds)]

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

    def _gradient_forms(self, graph: Graph, entries: dict, rules: dict, resolver: Resolver, plan: Plan | None,
                        outputs: tuple, seeds: list) -> dict[int, Gradient] | None:
        """The rules as gradients where the call may run on autograd's engine
        (:mod:`dynlrp.gradform`): ``{node: Gradient}`` for the nodes that are not their backward
        as it is; None where a node that relevance reaches has no gradient form, or where autograd's
        engine is not worth taking (:func:`gradform.worth <dynlrp.gradform.worth>`). Known from the
        plan, or asked of the rules (and then kept by the plan)."""
        known = None if plan is None else plan.gradients
        if known is False or not gradform.eligible(graph, outputs, seeds):
            return None
        if known is not None:
            return known
        forms = self._forms(graph, entries, rules, resolver)
        if forms is not None and not gradform.worth(graph, forms):
            forms = None
        if plan is not None:  # (a plan made by a call that could not ask learns them now)
            plan.gradients = False if forms is None else forms
        return forms

    def _forms(self, graph: Graph, entries: dict, rules: dict,
               resolver: Resolver) -> dict[int, Gradient] | None:
        """Each rule that relevance reaches, asked for its gradient form (filling ``rules``); None
        also where relevance reaches an output other than the first of a node that needs a hook
        (the hooks scale or replace the first output's ``g`` only)."""
        nodes, rule_at, forms = graph.nodes, self.rules.rule_at, {}
        reached = [0] * len(nodes)  # relevance may arrive (not only through slots that take none):
        for i, k in graph.roots:  # 1 through the first output, 2 through another
            reached[i] |= 2 if k else 1
        for i in graph.order:
            gn = nodes[i]
            if gn.is_leaf or not reached[i]:
                continue
            entry = entries[i]
            rule = rules.get(i)
            if rule is None:
                rule = rules[i] = rule_at(graph, gn, entry)
            form = as_gradient_of(rule, RuleContext(gn, entry, graph, [None], resolver, rule.fused))
            if form is None:
                return None
            if form.at is not None:  # (a fold: the op after this one, already walked, scales g)
                forms.pop(form.at, None)
                if form.eps is not None:
                    forms[form.at] = Gradient(form.eps)
                form = Gradient(None, form.shares)
            if form is not NATIVE and not form.native:
                if reached[i] & 2:
                    return None
                forms[i] = form
            for slot in gn.reaching:
                if form.share(slot):
                    j, k = gn.inputs[slot]
                    reached[j] |= 2 if k else 1
        return forms

    def _propagate(self, graph: Graph, entries: dict, rules: dict, seeds: list, resolver: Resolver,
                   check_each: bool) -> list:
        pending: dict[tuple[int, int], torch.Tensor] = {}
        for edge, seed in zip(graph.roots, seeds):
            _accumulate(pending, edge, seed)
        found: dict[tuple[int, int], torch.Tensor] = {}
        targets = graph.targets
        wanted = {t[0] for t in targets}
        nodes = graph.nodes
        processed = resolver.processed
        done = resolver.done
        pop, get = pending.pop, pending.get
        rule_at = self.rules.rule_at
        apply = self._apply
        passes = passes_of
        # Per edge with pending relevance: an edge whose forward value is 0 wherever that
        # relevance is (Rule.vanishes; absent: nothing known). Carried like the relevance.
        zeros: dict[tuple[int, int], tuple[int, int]] = {}
        zeros_pop, zeros_get = zeros.pop, zeros.get
        for i in graph.order:
            gn = nodes[i]
            nout = gn.num_outputs
            ref = zeros_pop((i, 0), None)
            if nout == 1:
                r = pop((i, 0), None)
                rels = [r]
                empty = r is None
                per_unit_in = type(r) is PerUnit
            else:  # (what is known of output 0 says nothing of the others: a split routes all)
                ref = None
                for k in range(1, nout):
                    zeros_pop((i, k), None)
                rels = [pop((i, k), None) for k in range(nout)]
                empty = all(r is None for r in rels)
                per_unit_in = any(type(r) is PerUnit for r in rels)
            if i in wanted:
                for k, r in enumerate(rels):
                    if (i, k) in targets:
                        found[(i, k)] = r
            if empty or gn.is_leaf:
                processed[i] = True
                done(i)
                continue
            entry = entries[i]
            rule = rules.get(i)
            if rule is None:
                rule = rules[i] = rule_at(graph, gn, entry)
            per_unit, extras, plain = None, None, None
            edges = gn.relevance_edges(nodes)  # the inputs that lead to a requested input
            if (nout == 1 and len(edges) == 1 and not per_unit_in and not check_each and r is not None
                    and passes(rule) and r.shape == nodes[edges[0][1][0]].meta(edges[0][1][1])[0]):
                # the identity, shapes unchanged: the relevance moves on as it is (Rule.passes)
                out, units, vanishes, partial = [None] * edges[0][0] + [r], (), "output", False
                received = r.shape
            else:
                if per_unit_in:
                    rels, extras, per_unit = _per_unit_in(rule, gn, entry, graph, rels, resolver)
                if nout != 1 or rels[0] is None:
                    rels = _filled(gn, rels)
                ctx = RuleContext(gn, entry, graph, rels, resolver, rule.fused)
                if not per_unit_in:
                    ctx.zeros_of = ref
                out, units = apply(rule, ctx, gn, check_each, per_unit)
                vanishes = None if per_unit_in else vanishes_of(rule, ctx)
                partial = ctx.partial_inputs
                received = rels[0].shape
                if extras is not None:  # ordinary relevance routed alongside the per-unit part
                    ctx = RuleContext(gn, entry, graph, _filled(gn, extras), resolver, rule.fused)
                    plain, _ = apply(rule, ctx, gn, check_each)
                del ctx
            del rels
            processed[i] = True
            n = len(out)
            for slot, e, dtype in edges:
                if slot >= n or (r := out[slot]) is None:
                    continue
                fact = None  # (see `zeros`)
                if vanishes is not None:
                    if vanishes == "inputs":
                        fact = None if partial else e
                    elif vanishes == "output":
                        fact = ref if r.shape == received else None
                    elif ref == (i, 0):  # "routes"
                        fact = e
                if r.dtype != dtype:  # float32 for half
                    r = r.to(dtype)
                if units and slot in units:
                    extra = None if plain is None or plain[slot] is None else plain[slot].to(dtype)
                    r = PerUnit(r, extra)
                    fact = None
                prev = get(e)
                if prev is None:
                    pending[e] = r
                    if fact is not None:
                        zeros[e] = fact
                else:
                    pending[e] = prev + r
                    if fact is None or zeros_get(e) != fact:
                        zeros_pop(e, None)
            done(i)
        return [_settled(found.get(t), resolver, t) for t in targets]

    def _apply(self, rule, ctx: RuleContext, gn: GNode, check_each: bool,
               per_unit: str | None = None) -> tuple[list, tuple[int, ...]]:
        """Run ``rule`` at ``gn``; return its relevances and the inputs they are per unit of.

        ``per_unit`` (``"divides"`` or ``"routes"``) says that the relevance arriving is per
        unit of an output value nothing can rebuild (see :class:`PerUnit`)."""
        needs = rule.needs(ctx)
        partial = False
        units: tuple[int, ...] = ()
        costly, inputs = ctx._resolver.costly, gn.inputs
        for slot in needs.inputs:
            if inputs[slot] is not None and costly(inputs[slot]) and slot in rule.factors(ctx):
                v = None  # not worth rebuilding: per unit, as where it is unknown
            else:
                try:
                    v = ctx.value_of_input(slot)
                except UnrecoverableValueError:
                    if slot not in rule.factors(ctx):
                        raise
                    v = None
            if v is None:
                ctx.assume_unit(slot)
                units += (slot,)
                continue
            if not v.exact:
                partial = ctx.partial_inputs = True
        if per_unit == "divides":
            ctx.assume_unit("out")
        elif needs.output:
            v = ctx.value_of_output()
            partial = partial or not v.exact
        if per_unit == "routes":
            units = tuple(range(ctx.num_inputs))
        if partial:
            _check_partial(ctx, gn)
        out = rule(ctx)
        if check_each:
            for slot, r in enumerate(out):
                if r is not None and not torch.isfinite(r).all():
                    raise NonFiniteRelevanceError(
                        f"the {type(rule).__name__} rule at {gn.name} produced NaN or inf "
                        f"relevance for its input {slot}"
                    )
        return list(out), units


class PerUnit:
    """Relevance per unit of forward value: ``R = v * g`` for the edge's value ``v``.

    ``extra`` holds ordinary relevance that arrived at the same edge from other consumers;
    the two can only be added once ``v`` is known (:meth:`settle`).
    """

    __slots__ = ("g", "extra")

    def __init__(self, g: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        self.g = g
        self.extra = extra

    def __add__(self, other: Any) -> PerUnit:
        if isinstance(other, PerUnit):
            extra = other.extra if self.extra is None else (
                self.extra if other.extra is None else self.extra + other.extra)
            return PerUnit(self.g + other.g, extra)
        return PerUnit(self.g, other if self.extra is None else self.extra + other)

    __radd__ = __add__

    def settle(self, resolver: Resolver, edge: tuple[int, int]) -> torch.Tensor:
        """``v * g + extra``, with ``v`` from the resolver; raises where ``v`` is unknown.

        A value known on a mask only serves where ``g`` is zero outside it."""
        v = resolver.value(edge, edge[0])
        if not v.exact and self.g.masked_fill(v.mask, 0).any():
            v = resolver.exact(edge, edge[0])
        if v.exact:
            r = v.tensor * self.g
        elif not (self.g[~v.mask] != 0).any():
            r = torch.where(v.mask, v.tensor * self.g, torch.zeros_like(self.g))
        else:
            raise _unknown(resolver, edge)
        return r if self.extra is None else r + self.extra

    def per_unit(self, resolver: Resolver, edge: tuple[int, int]) -> torch.Tensor:
        """All of it per unit: ``g + extra / v``, where ``extra`` lies where ``v`` is known and
        nonzero (a tensor whose parts other consumers saved); raises otherwise."""
        if self.extra is None:
            return self.g
        live = self.extra != 0
        v = resolver.value(edge, edge[0])
        if not v.exact and live.masked_fill(v.mask, False).any():
            v = resolver.exact(edge, edge[0])
        known = live if v.exact else live & v.mask
        if (known != live).any() or (v.tensor[live] == 0).any():
            raise _unknown(resolver, edge)
        safe = torch.where(live, v.tensor, torch.ones_like(v.tensor))
        return self.g + torch.where(live, self.extra / safe, torch.zeros_like(self.g))


def _unknown(resolver: Resolver, edge: tuple[int, int]) -> UnrecoverableValueError:
    name = resolver.graph.nodes[edge[0]].name
    return UnrecoverableValueError(
        f"the relevance at the output of {name} needs its value where the graph does not know it. "
        "Pass the model (`model=`) or record the forward pass: "
        "`with dynlrp.record() as tape: y = model(x)` then `dynlrp.lrp(y, x, tape=tape)`."
    )


def _restart_error(failed: Exception) -> Exception:
    """The error of a call whose pass on autograd's engine failed after freeing forward values as
    it went, so that the Python traversal could not start over: a tensor modified in place is said
    as such (:func:`~dynlrp.saved.translate_error`); anything else names the failure and the way
    around it."""
    cause = failed.__cause__
    if isinstance(cause, RuntimeError):
        typed = translate_error(None, cause)
        if isinstance(typed, ModifiedInPlaceError):
            return typed
    return GraphFreedError(
        f"autograd's engine could not finish the propagation ({failed}) after freeing forward values "
        "on the way, and the Python traversal cannot start over without them. Run the forward pass "
        "again and explain with `dynlrp.gradform.ENABLED = False`, or pass `retain_graph=True`.")


def _settled(r: Any, resolver: Resolver, edge: tuple[int, int]) -> Any:
    return r.settle(resolver, edge) if isinstance(r, PerUnit) else r


def _per_unit_in(rule, gn: GNode, entry: ops.OpEntry, graph: Graph, rels: list,
                 resolver: Resolver) -> tuple[list, list | None, str | None]:
    """Relevance arrived per unit of ``gn``'s output(s): ``(relevances, ordinary parts, mode)``.

    A routing rule (``"routes"``) passes the per-unit part on as it is, and the ordinary part
    that arrived with it separately. Otherwise relevance becomes ordinary where the output
    can be rebuilt, and a rule that only divides by the output (``"divides"``) takes the
    per-unit part as ``R / z`` where it cannot."""
    probe = RuleContext(gn, entry, graph, _filled(gn, rels), resolver, fused=rule.fused)
    mode = rule.per_unit(probe)
    if mode == "routes" and all(r is None or isinstance(r, PerUnit) for r in rels):
        extras = [None if r is None else r.extra for r in rels]
        return [None if r is None else r.g for r in rels], (None if all(
            x is None for x in extras) else extras), mode
    divides = mode == "divides" and len(rels) == 1
    if not (divides and rels[0].extra is None and rule.fused is None and resolver.costly((gn.index, 0))):
        try:
            return [_settled(r, resolver, (gn.index, k)) for k, r in enumerate(rels)], None, None
        except UnrecoverableValueError:
            if not divides:
                raise
    return [rels[0].per_unit(resolver, (gn.index, 0))], None, mode


def _check_partial(ctx: RuleContext, gn: GNode) -> None:
    """A value known only on a mask serves where no relevance flows outside it; elsewhere the
    resolver is asked for the exact value (which may cost a recomputation)."""
    r = ctx.relevance
    for key, v in list(ctx._values.items()):
        if v.exact:
            continue
        if key == "out" and type(v) is ClippedValue and v.source is not None and v.source == ctx.zeros_of:
            # the relevance is 0 wherever the clipping op's output is, which is where this
            # value is unknown: it serves as it is (no mask, no test; unknown entries read 0)
            ctx._values[key] = NonnegativeValue(v.tensor)
            ctx._resolver.clipped += 1
            continue
        # (r outside the mask, as one masked_fill: no boolean indexing)
        if v.mask.shape != r.shape or r.masked_fill(v.mask, 0).any():
            v = ctx.exact_value(key)
            if not v.exact:
                raise _partial_error(gn)
        else:  # fill the unknown positions so that rules see finite numbers (their relevance is 0)
            v = Value(torch.where(v.mask, v.tensor, scalar(1, v.tensor)))
        ctx._values[key] = v


def _partial_error(gn: GNode) -> UnrecoverableValueError:
    return UnrecoverableValueError(
        f"the rule at {gn.name} needs forward values that the graph only partly recovers (a "
        "layer's output seen through a ReLU), and relevance flows where they are unknown. "
        "Record the forward pass with `dynlrp.record()` and pass `tape=`."
    )


def _filled(gn: GNode, rels: list) -> list:
    """``rels`` with zeros for the outputs that received no relevance."""
    if all(r is not None for r in rels):  # (not `None in rels`: that compares tensors)
        return rels
    return [r if r is not None else _zeros(gn, k) for k, r in enumerate(rels)]


def _zeros(gn: GNode, k: int) -> torch.Tensor:
    shape, dtype, device = gn.meta(k)
    return torch.zeros(shape, dtype=compute_dtype(dtype), device=device)


_gc_lock = threading.Lock()
_gc_users = [0, False]  # active calls, whether the collector was on when the first began


@contextmanager
def _paused_gc():
    """Pause Python's cyclic garbage collector for the duration of a call.

    A call makes a few small objects per node (graph nodes, edges, forward values, rule
    contexts) that all live about as long as the call, and that reference counting frees when
    it returns (they form no cycles). With the collector on, every few hundred of them start
    a young collection, and those that survive it are promoted until they start a collection
    of the whole heap -- with torch imported, far more than the call itself costs on small
    tensors (a quarter to a third of the time on a 2,000-node graph of tiny tensors). The collector
    is resumed, as it was, when the last concurrent call ends."""
    with _gc_lock:
        if _gc_users[0] == 0:
            _gc_users[1] = gc.isenabled()
            gc.disable()
        _gc_users[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users[0] -= 1
            if _gc_users[0] == 0 and _gc_users[1]:
                gc.enable()


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

"""The Promise System (paper 4.3, appendices C-E): forward values autograd did not keep.

When a rule at node A (the *Origin Node*) needs a forward value that A's own saved tensors
do not hold, a :class:`Promise` is made, with one :class:`PromiseBranch` per missing value.
A branch walks from A toward the inputs. Each node it passes is an *internal node*: the
branch records the node's forward closure. It stops at the first *Arg Node* -- a node whose
output is retrievable from cached tensors: rebuilt from its own saved tensors (paper
4.3.1), kept by one of its consumers as that consumer's input, a leaf, or a tensor the
caller passed -- and replays the recorded forward closures to rebuild the value at A.

* **Promise trees** (4.3.2, D.2): an internal node whose forward closure needs several
  inputs that are missing too (an ``add`` on a residual stream) opens a nested promise with
  a branch per input; the nested promise resolves first and feeds its parent branch.
* **Pre-promises** (4.3.3, D.3): a branch may reach a node whose relevance is still
  waiting for other consumers -- ahead of the traversal frontier. The paper's deadlock
  cannot happen here: the branch reaches ahead to its Arg Node at once (the pre-promise),
  without propagating any relevance there; the node is propagated later, when the
  traversal gets to it. Such reach-aheads are counted as ``pre_promises``.
* **Aggregation** (appendix E): branches that meet at a node share one resolution -- the
  node's forward closure runs once, and its value serves every branch (``aggregations``).
* **Inversion**: where a branch cannot replay a node (its forward closure needs an operand
  autograd never saw, such as the bias of a frozen layer), it asks the node's consumers to
  invert their op from a known output (``a = (a + b) - b``; ``x = relu(x)`` where positive).
* **Cost**: a value is taken where it costs least. A consumer's saved input comes before
  the node's own saved tensors; and where those would *recompute* the op (a matrix
  product, a convolution: :attr:`~dynlrp.ops.OpEntry.own_recomputes`), consumers that
  invert their op from values that cost nothing come first (the output of a projection
  from the residual sum a norm saved minus the residual; a layer's output through the
  ReLU after it, known where positive). Such a value may be partial: the engine uses it
  where relevance flows only inside its mask, and asks :meth:`PromiseResolver.exact`
  otherwise.

Relevance is *not* carried along the branches: the deferred rule at A runs as soon as its
promise resolves, which is immediately, and every internal node is then propagated by the
traversal itself when its turn comes -- each node exactly once (Proposition 2), with each
node replayed at most once (the memo), which gives the bound of Theorem 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnrecoverableValueError
from .graph import Edge
from .ops import MissingOperand, Value, lookup
from .saved import leaf_variable
from .values import Resolver, invert_by_consumers, recomputes, replay, replay_output, saved_value

#: How many consumer levels an inversion from free values may climb (view, transpose, ...).
FREE_DEPTH = 12

_REPLAY = ("replay",)


@dataclass(eq=False)
class PromiseBranch:
    """One missing value of a promise: the path it walked and where it ended."""

    edge: Edge
    path: list[int] = field(default_factory=list)  # internal nodes, origin side first
    arg_node: int | None = None


@dataclass(eq=False)
class Promise:
    """A deferred value request made at an Origin Node; ``parent`` links promise trees."""

    origin: int
    branches: list[PromiseBranch] = field(default_factory=list)
    parent: PromiseBranch | None = None


class PromiseResolver(Resolver):
    """Resolves forward values from the graph's saved tensors, making promises as needed."""

    def __init__(self, graph, outputs, inputs, params=None):
        super().__init__(graph, outputs, inputs, params)
        self.promises: list[Promise] = []
        self.pre_promises = 0
        self.aggregations = 0
        self.inversions = 0
        self.replayed: set[int] = set()
        self._busy: set[Edge] = set()
        self._not_direct: set[Edge] = set()
        self._failed: set[Edge] = set()
        self._not_free: set[Edge] = set()
        self._seen: set[Edge] = set()
        self._free_cuts = 0
        # For each node a branch walked into or ended at: the edges (consumer, slot) it was
        # reached through. A replayed node reached through a new edge is an aggregation.
        self._entered: dict[int, set[tuple[int, int]]] = {}
        self._cuts = 0  # walks stopped by the cycle guard: their failures depend on context
        self.how: dict[Edge, tuple] = {e: ("given",) for e in self.memo}  # the plan (4.4.1)
        self.units: set[Edge] = set()  # values left unbuilt: relevance went per unit (costly)

    # -- sources that need no promise -------------------------------------------------
    def direct(self, edge: Edge, recompute: bool = True) -> Value | None:
        """The value when it is retrievable without walking: memo, leaf, taps, own saved tensors.
        An ``own`` that recomputes the op comes last, after an exact inversion from values
        that cost nothing, and not at all with ``recompute=False``. A partial value in the
        memo is returned only when no exact one is found."""
        known = self.memo.get(edge)
        if (known is not None and known.exact) or edge in self._not_direct:
            return known
        gn = self.graph.nodes[edge[0]]
        var = leaf_variable(gn.fn) if gn.is_leaf else None
        value, how = (var.detach(), ("leaf",)) if var is not None else saved_value(self.graph, edge, False)
        if value is None and recomputes(self.graph, edge):
            if not recompute:
                return known
            if known is None:  # (a partial value in the memo is all that inverting gives)
                inverted = self._inverted(edge, keep_partial=False)
                if inverted is not None and inverted.exact:
                    return inverted
            value, how = saved_value(self.graph, edge)
        if value is None:
            self._not_direct.add(edge)
            return known
        self.memo[edge] = Value(value)
        self.how[edge] = how
        return self.memo[edge]

    def _free(self, edge: Edge, depth: int) -> Value | None:
        """The value of ``edge`` if it costs nothing to get: saved, or inverted from saved values.
        Each edge is tried once per top-level request (:meth:`_inverted`), so a request climbs at
        most ``FREE_DEPTH`` consumer levels and never loops."""
        found = self.direct(edge, recompute=False)
        if found is not None or edge in self._not_free:
            return found
        if depth >= FREE_DEPTH or edge in self._seen:
            self._free_cuts += 1
            return None
        self._seen.add(edge)
        cuts = self._free_cuts
        found = self._invert_free(edge, depth + 1, keep_partial=False)
        if found is None and cuts == self._free_cuts:
            self._not_free.add(edge)  # failed on its own, not for want of depth: do not retry
        return found

    def _inverted(self, edge: Edge, keep_partial: bool) -> Value | None:
        """A top-level request for ``edge``'s value from consumers' inversions of free values."""
        self._seen = {edge}
        try:
            return self._invert_free(edge, 1, keep_partial)
        finally:
            self._seen = set()

    def _invert_free(self, edge: Edge, depth: int, keep_partial: bool) -> Value | None:
        """``edge``'s value inverted by its consumers from values that cost nothing (no replay,
        no recompute); memoised when exact, or when partial and ``keep_partial``."""
        found, used = invert_by_consumers(self.graph, edge, lambda out, _: self._free(out, depth),
                                          lambda e, _c, _s: self._free(e, depth))
        if found is not None:  # (the recipe, even of a partial value: an inversion built on it
            self.how[edge] = ("inverse", tuple(used))  # may enter the plan)
            if found.exact or keep_partial:
                self.inversions += 1
                self.memo[edge] = found
        return found

    def seen_through(self, edge: Edge, consumer: int) -> Value | None:
        return self._clipped(edge, consumer, self.direct((consumer, 0), recompute=False))

    def costly(self, edge: Edge) -> bool:
        if not self.skip_costly or edge in self.memo:
            return False
        if edge in self.units:
            return True
        if not self._costly(edge, 0):
            return False
        self.units.add(edge)
        return True

    def _costly(self, edge: Edge, depth: int) -> bool:
        """No free value, and the op that made it (past views and selections, which move values
        and cost nothing to replay) recomputes (:func:`~dynlrp.values.recomputes`)."""
        if self.direct(edge, recompute=False) is not None:
            return False
        if not recomputes(self.graph, edge):
            gn = self.graph.nodes[edge[0]]
            entry = gn.entry
            sources = [e for e in gn.inputs if e is not None]
            if (entry is None or entry.kind != "route" or len(sources) != 1 or depth >= FREE_DEPTH
                    or not self._costly(sources[0], depth + 1)):
                return False
        return self._inverted(edge, keep_partial=True) is None

    # -- the promise walk -----------------------------------------------------------------
    def value(self, edge: Edge, requester: int) -> Value:
        found = self.direct(edge, recompute=False)
        if found is None and recomputes(self.graph, edge):
            found = self._inverted(edge, keep_partial=True)
        return found if found is not None else self.exact(edge, requester)

    def exact(self, edge: Edge, requester: int) -> Value:
        found = self.direct(edge)
        if found is not None and found.exact:
            return found
        promise = Promise(requester)
        self.promises.append(promise)
        if found is None:
            return self._branch(promise, edge)
        # Only part of it is known: walk past the partial value, to its inputs.
        branch = PromiseBranch(edge)
        promise.branches.append(branch)
        value = self._walk_internal(branch, edge, came_from=requester)
        return found if value is None else value

    def _branch(self, promise: Promise, edge: Edge) -> Value:
        branch = PromiseBranch(edge)
        promise.branches.append(branch)
        inputs = self.graph.nodes[promise.origin].inputs
        slot = inputs.index(edge) if edge in inputs else -1  # -1: the origin's own output
        value = self._walk(branch, edge, came_from=promise.origin, slot=slot)
        if value is None:
            self.how[edge] = ("unknown",)  # the plan remembers it: rules may go per unit
            raise self._unrecoverable(promise.origin, edge)
        return value

    def _walk(self, branch: PromiseBranch, edge: Edge, came_from: int, slot: int = -1) -> Value | None:
        found = self.direct(edge)
        if found is not None:
            return self._ends_at(branch, edge, found, (came_from, slot))
        if edge in self._busy:
            self._cuts += 1
            return None
        if edge in self._failed:
            return None
        self._busy.add(edge)
        self._entered_at(edge[0]).add((came_from, slot))
        cuts = self._cuts
        try:
            value = self._walk_internal(branch, edge, came_from)
        finally:
            self._busy.discard(edge)
        if value is None and cuts == self._cuts:
            self._failed.add(edge)  # failed on its own: no need to walk it again
        return value

    def _walk_internal(self, branch: PromiseBranch, edge: Edge, came_from: int) -> Value | None:
        i, k = edge
        gn = self.graph.nodes[i]
        branch.path.append(i)
        processed = self.processed
        for c, _ in gn.consumers:
            if c != came_from and not processed[c]:
                self.pre_promises += 1
                break
        value = self._replay(branch, gn, k)
        if value is None:
            value = self._invert(branch, edge)
        return value

    def _ends_at(self, branch: PromiseBranch, edge: Edge, value: Value | None,
                 via: tuple[int, int]) -> Value | None:
        """The branch found ``value`` at ``edge``, reached through ``via`` = (consumer, slot),
        without walking on: it ends there.

        The first such node is the branch's Arg Node. A node that a branch coming through
        another edge already replayed is where the branches meet and share one resolution
        (appendix E): an aggregation.
        """
        if value is None:
            return None
        entered = self._entered_at(edge[0])
        if edge[0] in self.replayed and via not in entered:
            self.aggregations += 1
        entered.add(via)
        if branch.arg_node is None:
            branch.arg_node = edge[0]
        return value

    def _entered_at(self, i: int) -> set[tuple[int, int]]:
        entered = self._entered.get(i)
        if entered is None:
            entered = self._entered[i] = set()
        return entered

    def _replay(self, branch: PromiseBranch, gn, k: int) -> Value | None:
        entry = gn.entry
        if entry is None or entry.forward is None:
            return None
        found = [None if e is None else self.direct(e) for e in gn.inputs]  # asked once per input
        missing = [s for s, e in enumerate(gn.inputs) if e is not None and found[s] is None]
        xs: list = [None] * len(gn.inputs)
        child_promise = Promise(gn.index, parent=branch) if len(missing) > 1 else None
        if child_promise is not None:
            self.promises.append(child_promise)
        for s, e in enumerate(gn.inputs):
            if e is None:
                continue
            if s in missing:
                sub = branch
                if child_promise is not None:
                    sub = PromiseBranch(e)
                    child_promise.branches.append(sub)
                v = self._walk(sub, e, came_from=gn.index, slot=s)
            else:
                v = self._ends_at(branch, e, found[s], (gn.index, s))
            if v is None or not v.exact:
                return None
            xs[s] = v.tensor
        try:
            out = replay(entry, gn.fn, xs, self.params)
        except MissingOperand:
            return None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        memo, how, i = self.memo, self.how, gn.index
        for j, o in enumerate(outs):
            known = memo.get((i, j))
            if known is None or not known.exact:
                memo[(i, j)] = Value(replay_output(o))
                how[(i, j)] = _REPLAY
        self.replayed.add(i)
        return memo.get((i, k))

    def _invert(self, branch: PromiseBranch, edge: Edge) -> Value | None:
        found, used = invert_by_consumers(
            self.graph, edge, lambda out, e: self._walk(branch, out, came_from=e[0]),
            lambda e, consumer, slot: self._walk(branch, e, came_from=consumer, slot=slot))
        if found is not None:
            self.inversions += 1
            self.memo[edge] = found
            self.how[edge] = ("inverse", tuple(used))
        return found

    def _unrecoverable(self, origin: int, edge: Edge) -> UnrecoverableValueError:
        nodes = self.graph.nodes
        i, k = edge
        reason = ""
        entry = lookup(nodes[i].name)
        if entry is not None and entry.forward is not None:
            xs = [None if e is None else (self.direct(e).tensor if self.direct(e) is not None and
                                          self.direct(e).exact else None) for e in nodes[i].inputs]
            try:
                entry.forward(nodes[i].fn, xs)
            except MissingOperand as exc:
                reason = f": missing {exc}"
            except Exception:  # noqa: BLE001 - only used to word the message
                pass
        return UnrecoverableValueError(
            f"the rule at {nodes[origin].name} needs the output of {nodes[i].name}"
            f"{'' if k == 0 else f' (output {k})'}, which the autograd graph cannot rebuild{reason}. "
            "This happens when a parameter that is not in the graph (for example the bias of a "
            "frozen layer) is needed. Pass the model (`dynlrp.lrp(y, x, model=model)`) so that its "
            "parameters can be read, or record the forward pass: "
            "`with dynlrp.record() as tape: y = model(x)` then `dynlrp.lrp(y, x, tape=tape)`."
        )

    def stats(self) -> dict[str, float]:
        branches = [b for p in self.promises for b in p.branches]
        internal = len(self.replayed)
        paths = [len(b.path) for b in branches]
        n = max(len(self.graph.order), 1)
        return {
            "promises": len(self.promises),
            "promise_branches": len(branches),
            "pre_promises": self.pre_promises,
            "promise_internal_nodes": internal,
            "mean_promise_path": (sum(paths) / len(paths)) if paths else 0.0,
            "promise_density": len(self.promises) / n,
            "aggregations": self.aggregations,
            "inversions": self.inversions,
            "promise_trees": sum(1 for p in self.promises if p.parent is not None),
            "per_unit_values": len(self.units),
            "clipped_values": self.clipped,
        }

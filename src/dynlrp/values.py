"""Where forward values come from: the sources both modes share, and the resolver interface.

A rule asks for the forward value of an *edge* -- output ``k`` of node ``i``. Two resolvers
answer: :class:`dynlrp.promise.PromiseResolver` (the Promise System: from what autograd
saved) and :class:`dynlrp.record.TapeResolver` (recorded mode: from the tape).
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Sequence

import torch

from .errors import GraphFreedError
from .graph import Edge, Graph
from .ops import ClippedValue, MissingOperand, PlacedValue, Value
from .saved import release, saves_tensors, view_base

#: How many levels below a node the inversions that read its saved tensors are awaited
#: before the tensors are freed (:meth:`Resolver._settle`).
RELEASE_DEPTH = 3
#: Nodes whose inputs and outputs all hold fewer elements than this keep their saved tensors
#: until the graph is dropped (:meth:`Resolver._worth_freeing`).
RELEASE_MIN = 1 << 14


class Resolver:
    """Answers forward-value requests for one graph; subclasses implement :meth:`value`."""

    #: Keep every forward value in ``memo`` until the call ends (for inspection in tests);
    #: by default values are dropped once no later node can ask for them (:meth:`done`).
    keep_values = False
    #: Free each node's saved tensors once no later request is likely to read them
    #: (``retain_graph=False``; set by the engine): see :meth:`done`.
    release_saved = False
    #: Leave values unbuilt where they are costly and a rule can do without them (set by the
    #: engine unless ``rebuild_costly``): see :meth:`costly`.
    skip_costly = False

    def __init__(self, graph: Graph, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                 params: Parameters | None = None):
        self.graph = graph
        self.params = params
        self.processed = [False] * len(graph.nodes)
        self.memo: dict[Edge, Value] = {}
        for y, edge in zip(outputs, graph.roots):
            self.memo[edge] = Value(y.detach())
            base = view_base(y)
            if base is not None:
                self._viewed_from(edge, y, base)
        for x, edge in zip(inputs, graph.targets):
            self.memo.setdefault(edge, Value(x.detach()))
        self._given = set(self.memo)
        #: Values seen through a clipping op and used without a test (the engine counts them)
        self.clipped = 0
        # Per node: how many of its input edges lead to nodes the traversal has yet to
        # propagate (-1: an input that the traversal never visits, so never).
        self._left = [len(r) if (r := gn.reaching) is (g := gn.graph_inputs) or len(r) == len(g) else -1
                      for gn in graph.nodes]
        self._hold: dict[int, set[int]] = {}  # nodes to free: the nodes below still to settle
        self._waiters: dict[int, list[int]] = {}  # node below -> the held nodes that wait for it
        self._settled = [False] * len(graph.nodes)
        self._large: list[tuple[bool, ...] | None] = [None] * len(graph.nodes)  # see _big
        self._any_large: bool | None = None  # see holds_large
        self._invertible: dict[int, bool] = {}
        self._weight: dict[int, int] = {}
        self._late: dict[int, int] = {}  # see defer
        self._then: dict[int, list[int]] = {}

    def _viewed_from(self, edge: Edge, y: torch.Tensor, base: torch.Tensor) -> None:
        """An output that is a view (``logits[:, -1]``) keeps the tensor it views alive: when the
        output's node is that view (its forward, run on ``base``, gives ``y`` itself -- the same
        memory, shape and strides), ``base`` is the node's input, known for free."""
        gn = self.graph.nodes[edge[0]]
        entry = gn.entry
        if entry is None or entry.forward is None or len(gn.inputs) != 1 or gn.inputs[0] is None:
            return
        source = gn.inputs[0]
        shape, dtype, _ = self.graph.nodes[source[0]].meta(source[1])
        if base.shape != shape or base.dtype != dtype:
            return
        try:
            seen = entry.forward(gn.fn, [base.detach()])
        except (MissingOperand, RuntimeError, TypeError, IndexError):
            return
        if (isinstance(seen, torch.Tensor) and seen.data_ptr() == y.data_ptr()
                and seen.shape == y.shape and seen.stride() == y.stride()):
            self.memo.setdefault(source, Value(base.detach()))

    def value(self, edge: Edge, requester: int) -> Value:  # pragma: no cover
        """The forward value of ``edge``; may be partial (known on a mask) where that is all
        the graph gives cheaply: the engine asks :meth:`exact` when a rule needs more."""
        raise NotImplementedError

    def exact(self, edge: Edge, requester: int) -> Value:
        """The forward value of ``edge`` known everywhere if it can be had at any cost (a partial
        value is returned only when nothing better exists)."""
        return self.value(edge, requester)

    def seen_through(self, edge: Edge, consumer: int) -> Value | None:
        """``edge``'s value as the clipping op at node ``consumer`` shows it (a
        :class:`~dynlrp.ops.ClippedValue`: known where that op's output is not 0), when that
        output is at hand without work; else None. The engine asks only where the relevance is
        known to be 0 wherever that output is, so the value serves without a test."""
        return None

    def _clipped(self, edge: Edge, consumer: int, out: Value | None) -> Value | None:
        """:meth:`seen_through` once the consumer's output ``out`` is found (or not)."""
        cn = self.graph.nodes[consumer]
        if out is None or not out.exact or cn.entry is None or cn.entry.inverse is None \
                or len(cn.inputs) != 1 or cn.inputs[0] != edge:
            return None
        got = inverse(cn, 0, out, [None])
        return got if type(got) is ClippedValue else None

    def costly(self, edge: Edge) -> bool:
        """Whether ``edge``'s value would cost recomputing a matrix product or a convolution
        (nothing saved it, nothing inverts to it from saved values). A rule that can take
        relevance per unit of that value then does, instead of rebuilding it
        (:class:`~dynlrp.engine.PerUnit`). Asked again, the answer is the same."""
        return False

    def done(self, i: int) -> None:
        """Node ``i`` was propagated: forget the forward values no later request can need.

        A node's outputs serve its own rule and its consumers' rules (all propagated before
        it), the replays of its consumers, and the inversions of its inputs (walks only go
        toward nodes not yet propagated). So once a node and every node below it in the
        traversal are propagated, its values are dropped, and memory stays near the width of
        the traversal frontier. A value asked for again is rebuilt the way it was found."""
        if self.release_saved and self.holds_large():
            self._settle_done(i)
        if self.keep_values:
            return
        left = self._left
        if left[i] == 0:
            self._release(i)
        processed = self.processed
        for c, _ in self.graph.nodes[i].consumers:
            n = left[c]
            if n > 0:
                left[c] = n = n - 1
                if n == 0 and processed[c]:
                    self._release(c)

    def defer(self, late: dict[int, int]) -> None:
        """Requests for the outputs of node ``f`` come as late as node ``late[f]`` (a batch norm
        folded into the layer before it: that layer's rule reads the norm's output and saved
        tensors), so ``f`` is settled (:meth:`_settle`) with that node, not before."""
        self._late = late
        for f, p in late.items():
            self._then.setdefault(p, []).append(f)

    def _settle_done(self, i: int) -> None:
        if i in self._late:
            return
        for f in self._then.get(i, ()):
            self._settle(f)
        self._settle(i)

    def _settle(self, i: int) -> None:
        """Node ``i`` was propagated: free the saved tensors of nodes no later request reads.

        Autograd's engine frees a node's saved tensors right after running it. Here they
        serve longer: a value below a node may be taken from them, through the inverses of the
        nodes in between (``(a + b) - b``, a view seen back, ``relu`` where positive). So a
        node's tensors are freed once it and the nodes :data:`RELEASE_DEPTH` levels below it
        through invertible nodes are settled. A request that still reaches a freed node
        finds no value there and takes the next source (:data:`Graph.freed`)."""
        hold, settled, waiters = self._hold, self._settled, self._waiters
        settled[i] = True
        if self._worth_freeing(i):
            below = {y for y in self._reach(i) if not settled[y]}
            if below:
                hold[i] = below
                for y in below:
                    waiters.setdefault(y, []).append(i)
            else:
                self._free_saved(i)
        for c in waiters.pop(i, ()):
            waits = hold[c]
            waits.discard(i)
            if not waits:
                del hold[c]
                self._free_saved(c)

    def _reach(self, i: int) -> set[int]:
        """Nodes below ``i`` that the traversal propagates, with only invertible nodes in
        between, at most :data:`RELEASE_DEPTH` of which keep tensors (views and transposes,
        which keep none, are passed for free)."""
        nodes, spent, frontier = self.graph.nodes, {}, deque([(i, 0)])
        while frontier:
            x, used = frontier.popleft()
            if x != i:
                if not self._inverts(x):
                    continue
                used += self._weighs(x)
            for e in nodes[x].inputs:
                if e is not None and used < RELEASE_DEPTH and spent.get(y := e[0], RELEASE_DEPTH) > used:
                    spent[y] = used
                    frontier.append((y, used))
        return {y for y in spent if nodes[y].reaches}

    def _worth_freeing(self, i: int) -> bool:
        """Whether node ``i`` may keep a tensor worth freeing: one of its inputs or outputs holds
        :data:`RELEASE_MIN` elements or more (freeing costs microseconds per tensor; graphs
        without such a value skip the bookkeeping altogether: :meth:`holds_large`). A node that
        keeps no tensor (a view) has none."""
        gn = self.graph.nodes[i]
        if gn.is_leaf:
            return False
        big = self._big
        if True not in big(i):  # (loops, not generators: this runs once per node of every call)
            for e in gn.inputs:
                if e is not None and big(e[0])[e[1]]:
                    break
            else:
                return False
        return bool(self._weighs(i))

    def holds_large(self) -> bool:
        """Whether any forward value of the graph holds :data:`RELEASE_MIN` elements or more
        (worked out once per call; a large graph answers at its first large value). A node is
        worth freeing only where one of its inputs or outputs is large, so a graph of small
        tensors skips the freeing bookkeeping altogether (about 5% of the call on 2,000 tiny
        nodes), and frees nothing, as it would have."""
        known = self._any_large
        if known is None:
            big = self._big
            known = self._any_large = any(True in big(i) for i in range(len(self.graph.nodes)))
        return known

    def _big(self, i: int) -> tuple[bool, ...]:
        """Per output of node ``i``, whether it holds :data:`RELEASE_MIN` elements or more (worked
        out once per node: every consumer of ``i`` asks again)."""
        known = self._large[i]
        if known is None:
            gn = self.graph.nodes[i]
            meta, n = gn.meta, gn.num_outputs
            known = self._large[i] = ((math.prod(meta(0)[0]) >= RELEASE_MIN,) if n == 1 else
                                      tuple([math.prod(meta(k)[0]) >= RELEASE_MIN for k in range(n)]))
        return known

    def _weighs(self, x: int) -> int:
        known = self._weight.get(x)
        if known is None:
            known = self._weight[x] = int(saves_tensors(self.graph.nodes[x].fn))
        return known

    def _inverts(self, x: int) -> bool:
        known = self._invertible.get(x)
        if known is None:
            entry = self.graph.nodes[x].entry
            known = self._invertible[x] = entry is not None and entry.inverse is not None
        return known

    def forget(self, edge: Edge) -> None:
        """Drop ``edge``'s value from the memo (not a tensor the caller passed): a request that
        comes again rebuilds it (autograd's engine asks for each value once: :mod:`dynlrp.gradform`)."""
        if edge not in self._given:
            self.memo.pop(edge, None)

    def free_all(self) -> None:
        """Free the saved tensors of every node worth freeing (:meth:`_worth_freeing`: a large input
        or output) at once: the end of a call that could not free them as it went (autograd's
        engine). Only the large values' nodes and their consumers are looked at."""
        nodes, freed = self.graph.nodes, self.graph.freed
        candidates = set()
        for i in self.graph.large(RELEASE_MIN):
            candidates.add(i)
            candidates.update(c for c, _ in nodes[i].consumers)
        for i in sorted(candidates):
            if not freed[i] and self._worth_freeing(i):  # (settled as the pass went: freed already)
                self._free_saved(i)

    def _free_saved(self, i: int) -> None:
        if release(self.graph.nodes[i].fn):  # (leaves are never worth freeing: _worth_freeing)
            self.graph.freed[i] = True

    def _release(self, i: int) -> None:
        memo, given = self.memo, self._given
        n = self.graph.nodes[i].num_outputs
        for edge in ((i, 0),) if n == 1 else [(i, k) for k in range(n)]:
            if edge not in given:
                memo.pop(edge, None)

    def output(self, i: int, k: int = 0) -> Value:
        return self.value((i, k), i)

    def input(self, i: int, slot: int) -> Value:
        edge = self.graph.nodes[i].inputs[slot]
        return self.value(edge, i)

    def stats(self) -> dict[str, float]:
        return {}


def merge(known: Value | None, more: Value) -> Value:
    """Two partial values of one tensor combined: known where either is (exact once everywhere;
    where both are, ``known``'s numbers).

    When ``known`` owns its tensors and ``more`` is one part placed in a tensor of its own (the
    parts that the selections of a fused projection read back: query, key, value), the part is
    written into ``known``'s tensors -- a pass over the part instead of three over the whole
    (``known`` is used up)."""
    if known is None or more.exact:
        return more
    if known.exact:
        return known
    if known.owned and isinstance(more, PlacedValue):
        view, part, part_mask = more.place
        region, seen = view(known.tensor), view(known.mask)
        region.copy_(torch.where(seen, region, part))
        if part_mask is None:
            seen.fill_(True)
        else:
            seen.logical_or_(part_mask)
        mask, tensor = known.mask, known.tensor
    else:
        mask = known.mask | more.mask
        tensor = torch.where(known.mask, known.tensor, more.tensor)
    return Value(tensor, None if _all_true(mask) else mask, owned=True)


def _all_true(mask: torch.Tensor) -> bool:
    """``bool(mask.all())``, read as bytes: the smallest byte is 1 (one vectorised pass, a
    fifteenth of ``all``'s time on a projection's 450,000 entries)."""
    return mask.numel() == 0 or bool(mask.view(torch.uint8).amin())


def inverse(cn, slot: int, out: Value, xs: list) -> Value | None:
    """Input ``slot`` of node ``cn`` from its output ``out`` and other inputs ``xs``, by its op's
    inverse. A value seen through a clipping op learns the edge it was seen from
    (:attr:`~dynlrp.ops.ClippedValue.source`)."""
    got = cn.entry.inverse(cn.fn, out, xs).get(slot)
    if type(got) is ClippedValue:
        got.source = (cn.index, 0)
    return got


def invert_by_consumers(graph: Graph, edge: Edge, output_of, operand_of) -> tuple[Value | None, list]:
    """``edge``'s value recovered by its consumers' inverses, and the ``(consumer, slot)`` pairs
    used. ``output_of(consumer_edge, edge)`` gives a consumer's output, ``operand_of(e, consumer,
    slot)`` its other operands (either may return None); consumers that each know a part are
    merged, and the search stops once the value is known everywhere."""
    found, used = None, []
    nodes = graph.nodes
    for consumer, slot in nodes[edge[0]].consumers:
        cn = nodes[consumer]
        entry = cn.entry
        if entry is None or entry.inverse is None or cn.inputs[slot] != edge:
            continue
        out = output_of((consumer, 0), edge)
        if out is None:
            continue
        xs: list = [None] * len(cn.inputs)
        for s, e in enumerate(cn.inputs):
            if e is not None and s != slot:
                v = operand_of(e, consumer, s)
                xs[s] = None if v is None or not v.exact else v.tensor
        try:
            got = inverse(cn, slot, out, xs)
        except GraphFreedError:  # (an inverse that reads a tensor the call freed)
            if not graph.freed[consumer]:
                raise
            continue
        if got is not None:
            found = merge(found, got)
            used.append((consumer, slot))
            if found.exact:
                break
    return found, used


def saved_value(graph: Graph, edge: Edge, recompute: bool = True) -> tuple[torch.Tensor | None, tuple | None]:
    """The value of ``edge`` from what autograd saved, and how it was found: a consumer's saved
    input (``("tap", consumer, slot)``), else the node's own saved tensors (output 0;
    ``("own",)``). Taps come first: they cost nothing, while an ``own`` may recompute the op
    (:attr:`~dynlrp.ops.OpEntry.own_recomputes`), which ``recompute=False`` skips.
    ``(None, None)`` when none holds it."""
    gn = graph.nodes[edge[0]]
    for consumer, slot in gn.consumers:
        if graph.nodes[consumer].inputs[slot] != edge:
            continue  # the consumer reads another output of this node
        value = tap_value(graph, consumer, slot)
        if value is not None:
            return value, ("tap", consumer, slot)
    entry = gn.entry
    if entry is None or edge[1] != 0 or (entry.own_recomputes and not recompute) or graph.freed[edge[0]]:
        return None, None
    own = entry.own(gn.fn)
    return (own.detach(), ("own",)) if own is not None else (None, None)


def recomputes(graph: Graph, edge: Edge) -> bool:
    """Whether the only saved source of ``edge`` may be an ``own`` that recomputes its op."""
    entry = graph.nodes[edge[0]].entry
    return entry is not None and entry.own_recomputes and edge[1] == 0


def tap_value(graph: Graph, consumer: int, slot: int) -> torch.Tensor | None:
    """The value of input ``slot`` of node ``consumer`` if that node saved it, else None."""
    cn = graph.nodes[consumer]
    entry = cn.entry
    if entry is None or graph.freed[consumer]:
        return None
    value = entry.taps(cn.fn).get(slot)
    return None if value is None else value.detach()


class Parameters:
    """A model's parameters by the storage they live in: supplies operands autograd did not keep.

    Autograd never sees a frozen layer's bias, yet it saves the layer's weight. Given the
    model, the weight identifies the module, and the module holds the bias. The model is
    only read. Three ways a saved weight is matched to its bias:

    * the weight *is* a module's weight (same storage and offset): the module's bias;
    * the weight is a block of rows of one (``nn.MultiheadAttention`` splits its packed
      ``in_proj_weight`` into query, key and value rows when the query is not the key): the
      same rows of the bias;
    * the weight is computed from the module's parameters on every call (a parametrization
      such as weight normalisation): the module whose computed weight equals it.

    The index of a model's parameters is built on the first request and kept for later calls
    on the same model (a model of ResNet-50's size takes milliseconds to index); every answer
    is checked against the module it came from, and the index is built afresh where a module
    no longer holds what it held, or where a weight is not found in an index made by an earlier
    call (a module added since).
    """

    #: (weight attribute, bias attribute) pairs a module may hold.
    PAIRS = (("weight", "bias"), ("in_proj_weight", "in_proj_bias"))
    #: model -> its index, kept for later calls: (by storage, computed weights)
    _INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._by_storage: dict[int, list[tuple]] = {}
        self._computed: list[tuple] = []
        self._indexed = False  # the index is looked up on the first request: most calls make none
        self._fresh = False  # the index was built by this call

    def _index(self, fresh: bool = False) -> None:
        from torch.nn.utils import parametrize

        self._indexed = True
        known = None if fresh else self._INDEXES.get(self._model)
        if known is not None:
            self._by_storage, self._computed = known
            return
        self._fresh = True
        by_storage: dict[int, list[tuple]] = {}
        computed: list[tuple] = []
        for module in self._model.modules():
            for w_name, b_name in self.PAIRS:
                if parametrize.is_parametrized(module, w_name):
                    computed.append((weakref.ref(module), w_name, b_name))
                    continue
                weight, bias = getattr(module, w_name, None), getattr(module, b_name, None)
                if isinstance(weight, torch.Tensor) and weight.numel() and isinstance(bias, torch.Tensor):
                    key = weight.untyped_storage().data_ptr()  # (modules by weak reference: the
                    # index, kept while the model lives, must not keep the model alive)
                    by_storage.setdefault(key, []).append((weight, bias, weakref.ref(module), w_name, b_name))
        self._by_storage, self._computed = by_storage, computed
        self._INDEXES[self._model] = (by_storage, computed)

    def bias_for(self, owner: torch.Tensor | None) -> torch.Tensor | None:
        """The bias that goes with weight ``owner`` (a module's weight, a view of it, or a block
        of its rows), or None."""
        if owner is None:
            return None
        if not self._indexed:
            self._index()
        found = self._lookup(owner)
        if found is _STALE or (found is None and not self._fresh):
            self._index(fresh=True)  # (an index of an earlier call that no longer holds)
            found = self._lookup(owner)
        return None if found is _STALE else found

    def _lookup(self, owner: torch.Tensor) -> object:
        """``bias_for`` in the current index: the bias, None, or ``_STALE`` (a module changed)."""
        candidates = self._by_storage.get(owner.untyped_storage().data_ptr(), ())
        for weight, bias, module_ref, w_name, b_name in candidates:
            module = module_ref()
            if getattr(module, w_name, None) is not weight or getattr(module, b_name, None) is not bias:
                return _STALE
            if owner.data_ptr() == weight.data_ptr() and owner.numel() == weight.numel():
                return bias.detach()  # the weight itself, or a transposed or reshaped view
            rows = _row_block(owner, weight)
            if rows is not None and bias.shape[:1] == weight.shape[:1]:
                return bias.detach()[rows]
        for module_ref, w_name, b_name in self._computed:
            module = module_ref()
            bias = getattr(module, b_name, None)
            if not isinstance(bias, torch.Tensor):
                continue
            with torch.no_grad():
                weight = getattr(module, w_name)
            if weight.shape == owner.shape and torch.equal(weight, owner):
                return bias.detach()
        return None


_STALE = object()


def _row_block(view: torch.Tensor, weight: torch.Tensor) -> slice | None:
    """The rows of ``weight`` that ``view`` is (possibly transposed, as ``t()`` saves it), or None."""
    if view.dtype != weight.dtype or weight.dim() == 0:
        return None
    for candidate in (view, view.t()) if view.dim() == 2 else (view,):
        if candidate.shape[1:] != weight.shape[1:] or candidate.stride() != weight.stride():
            continue
        offset = candidate.storage_offset() - weight.storage_offset()
        step = weight.stride(0)
        if step and offset % step == 0 and 0 <= offset // step <= weight.shape[0] - candidate.shape[0]:
            start = offset // step
            return slice(start, start + candidate.shape[0])
    return None


def replay_output(t: torch.Tensor) -> torch.Tensor:
    """A replay's output as a forward value: replays run without grad, so their outputs are
    already outside any graph and need no ``detach`` (which costs a new tensor each)."""
    return t.detach() if t.requires_grad else t


def replay(entry, node, xs: list, params: Parameters | None):
    """Run an op's forward closure; operands autograd did not keep come from ``params``.

    (No exception object outlives its ``except`` clause: one kept in a local would hold this
    frame, and the tensors in it, in a reference cycle until the garbage collector runs.)"""
    try:
        return entry.forward(node, xs)  # (the usual case: no copy of xs, no retries)
    except MissingOperand as exc:
        if params is None:
            raise
        missing = (str(exc), exc.slot, exc.owner)
    xs = list(xs)
    for _ in range(len(xs)):
        message, slot, owner = missing
        found = None if slot is None else params.bias_for(owner)
        if found is None or xs[slot] is not None:
            raise MissingOperand(message, slot, owner)
        xs[slot] = found
        try:
            return entry.forward(node, xs)
        except MissingOperand as exc:
            missing = (str(exc), exc.slot, exc.owner)
    raise MissingOperand(f"operands of {node.name()}")

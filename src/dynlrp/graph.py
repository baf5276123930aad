"""The auxiliary graph over autograd's ``grad_fn`` / ``next_functions`` (paper Algorithm 1).

One :class:`GNode` per autograd node reachable from the outputs: its op name, its input
edges (child index and which of the child's outputs), its consumers, and whether it leads
to a requested input. :func:`build` also orders the nodes with the traversal heuristic of
paper 4.2 (Definition 1): a stack seeded with the nodes of in-degree 0, a node pushed once
every consumer has propagated to it -- so every node is visited exactly once, after all
of its consumers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .dtypes import compute_dtype
from .errors import GraphError
from .ops import Affine, OpEntry, lookup
from .saved import decode_metas, node_facts, node_name

Edge = tuple[int, int]  # (node index, output index)
_UNSET = object()


class GNode:
    """One autograd node in the auxiliary graph.

    Besides the structure, a node caches facts the traversal asks for at every visit:
    ``is_leaf``, ``num_inputs``, ``graph_inputs`` (input slots with an edge), ``reaching``
    (those whose child leads to a requested input; set by :func:`build`), its op entry
    (:attr:`entry`), its outputs' metadata (:meth:`meta`) and its reaching input edges with
    the dtype relevance is carried in there (:meth:`relevance_edges`)."""

    __slots__ = ("fn", "name", "index", "inputs", "consumers", "reaches", "is_leaf", "num_outputs",
                 "num_inputs", "graph_inputs", "reaching", "_raw", "_meta", "_edges", "_entry", "_affine")

    def __init__(self, fn: Any, name: str, index: int, is_leaf: bool = False, outputs: int = 1,
                 raw: tuple | None = None) -> None:
        self.fn = fn
        self.name = name
        self.index = index
        self.inputs: tuple[Edge | None, ...] = ()  # set by the graph builder
        self.consumers: list[tuple[int, int]] = []  # (consumer, input slot)
        self.reaches = False
        self.is_leaf = is_leaf
        self.num_outputs = outputs  # forward outputs
        self.num_inputs = 0
        self.graph_inputs: tuple[int, ...] = ()
        self.reaching: tuple[int, ...] = ()
        self._raw = raw  # the node's output metadata as autograd keeps it (decoded on demand)
        self._meta: list | None = None
        self._edges: tuple | None = None
        self._entry: Any = _UNSET
        self._affine: dict[int, Any] | None = None

    @property
    def entry(self) -> OpEntry | None:
        """The registered op entry of this node's type (:func:`dynlrp.ops.lookup`), looked up
        once: the resolvers ask for it at every value request."""
        entry = self._entry
        if entry is _UNSET:
            entry = self._entry = lookup(self.name)
        return entry

    def affine(self, slot: int) -> Affine | None:
        """The op as an affine map of input ``slot`` (its entry's ``affine`` view), or None. A
        channel-wise view (a batch norm's: it computes the per-channel scale and shift) is made
        once -- a rule set asks while it plans folds, the engine again when it folds; other views
        are not kept (one holds its weight, which for a product of two activations is an
        activation the traversal frees)."""
        views = self._affine
        if views is not None and slot in views:
            return views[slot]
        entry = self.entry
        view = None if entry is None or entry.affine is None else entry.affine(self.fn, slot)
        if view is not None and view.channelwise:
            if views is None:
                views = self._affine = {}
            views[slot] = view
        return view

    def meta(self, k: int = 0) -> tuple[torch.Size, torch.dtype, torch.device]:
        """Shape, dtype and device of forward output ``k`` (read once, then cached)."""
        metas = self._meta
        if metas is None:
            metas = self._meta = decode_metas(self.fn, self._raw)
            self._raw = None
        return metas[k]

    def relevance_edges(self, nodes: list[GNode]) -> tuple[tuple[int, Edge, torch.dtype], ...]:
        """``(slot, edge, dtype)`` for each slot in :attr:`reaching`: where relevance goes, and
        the dtype it is carried in there (:func:`~dynlrp.dtypes.compute_dtype`); ``nodes`` are
        the graph's."""
        edges = self._edges
        if edges is None:
            inputs = self.inputs
            found = []
            for s in self.reaching:
                c, k = inputs[s]
                found.append((s, inputs[s], compute_dtype(nodes[c].meta(k)[1])))
            edges = self._edges = tuple(found)
        return edges

    def __repr__(self) -> str:
        return f"GNode({self.index}, {self.name}, inputs={self.inputs})"


@dataclass(eq=False)
class Graph:
    """The auxiliary graph of one forward pass, seen from its outputs."""

    nodes: list[GNode]
    roots: list[Edge]
    targets: list[Edge]
    order: list[int]  # traversal order of the nodes that lead to a requested input
    #: per node: whether the call released its saved tensors (``retain_graph=False``)
    freed: list[bool] = field(default_factory=list)

    def node(self, fn: Any) -> GNode:
        return self.nodes[self._index[fn]]

    def rank(self, fn: Any) -> int | None:
        """Where autograd node ``fn`` comes in :attr:`order` (every node before its inputs), or
        None for a node outside it."""
        ranks = self.__dict__.get("_ranks")
        if ranks is None:
            ranks = self._ranks = {i: at for at, i in enumerate(self.order)}
        i = self._index.get(fn)
        return None if i is None else ranks.get(i)

    def _values(self):
        """``(node index, shape, dtype)`` of every forward value, from the metadata autograd keeps,
        decoded (:meth:`GNode.meta`) or not (what :func:`~dynlrp.saved.node_facts` read)."""
        for gn in self.nodes:
            metas = gn._meta
            if metas is None:
                metas = gn._raw if gn._raw is not None else [gn.meta(0)]
            for m in metas:
                if type(m) is tuple:
                    yield gn.index, m[0], m[1]
                else:
                    yield gn.index, m.shape, m.dtype

    def large(self, limit: int) -> list[int]:
        """The nodes with an output of ``limit`` elements or more."""
        prod = math.prod
        return list(dict.fromkeys(i for i, shape, _ in self._values() if prod(shape) >= limit))

    def elements(self) -> list[int]:
        """The number of elements each node's outputs hold, by node index."""
        return self._summary()[0]

    def fits(self, limit: int | None = None) -> bool:
        """Whether every forward value is in the dtype relevance is carried in
        (:func:`~dynlrp.dtypes.compute_dtype`: not float16 or bfloat16) and, given a ``limit``, the
        values hold fewer than ``limit`` elements in all."""
        _, total, carried = self._summary()
        return carried and (limit is None or total < limit)

    def _summary(self) -> tuple[list[int], int, bool]:
        """Elements per node, in all, and whether every value is in the dtype relevance is carried
        in: one pass over autograd's metadata, made once."""
        found = self.__dict__.get("_sizes")
        if found is None:
            sizes, prod, carried = [0] * len(self.nodes), math.prod, True
            for i, shape, dtype in self._values():
                sizes[i] += prod(shape)
                if carried and compute_dtype(dtype) != dtype:
                    carried = False
            found = self._sizes = (sizes, sum(sizes), carried)
        return found

    def signature(self) -> tuple:
        """Structure of the graph (op names and edges): equal for the same architecture."""
        nodes = self.nodes
        return (tuple([n.name for n in nodes]), tuple([n.inputs for n in nodes]), tuple(self.roots),
                tuple(self.targets))


def _walk(root_fns: list[Any]) -> tuple[list[GNode], dict[Any, int], dict[int, int]]:
    index: dict[Any, int] = {}
    fns: list[Any] = []
    edges: list[tuple] = []  # each node's next_functions, read once
    stack = list(root_fns)
    pop, push, add_fn, add_edges = stack.pop, stack.append, fns.append, edges.append
    while stack:
        fn = pop()
        if fn in index:
            continue
        index[fn] = len(fns)
        add_fn(fn)
        nexts = fn.next_functions
        add_edges(nexts)
        for child, _ in nexts:
            if child is not None and child not in index:
                push(child)
    nodes: list[GNode] = []
    leaves: dict[int, int] = {}  # id(leaf tensor) -> node
    add = nodes.append
    for i, fn in enumerate(fns):
        name, var, raw = node_facts(fn)
        if var is not None:
            leaves[id(var)] = i
            add(GNode(fn, name, i, True, 1))
        else:
            add(GNode(fn, name, i, False, len(raw), raw))
    for gn, nexts in zip(nodes, edges):
        i = gn.index
        n = len(nexts)
        if n == 1:  # (most nodes have one or two inputs)
            child, k = nexts[0]
            gn.num_inputs = 1
            if child is None:
                gn.inputs = (None,)
            else:
                c = index[child]
                gn.inputs = ((c, k),)
                nodes[c].consumers.append((i, 0))
                gn.graph_inputs = (0,)
            continue
        if n == 2:
            (a, ka), (b, kb) = nexts
            gn.num_inputs = 2
            ea = eb = None
            if a is not None:
                ea = (index[a], ka)
                nodes[ea[0]].consumers.append((i, 0))
            if b is not None:
                eb = (index[b], kb)
                nodes[eb[0]].consumers.append((i, 1))
            gn.inputs = (ea, eb)
            if ea is not None:
                gn.graph_inputs = (0, 1) if eb is not None else (0,)
            elif eb is not None:
                gn.graph_inputs = (1,)
            continue
        inputs: list = []
        graph_inputs = []
        for slot, (child, k) in enumerate(nexts):
            if child is None:
                inputs.append(None)
            else:
                c = index[child]
                inputs.append((c, k))
                nodes[c].consumers.append((i, slot))
                graph_inputs.append(slot)
        gn.inputs = tuple(inputs)
        gn.num_inputs = len(inputs)
        gn.graph_inputs = tuple(graph_inputs)
    return nodes, index, leaves


def _target_edge(t: torch.Tensor, index: dict[Any, int], leaves: dict[int, int], pos: int) -> Edge:
    if not isinstance(t, torch.Tensor):
        raise GraphError(f"inputs[{pos}] is a {type(t).__name__}, not a tensor")
    if t.grad_fn is not None:
        if t.grad_fn not in index:
            raise GraphError(
                f"inputs[{pos}] (produced by {node_name(t.grad_fn)}) is not part of the outputs' "
                "graph: the outputs do not depend on it."
            )
        return index[t.grad_fn], t.output_nr
    if not t.requires_grad:
        raise GraphError(
            f"inputs[{pos}] does not require grad, so autograd did not record how the outputs "
            "depend on it. Call `x.requires_grad_(True)` before the forward pass."
        )
    if id(t) not in leaves:
        raise GraphError(f"inputs[{pos}] is a leaf tensor that the outputs do not depend on.")
    return leaves[id(t)], 0


def _check_supported(t: torch.Tensor, what: str) -> None:
    if getattr(t, "is_nested", False):
        raise GraphError(f"{what} is a nested tensor; dynlrp supports dense (strided) tensors. "
                         "Pad the batch into a dense tensor (and mask the padding) instead.")
    if t.layout != torch.strided:
        raise GraphError(f"{what} has layout {t.layout}; dynlrp supports dense (strided) tensors. "
                         "Call `.to_dense()` before the forward pass.")
    if t.is_complex():
        raise GraphError(f"{what} is complex ({t.dtype}); LRP relevance is defined for real tensors. "
                         "Explain a real-valued function of it built from real tensors.")


def build(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> Graph:
    """Build the auxiliary graph of ``outputs`` and mark what leads to ``inputs``."""
    for pos, t in enumerate(outputs):
        if isinstance(t, torch.Tensor):
            _check_supported(t, f"outputs[{pos}]")
    for pos, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            _check_supported(t, f"inputs[{pos}]")
    for pos, y in enumerate(outputs):
        if not isinstance(y, torch.Tensor):
            raise GraphError(f"outputs[{pos}] is a {type(y).__name__}, not a tensor")
        if y.grad_fn is None:
            why = ("it does not require grad" if not y.requires_grad else "it is a leaf tensor")
            raise GraphError(
                f"outputs[{pos}] has no grad_fn ({why}): there is no autograd graph to explain. "
                "Run the forward pass with grad enabled (not under torch.no_grad() or "
                "torch.inference_mode()) and with `requires_grad_(True)` on the input."
            )
    nodes, index, leaves = _walk([y.grad_fn for y in outputs])
    targets = [_target_edge(t, index, leaves, pos) for pos, t in enumerate(inputs)]
    roots = [(index[y.grad_fn], y.output_nr) for y in outputs]

    # Which nodes lead to a requested input: children before parents (reverse DFS order).
    target_nodes = {t for t, _ in targets}
    order = _topological(nodes, roots)
    for i in reversed(order):
        gn = nodes[i]
        inputs, graph_inputs = gn.inputs, gn.graph_inputs
        reaching = [s for s in graph_inputs if nodes[inputs[s][0]].reaches] if graph_inputs else ()
        # (one tuple per distinct set of slots: most nodes share their graph_inputs' tuple)
        gn.reaching = graph_inputs if len(reaching) == len(graph_inputs) else tuple(reaching)
        gn.reaches = bool(reaching) or i in target_nodes
    graph = Graph(nodes, roots, targets, [i for i in order if nodes[i].reaches], [False] * len(nodes))
    graph._index = index
    return graph


def _topological(nodes: list[GNode], roots: list[Edge]) -> list[int]:
    """Paper 4.2, Definition 1: pop a node, decrement its children's in-degree, push the
    children whose in-degree reached zero."""
    indegree = [len(n.consumers) for n in nodes]
    stack = sorted({r for r, _ in roots if indegree[r] == 0}, reverse=True)
    order: list[int] = []
    pop, push, visit = stack.pop, stack.append, order.append
    while stack:
        i = pop()
        visit(i)
        for e in nodes[i].inputs:
            if e is None:
                continue
            c = e[0]
            left = indegree[c] = indegree[c] - 1
            if left == 0:
                push(c)
    if len(order) != len(nodes):  # an output that another output consumes
        seen = set(order)
        rest = [n.index for n in nodes if n.index not in seen]
        raise GraphError(
            f"{len(rest)} autograd nodes could not be ordered; is one output computed from "
            "another? Pass only the final outputs."
        )
    return order

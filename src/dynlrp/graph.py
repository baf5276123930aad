"""The auxiliary graph over autograd's ``grad_fn`` / ``next_functions`` (paper Algorithm 1).

One :class:`GNode` per autograd node reachable from the outputs: its op name, its input
edges (child index and which of the child's outputs), its consumers, and whether it leads
to a requested input. :func:`build` also orders the nodes with the traversal heuristic of
paper 4.2 (Definition 1): a stack seeded with the nodes of in-degree 0, a node pushed once
every consumer has propagated to it -- so every node is visited exactly once, after all
of its consumers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import GraphError
from .saved import leaf_variable, node_name, num_outputs, output_meta

Edge = tuple[int, int]  # (node index, output index)


class GNode:
    """One autograd node in the auxiliary graph.

    Besides the structure, a node caches facts the traversal asks for at every visit:
    ``is_leaf``, ``graph_inputs`` (input slots with an edge), ``reaching`` (those whose child
    leads to a requested input; set by :func:`build`) and its outputs' metadata
    (:meth:`meta`)."""

    __slots__ = ("fn", "name", "index", "inputs", "consumers", "reaches", "is_leaf", "num_outputs",
                 "graph_inputs", "reaching", "_meta")

    def __init__(self, fn: Any, name: str, index: int, is_leaf: bool = False, outputs: int = 1) -> None:
        self.fn = fn
        self.name = name
        self.index = index
        self.inputs: list[Edge | None] = []
        self.consumers: list[tuple[int, int]] = []  # (consumer, input slot)
        self.reaches = False
        self.is_leaf = is_leaf
        self.num_outputs = outputs  # forward outputs
        self.graph_inputs: tuple[int, ...] = ()
        self.reaching: tuple[int, ...] = ()
        self._meta: list | None = None

    def meta(self, k: int = 0) -> tuple[torch.Size, torch.dtype, torch.device]:
        """Shape, dtype and device of forward output ``k`` (read once, then cached)."""
        metas = self._meta
        if metas is None:
            metas = self._meta = [output_meta(self.fn, j) for j in range(self.num_outputs)]
        return metas[k]

    def __repr__(self) -> str:
        return f"GNode({self.index}, {self.name}, inputs={self.inputs})"


@dataclass(eq=False)
class Graph:
    """The auxiliary graph of one forward pass, seen from its outputs."""

    nodes: list[GNode]
    roots: list[Edge]
    targets: list[Edge]
    order: list[int]  # traversal order of the nodes that lead to a requested input

    def node(self, fn: Any) -> GNode:
        return self.nodes[self._index[fn]]

    def signature(self) -> tuple:
        """Structure of the graph (op names and edges): equal for the same architecture."""
        return tuple((n.name, tuple(n.inputs)) for n in self.nodes) + (tuple(self.roots), tuple(self.targets))


def _walk(root_fns: list[Any]) -> tuple[list[GNode], dict[Any, int]]:
    index: dict[Any, int] = {}
    nodes: list[GNode] = []
    edges: list[tuple] = []  # each node's next_functions, read once
    stack = [fn for fn in root_fns]
    while stack:
        fn = stack.pop()
        if fn in index:
            continue
        index[fn] = len(nodes)
        nexts = fn.next_functions
        leaf = leaf_variable(fn) is not None
        nodes.append(GNode(fn, node_name(fn), len(nodes), leaf, 1 if leaf else num_outputs(fn)))
        edges.append(nexts)
        for child, _ in nexts:
            if child is not None and child not in index:
                stack.append(child)
    for gn, nexts in zip(nodes, edges):
        inputs = gn.inputs
        for slot, (child, k) in enumerate(nexts):
            if child is None:
                inputs.append(None)
            else:
                c = index[child]
                inputs.append((c, k))
                nodes[c].consumers.append((gn.index, slot))
        gn.graph_inputs = tuple(s for s, e in enumerate(inputs) if e is not None)
    return nodes, index


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
    nodes, index = _walk([y.grad_fn for y in outputs])
    leaves = {id(leaf_variable(n.fn)): n.index for n in nodes if n.is_leaf}
    targets = [_target_edge(t, index, leaves, pos) for pos, t in enumerate(inputs)]
    roots = [(index[y.grad_fn], y.output_nr) for y in outputs]

    # Which nodes lead to a requested input: children before parents (reverse DFS order).
    target_nodes = {t for t, _ in targets}
    order = _topological(nodes, roots)
    for i in reversed(order):
        gn = nodes[i]
        gn.reaching = tuple(s for s in gn.graph_inputs if nodes[gn.inputs[s][0]].reaches)
        gn.reaches = i in target_nodes or bool(gn.reaching)
    graph = Graph(nodes, roots, targets, [i for i in order if nodes[i].reaches])
    graph._index = index
    return graph


def _topological(nodes: list[GNode], roots: list[Edge]) -> list[int]:
    """Paper 4.2, Definition 1: pop a node, decrement its children's in-degree, push the
    children whose in-degree reached zero."""
    indegree = [len(n.consumers) for n in nodes]
    stack = sorted({r for r, _ in roots if indegree[r] == 0}, reverse=True)
    order: list[int] = []
    while stack:
        i = stack.pop()
        order.append(i)
        for e in nodes[i].inputs:
            if e is None:
                continue
            indegree[e[0]] -= 1
            if indegree[e[0]] == 0:
                stack.append(e[0])
    if len(order) != len(nodes):  # an output that another output consumes
        seen = set(order)
        rest = [n.index for n in nodes if n.index not in seen]
        raise GraphError(
            f"{len(rest)} autograd nodes could not be ordered; is one output computed from "
            "another? Pass only the final outputs."
        )
    return order

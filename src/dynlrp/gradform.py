"""Relevance propagated by autograd's own engine, where every rule on the way is a gradient.

Write the relevance on every edge as ``R = v * g``, its forward value times a *gradient*
``g``. Many rules are then the node's own backward of ``g``, scaled (:meth:`Rule.as_gradient
<dynlrp.rules.Rule.as_gradient>`): the epsilon rule (paper Eq. 4),
``R_i = v_i * J_i^T (R / stab(z))``, is ``g_i = J_i^T (g * z / stab(z))``; proportional sharing
at a sum (Eq. 8), the identity at a ReLU or a product with constants, and routing by a view or
a selection are the backward itself (Euler's identity ``v * J^T g = z * g`` for an op that is
positively homogeneous in ``v``); AttnLRP's uniform rule for a product of ``n`` activations is
the backward over ``n``. That is LRP as a modified gradient, as Zennit and LxT compute it,
but found per autograd node, as the rest of dynlrp is.

Where every node's rule has that form, one ``torch.autograd.grad`` call from the seeds
(``g = R / y`` at the outputs) with a pre-hook on each node whose rule scales ``g`` gives
the relevance at the inputs, ``x * g``: the traversal, the sums of relevance and the backward of
every unscaled node run in autograd's C++ engine, and Python runs only the scaled nodes'
hooks, each asking the resolver (the Promise System, or a tape) for its output ``z``.

The engine takes this path for graphs under :data:`MAX_ELEMENTS` values in all where every rule
that relevance reaches has a gradient form, the values are in a dtype relevance is carried in
(float16: autograd would carry ``g`` in float16), no seed sits on an output value of 0
(``R = 0 * g`` has no ``g``) and no other call is propagating the same graph; else the Python
traversal (:meth:`dynlrp.engine.LRP._propagate`). There the per-node bookkeeping of the Python
traversal is most of the call. Memory: each hook's values leave the resolver's memo once used;
the saved tensors stay for the whole pass (the hooks read them: ``retain_graph=True``) and a call
without ``retain_graph`` frees them when it ends (the Python traversal frees them as it goes).
If a hook cannot get a value it needs, or autograd's pass fails otherwise, the call starts over
on the Python traversal, which gives the relevance or the typed error.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from .graph import Edge, Graph
from .ops import ClippedValue
from .rules import Gradient, stabilize
from .values import Resolver

#: Off: every call takes the Python traversal (the tests compare the two).
ENABLED = True
#: Graphs whose forward values hold this many elements or more in all (4 MiB of float32) take the
#: Python traversal, which keeps within the memory of a gradient (None: no limit; the tests set
#: 0 to take the Python traversal everywhere). On the transformers of benchmarks/compare.py
#: autograd's engine was faster, but its extra peak memory reached 1.24x the gradient's on BERT
#: at batch 8: the hooks' temporaries at the first GELU, before anything can be freed
#: (docs/performance.md).
MAX_ELEMENTS: int | None = 1 << 20
#: Graphs whose values hold this many elements or more in all are freed as autograd's pass goes
#: (a post-hook per node settles it, :meth:`Resolver.done <dynlrp.values.Resolver.done>`);
#: smaller ones at its end (:meth:`Resolver.free_all <dynlrp.values.Resolver.free_all>`).
SETTLE_ELEMENTS = 1 << 20


_BUSY = "dynlrp: propagating"  # key in a root node's (public) ``metadata`` during a call
_busy_lock = threading.Lock()


class _NoValue(Exception):
    """A hook could not get an exact value it needs (the call falls back)."""


def eligible(graph: Graph, outputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor]) -> bool:
    """Whether the call may run on autograd's engine, its rules aside: values in a dtype relevance is
    carried in (and under :data:`MAX_ELEMENTS` in all, if set), no seed on an output value of 0,
    and no other call propagating the same graph on autograd's engine."""
    if not ENABLED or not graph.fits(MAX_ELEMENTS) or _busy(graph):
        return False
    return not any(bool(((y == 0) & (r != 0)).any()) for y, r in zip(outputs, seeds))


def may_settle(graph: Graph) -> bool:
    """Whether the graph is large enough to be settled as the pass goes (:data:`SETTLE_ELEMENTS`;
    never under a :data:`MAX_ELEMENTS` no larger, which the graph already met)."""
    limit = MAX_ELEMENTS
    return (limit is None or limit > SETTLE_ELEMENTS) and not graph.fits(SETTLE_ELEMENTS)


def _busy(graph: Graph) -> bool:
    return any(graph.nodes[i].fn.metadata.get(_BUSY) for i, _ in graph.roots)


def propagate(graph: Graph, forms: dict[int, Gradient], seeds: Sequence[torch.Tensor],
              outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
              resolver: Resolver, settle: bool = False) -> list | None:
    """The relevance at ``inputs`` (None where none arrives), or None if a hook could not get a
    value (nothing is freed then: the Python traversal can start over), or if another call is
    propagating the same graph (two calls with ``retain_graph=True``, in two threads).

    ``forms`` holds the nodes whose rule is not the backward as it is; every other node on
    the way is (or receives no relevance)."""
    roots = [graph.nodes[i].fn for i, _ in graph.roots]
    with _busy_lock:  # (hooks on a graph another call is propagating would fire in both)
        if _busy(graph):
            return None
        for fn in roots:
            fn.metadata[_BUSY] = True
    try:
        return _propagate(graph, forms, seeds, outputs, inputs, resolver, settle)
    finally:
        for fn in roots:
            fn.metadata.pop(_BUSY, None)


def _propagate(graph: Graph, forms: dict[int, Gradient], seeds: Sequence[torch.Tensor],
               outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
               resolver: Resolver, settle: bool) -> list | None:
    nodes = graph.nodes
    handles = []
    for i, form in forms.items():
        fn = nodes[i].fn
        if form.ratio or form.adjoint:  # (the backward is replaced; autograd allows no way to skip it)
            replace = _ratio(graph, resolver, i) if form.ratio else _adjoint(graph, resolver, i, form.eps)
            handles.append(fn.register_hook(lambda grad_inputs, grad_outputs, replace=replace:
                                            replace(len(grad_inputs), grad_outputs[0])))
            continue
        uniform = type(form.shares) is float
        if form.eps is not None or (uniform and form.shares != 1.0):
            handles.append(fn.register_prehook(_scaling(graph, resolver, i, form.share(0) if uniform else 1.0,
                                                        form.eps)))
        if not uniform:
            handles.append(fn.register_hook(_sharing(form.shares)))
    if settle:  # each node, once run (after its rule's hooks), settles as in the Python traversal
        for i in graph.order:
            if not nodes[i].is_leaf:
                handles.append(nodes[i].fn.register_hook(_settling(resolver, i)))
    grads = [torch.where(y == 0, torch.zeros_like(r), r / y) for y, r in zip(outputs, seeds)]
    try:
        found = torch.autograd.grad(list(outputs), list(inputs), grads, retain_graph=True, allow_unused=True)
    except Exception:  # noqa: BLE001 -- a value a hook could not get, a graph freed by a backward,
        # a saved tensor modified in place: the Python traversal starts over (nothing is freed
        # yet) and gives the relevance or the typed error
        return None
    finally:
        for handle in handles:
            handle.remove()
    return [None if g is None else x.detach() * g for x, g in zip(inputs, found)]


def _scaling(graph: Graph, resolver: Resolver, i: int, share: float, eps: float | None):
    """Node ``i``'s pre-hook: ``g -> share * g * z / stab(z)`` (``share * g`` without ``eps``) on
    its first output; its other outputs carry no relevance."""

    def hook(grads: tuple) -> tuple | None:
        g = grads[0]
        if g is None:
            return None
        if len(grads) > 1 and any(h is not None for h in grads[1:]):
            raise _NoValue(f"relevance reaches an output of {graph.nodes[i].name} other than its first")
        if eps is None:
            s = g * share
        else:
            s = _stabilized(graph, resolver, i, g, eps)
            if share != 1.0:
                s.mul_(share)
        return (s, *grads[1:])

    return hook


def _settling(resolver: Resolver, i: int):
    """A post-hook: node ``i`` was propagated (:meth:`Resolver.done
    <dynlrp.values.Resolver.done>`: its saved tensors are freed once no request below can read
    them, its values once no consumer can ask)."""

    def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
        resolver.processed[i] = True
        resolver.done(i)

    return hook


def _sharing(shares: tuple[float, ...]):
    """A post-hook: the backward's ``g_i`` times ``shares[i]`` (None where the share is 0)."""

    def hook(grad_inputs: tuple, grad_outputs: tuple) -> tuple:
        return tuple(None if g is None or share == 0.0 else (g if share == 1.0 else g * share)
                     for g, share in zip(grad_inputs, shares))

    return hook


def _ratio(graph: Graph, resolver: Resolver, i: int):
    """The replacement of node ``i``'s backward for the identity at an op that is not
    homogeneous: its one input that carries relevance gets ``g * z / v`` (``R_v = R_z``)."""
    gn = graph.nodes[i]
    slot = gn.reaching[0]
    edge = gn.inputs[slot]

    def replace(n: int, g: torch.Tensor | None) -> tuple:
        out: list = [None] * n
        if g is None:
            return tuple(out)
        zg = torch.mul(g, _exact(graph, resolver, (i, 0), i, g))  # (z is dropped at once)
        resolver.forget((i, 0))
        v = _exact(graph, resolver, edge, i, g)
        resolver.forget(edge)
        q = zg.div_(v)  # (in place: one tensor of the output's size, not three)
        if not (q.is_cpu and math.isfinite(q.sum())):  # (a zero in v: one pass tells, on the CPU)
            zg = torch.mul(g, _exact(graph, resolver, (i, 0), i, g))
            resolver.forget((i, 0))
            if zg.masked_fill(v != 0, 0).any():  # relevance on an input value of 0: no g has it
                raise _NoValue(f"relevance reaches an input value of 0 at {gn.name}")
            q = zg.div_(torch.where(v == 0, torch.ones_like(v), v))
        out[slot] = q
        return tuple(out)

    return replace


def _adjoint(graph: Graph, resolver: Resolver, i: int, eps: float | None):
    """The replacement of node ``i``'s backward for a rule that maps by the op's affine adjoint (a
    normalisation with its statistics held constant): input 0 gets ``J_c^T (g * z / stab(z))``
    (``J_c^T g`` without ``eps``)."""
    gn = graph.nodes[i]

    def replace(n: int, g: torch.Tensor | None) -> tuple:
        out: list = [None] * n
        if g is not None:
            s = g if eps is None else _stabilized(graph, resolver, i, g, eps)
            affine = gn.entry.affine(gn.fn, 0)
            out[0] = affine.adjoint(s, affine.weight.detach())
        return tuple(out)

    return replace


def _stabilized(graph: Graph, resolver: Resolver, i: int, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``g * z / stab(z)`` for node ``i``'s output ``z`` (a new tensor; ``z`` leaves the memo).
    ``g * z`` is 0 where ``z`` is, so the sign ``stab(0)`` takes is idle."""
    z = _exact(graph, resolver, (i, 0), i, g)
    s = torch.mul(g, z).div_(stabilize(z, eps, zeros_idle=True))
    resolver.forget((i, 0))
    return s


def _exact(graph: Graph, resolver: Resolver, edge: Edge, requester: int, g: torch.Tensor) -> torch.Tensor:
    """``edge``'s value, exact wherever ``g`` (of the value's shape) is not 0; 0 elsewhere, so
    that ``g * v`` is 0 there."""
    v = resolver.value(edge, requester)
    if v.exact:
        return v.tensor
    consumers = graph.nodes[edge[0]].consumers
    if (edge == (requester, 0) and type(v) is ClippedValue and len(consumers) == 1
            and v.source == (consumers[0][0], 0)):
        # the node's output seen through its only consumer, a clipping op whose backward zeroes
        # g where it clipped: the unknown entries read 0 there
        return v.tensor
    if g.shape == v.mask.shape and not g.masked_fill(v.mask, 0).any():
        return v.tensor.masked_fill(~v.mask, 0)
    v = resolver.exact(edge, requester)
    if not v.exact:
        raise _NoValue(f"the output of {graph.nodes[edge[0]].name} is known only in part")
    return v.tensor

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

The engine takes this path where every rule that relevance reaches has a gradient form, the
values are in a dtype relevance is carried in (float16: autograd would carry ``g`` in float16),
no seed sits on an output value of 0 (``R = 0 * g`` has no ``g``), no other call is propagating
the same graph, the graph is under :data:`MAX_ELEMENTS` values if that is set, and the path is
worth it (:func:`worth`: a large graph whose values mostly pass stabilising hooks, a CNN under the
epsilon rule, is faster on the Python traversal); else the Python traversal
(:meth:`dynlrp.engine.LRP._propagate`). On small graphs the per-node bookkeeping of the Python
traversal is most of the call; on the transformers autograd's engine saves the rules' passes over
each layer's output (their matrix products are their backward as it is). Memory: each hook's
values leave the resolver's memo once used, and a hook that replaces a backward writes into the
gradient that backward just made (:func:`_scratch`), so it holds no more than the backward; the
saved tensors stay for the pass (the hooks read them: ``retain_graph=True``) and a call without
``retain_graph`` frees them when it ends, or, over :data:`SETTLE_ELEMENTS` and where that lowers the
pass's peak (:func:`may_settle`), node by node as it goes (as the Python traversal does). If a hook
cannot get a value it needs, or autograd's pass fails otherwise, the call starts over on the Python
traversal, which gives the relevance or the typed error; after a pass that freed values on the way
it may not, and the error says so (a pass first checks what it can, :func:`_settles`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from .graph import Edge, Graph
from .rules import Gradient, stabilize
from .values import Resolver

#: Off: every call takes the Python traversal (the tests compare the two).
ENABLED = True
#: Graphs whose forward values hold this many elements or more in all take the Python traversal
#: (None, the default: no limit; the tests set 0 to take the Python traversal everywhere). On the
#: transformers of benchmarks/compare.py autograd's engine is the faster, with the Python
#: traversal's extra peak memory (docs/performance.md).
MAX_ELEMENTS: int | None = None
#: Graphs whose values hold fewer elements than this in all take autograd's engine wherever they
#: can: there the Python traversal's bookkeeping per node is most of the call (:func:`worth`).
SMALL_ELEMENTS = 1 << 20
#: Larger graphs take it unless the nodes whose hook stabilises (``g * z / stab(z)``) hold more
#: than this share of the values (:func:`worth`).
STABILISED_SHARE = 0.25
#: Graphs whose values hold this many elements or more in all may be freed as autograd's pass goes
#: (a post-hook per node settles it, :meth:`Resolver.done <dynlrp.values.Resolver.done>`);
#: smaller ones are freed at its end (:meth:`Resolver.free_all <dynlrp.values.Resolver.free_all>`).
SETTLE_ELEMENTS = 1 << 20
#: ... where freeing as it goes lowers the pass's estimated peak by this share of the graph's values
#: or more (:func:`may_settle`): the hooks cost ~25 us a node, 5-14 ms on the transformers at batch 1,
#: whose estimated saving is 0.1-1.5% (VGG16's 22%). Measured, settling lowered the explanation's
#: peak of ViT-B/16 at batch 1 by 9 MiB and of BERT, Llama and ViT-B/16 at batch 8 by under
#: 0.1 MiB (docs/performance.md).
SETTLE_SHARE = 1 / 16


_BUSY = "dynlrp: propagating"  # key in a root node's (public) ``metadata`` during a call
_busy_lock = threading.Lock()


class _NoValue(Exception):
    """A hook could not get an exact value it needs (the call falls back)."""


class Failed(Exception):
    """Autograd's pass failed (its ``__cause__`` says why): the Python traversal starts over. It
    can where nothing was freed yet; a pass that settles as it goes (over
    :data:`SETTLE_ELEMENTS`) checks first what it can (:func:`_settles`)."""


def eligible(graph: Graph, outputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor]) -> bool:
    """Whether the call may run on autograd's engine, its rules aside: values in a dtype relevance is
    carried in (and under :data:`MAX_ELEMENTS` in all, if set), no seed on an output value of 0,
    and no other call propagating the same graph on autograd's engine."""
    if not ENABLED or not graph.fits(MAX_ELEMENTS) or _busy(graph):
        return False
    return not any(bool(((y == 0) & (r != 0)).any()) for y, r in zip(outputs, seeds))


def worth(graph: Graph, forms: dict[int, Gradient]) -> bool:
    """Whether autograd's engine is worth taking over the Python traversal for these forms: always
    on a graph under :data:`SMALL_ELEMENTS` values, where the Python traversal's bookkeeping per
    node is most of the call; on a larger one unless the nodes whose hook stabilises hold more than
    :data:`STABILISED_SHARE` of its values. Such a hook makes the passes the Python rule makes (the
    stabiliser, the quotient, the product), and autograd's engine runs besides the backwards that the
    Python traversal skips (a ReLU's mask, a folded batch norm's scale): on a CNN under the epsilon
    rule (VGG16: 47% of the values; ResNet-50: 44%) the Python traversal was the faster, on the
    transformers under AttnLRP and CP-LRP (no stabilising hook) autograd's engine
    (docs/performance.md)."""
    if graph.fits(SMALL_ELEMENTS):
        return True
    sizes = graph.elements()
    stabilised = sum(sizes[i] for i, form in forms.items() if form.eps is not None)
    return stabilised <= STABILISED_SHARE * sum(sizes)


def may_settle(graph: Graph) -> bool:
    """Whether the graph is settled as the pass goes: large enough (:data:`SETTLE_ELEMENTS`; never
    under a :data:`MAX_ELEMENTS` no larger, which the graph already met), and freeing as it goes
    lowers the pass's peak by :data:`SETTLE_SHARE` of its values or more (:func:`settling_saves`)."""
    limit = MAX_ELEMENTS
    if (limit is not None and limit <= SETTLE_ELEMENTS) or graph.fits(SETTLE_ELEMENTS):
        return False
    sizes = graph.elements()
    return settling_saves(graph) >= SETTLE_SHARE * sum(sizes)


def settling_saves(graph: Graph) -> int:
    """By how many elements freeing as the pass goes lowers its peak, estimated from the values'
    sizes: each node, run in turn, holds the gradient it receives and makes one per input. Kept to
    the end, every saved value is still held then (the peak is the largest such step); freed as
    the pass goes, the values of the nodes already run are gone (the step less what they held).
    Large where the pass ends on large values, as a CNN's near its input; about 0 where the steps
    are alike throughout, as a transformer's layers (the first steps free nothing either way)."""
    sizes, nodes = graph.elements(), graph.nodes
    kept = settled = freed = 0
    for i in graph.order:
        gn = nodes[i]
        if gn.is_leaf:
            continue
        step = sizes[i] + sum(sizes[e[0]] for e in gn.inputs if e is not None)
        kept = max(kept, step)
        settled = max(settled, step - freed)
        freed += sizes[i]
    return kept - settled


def _busy(graph: Graph) -> bool:
    return any(graph.nodes[i].fn.metadata.get(_BUSY) for i, _ in graph.roots)


def propagate(graph: Graph, forms: dict[int, Gradient], seeds: Sequence[torch.Tensor],
              outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
              resolver: Resolver, settle: bool = False) -> list | None:
    """The relevance at ``inputs`` (None where none arrives), or None if another call is
    propagating the same graph (two calls with ``retain_graph=True``, in two threads). Raises
    :class:`Failed` if a hook could not get a value or autograd's pass failed otherwise.

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
               resolver: Resolver, settle: bool) -> list:
    nodes = graph.nodes
    handles = []
    for i, form in forms.items():
        fn = nodes[i].fn
        if form.ratio or form.adjoint:  # (the backward is replaced; autograd allows no way to skip it)
            clip = _clipping(graph, forms, i)
            replace = (_ratio(graph, resolver, i, clip) if form.ratio
                       else _adjoint(graph, resolver, i, form.eps, clip))
            handles.append(fn.register_hook(lambda grad_inputs, grad_outputs, replace=replace:
                                            replace(grad_inputs, grad_outputs[0])))
            continue
        uniform = type(form.shares) is float
        if form.eps is not None or (uniform and form.shares != 1.0):
            handles.append(fn.register_prehook(_scaling(graph, resolver, i, form.share(0) if uniform else 1.0,
                                                        form.eps, _clipping(graph, forms, i))))
        if not uniform:
            handles.append(fn.register_hook(_sharing(form.shares)))
    if settle and _settles(graph, forms, resolver):  # each node, once run (after its rule's hooks),
        for i in graph.order:  # settles as in the Python traversal
            if not nodes[i].is_leaf:
                handles.append(nodes[i].fn.register_hook(_settling(resolver, i)))
    grads = [torch.where(y == 0, torch.zeros_like(r), r / y) for y, r in zip(outputs, seeds)]
    try:
        found = torch.autograd.grad(list(outputs), list(inputs), grads, retain_graph=True, allow_unused=True)
    except Exception as exc:  # a value a hook could not get, a graph freed by a backward, a saved
        # tensor modified in place: the Python traversal starts over and gives the relevance or
        # the typed error
        raise Failed(str(exc)) from exc
    finally:
        for handle in handles:
            handle.remove()
    return [None if g is None else x.detach() * g for x, g in zip(inputs, found)]


def _scaling(graph: Graph, resolver: Resolver, i: int, share: float, eps: float | None, clip: int | None):
    """Node ``i``'s pre-hook: ``g -> share * g * z / stab(z)`` (``share * g`` without ``eps``) on
    its first output; its other outputs carry no relevance (``LRP._forms`` sees to that)."""

    def hook(grads: tuple) -> tuple | None:
        g = grads[0]
        if g is None:
            return None
        if eps is None:
            s = g * share
        else:
            s = _stabilized(graph, resolver, i, g, eps, clip)
            if share != 1.0:
                s.mul_(share)
        return (s, *grads[1:])

    return hook


def _settles(graph: Graph, forms: dict[int, Gradient], resolver: Resolver) -> bool:
    """Whether the pass may free as it goes: not where a ratio hook would find an input value of 0
    (or one it cannot get), which may fail it (``g * z / v``, where ``f(0) != 0``) once values the
    Python traversal needs to start over are freed. (The other hooks fail only where the resolver
    cannot give a value exactly, which the Python traversal's rules mostly need too; if one does
    after a free, :class:`dynlrp.LRP` says so.)"""
    nodes = graph.nodes
    for i, form in forms.items():
        gn = nodes[i]
        if form.ratio and gn.entry.quotient is None:
            edge = gn.inputs[gn.reaching[0]]
            try:
                v = resolver.value(edge, i)
                zero = not v.exact or bool((v.tensor == 0).any())
            except Exception:  # noqa: BLE001 -- (the pass will say what; the check only declines)
                return False
            resolver.forget(edge)
            if zero:
                return False
    return True


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


def _ratio(graph: Graph, resolver: Resolver, i: int, clip: int | None):
    """The replacement of node ``i``'s backward for the identity at an op that is not
    homogeneous: its one input that carries relevance gets ``g * z / v`` (``R_v = R_z``), or
    ``g * f(v) / v`` from the input alone where the op declares that quotient
    (:attr:`OpEntry.quotient <dynlrp.ops.OpEntry>`). Written into the memory of the gradient the
    op's backward just made where that is its own, so the hook holds no more than the backward."""
    gn = graph.nodes[i]
    slot = gn.reaching[0]
    edge = gn.inputs[slot]
    quotient = gn.entry.quotient

    def replace(native: tuple, g: torch.Tensor | None) -> tuple:
        out: list = [None] * len(native)
        if g is None:
            return tuple(out)
        if quotient is not None:
            v = _exact(graph, resolver, edge, i, g)
            out[slot] = quotient(gn.fn, v, _scratch(native[slot], g, v)).mul_(g)
            resolver.forget(edge)
            return tuple(out)
        q = torch.mul(g, _output(graph, resolver, i, g, clip)[0], out=_scratch(native[slot], g))
        resolver.forget((i, 0))  # (z is dropped at once)
        v = _exact(graph, resolver, edge, i, g)
        resolver.forget(edge)
        q.div_(v)
        if not (q.is_cpu and math.isfinite(q.sum())):  # (a zero in v: one pass tells, on the CPU)
            zg = torch.mul(g, _output(graph, resolver, i, g, clip)[0], out=q)
            resolver.forget((i, 0))
            if zg.masked_fill(v != 0, 0).any():  # relevance on an input value of 0: no g has it
                raise _NoValue(f"relevance reaches an input value of 0 at {gn.name}")
            q = zg.div_(torch.where(v == 0, torch.ones_like(v), v))
        out[slot] = q
        return tuple(out)

    return replace


def _scratch(native: torch.Tensor | None, g: torch.Tensor, *held: torch.Tensor) -> torch.Tensor:
    """Memory for a hook's result of ``g``'s shape: the gradient the op's backward just made
    (``native``, which the hook replaces), unless it shares memory with ``g`` or ``held`` (a
    backward that passed ``g`` on as it is, or a view of it); else a new tensor."""
    if (native is None or native.shape != g.shape or native.dtype != g.dtype or native.requires_grad
            or not native.is_contiguous()):
        return torch.empty_like(g)
    ptr = native.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == ptr for t in (g, *held)):
        return torch.empty_like(g)
    return native


def _adjoint(graph: Graph, resolver: Resolver, i: int, eps: float | None, clip: int | None):
    """The replacement of node ``i``'s backward for a rule that maps by the op's affine adjoint (a
    normalisation with its statistics held constant): input 0 gets ``J_c^T (g * z / stab(z))``
    (``J_c^T g`` without ``eps``)."""
    gn = graph.nodes[i]

    def replace(native: tuple, g: torch.Tensor | None) -> tuple:
        out: list = [None] * len(native)
        if g is not None:
            s = g if eps is None else _stabilized(graph, resolver, i, g, eps, clip)
            affine = gn.entry.affine(gn.fn, 0)
            out[0] = affine.adjoint(s, affine.weight.detach())
        return tuple(out)

    return replace


def _stabilized(graph: Graph, resolver: Resolver, i: int, g: torch.Tensor, eps: float,
                clip: int | None) -> torch.Tensor:
    """``g * z / stab(z)`` for node ``i``'s output ``z`` (a new tensor, the only one made, in four
    passes; ``z`` leaves the memo), with :func:`~dynlrp.rules.stabilize`'s ``stab(z) = z +
    copysign(eps, z)``: 0 where ``z`` is (there ``g * z`` is 0, whatever sign ``stab(0)`` takes).
    Where ``z`` is seen through a ReLU, ``stab(z) = z + eps``: three passes."""
    z, nonnegative = _output(graph, resolver, i, g, clip)
    s = stabilize(z, eps, nonnegative=nonnegative, zeros_idle=True)
    s = torch.div(z, s, out=s).mul_(g)
    resolver.forget((i, 0))
    return s


def _clipping(graph: Graph, forms: dict[int, Gradient], i: int) -> int | None:
    """The only consumer of node ``i``'s output if its backward is its own (no hook): then where
    it is a clipping op (a ReLU), ``g`` at ``i``'s output is 0 wherever it clipped, and its saved
    output shows ``i``'s output wherever ``g`` is not (:meth:`Resolver.seen_through
    <dynlrp.values.Resolver.seen_through>`)."""
    consumers = graph.nodes[i].consumers
    if len(consumers) != 1 or consumers[0][0] in forms or graph.nodes[i].num_outputs != 1:
        return None
    return consumers[0][0]


def _output(graph: Graph, resolver: Resolver, i: int, g: torch.Tensor,
            clip: int | None) -> tuple[torch.Tensor, bool]:
    """Node ``i``'s output as :func:`_exact` gives it, and whether it is known to be nonnegative:
    where ``clip`` is its consumer whose own backward leaves ``g`` 0 wherever it clipped
    (:func:`_clipping`), the value seen through that op (a ReLU's saved output) serves without a
    test, unless the value is in the memo already."""
    edge = (i, 0)
    if clip is not None and edge not in resolver.memo:
        v = resolver.seen_through(edge, clip)
        if v is not None:
            resolver.clipped += 1
            return v.tensor, True
    return _exact(graph, resolver, edge, i, g), False


def _exact(graph: Graph, resolver: Resolver, edge: Edge, requester: int, g: torch.Tensor) -> torch.Tensor:
    """``edge``'s value, exact wherever ``g`` (of the value's shape) is not 0; 0 elsewhere, so
    that ``g * v`` is 0 there."""
    v = resolver.value(edge, requester)
    if v.exact:
        return v.tensor
    if g.shape == v.mask.shape and not g.masked_fill(v.mask, 0).any():
        return v.tensor.masked_fill(~v.mask, 0)
    v = resolver.exact(edge, requester)
    if not v.exact:
        raise _NoValue(f"the output of {graph.nodes[edge[0]].name} is known only in part")
    return v.tensor

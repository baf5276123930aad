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

The engine uses it for graphs that hold no large value (none of
:data:`~dynlrp.values.RELEASE_MIN` elements: :meth:`Graph.holds_only_small
<dynlrp.graph.Graph.holds_only_small>`), where the per-node bookkeeping of the Python traversal
(:meth:`dynlrp.engine.LRP._propagate`) is most of the call; large graphs keep the Python
traversal, which frees saved tensors as it goes (here they stay until the call returns), and
so does every graph with a node whose rule has no gradient form, a seed on an output value
of 0 (``R = 0 * g`` has no ``g``), or a dtype that relevance is carried wider than (float16:
autograd would carry ``g`` in float16). If a hook cannot get a value it needs, the call falls
back to the Python traversal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import values
from .errors import LRPError
from .graph import Graph
from .ops import ClippedValue, MissingOperand
from .rules import stabilize
from .values import Resolver

#: Off: every call takes the Python traversal (the tests compare the two).
ENABLED = True

Form = tuple[float, "float | None"]  # (share, eps) of Rule.as_gradient


class _NoValue(Exception):
    """A hook could not get the exact output it scales by (the call falls back)."""


def eligible(graph: Graph, outputs: Sequence[torch.Tensor], seeds: Sequence[torch.Tensor]) -> bool:
    """Whether the call may run on autograd's engine, its rules aside: no large value, every value
    in a dtype relevance is carried in, and no seed on an output value of 0."""
    if not ENABLED or not graph.holds_only_small(values.RELEASE_MIN):
        return False
    return not any(bool(((y == 0) & (r != 0)).any()) for y, r in zip(outputs, seeds))


def propagate(graph: Graph, forms: dict[int, Form], seeds: Sequence[torch.Tensor],
              outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
              resolver: Resolver) -> list | None:
    """The relevance at ``inputs`` (None where none arrives), or None if a hook could not get a
    value (nothing is freed then: the Python traversal can start over).

    ``forms`` holds the nodes whose rule scales the backward (``(share, eps)`` other than
    ``(1, None)``); every other node on the way is its backward as it is."""
    nodes = graph.nodes
    handles = [nodes[i].fn.register_prehook(_scaling(graph, resolver, i, share, eps))
               for i, (share, eps) in forms.items()]
    grads = [torch.where(y == 0, torch.zeros_like(r), r / y) for y, r in zip(outputs, seeds)]
    try:
        found = torch.autograd.grad(list(outputs), list(inputs), grads, retain_graph=True, allow_unused=True)
    except (_NoValue, LRPError, MissingOperand):  # (a value the hooks could not get)
        return None
    finally:
        for handle in handles:
            handle.remove()
    return [None if g is None else x.detach() * g for x, g in zip(inputs, found)]


def _scaling(graph: Graph, resolver: Resolver, i: int, share: float, eps: float | None):
    """Node ``i``'s pre-hook: ``g -> share * g * z / stab(z)`` (``share * g`` without ``eps``)."""

    def hook(grads: tuple) -> tuple | None:
        g = grads[0]
        if g is None:
            return None
        if eps is None:
            return (g * share,)
        z = _output(graph, resolver, i, g)  # (g * z is 0 where z is: the sign of stab(0) is idle)
        s = torch.mul(g, z).div_(stabilize(z, eps, zeros_idle=True))
        return (s.mul_(share) if share != 1.0 else s,)

    return hook


def _output(graph: Graph, resolver: Resolver, i: int, g: torch.Tensor) -> torch.Tensor:
    """Node ``i``'s output, exact wherever ``g`` is not 0 (0 elsewhere, so ``g * z`` is 0 there)."""
    edge = (i, 0)
    v = resolver.value(edge, i)
    if v.exact:
        return v.tensor
    consumers = graph.nodes[i].consumers
    if type(v) is ClippedValue and len(consumers) == 1 and v.source == (consumers[0][0], 0):
        # seen through its only consumer, a clipping op, whose backward zeroes g where it clipped
        return v.tensor
    if not g.masked_fill(v.mask, 0).any():
        return v.tensor.masked_fill(~v.mask, 0)
    v = resolver.exact(edge, i)
    if not v.exact:
        raise _NoValue(f"the output of {graph.nodes[i].name} is known only in part")
    return v.tensor

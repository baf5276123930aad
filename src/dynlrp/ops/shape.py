"""Shape, indexing and joining ops: relevance is routed, never reshaped by value.

Kind ``route``: the default rule moves relevance exactly where the op moved values (the
node's own adjoint, which for these 0/1 maps is a permutation, selection or copy-sum;
paper 7.1); contract ``route``. Forward closures replay them inside Promise branches;
inverses undo the invertible ones (view, permute, transpose, (un)squeeze) exactly.
"""

from __future__ import annotations

import torch

from ..saved import saved, saved_dim
from . import MissingOperand, PlacedValue, Value, register
from .common import out_shape


def _in_shape(node):
    return torch.Size(saved(node, "self_sym_sizes"))


def _reshape_inverse(node, out, xs):
    shape = _in_shape(node)
    mask = None if out.mask is None else out.mask.reshape(shape)
    return {0: Value(out.tensor.reshape(shape), mask)}


def _apply_inverse(fn):
    def inverse(node, out, xs):
        mask = None if out.mask is None else fn(node, out.mask)
        return {0: Value(fn(node, out.tensor), mask)}

    return inverse


def _route(names, forward, inverse=None):
    register(names, "route", "route", forward=forward, inverse=inverse)


_reshape = lambda n, xs: xs[0].reshape(out_shape(n))  # noqa: E731
_route(("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0",
        "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "FlattenBackward0"),
       _reshape, _reshape_inverse)


def _inverse_perm(dims):
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d % len(dims)] = i
    return inv


_route("PermuteBackward0", lambda n, xs: xs[0].permute(saved_dim(n, "dims")),
       _apply_inverse(lambda n, t: t.permute(_inverse_perm(saved_dim(n, "dims")))))
_transpose = lambda n, t: t.transpose(saved_dim(n, "dim0"), saved_dim(n, "dim1"))  # noqa: E731
_route("TransposeBackward0", lambda n, xs: _transpose(n, xs[0]), _apply_inverse(_transpose))
_route("TransposeBackward1", lambda n, xs: _transpose(n, xs[0]), _apply_inverse(_transpose))
_route("TBackward0", lambda n, xs: xs[0].t(), _apply_inverse(lambda n, t: t.t()))
_route("UnsqueezeBackward0", lambda n, xs: xs[0].unsqueeze(saved_dim(n)),
       _apply_inverse(lambda n, t: t.squeeze(saved_dim(n))))
_route(("ExpandBackward0", "ExpandAsBackward0"), lambda n, xs: xs[0].expand(out_shape(n)))


def _slice(node, x):
    # start and end are saved as unsigned 64-bit integers: read them like dims (signed).
    dim = saved_dim(node)
    index = [slice(None)] * (dim % x.dim()) + [slice(saved_dim(node, "start"), saved_dim(node, "end"),
                                                     saved(node, "step"))]
    return x[tuple(index)]


def _index(node, x):
    # autograd saves ``None`` for the dims that are not indexed (``x[:, idx]``): a full slice,
    # not a new axis.
    return x[tuple(slice(None) if i is None else i for i in saved(node, "indices"))]


def _placed_inverse(select):
    """The inverse of a selection: the input, known where it was selected (a partial value).
    Consumers that select different parts of one tensor together rebuild all of it."""

    def inverse(node, out, xs):
        return {0: PlacedValue(_in_shape(node), lambda t: select(node, t), out.tensor, out.mask)}

    return inverse


_select = lambda n, t: t.select(saved_dim(n), saved_dim(n, "index"))  # noqa: E731
_route("SliceBackward0", lambda n, xs: _slice(n, xs[0]), _placed_inverse(_slice))
_route("SelectBackward0", lambda n, xs: _select(n, xs[0]), _placed_inverse(_select))
_route("IndexBackward0", lambda n, xs: _index(n, xs[0]))
_route("IndexSelectBackward0", lambda n, xs: xs[0].index_select(saved_dim(n), saved(n, "index")))
_route("GatherBackward0", lambda n, xs: xs[0].gather(saved_dim(n), saved(n, "index")))
_route("RepeatBackward0", lambda n, xs: xs[0].repeat(saved(n, "repeats")))
_route("FlipBackward0", lambda n, xs: xs[0].flip(saved_dim(n, "dims")))
_route("RollBackward0", lambda n, xs: xs[0].roll(saved_dim(n, "shifts"), saved_dim(n, "dims")))


def _all(node, xs, what):
    if any(x is None for x in xs):
        raise MissingOperand(f"a {what} input of {node.name()} that is not in the graph")
    return xs


_route("CatBackward0", lambda n, xs: torch.cat(_all(n, xs, "concatenated"), saved_dim(n)))
_route("StackBackward0", lambda n, xs: torch.stack(_all(n, xs, "stacked"), saved_dim(n)))
_route("SplitBackward0", lambda n, xs: xs[0].split(saved(n, "split_size"), saved_dim(n)))
_route("SplitWithSizesBackward0", lambda n, xs: xs[0].split(list(saved(n, "split_sizes")), saved_dim(n)))
_route("UnbindBackward0", lambda n, xs: xs[0].unbind(saved_dim(n)))

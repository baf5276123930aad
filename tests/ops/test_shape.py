"""Brute-force tests of the shape, indexing and joining op entries (src/dynlrp/ops/shape.py).

Relevance is routed: the reference is the forward's 0/1 index map, computed as a dense
matrix from the forward on basis vectors, applied in reverse (``R_x = M^T R``: copies are
summed, unselected values get nothing).
"""

from __future__ import annotations

import pytest
import torch

import dynlrp

from .helpers import (
    DT,
    Case,
    assert_close,
    case_tests,
    check_closures,
    check_conservation,
    constants,
    covered,
    randn,
    route_reference,
    route_reference_multi,
    run_lrp,
)

B = 3
const = constants(23)
C34 = const(B, 3, 2)
IDX = torch.tensor([2, 0, 2])
IDX4 = torch.tensor([3, 3, 0, 1, 3])
IDX2D = torch.tensor([[0, 2], [2, 2]])
MASK = torch.tensor([True, False, True])
GATHER2 = torch.randint(0, 4, (B, 3, 5), generator=torch.Generator().manual_seed(3))
GATHER1 = torch.randint(0, 3, (B, 2, 4), generator=torch.Generator().manual_seed(4))


def _route(cid, names, fn, shape=(B, 3, 4), **kw) -> Case:
    return Case(cid, (names,) if isinstance(names, str) else tuple(names), fn, lambda: [randn(*shape)],
                lambda v, r: [route_reference(fn, v[0], r)], **kw)


def _joined(cid, name, fn, shapes, requested, **kw) -> Case:
    return Case(cid, (name,), fn, lambda: [randn(*s) for s in shapes],
                lambda v, r: route_reference_multi(fn, v, r, requested), requested=requested, **kw)


NONCONTIG = ("UnsafeViewBackward0", "CloneBackward0", "TransposeBackward0")

CASES = [
    # views and reshapes
    _route("view", "ViewBackward0", lambda x: x.view(B, 12)),
    _route("reshape", "ViewBackward0", lambda x: x.reshape(B, 2, -1)),
    _route("flatten", "ViewBackward0", lambda x: x.flatten(1)),
    _route("reshape-noncontiguous", NONCONTIG, lambda x: x.transpose(1, 2).reshape(B, 12)),
    _route("flatten-noncontiguous", NONCONTIG, lambda x: x.transpose(1, 2).flatten(1)),
    _route("reshape-alias", "ReshapeAliasBackward0",
           lambda x: torch.ops.aten._reshape_alias(x, (B, 12), (12, 1))),
    # permutations
    _route("permute", "PermuteBackward0", lambda x: x.permute(0, 2, 1)),
    _route("permute-negative", "PermuteBackward0", lambda x: x.permute(0, -1, -3, -2), shape=(B, 2, 3, 4)),
    _route("permute-batch", "PermuteBackward0", lambda x: x.permute(1, 2, 0), out_axis=2),
    _route("transpose", "TransposeBackward0", lambda x: x.transpose(1, 2)),
    _route("transpose-negative", "TransposeBackward0", lambda x: x.transpose(-1, -2)),
    _route("transpose-batch", "TransposeBackward0", lambda x: x.transpose(0, 1), out_axis=1),
    _route("transpose-inplace", ("TransposeBackward1", "CloneBackward0"),
           lambda x: x.clone().transpose_(1, 2)),
    _route("t", "TBackward0", lambda x: x.t(), shape=(B, 4), out_axis=1),
    # broadcasting copies
    _route("expand", "ExpandBackward0", lambda x: x.expand(B, 3, 4), shape=(B, 1, 4)),
    _route("expand-new-dim", "ExpandBackward0", lambda x: x.expand(2, B, 4), shape=(B, 4), out_axis=1),
    _route("expand-as", "ExpandBackward0", lambda x: x.expand_as(C34), shape=(B, 1, 2)),
    _route("repeat", "RepeatBackward0", lambda x: x.repeat(1, 2, 1)),
    _route("repeat-last", "RepeatBackward0", lambda x: x.repeat(1, 1, 3)),
    _route("repeat-new-dim", "RepeatBackward0", lambda x: x.repeat(2, 1, 1, 1), out_axis=1),
    # (un)squeeze
    _route("squeeze-all", "SqueezeBackward0", lambda x: x.squeeze(), shape=(B, 1, 4, 1)),
    _route("squeeze-dim", "SqueezeBackward1", lambda x: x.squeeze(1), shape=(B, 1, 4, 1)),
    _route("squeeze-negative-dim", "SqueezeBackward1", lambda x: x.squeeze(-1), shape=(B, 1, 4, 1)),
    _route("squeeze-dims", "SqueezeBackward2", lambda x: x.squeeze((1, 3)), shape=(B, 1, 4, 1)),
    _route("squeeze-inplace", ("SqueezeBackward3", "CloneBackward0"), lambda x: x.clone().squeeze_(),
           shape=(B, 1, 4, 1)),
    _route("unsqueeze", "UnsqueezeBackward0", lambda x: x.unsqueeze(1)),
    _route("unsqueeze-negative", "UnsqueezeBackward0", lambda x: x.unsqueeze(-2)),
    _route("unsqueeze-front", "UnsqueezeBackward0", lambda x: x.unsqueeze(0), out_axis=1),
    # slices and selections
    _route("slice-step", "SliceBackward0", lambda x: x[:, ::2]),
    _route("slice-range", "SliceBackward0", lambda x: x[:, 1:3]),
    _route("slice-negative", "SliceBackward0", lambda x: x[..., -3:]),
    _route("slice-start-step", "SliceBackward0", lambda x: x[:, :, 1::2]),
    _route("slice-negative-end", "SliceBackward0", lambda x: x[:, 1:-1]),
    _route("slice-negative-start-step", "SliceBackward0", lambda x: x[..., -3::2]),
    _route("narrow", "SliceBackward0", lambda x: x.narrow(2, 1, 2)),
    _route("select", "SelectBackward0", lambda x: x[:, 1]),
    _route("select-negative", "SelectBackward0", lambda x: x.select(-1, -1)),
    _route("select-negative-index", "SelectBackward0", lambda x: x[:, -2]),
    # advanced indexing (duplicates: copies sum their relevance)
    _route("index-duplicates", "IndexBackward0", lambda x: x[:, IDX]),
    _route("index-last-dim", "IndexBackward0", lambda x: x[:, :, IDX4]),
    _route("index-ellipsis", "IndexBackward0", lambda x: x[..., IDX4]),
    _route("index-2d-tensor", "IndexBackward0", lambda x: x[:, IDX2D]),
    _route("index-bool-mask", "IndexBackward0", lambda x: x[:, MASK]),
    _route("index-two-tensors", "IndexBackward0", lambda x: x[:, IDX, IDX4[:3]]),
    _route("index-batch-dim", "IndexBackward0", lambda x: x[torch.tensor([0, 2, 2, 1])], in_axes=None),
    _route("index-select", "IndexSelectBackward0", lambda x: x.index_select(1, IDX)),
    _route("index-select-negative", "IndexSelectBackward0", lambda x: x.index_select(-1, IDX4)),
    _route("gather", "GatherBackward0", lambda x: x.gather(2, GATHER2)),
    _route("gather-dim1", "GatherBackward0", lambda x: x.gather(1, GATHER1)),
    _route("gather-negative-dim", "GatherBackward0", lambda x: x.gather(-1, GATHER2)),
    # reorderings
    _route("flip", "FlipBackward0", lambda x: x.flip(1)),
    _route("flip-two-dims", "FlipBackward0", lambda x: x.flip(-1, 1)),
    _route("roll", "RollBackward0", lambda x: x.roll(1, 1)),
    _route("roll-two-dims", "RollBackward0", lambda x: x.roll((1, -2), (1, 2))),
    _route("roll-flat", "RollBackward0", lambda x: x.roll(3), in_axes=None),
    # splits (one output explained here; all outputs at once below)
    _route("split", "SplitBackward0", lambda x: x.split(2, 2)[1]),
    _route("split-uneven", "SplitBackward0", lambda x: x.split(3, -1)[1]),
    _route("chunk", "SplitBackward0", lambda x: x.chunk(3, 1)[0]),
    _route("split-with-sizes", "SplitWithSizesBackward0", lambda x: x.split([1, 3], -1)[1]),
    _route("split-with-sizes-dim1", "SplitWithSizesBackward0", lambda x: x.split([2, 1], 1)[0]),
    _route("unbind", "UnbindBackward0", lambda x: x.unbind(1)[2]),
    _route("unbind-negative", "UnbindBackward0", lambda x: x.unbind(-1)[0]),
    # joins
    _joined("cat", "CatBackward0", lambda a, b: torch.cat([a, b], 1), [(B, 3, 4), (B, 2, 4)], (0, 1),
            in_axes=(0, 0)),
    _joined("cat-negative-dim", "CatBackward0", lambda a, b: torch.cat([a, b], -1), [(B, 3, 4), (B, 3, 2)],
            (0, 1), in_axes=(0, 0)),
    _joined("cat-batch-dim", "CatBackward0", lambda a, b: torch.cat([a, b]), [(B, 3), (2, 3)], (0, 1),
            in_axes=None),
    _joined("stack", "StackBackward0", lambda a, b: torch.stack([a, b], 1), [(B, 4), (B, 4)], (0, 1),
            in_axes=(0, 0)),
    _joined("stack-front", "StackBackward0", lambda a, b: torch.stack([a, b]), [(B, 4), (B, 4)], (0, 1),
            in_axes=(0, 0), out_axis=1),
    _joined("stack-one-requested", "StackBackward0", lambda a, b: torch.stack([a, b], -1), [(B, 4), (B, 4)],
            (1,), conserve=False, in_axes=(0, 0)),
    # a constant operand takes its relevance with it, and promise mode cannot rebuild the join
    Case("cat-constant", ("CatBackward0",), lambda x: torch.cat([x, C34], -1), lambda: [randn(B, 3, 4)],
         lambda v, r: [r[..., :4]], conserve=False),  # the constant part: relevance per unit
]

INVERTIBLE = [c for c in CASES if len(c.make()) == 1
              and all(dynlrp.ops.lookup(n).inverse is not None for n in c.names)]


test_relevance, test_replay_before_frozen_layer, test_inverse_after_frozen_layer = case_tests(
    CASES, INVERTIBLE)


MULTI = {
    "split": (lambda x: x.split(2, 2), "SplitBackward0"),
    "split-with-sizes": (lambda x: x.split([1, 2, 1], -1), "SplitWithSizesBackward0"),
    "unbind": (lambda x: x.unbind(1), "UnbindBackward0"),
    "chunk": (lambda x: x.chunk(2, 0), "SplitBackward0"),
}


@pytest.mark.parametrize("which", list(MULTI))
def test_multi_output_all_outputs(which):
    """All outputs of a split explained at once: their relevance lands where each came from."""
    fn, name = MULTI[which]
    x = randn(B + 1, 3, 4)
    parts = fn(x)
    assert all(p.grad_fn.name() == name for p in parts)
    seeds = [torch.randn_like(p) for p in parts]
    (rx,) = run_lrp(list(parts), [x], seeds, retain_graph=True)  # check_closures reads the graph
    expected = sum(route_reference(lambda t, k=k: fn(t)[k], x.detach(), s) for k, s in enumerate(seeds))
    assert_close(rx, expected, f"{which}: all outputs")
    check_conservation([rx], seeds, dynlrp.ops.lookup(name).contract, which)
    with dynlrp.record() as tape:
        parts2 = fn(x)
    (recorded,) = run_lrp(list(parts2), [x], seeds, tape=tape)
    assert_close(recorded, rx, f"{which}: recorded mode")
    check_closures(list(parts))


def test_same_tensor_twice_in_cat_sums_its_copies():
    x = randn(B, 2)
    y = torch.cat([x, x * 1, x], 1)
    seed = torch.randn_like(y)
    (rx,) = run_lrp(y, [x], seed)
    assert_close(rx, seed[:, 0:2] + seed[:, 2:4] + seed[:, 4:6], "cat [x, x, x]")


def test_float32_route_keeps_dtype():
    x = randn(B, 3, 4, dtype=torch.float32)
    y = x.permute(2, 0, 1)[1:]
    (rx,) = run_lrp(y, [x], torch.ones_like(y))
    assert rx.dtype == torch.float32
    assert float(rx.sum()) == y.numel()


def test_contracts_and_kinds():
    for name in {n for c in CASES for n in c.names}:
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("route", "route"), name
    assert DT == torch.float64


COVERED = covered(CASES)


def _placed(x: torch.Tensor, select, known: torch.Tensor | None = None, shift: float = 0.0
            ) -> dynlrp.ops.Value:
    """The inverse of ``select`` (a selection of ``x``) from its output (plus ``shift``, to tell
    parts apart), as the Promise System asks for it: ``x`` known where the selection read it."""
    y = select(x)
    out = y.detach() + shift
    value = dynlrp.ops.Value(out, None if known is None else known)
    return dynlrp.ops.lookup(y.grad_fn.name()).inverse(y.grad_fn, value, [None])[0]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1)])
def test_selected_parts_merge_into_the_whole(order):
    """The query, key and value read back from a fused projection (three selections) rebuild
    it; the parts are copied into one tensor (values.merge's placed path), with the numbers and
    the mask of the general merge."""
    from dynlrp.values import merge

    x = torch.randn(3, 4, 5, requires_grad=True)
    found = None
    for i in order:
        found = merge(found, _placed(x, lambda t, i=i: t.select(0, i)))
    assert found.exact and torch.equal(found.tensor, x.detach())
    # two parts only: known there, and the same as merging without placement
    a, b = _placed(x, lambda t: t.select(0, 0)), _placed(x, lambda t: t[1:2])
    fast = merge(a, b)
    plain = merge(dynlrp.ops.Value(a.tensor.clone(), a.mask.clone()), dynlrp.ops.Value(b.tensor, b.mask))
    assert not fast.exact and torch.equal(fast.mask, plain.mask)
    assert torch.equal(fast.tensor[fast.mask], plain.tensor[plain.mask])


def test_a_partial_part_and_an_overlap_merge_like_the_general_merge():
    """A part known only in part (behind a ReLU) adds only what it knows, and where two parts
    overlap the value known first is kept, as in the general merge."""
    from dynlrp.values import merge

    x = torch.randn(3, 4, requires_grad=True)
    half = torch.tensor([True, False, True, False])
    first = _placed(x, lambda t: t[0:2])
    second = _placed(x, lambda t: t.select(0, 2), known=half)
    overlap = _placed(x, lambda t: t.select(0, 1), shift=1.0)  # (other numbers: which are kept?)
    plain = merge(dynlrp.ops.Value(first.tensor.clone(), first.mask.clone()),
                  dynlrp.ops.Value(second.tensor, second.mask))
    plain = merge(plain, dynlrp.ops.Value(overlap.tensor, overlap.mask))
    fast = merge(merge(first, second), overlap)
    assert torch.equal(fast.mask, plain.mask) and not fast.exact
    assert torch.equal(fast.mask[2], half)
    assert torch.equal(fast.tensor[fast.mask], plain.tensor[plain.mask])
    assert torch.equal(fast.tensor[1], x.detach()[1])

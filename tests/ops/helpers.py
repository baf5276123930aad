"""Shared machinery of the op tests: cases, brute-force references and the generic checks.

Every op entry of :mod:`dynlrp.ops` is tested by :class:`Case` objects: a tiny forward
graph that produces the op's autograd node, fresh random inputs, and an *independent*
reference for the relevance written in plain math (explicit formulas, loops, einsum, or
dense 0/1 matrices computed from the forward on basis vectors). :func:`check_case` runs
every generic check on a case:

* the autograd node names (so a test fails when torch changes the node type);
* dynlrp's relevance against the reference;
* relevance shape and dtype equal the input's;
* per-example rows never mix;
* conservation, as the entry's ``contract`` declares;
* promise mode equals recorded mode;
* the entry's closures (``forward``, ``own``, ``taps``, ``inverse``) against the true
  forward values (:func:`check_closures`);
* the default call, which frees the graph's saved tensors as it goes, equals a call with
  ``retain_graph=True`` exactly (:func:`check_released`).

:func:`check_replay` and :func:`check_inverse_chain` put the op between frozen linear maps so
that the Promise System must rebuild its values through the entry's forward and inverse
closures.

Nothing here calls dynlrp to compute a reference: references use torch's forward only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import dynlrp
from dynlrp import ops

DT = torch.float64
Tensor = torch.Tensor


# -- small math helpers ----------------------------------------------------------------------

def stab(z: Tensor, eps: float) -> Tensor:
    """The epsilon stabiliser written out: ``z + eps * sign(z)`` with ``sign(0) = +1``.

    Parameters
    ----------
    z : torch.Tensor
        Pre-activations (the forward output of a linear map, bias included).
    eps : float
        Stabiliser. With ``eps == 0`` zeros are replaced by ones (nothing is divided by 0).

    Returns
    -------
    torch.Tensor
        The stabilised denominator.
    """
    if eps == 0:
        return torch.where(z == 0, torch.ones_like(z), z)
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def randn(*shape: int, dtype: torch.dtype = DT, grad: bool = True, away: float = 0.0) -> Tensor:
    """A random leaf tensor.

    Parameters
    ----------
    *shape : int
        Its shape.
    dtype : torch.dtype
        Its dtype (float64 by default: tight tolerances).
    grad : bool
        Whether it requires grad.
    away : float
        When positive, values are pushed at least ``away`` away from zero (keeps
        denominators of proportional rules well conditioned).

    Returns
    -------
    torch.Tensor
    """
    x = torch.randn(*shape, dtype=dtype)
    if away:
        x = torch.where(x >= 0, x + away, x - away)
    return x.requires_grad_(grad)


def positive(*shape: int, grad: bool = True) -> Tensor:
    """A random leaf tensor with values in ``[0.5, 1.5)`` (sums far from zero).

    Parameters
    ----------
    *shape : int
        Its shape.
    grad : bool
        Whether it requires grad.

    Returns
    -------
    torch.Tensor
    """
    return (torch.rand(*shape, dtype=DT) + 0.5).requires_grad_(grad)


def leaf(t: Tensor, grad: bool = True) -> Tensor:
    """``t`` as a fresh leaf tensor (``requires_grad=grad``)."""
    return t.detach().clone().requires_grad_(grad)


def constants(seed: int) -> Callable[..., Tensor]:
    """A factory of reproducible float64 constants, independent of the global RNG.

    Parameters
    ----------
    seed : int
        Seed of the factory's own generator.

    Returns
    -------
    callable
        ``const(*shape, positive=False)``: standard normal values, or uniform in
        ``[0.5, 1.5)`` with ``positive=True``.
    """
    gen = torch.Generator().manual_seed(seed)

    def const(*shape: int, positive: bool = False) -> Tensor:
        if positive:
            return torch.rand(*shape, generator=gen, dtype=DT) + 0.5
        return torch.randn(*shape, generator=gen, dtype=DT)

    return const


def dense_matrix(fn: Callable[[Tensor], Tensor], shape: Sequence[int], dtype: torch.dtype = DT) -> Tensor:
    """The matrix of a linear map, from its forward applied to every basis vector.

    Parameters
    ----------
    fn : callable
        A linear function of one tensor (shape ops, selections, constant linear maps).
    shape : sequence of int
        The input's shape.
    dtype : torch.dtype
        The dtype of the basis vectors.

    Returns
    -------
    torch.Tensor
        ``M`` of shape ``(fn(x).numel(), x.numel())`` with ``fn(x).flatten() == M @ x.flatten()``.
    """
    n = math.prod(shape)
    columns = []
    with torch.no_grad():
        for k in range(n):
            e = torch.zeros(n, dtype=dtype)
            e[k] = 1
            columns.append(fn(e.reshape(tuple(shape))).reshape(-1))
    return torch.stack(columns, 1)


def route_reference(fn: Callable[[Tensor], Tensor], x: Tensor, seed: Tensor) -> Tensor:
    """Routing relevance: the forward's 0/1 index map applied in reverse, ``R_x = M^T R``.

    Parameters
    ----------
    fn : callable
        The forward, a linear 0/1 map of one tensor.
    x : torch.Tensor
        The input (only its shape and dtype are used).
    seed : torch.Tensor
        Relevance of ``fn(x)``.

    Returns
    -------
    torch.Tensor
        Relevance shaped like ``x``.
    """
    m = dense_matrix(fn, x.shape, x.dtype)
    assert set(m.unique().tolist()) <= {0.0, 1.0}, "route reference needs a 0/1 map"
    return (m.T @ seed.reshape(-1).to(m.dtype)).reshape(x.shape)


def epsilon_dense(m: Tensor, x: Tensor, bias: Tensor | float, r: Tensor, eps: float) -> Tensor:
    """Epsilon rule of a batch of affine maps given as one dense matrix per example.

    ``z[b, j] = sum_i m[j, i] x[b, i] + bias[j]`` and
    ``R_x[b, i] = sum_j x[b, i] m[j, i] R[b, j] / (z[b, j] + eps * sign(z[b, j]))``.

    Parameters
    ----------
    m : torch.Tensor
        ``(out, in)`` matrix shared by the examples.
    x : torch.Tensor
        ``(batch, in)`` inputs.
    bias : torch.Tensor or float
        ``(out,)`` bias (0 for none).
    r : torch.Tensor
        ``(batch, out)`` output relevance.
    eps : float
        Stabiliser.

    Returns
    -------
    torch.Tensor
        ``(batch, in)`` input relevance.
    """
    z = torch.einsum("ji,bi->bj", m, x) + bias
    return torch.einsum("bi,ji,bj->bi", x, m, r / stab(z, eps))


# -- the generic checks ----------------------------------------------------------------------

def assert_close(actual: Tensor, expected: Tensor, what: str = "", rtol: float = 1e-7,
                 atol: float = 1e-9) -> None:
    """``torch.testing.assert_close`` in float64 with a message.

    Parameters
    ----------
    actual, expected : torch.Tensor
        Compared after casting to float64 (shapes must match).
    what : str
        Prepended to the failure message.
    rtol, atol : float
        Tolerances.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.detach().to(DT), expected.detach().to(DT), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def grad_fn_chain(y: Tensor, depth: int) -> list[str]:
    """Names of the autograd nodes from ``y`` downwards, following each node's first edge to a
    non-leaf node (leaves end the chain).

    Parameters
    ----------
    y : torch.Tensor
        A tensor with a ``grad_fn``.
    depth : int
        How many names to return at most.

    Returns
    -------
    list of str
    """
    names, fn = [], y.grad_fn
    while fn is not None and _leaf(fn) is None and len(names) < depth:
        names.append(fn.name())
        edges = [c for c, _ in fn.next_functions if c is not None and _leaf(c) is None]
        fn = edges[0] if edges else None
    return names


def graph_nodes(y: Tensor | Sequence[Tensor]) -> list[Any]:
    """Every autograd node reachable from ``y`` (children after parents, leaves included).

    Parameters
    ----------
    y : torch.Tensor or sequence of torch.Tensor
        Outputs of a forward pass.

    Returns
    -------
    list
        The autograd nodes.
    """
    ys = [y] if isinstance(y, Tensor) else list(y)
    seen: dict[Any, None] = {}
    stack = [t.grad_fn for t in ys if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen[fn] = None
        stack.extend(c for c, _ in fn.next_functions if c is not None)
    return list(seen)


def run_lrp(y: Any, xs: Sequence[Tensor], seed: Any, rules: Any = None,
            tape: Any = None, retain_graph: bool = False) -> tuple[Tensor, ...]:
    """``dynlrp.lrp`` with the arguments the tests use.

    ``retain_graph=True`` keeps ``y``'s graph for a later use (another call, reading saved
    tensors); by default the call frees it as it propagates.

    Returns
    -------
    tuple of torch.Tensor
        One relevance per requested input.
    """
    return dynlrp.lrp(y, list(xs), seed, rules=rules, tape=tape, retain_graph=retain_graph)


def check_shape_dtype(rels: Sequence[Tensor], xs: Sequence[Tensor]) -> None:
    """Relevance has the shape and dtype of its input.

    Parameters
    ----------
    rels : sequence of torch.Tensor
        Relevance, one per input.
    xs : sequence of torch.Tensor
        The inputs.
    """
    assert len(rels) == len(xs)
    for r, x in zip(rels, xs):
        assert r.shape == x.shape, f"relevance shape {tuple(r.shape)} != input shape {tuple(x.shape)}"
        assert r.dtype == x.dtype, f"relevance dtype {r.dtype} != input dtype {x.dtype}"


def check_conservation(rels: Sequence[Tensor], seeds: Sequence[Tensor], contract: str,
                       what: str = "") -> None:
    """Total input relevance equals total seed relevance (contracts ``exact``, ``bias``, ``route``).

    Call it only where the contract promises exact conservation: every operand that takes
    relevance is requested, and (``bias``) the bias is zero and the stabiliser negligible.

    Parameters
    ----------
    rels : sequence of torch.Tensor
        Input relevance.
    seeds : sequence of torch.Tensor
        Output relevance.
    contract : str
        The entry's declared contract.
    what : str
        Prepended to the failure message.
    """
    assert contract in ("exact", "bias", "route"), f"{what}: contract {contract!r} promises no conservation"
    total_in = sum(float(r.to(DT).sum()) for r in rels)
    total_out = sum(float(s.to(DT).sum()) for s in seeds)
    scale = max(1.0, sum(float(s.to(DT).abs().sum()) for s in seeds))
    tol = 1e-8 if contract == "bias" else 1e-10
    if any(t.dtype != DT for t in (*rels, *seeds)):
        tol = 1e-5  # relevance of a float32 input is rounded to float32
    assert abs(total_in - total_out) <= tol * scale, (
        f"{what}: contract {contract!r} broken: inputs get {total_in!r}, outputs had {total_out!r}")


# -- cases ------------------------------------------------------------------------------------

Reference = Callable[[list[Tensor], Tensor], list[Tensor]]


@dataclass
class Case:
    """One tiny forward graph for one (or a few) op entries.

    Attributes
    ----------
    id : str
        Test id.
    names : tuple of str
        Expected autograd node names from the output downwards, following first edges to
        non-leaf nodes (``names[0] == y.grad_fn.name()``). All of them count as covered.
    fn : callable
        ``fn(*inputs) -> tensor``: the forward.
    make : callable
        ``make() -> list of leaf tensors``: fresh random inputs.
    reference : callable
        ``reference(values, seed) -> list``: the independent relevance of each requested
        input, from detached input values and the output relevance.
    requested : tuple of int
        Which inputs to explain (the others are frozen or trainable parameters).
    rules : dict or None
        ``rules=`` for dynlrp.
    conserve : bool
        Whether the setup makes the entry's contract promise exact conservation (every
        operand that takes relevance requested, zero bias, negligible stabiliser).
    in_axes : tuple of (int or None)
        Batch axis of each input (``None``: not batched). ``None`` skips the batch test.
    out_axis : int or None
        Batch axis of the output.
    seed : callable or None
        ``seed(y) -> tensor``; default standard normal.
    replay : str
        What happens when a frozen linear map follows the op (:func:`check_replay`):
        ``"ok"`` (promise mode rebuilds the op's output), ``"per-unit"`` (it cannot, but the
        rules pass relevance per unit of that output, so promise mode still equals recorded
        mode), ``"unrecoverable"`` (promise mode must raise
        :class:`dynlrp.UnrecoverableValueError`) or ``"skip"``.
    tol : float
        Relative tolerance of the reference comparison.
    op : str or None
        The entry whose contract the conservation check uses (default ``names[0]``).
    xfail : dict of str to str
        Known bugs outside the op entries: ``{check: reason}`` marks the test of that check
        (``"relevance"``: :func:`check_case`, ``"replay"``: :func:`check_replay`,
        ``"inverse"``: :func:`check_inverse_chain`) ``xfail(strict=True)``.
    """

    id: str
    names: tuple[str, ...]
    fn: Callable[..., Tensor]
    make: Callable[[], list[Tensor]]
    reference: Reference
    requested: tuple[int, ...] = (0,)
    rules: dict | None = None
    conserve: bool = True
    in_axes: tuple[int | None, ...] | None = (0,)
    out_axis: int | None = 0
    seed: Callable[[Tensor], Tensor] | None = None
    replay: str = "ok"
    tol: float = 1e-7
    op: str | None = None
    xfail: dict[str, str] = field(default_factory=dict)

    @property
    def contract(self) -> str:
        """The declared contract of the op under test (``op``, default ``names[0]``)."""
        entry = ops.lookup(self.op or self.names[0])
        assert entry is not None, f"{self.id}: no op entry for {self.op or self.names[0]}"
        return entry.contract

    def __repr__(self) -> str:
        return f"Case({self.id})"


def params(cases: Sequence[Case], check: str = "relevance") -> list[Any]:
    """Cases as ``pytest.param`` objects, marked ``xfail(strict=True)`` where the case says so.

    Parameters
    ----------
    cases : sequence of Case
    check : str
        ``"relevance"`` (:func:`check_case`), ``"replay"`` (:func:`check_replay`) or
        ``"inverse"`` (:func:`check_inverse_chain`).

    Returns
    -------
    list
        Arguments for ``pytest.mark.parametrize("case", ...)``.
    """
    out = []
    for case in cases:
        reason = case.xfail.get(check)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def covered(*case_lists: Sequence[Case]) -> set[str]:
    """Every autograd node name the cases assert they produce.

    Parameters
    ----------
    *case_lists : sequence of Case

    Returns
    -------
    set of str
    """
    return {name for cases in case_lists for case in cases for name in case.names}


def detached(inputs: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Detached copies of the inputs (``None`` stays ``None``)."""
    return [None if x is None else x.detach() for x in inputs]


def make_seed(case: Case, y: Tensor) -> Tensor:
    """The case's seed for output ``y``."""
    return case.seed(y) if case.seed is not None else torch.randn_like(y)


def forward(case: Case, inputs: Sequence[Tensor]) -> Tensor:
    """Run the case's forward and check the autograd node names.

    Returns
    -------
    torch.Tensor
        The output.
    """
    y = case.fn(*inputs)
    got = grad_fn_chain(y, len(case.names))
    assert tuple(got) == case.names, f"{case.id}: torch built {got}, the test expects {list(case.names)}"
    return y


def _splice(fresh: Tensor, old: Tensor, axis: int) -> Tensor:
    """``old`` with every row but the first (along ``axis``) taken from ``fresh``."""
    out = fresh.detach().clone()
    out.narrow(axis, 0, 1).copy_(old.detach().narrow(axis, 0, 1))
    return out


def check_batch_rows(case: Case, inputs: list[Tensor], seed: Tensor, rels: Sequence[Tensor]) -> None:
    """Relevance of example 0 does not change when the other examples (and their seeds) change.

    Parameters
    ----------
    case : Case
    inputs : list of torch.Tensor
        The inputs of the first run.
    seed : torch.Tensor
        Its seed.
    rels : sequence of torch.Tensor
        Its relevance, one per requested input.
    """
    if case.in_axes is None or case.out_axis is None:
        return
    fresh = case.make()
    new = []
    for x, f, axis in zip(inputs, fresh, case.in_axes):
        new.append(x if axis is None else _splice(f, x, axis).requires_grad_(x.requires_grad))
    y = forward(case, new)
    seed2 = _splice(make_seed(case, y), seed, case.out_axis)
    rels2 = run_lrp(y, [new[i] for i in case.requested], seed2, case.rules)
    for k, i in enumerate(case.requested):
        axis = case.in_axes[i]
        if axis is None:
            continue
        assert_close(rels2[k].narrow(axis, 0, 1), rels[k].narrow(axis, 0, 1),
                     f"{case.id}: example 0 of input {i} changed with the other examples")


def check_recorded(case: Case, inputs: list[Tensor], seed: Tensor, expected: Sequence[Tensor]) -> None:
    """Recorded mode (``dynlrp.record()`` + ``tape=``) gives the promise-mode relevance.

    Parameters
    ----------
    case : Case
    inputs : list of torch.Tensor
    seed : torch.Tensor
    expected : sequence of torch.Tensor
        Promise-mode relevance.
    """
    with dynlrp.record() as tape:
        y = case.fn(*inputs)
    rels = run_lrp(y, [inputs[i] for i in case.requested], seed, case.rules, tape=tape)
    for k, (r, e) in enumerate(zip(rels, expected)):
        assert_close(r, e, f"{case.id}: recorded mode != promise mode (input {case.requested[k]})",
                     rtol=1e-9, atol=1e-12)


def check_case(case: Case) -> None:
    """Every generic check of one case (see the module docstring).

    Parameters
    ----------
    case : Case
    """
    inputs = case.make()
    y = forward(case, inputs)
    seed = make_seed(case, y)
    requested = [inputs[i] for i in case.requested]
    rels = run_lrp(y, requested, seed, case.rules, retain_graph=True)  # check_closures reads y's graph
    check_shape_dtype(rels, requested)
    expected = case.reference(detached(inputs), seed.detach())
    assert len(expected) == len(rels)
    for k, (r, e) in enumerate(zip(rels, expected)):
        assert_close(r, e, f"{case.id}: relevance of input {case.requested[k]} != reference",
                     rtol=case.tol, atol=case.tol * 1e-2)
    if case.conserve:
        check_conservation(rels, [seed], case.contract, case.id)
    check_recorded(case, inputs, seed, rels)
    check_batch_rows(case, inputs, seed, rels)
    check_closures(y)
    check_released(case, y, requested, seed, rels)


def check_released(case: Case, y: Tensor, requested: Sequence[Tensor], seed: Tensor,
                   expected: Sequence[Tensor]) -> None:
    """The default call (``retain_graph=False``, saved tensors freed as it goes) gives exactly
    the relevance of a call that kept the graph. Uses ``y``'s graph up: call it last.

    Parameters
    ----------
    case : Case
    y : torch.Tensor
        The output whose graph ``expected`` came from (still retained).
    requested : sequence of torch.Tensor
        The requested inputs.
    seed : torch.Tensor
    expected : sequence of torch.Tensor
        Relevance of the earlier call with ``retain_graph=True``.
    """
    released = run_lrp(y, requested, seed, case.rules)
    assert len(released) == len(expected)
    for k, (r, e) in enumerate(zip(released, expected)):
        assert torch.equal(r, e), (
            f"{case.id}: relevance of input {case.requested[k]} differs when the graph is freed as "
            f"it goes (retain_graph=False): max abs diff {float((r.to(DT) - e.to(DT)).abs().max())!r}")


# -- the entry closures against true values --------------------------------------------------

def _leaf(fn: Any) -> Tensor | None:
    return getattr(fn, "variable", None)


def true_values(y: Tensor | Sequence[Tensor]) -> dict[Any, tuple[Tensor, ...] | None]:
    """Forward values of every node of ``y``'s graph, replayed bottom-up with the entries'
    ``forward`` closures from the leaves (``None`` where a closure lacks an operand).

    Parameters
    ----------
    y : torch.Tensor or sequence of torch.Tensor

    Returns
    -------
    dict
        ``{autograd node: tuple of its forward outputs}``.
    """
    values: dict[Any, tuple[Tensor, ...] | None] = {}

    def value(fn: Any) -> tuple[Tensor, ...] | None:
        if fn in values:
            return values[fn]
        leaf = _leaf(fn)
        if leaf is not None:
            values[fn] = (leaf.detach(),)
            return values[fn]
        xs = []
        for child, k in fn.next_functions:
            if child is None:
                xs.append(None)
                continue
            got = value(child)
            if got is None:
                values[fn] = None
                return None
            xs.append(got[k])
        entry = ops.lookup(fn.name())
        assert entry is not None, f"no entry for {fn.name()}"
        if entry.forward is None:
            values[fn] = None
            return None
        try:
            with torch.no_grad():
                out = entry.forward(fn, xs)
        except ops.MissingOperand:
            values[fn] = None
            return None
        values[fn] = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return values[fn]

    for fn in graph_nodes(y):
        value(fn)
    return values


def check_closures(y: Tensor | Sequence[Tensor], allow_missing: bool = True) -> None:
    """Check every entry's closures in ``y``'s graph against the true forward values.

    * ``forward`` replayed from the leaves reproduces each output ``y``;
    * ``own(node)``, when not ``None``, equals the node's replayed output;
    * ``taps(node)[i]`` equals the value of input ``i``;
    * ``inverse(node, output, other inputs)[i]`` equals input ``i`` where its mask is true.

    Parameters
    ----------
    y : torch.Tensor or sequence of torch.Tensor
        Outputs of a forward pass.
    allow_missing : bool
        Whether a forward closure may raise :class:`dynlrp.ops.MissingOperand` (an operand
        autograd neither saved nor put in the graph).
    """
    ys = [y] if isinstance(y, Tensor) else list(y)
    values = true_values(ys)
    for t in ys:
        got = values[t.grad_fn]
        if got is None:
            assert allow_missing, f"forward closure of {t.grad_fn.name()} could not replay"
            continue
        assert_close(got[t.output_nr], t, f"{t.grad_fn.name()}: forward closure replay != true output",
                     rtol=1e-6, atol=1e-9)
    for fn, out in values.items():
        if _leaf(fn) is not None or out is None:
            continue
        entry = ops.lookup(fn.name())
        own = entry.own(fn)
        if own is not None:
            assert_close(own, out[0], f"{fn.name()}: own() != forward output", rtol=1e-6, atol=1e-9)
        inputs = []
        for child, k in fn.next_functions:
            cv = None if child is None else values.get(child)
            inputs.append(None if cv is None else cv[k])
        for slot, tapped in entry.taps(fn).items():
            if inputs[slot] is not None:
                assert_close(tapped, inputs[slot], f"{fn.name()}: taps()[{slot}] != input value")
        if entry.inverse is None:
            continue
        for slot, x in enumerate(inputs):
            if x is None:
                continue
            others = [None if s == slot else v for s, v in enumerate(inputs)]
            got = entry.inverse(fn, ops.Value(out[0]), others).get(slot)
            if got is None:
                continue
            mask = torch.ones_like(x, dtype=torch.bool) if got.mask is None else got.mask
            assert got.tensor.shape == x.shape, f"{fn.name()}: inverse()[{slot}] has the wrong shape"
            assert got.tensor.dtype == x.dtype, f"{fn.name()}: inverse()[{slot}] has the wrong dtype"
            assert_close(torch.where(mask, got.tensor, x), x, f"{fn.name()}: inverse()[{slot}] != input",
                         rtol=1e-6, atol=1e-9)


# -- the op between frozen linear maps: the Promise System at work ---------------------------

def frozen_matrix(n_in: int, n_out: int = 3) -> Tensor:
    """A constant (frozen, not in the graph) float64 matrix."""
    return torch.randn(n_in, n_out, dtype=DT)


def epsilon_mm(h: Tensor, w: Tensor, r: Tensor, eps: float, bias: Tensor | float = 0.0) -> Tensor:
    """Epsilon relevance of ``h`` in ``z = h @ w + bias`` (2-d ``h``), written out.

    ``R_h[b, i] = sum_j h[b, i] w[i, j] R[b, j] / (z[b, j] + eps * sign(z[b, j]))``.

    Parameters
    ----------
    h : torch.Tensor
        ``(batch, in)``.
    w : torch.Tensor
        ``(in, out)``.
    r : torch.Tensor
        ``(batch, out)`` output relevance.
    eps : float
    bias : torch.Tensor or float

    Returns
    -------
    torch.Tensor
    """
    z = h @ w + bias
    return h * ((r / stab(z, eps)) @ w.T)


HEAD_EPS = 1e-9
HEAD_RULES = {"MmBackward0": dynlrp.rules.Epsilon(HEAD_EPS), "AddmmBackward0": dynlrp.rules.Epsilon(HEAD_EPS)}


def check_replay(case: Case) -> None:
    """Put the op in front of a frozen linear map: ``y = flatten(op(x)) @ W``.

    Autograd keeps neither ``op(x)`` nor the flattened view (``W`` does not require grad),
    so promise mode must rebuild them with the entries' forward closures. The relevance is
    compared with the reference composed with the written-out epsilon rule, and with
    recorded mode. With ``case.replay == "unrecoverable"`` promise mode must raise
    :class:`dynlrp.UnrecoverableValueError` (the op's output depends on an operand
    autograd never saw) while recorded mode still matches the reference.

    Parameters
    ----------
    case : Case
    """
    if case.replay == "skip":
        pytest.skip("no replay variant for this case")
    inputs = case.make()
    h0 = forward(case, inputs)
    w = frozen_matrix(h0.numel() // h0.shape[0])

    def fn(*xs):
        h = case.fn(*xs)
        return h.reshape(h.shape[0], -1) @ w.to(h.dtype)

    h = h0.detach()
    y = fn(*inputs)
    seed = torch.randn_like(y)
    rules = {**(case.rules or {}), **HEAD_RULES}
    r_h = epsilon_mm(h.reshape(h.shape[0], -1), w.to(h.dtype), seed, HEAD_EPS).reshape(h.shape)
    expected = case.reference(detached(inputs), r_h)
    requested = [inputs[i] for i in case.requested]
    with dynlrp.record() as tape:
        y2 = fn(*inputs)
    recorded = run_lrp(y2, requested, seed, rules, tape=tape)
    for k, (r, e) in enumerate(zip(recorded, expected)):
        assert_close(r, e, f"{case.id} + frozen head, recorded mode: input {case.requested[k]}",
                     rtol=max(case.tol, 1e-6), atol=1e-9)
    if case.replay == "unrecoverable":
        with pytest.raises(dynlrp.UnrecoverableValueError, match="record"):
            run_lrp(y, requested, seed, rules)
        return
    promised = run_lrp(y, requested, seed, rules)
    for k, (r, e) in enumerate(zip(promised, recorded)):
        assert_close(r, e, f"{case.id} + frozen head: promise mode != recorded mode "
                     f"(input {case.requested[k]})", rtol=1e-9, atol=1e-12)


def check_inverse_chain(case: Case) -> None:
    """Put a frozen affine map with a frozen bias in front of a one-input op:
    ``y = op(reshape(addmm(c, x, A)))``.

    The bias ``c`` is not in the graph, so promise mode cannot replay the affine map; it
    must recover its output by inverting the op (and the reshape) from ``y``. Compared
    with the reference composed with the written-out epsilon rule and with recorded mode.

    Parameters
    ----------
    case : Case
        A case whose op has one input (``case.make()`` returns one tensor) and an ``inverse``.
    """
    (x0,) = case.make()
    shape = x0.shape
    n = x0.numel() // shape[0]
    a = torch.randn(4, n, dtype=x0.dtype)
    c = torch.randn(n, dtype=x0.dtype)
    u = randn(shape[0], 4, dtype=x0.dtype)

    def fn(u):
        return case.fn(torch.addmm(c, u, a).reshape(shape))

    y = fn(u)
    names = grad_fn_chain(y, len(case.names) + 2)
    assert tuple(names) == case.names + ("ViewBackward0", "AddmmBackward0"), names
    h = (u.detach() @ a + c).reshape(shape)
    seed = case.seed(y) if case.seed is not None else torch.randn_like(y)
    rules = {**(case.rules or {}), **HEAD_RULES}
    (r_h,) = case.reference([h], seed.detach())
    expected = epsilon_mm(u.detach().to(DT), a.to(DT), r_h.reshape(shape[0], -1).to(DT), HEAD_EPS, c.to(DT))
    # float32 anywhere in the chain: values (and a cast's inverse) are float32-exact only, and
    # a relevance that cancels to a small number keeps the rounding of the large terms that
    # cancelled: tolerated relative to the largest relevance (how the sums round depends on the
    # CPU's kernels: 1.7e-5 relative at one small entry on an AVX-512 Xeon, none on an EPYC)
    rtol = 1e-9 if {x0.dtype, y.dtype} == {DT} else 1e-5
    with dynlrp.record() as tape:
        y2 = fn(u)
    (recorded,) = run_lrp(y2, [u], seed, rules, tape=tape)
    assert_close(recorded, expected, f"{case.id} after a frozen affine map, recorded mode",
                 rtol=max(rtol, 1e-6), atol=1e-9 if rtol < 1e-6 else rtol * float(expected.abs().max()))
    (promised,) = run_lrp(y, [u], seed, rules)
    assert_close(promised, recorded, f"{case.id} after a frozen affine map: promise != recorded", rtol=rtol)


# -- windows of convolutions and pools, written as loops -------------------------------------

def window_positions(out_pos: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int],
                     dilation: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Kernel offsets and input positions (possibly outside the input) of one output position.

    Parameters
    ----------
    out_pos : sequence of int
        Output position (one int per spatial dim).
    kernel, stride, padding, dilation : sequence of int
        Per spatial dim.

    Returns
    -------
    list of (kernel offset, input position)
    """
    found = []
    for k in itertools.product(*(range(n) for n in kernel)):
        pos = tuple(o * s - p + kk * d for o, s, p, kk, d in zip(out_pos, stride, padding, k, dilation))
        found.append((k, pos))
    return found


def inside(pos: Sequence[int], size: Sequence[int]) -> bool:
    """Whether a position lies inside a grid of ``size``."""
    return all(0 <= p < s for p, s in zip(pos, size))


def flat_index(channel: int, pos: Sequence[int], size: Sequence[int]) -> int:
    """Row-major index of ``(channel, *pos)`` in a ``(C, *size)`` tensor."""
    index = channel
    for p, s in zip(pos, size):
        index = index * s + p
    return index


def conv_matrix(weight: Tensor, in_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int) -> tuple[Tensor, list[int]]:
    """The dense matrix of a (non-transposed) convolution of one example, built with loops.

    ``z[o, p] = sum_{c in group(o), k} W[o, c - first(group), k] x[c, p * stride - padding + k * dilation]``.

    Parameters
    ----------
    weight : torch.Tensor
        ``(C_out, C_in / groups, *kernel)``.
    in_size : sequence of int
        Spatial size of the input.
    stride, padding, dilation : sequence of int
    groups : int

    Returns
    -------
    (torch.Tensor, list of int)
        ``M`` of shape ``(C_out * prod(out_size), C_in * prod(in_size))`` and ``out_size``.
    """
    c_out, c_in_g, *kernel = weight.shape
    c_in = c_in_g * groups
    out_size = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                for s, p, d, k, st in zip(in_size, padding, dilation, kernel, stride)]
    rows, cols, taps = [], [], []
    per_group = c_out // groups
    for o in range(c_out):
        g = o // per_group
        for out_pos in itertools.product(*(range(n) for n in out_size)):
            row = flat_index(o, out_pos, out_size)
            for k, pos in window_positions(out_pos, kernel, stride, padding, dilation):
                if not inside(pos, in_size):
                    continue
                for ci in range(c_in_g):
                    rows.append(row)
                    cols.append(flat_index(g * c_in_g + ci, pos, in_size))
                    taps.append(flat_index(ci, k, kernel) + o * c_in_g * math.prod(kernel))
    m = torch.zeros(c_out * math.prod(out_size), c_in * math.prod(in_size), dtype=weight.dtype)
    m.index_put_((torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)),
                 weight.reshape(-1)[torch.tensor(taps, dtype=torch.long)], accumulate=True)
    return m, out_size


def route_reference_multi(fn: Callable[..., Tensor], values: Sequence[Tensor], seed: Tensor,
                          requested: Sequence[int]) -> list[Tensor]:
    """Routing relevance of a 0/1 map of several inputs (``cat``, ``stack``): ``R_i = M_i^T R``
    with ``M_i`` the map of input ``i`` when the others are zero.

    Parameters
    ----------
    fn : callable
        The forward, linear in all inputs jointly.
    values : sequence of torch.Tensor
        The inputs (shapes and dtypes are used).
    seed : torch.Tensor
        Relevance of the output.
    requested : sequence of int
        The inputs whose relevance to return.

    Returns
    -------
    list of torch.Tensor
    """
    out = []
    for i in requested:
        def only_i(t, i=i):
            return fn(*[t if j == i else torch.zeros_like(v) for j, v in enumerate(values)])

        out.append(route_reference(only_i, values[i], seed))
    return out


def case_tests(cases: list[Case], invertible: list[Case] | None = None) -> tuple:
    """The standard tests of an op module, parametrized over its cases.

    Parameters
    ----------
    cases : list of Case
        Every case of the module: relevance against the reference, and replay before a
        frozen layer (the Promise System rebuilding the op's output).
    invertible : list of Case, optional
        Cases whose entry can invert the op: checked after a frozen layer with a frozen bias.

    Returns
    -------
    tuple of callables
        ``(test_relevance, test_replay_before_frozen_layer[, test_inverse_after_frozen_layer])``
        to bind to those names in the test module, where pytest collects them.
    """

    @pytest.mark.parametrize("case", params(cases))
    def test_relevance(case):
        check_case(case)

    @pytest.mark.parametrize("case", params(cases, "replay"))
    def test_replay_before_frozen_layer(case):
        check_replay(case)

    if invertible is None:
        return test_relevance, test_replay_before_frozen_layer

    @pytest.mark.parametrize("case", params(invertible, "inverse"))
    def test_inverse_after_frozen_layer(case):
        check_inverse_chain(case)

    return test_relevance, test_replay_before_frozen_layer, test_inverse_after_frozen_layer

"""Brute-force tests of the transformer op entries and rules.

Entries: src/dynlrp/ops/math.py (pointwise math, running and norm sums, selections by value),
src/dynlrp/ops/attention.py (softmax, fused attention), src/dynlrp/ops/normalization.py
(layer and group norm), src/dynlrp/ops/embedding.py, src/dynlrp/ops/custom.py. Rules: the
transformer section of src/dynlrp/rules.py (SoftmaxDT, StopRelevance, UniformProduct,
ValuePathEpsilon, ConstantDenominator, AttnLRPAttention, CPAttention).

Every reference is written out with torch's forward only:

* pointwise functions: the identity rule, ``R_x = R``;
* ``cumsum``: ``R_x[i] = x[i] * sum_{j >= i} R[j] / y[j]``; a p-norm:
  ``R_x[i] = x[i] * (d|x|/dx_i) * R / |x|``;
* selections: the dense 0/1 map of the forward, transposed;
* softmax (AttnLRP Prop. 3.1): ``R_x = x * (R - s * sum(R))``;
* attention: the explicit decomposition ``S = q k^T * scale + mask``, ``P = softmax(S)``,
  ``o = P v`` with epsilon-uniform products (``1/2`` each) and the softmax rule between;
* layer and group norm: ``R_x = x * J_c^T (R / y)`` with the centring-and-scaling Jacobian
  ``J_c^T s = c - mean(c)``, ``c = s * w * rstd`` (the denominator a constant);
* the product rules on RMSNorm, SiLU and GELU written out, SwiGLU: identity for normalisers
  and activation gates, ``R / 2`` for two projections.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dynlrp
from dynlrp.ops.math import gate_factors, softmax_factors

from .helpers import (
    DT,
    Case,
    assert_close,
    check_case,
    check_closures,
    check_inverse_chain,
    check_replay,
    check_shape_dtype,
    constants,
    detached,
    forward,
    make_seed,
    params,
    positive,
    randn,
    route_reference,
    run_lrp,
    stab,
)

B = 3
SHAPE = (B, 3, 4)
EPS = 1e-10
_const = constants(11)


def _identity(v, r):
    return [r.to(v[0].dtype)]


def _pointwise(cid, name, fn, make=None, **kw) -> Case:
    return Case(cid, (name,) if isinstance(name, str) else name, fn,
                make or (lambda: [randn(*SHAPE, away=0.05)]), _identity, **kw)


def _pos():
    return [positive(*SHAPE)]


def _unit():
    return [(torch.rand(*SHAPE, dtype=DT) * 1.6 - 0.8).requires_grad_(True)]


POINTWISE = [
    _pointwise("pow-float", "PowBackward0", lambda x: x ** 2.5, _pos),
    _pointwise("pow-int-odd", "PowBackward0", lambda x: x ** 3),
    _pointwise("square", "PowBackward0", torch.square),
    _pointwise("sqrt", "SqrtBackward0", torch.sqrt, _pos),
    _pointwise("rsqrt", "RsqrtBackward0", torch.rsqrt, _pos),
    _pointwise("reciprocal", "ReciprocalBackward0", torch.reciprocal),
    _pointwise("exp2", "Exp2Backward0", torch.exp2),
    _pointwise("expm1", "Expm1Backward0", torch.expm1),
    _pointwise("log", "LogBackward0", torch.log, _pos),
    _pointwise("log2", "Log2Backward0", torch.log2, _pos),
    _pointwise("log10", "Log10Backward0", torch.log10, _pos),
    _pointwise("log1p", "Log1PBackward0", torch.log1p, _pos),
    _pointwise("sin", "SinBackward0", torch.sin),
    _pointwise("cos", "CosBackward0", torch.cos),
    _pointwise("erf", "ErfBackward0", torch.erf),
    _pointwise("erfinv", "ErfinvBackward0", torch.erfinv, _unit),
    _pointwise("abs", "AbsBackward0", torch.abs),
    _pointwise("sgn", "SgnBackward0", torch.sgn),
    _pointwise("sign", "SignBackward0", torch.sign),
    _pointwise("atan", "AtanBackward0", torch.atan),
    _pointwise("logsigmoid", "LogSigmoidBackward0", F.logsigmoid),
    _pointwise("scalar-pow", "PowBackward2", lambda x: 2.0 ** x),
]
INVERTIBLE = [c for c in POINTWISE if c.id in ("pow-int-odd", "reciprocal", "exp2", "expm1")]


@pytest.mark.parametrize("case", params(POINTWISE))
def test_pointwise_relevance(case):
    check_case(case)


@pytest.mark.parametrize("case", params(POINTWISE, "replay"))
def test_pointwise_replay_before_frozen_layer(case):
    check_replay(case)


@pytest.mark.parametrize("case", params(INVERTIBLE, "inverse"))
def test_pointwise_inverse_after_frozen_layer(case):
    check_inverse_chain(case)


# -- x ** y, running sums, norms --------------------------------------------------------------
def _cumsum_reference(v, r, dim=1):
    x = v[0]
    y = x.cumsum(dim)
    return [x * (r / stab(y, 0.0)).flip(dim).cumsum(dim).flip(dim)]


def _norm_reference(p, dim, keepdim):
    def reference(v, r):
        x = v[0]
        n = torch.linalg.vector_norm(x, p, dim, keepdim=True)
        share = (x.abs() / n) ** p  # x_i * d|x|_p/dx_i / |x|_p
        return [share * (r if keepdim else r.unsqueeze(dim))]
    return reference


SUMS = [
    Case("pow-tensor", ("PowBackward1",), lambda x, y: x ** y, lambda: [positive(*SHAPE), randn(*SHAPE)],
         lambda v, r: [r / 2, r / 2], requested=(0, 1), in_axes=(0, 0)),
    Case("cumsum", ("CumsumBackward0",), lambda x: x.cumsum(1), _pos, _cumsum_reference),
    Case("vector-norm-2", ("LinalgVectorNormBackward0",), lambda x: torch.linalg.vector_norm(x, dim=-1),
         lambda: [randn(*SHAPE, away=0.1)], _norm_reference(2, -1, False)),
    Case("vector-norm-1-keepdim", ("LinalgVectorNormBackward0",),
         lambda x: torch.linalg.vector_norm(x, 1, dim=1, keepdim=True),
         lambda: [randn(*SHAPE, away=0.1)], _norm_reference(1, 1, True)),
]


@pytest.mark.parametrize("case", params(SUMS))
def test_sum_relevance(case):
    check_case(case)


@pytest.mark.parametrize("case", params(SUMS, "replay"))
def test_sum_replay_before_frozen_layer(case):
    check_replay(case)


# -- selections by value --------------------------------------------------------------------
COND = _const(*SHAPE) > 0
OTHER = _const(*SHAPE)


def _route(fn_of_x):
    def reference(v, r):
        return [route_reference(lambda t: fn_of_x(t, v), v[0], r)]
    return reference


def _arg(fn, dim):
    def select(t, v):
        idx = fn(v[0], dim, keepdim=True).indices
        return t.gather(dim, idx).squeeze(dim)
    return select


def _where_both(v, r):
    return [r * COND, r * ~COND]


def _masked_fill_tensor(v, r):
    return [r * ~COND, (r * COND).sum().reshape(())]


def _masked_scatter(v, r):
    k = int(COND.sum())
    rs = torch.zeros_like(v[1]).reshape(-1)
    rs[:k] = r[COND]
    return [r * ~COND, rs.reshape(v[1].shape)]


def _extreme(fn):
    def reference(v, r):
        x = v[0]
        flat = fn(x.reshape(-1), 0)
        out = torch.zeros_like(x).reshape(-1)
        out[flat] = r.reshape(())
        return [out.reshape(x.shape)]
    return reference


SELECTIONS = [
    Case("where-both", ("WhereBackward0",), lambda a, b: torch.where(COND, a, b),
         lambda: [randn(*SHAPE), randn(*SHAPE)], _where_both, requested=(0, 1), in_axes=(0, 0)),
    Case("where-constant", ("WhereBackward0",), lambda a: torch.where(COND, a, OTHER),
         lambda: [randn(*SHAPE)], lambda v, r: [r * COND], conserve=False),
    Case("masked-fill", ("MaskedFillBackward0",), lambda a: a.masked_fill(COND, -1e4),
         lambda: [randn(*SHAPE)], lambda v, r: [r * ~COND], conserve=False),
    Case("masked-fill-tensor", ("MaskedFillBackward1",), lambda a, val: a.masked_fill(COND, val),
         lambda: [randn(*SHAPE), torch.randn((), dtype=DT).requires_grad_()], _masked_fill_tensor,
         requested=(0, 1), in_axes=None),
    Case("masked-scatter", ("MaskedScatterBackward0",), lambda a, src: a.masked_scatter(COND, src),
         lambda: [randn(*SHAPE), randn(*SHAPE)], _masked_scatter, requested=(0, 1), in_axes=None,
         replay="skip"),
    Case("max-dim", ("MaxBackward0",), lambda x: x.max(1).values, lambda: [randn(*SHAPE)],
         _route(_arg(torch.max, 1))),
    Case("min-dim", ("MinBackward0",), lambda x: x.min(-1).values, lambda: [randn(*SHAPE)],
         _route(_arg(torch.min, -1))),
    Case("max-all", ("MaxBackward1",), lambda x: x.max(), lambda: [randn(*SHAPE)],
         _extreme(torch.argmax), in_axes=None, replay="skip"),
    Case("min-all", ("MinBackward1",), lambda x: x.min(), lambda: [randn(*SHAPE)],
         _extreme(torch.argmin), in_axes=None, replay="skip"),
    Case("amax", ("AmaxBackward0",), lambda x: x.amax(2), lambda: [randn(*SHAPE)],
         _route(_arg(torch.max, 2))),
    Case("amin-keepdim", ("AminBackward0",), lambda x: x.amin(1, keepdim=True), lambda: [randn(*SHAPE)],
         _route(lambda t, v: _arg(torch.min, 1)(t, v).unsqueeze(1))),
    Case("maximum", ("MaximumBackward0",), lambda a, b: torch.maximum(a, b),
         lambda: [randn(*SHAPE), randn(*SHAPE)],
         lambda v, r: [r * (v[0] > v[1]), r * (v[1] > v[0])], requested=(0, 1), in_axes=(0, 0)),
    Case("minimum", ("MinimumBackward0",), lambda a, b: torch.minimum(a, b),
         lambda: [randn(*SHAPE), randn(*SHAPE)],
         lambda v, r: [r * (v[0] < v[1]), r * (v[1] < v[0])], requested=(0, 1), in_axes=(0, 0)),
]


@pytest.mark.parametrize("case", params(SELECTIONS))
def test_selection_relevance(case):
    check_case(case)


@pytest.mark.parametrize("case", params(SELECTIONS, "replay"))
def test_selection_replay_before_frozen_layer(case):
    check_replay(case)


# -- softmax ----------------------------------------------------------------------------------
MASK = torch.where(_const(B, 3, 4) > -0.8, 0.0, float("-inf")).to(DT)
MASK[..., 0] = 0.0  # every row keeps one position
BIAS = _const(B, 3, 4)


def _softmax_reference(v, r):
    x = v[0]
    s = x.softmax(-1)
    return [x * (r - s * r.sum(-1, keepdim=True))]


def _masked_softmax_reference(bias):
    def reference(v, r):
        x = v[0]
        s = (x + bias).softmax(-1)
        g = torch.where(s > 0, r - s * r.sum(-1, keepdim=True), torch.zeros_like(r))
        return [x * g]  # the sum gives the scores their share, the mask (or bias) the rest
    return reference


def _live(y):
    return torch.randn_like(y) * (y > 0)


MASKED_RULES = {"sum": dynlrp.rules.SumWithConstants()}


SOFTMAX = [
    Case("softmax", ("SoftmaxBackward0",), lambda x: x.softmax(-1), lambda: [randn(*SHAPE)],
         _softmax_reference, conserve=False),
    Case("softmax-dim1", ("SoftmaxBackward0",), lambda x: torch.softmax(x, 1), lambda: [randn(*SHAPE)],
         lambda v, r: [v[0] * (r - v[0].softmax(1) * r.sum(1, keepdim=True))], conserve=False),
    # attention scores + an additive mask (or position bias) autograd never saw: the sum's value
    # is not in the graph; the mask keeps its share (SumWithConstants), which lets promise mode
    # pass relevance per unit of the sum (the sum cancels).
    Case("softmax-masked", ("SoftmaxBackward0", "AddBackward0"), lambda x: (x + MASK).softmax(-1),
         lambda: [randn(*SHAPE)], _masked_softmax_reference(MASK), conserve=False, seed=_live,
         rules=MASKED_RULES, replay="per-unit"),
    Case("softmax-position-bias", ("SoftmaxBackward0", "AddBackward0"), lambda x: (x + BIAS).softmax(-1),
         lambda: [randn(*SHAPE)], _masked_softmax_reference(BIAS), conserve=False, rules=MASKED_RULES,
         replay="per-unit"),
]


def check_masked_softmax_case(case: Case) -> None:
    """:func:`check_case` for a softmax after a sum with a constant autograd never saw: the
    sum's value is not in the graph. Recorded mode gives the relevance (checked against the
    reference); promise mode gets the same through relevance per unit of the sum, and must
    refuse under the default rules, which give the constant nothing (its value matters)."""
    inputs = case.make()
    with dynlrp.record() as tape:
        y = forward(case, inputs)
    seed = make_seed(case, y)
    rels = run_lrp(y, inputs, seed, case.rules, tape=tape, retain_graph=True)  # check_closures reads y
    check_shape_dtype(rels, inputs)
    (expected,) = case.reference(detached(inputs), seed.detach())
    assert_close(rels[0], expected, f"{case.id}: relevance != reference", rtol=case.tol, atol=1e-12)
    (promised,) = run_lrp(forward(case, inputs), inputs, seed, case.rules)
    assert_close(promised, rels[0], f"{case.id}: promise mode != recorded mode", rtol=1e-9, atol=1e-12)
    with pytest.raises(dynlrp.UnrecoverableValueError, match="record"):
        run_lrp(forward(case, inputs), inputs, seed, None)
    check_closures(y)


@pytest.mark.parametrize("case", params(SOFTMAX))
def test_softmax_relevance(case):
    if case.replay == "per-unit":
        check_masked_softmax_case(case)
    else:
        check_case(case)


@pytest.mark.parametrize("case", params(SOFTMAX, "replay"))
def test_softmax_replay_before_frozen_layer(case):
    check_replay(case)


def test_softmax_after_frozen_affine_map():
    """Softmax after a layer with a frozen bias: the layer's output ``z`` is not in the graph
    (``log(s)`` gives it only up to a row constant, which the softmax rule does not ignore).
    With epsilon 0 the softmax rule passes ``R - s sum(R)`` per unit of ``z`` and the layer's
    rule divides by ``z``: ``z`` cancels, and promise mode gives recorded mode's
    ``R_u = u * A^T (R - s sum(R))``. With epsilon > 0 it does not cancel: promise mode refuses."""
    u = randn(B, 4)
    a, c = torch.randn(4, 5, dtype=DT), torch.randn(5, dtype=DT)
    y = torch.addmm(c, u, a).softmax(-1)
    seed = torch.randn_like(y)
    rules = {"linear": dynlrp.rules.Epsilon(0.0)}
    with dynlrp.record() as tape:
        y2 = torch.addmm(c, u, a).softmax(-1)
    (recorded,) = dynlrp.lrp(y2, u, seed, rules=rules, tape=tape)
    g = seed - y.detach() * seed.sum(-1, keepdim=True)
    assert_close(recorded, u.detach() * (g @ a.T), "recorded != reference")
    (promised,) = dynlrp.lrp(y, u, seed, rules=rules, retain_graph=True)  # y is explained again below
    assert_close(promised, recorded, "promise != recorded", rtol=1e-12, atol=1e-14)
    with pytest.raises(dynlrp.UnrecoverableValueError, match="record"):
        dynlrp.lrp(y, u, seed, rules={"linear": dynlrp.rules.Epsilon(1e-6)})


def test_sum_with_constants():
    """``x + c`` with a constant ``c`` (a tensor or a Python number): ``x`` gets
    ``x * R / (x + c)``, ``c`` keeps the rest; ``3 - x`` (whose node has no forward closure)
    gets the identity rule."""
    x = randn(*SHAPE, away=0.1)
    c = OTHER.abs() + 0.5
    y = x + c
    seed = torch.randn_like(y)
    rules = {"sum": dynlrp.rules.SumWithConstants()}
    (r,) = dynlrp.lrp(y, x, seed, rules=rules, retain_graph=True)  # y is explained again below
    assert_close(r, x.detach() * seed / (x.detach() + c), "x + c")
    (r0,) = dynlrp.lrp(y, x, seed)  # Proportional: a constant takes nothing
    assert_close(r0, seed, "Proportional on x + c")
    (r3,) = dynlrp.lrp(x + 3.0, x, seed, rules=rules)
    assert_close(r3, x.detach() * seed / (x.detach() + 3.0), "x + 3")
    y4 = 3.0 - x
    assert y4.grad_fn.name() == "RsubBackward1"
    (r4,) = dynlrp.lrp(y4, x, seed, rules=rules)
    assert_close(r4, seed, "3 - x")


def test_stop_relevance_on_softmax():
    x = randn(*SHAPE)
    y = x.softmax(-1)
    (r,) = dynlrp.lrp(y, x, torch.randn_like(y), rules={"softmax": dynlrp.rules.StopRelevance()})
    assert torch.equal(r, torch.zeros_like(x))


# -- attention: products around a softmax, fused attention -----------------------------------
def _attention_parts(q, k, v, mask=None, causal=False, scale=None):
    rep = q.shape[-3] // k.shape[-3]
    kk, vv = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    sc = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s0 = q @ kk.transpose(-1, -2)
    add = torch.zeros_like(s0)
    if mask is not None:
        add = add + (torch.where(mask, 0.0, float("-inf")).to(q.dtype) if mask.dtype == torch.bool else mask)
    if causal:
        lq, lk = s0.shape[-2:]
        add = add.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
    p = (s0 * sc + add).softmax(-1)
    return kk, vv, sc, s0, p, p @ vv


def _fold(t, heads):
    """Sum grouped-query copies back onto their key/value head."""
    rep = t.shape[-3] // heads
    return t.unflatten(-3, (heads, rep)).sum(-3)


def attention_reference(q, k, v, r, *, mask=None, causal=False, scale=None, cp=False, eps=EPS):
    """AttnLRP (or CP-LRP) relevance of q, k, v through the explicit decomposition."""
    kk, vv, sc, s0, p, o = _attention_parts(q, k, v, mask, causal, scale)
    s = r / stab(o, eps)
    if cp:
        return [torch.zeros_like(q), torch.zeros_like(k), _fold(vv * (p.transpose(-1, -2) @ s), k.shape[-3])]
    r_p = p * (s @ vv.transpose(-1, -2)) / 2
    r_v = vv * (p.transpose(-1, -2) @ s) / 2
    g = torch.where(p > 0, r_p - p * r_p.sum(-1, keepdim=True), torch.zeros_like(p))  # softmax rule / S
    # S = s0 * sc + mask: the sum gives s0 * sc its share s0 * sc * g; the bilinear product
    # q k^T splits R / s0 = sc * g evenly between its factors.
    r_q = q * ((sc * g) @ kk) / 2
    r_k = kk * ((sc * g).transpose(-1, -2) @ q) / 2
    return [r_q, _fold(r_k, k.shape[-3]), _fold(r_v, k.shape[-3])]


HEADS, KV_HEADS, L, D = 2, 2, 4, 3
KEY_MASK = _const(B, 1, L, L) * 2
BOOL_MASK = torch.ones(B, 1, L, L, dtype=torch.bool)
BOOL_MASK[0, 0, :, -1] = False
BOOL_MASK[1, 0, 1:, 1] = False


def _qkv(kv_heads=KV_HEADS, lk=L):
    return lambda: [randn(B, HEADS, L, D), randn(B, kv_heads, lk, D), randn(B, kv_heads, lk, D)]


def _sdpa_case(cid, *, mask=None, causal=False, scale=None, kv_heads=KV_HEADS, lk=L, rules=None, cp=False):
    kwargs = {"attn_mask": mask, "is_causal": causal, "scale": scale}
    if kv_heads != HEADS:
        kwargs["enable_gqa"] = True

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def reference(vals, r):
        return attention_reference(*vals, r, mask=mask, causal=causal, scale=scale, cp=cp)

    return Case(cid, ("ScaledDotProductFlashAttentionForCpuBackward0",), fn, _qkv(kv_heads, lk), reference,
                requested=(0, 1, 2), in_axes=(0, 0, 0), conserve=False,
                rules=rules or {"attention": dynlrp.rules.AttnLRPAttention(EPS)}, tol=1e-6)


SDPA = [
    _sdpa_case("sdpa"),
    _sdpa_case("sdpa-causal", causal=True),
    _sdpa_case("sdpa-float-mask", mask=KEY_MASK),
    _sdpa_case("sdpa-bool-mask", mask=BOOL_MASK),
    _sdpa_case("sdpa-scale-cross", scale=0.7, lk=5),
    _sdpa_case("sdpa-gqa", kv_heads=1),
    _sdpa_case("sdpa-cp", mask=KEY_MASK, rules={"attention": dynlrp.rules.CPAttention(EPS)}, cp=True),
    _sdpa_case("sdpa-cp-causal-gqa", causal=True, kv_heads=1,
               rules={"attention": dynlrp.rules.CPAttention(EPS)}, cp=True),
]


@pytest.mark.parametrize("case", params(SDPA))
def test_sdpa_relevance(case):
    check_case(case)


@pytest.mark.parametrize("case", params(SDPA, "replay"))
def test_sdpa_replay_before_frozen_layer(case):
    check_replay(case)


def _eager_attention(q, k, v, mask=None, causal=False):
    scores = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores + mask
    if causal:
        scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), torch.finfo(q.dtype).min)
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("mask,causal", [(None, False), (KEY_MASK, False), (None, True)])
@pytest.mark.parametrize("preset", ["attnlrp", "cp_lrp"])
def test_eager_attention_equals_fused_attention(preset, mask, causal):
    """The op-by-op rules on eager attention (matmul, scale, mask, softmax, matmul) give the
    fused node's relevance: epsilon-uniform products, softmax rule (or value path only)."""
    q, k, v = _qkv()()
    rules = dynlrp.presets.PRESETS[preset](epsilon=EPS)
    with dynlrp.record() as tape:
        y = _eager_attention(q, k, v, mask, causal)
    seed = torch.randn_like(y)
    eager = dynlrp.lrp(y, [q, k, v], seed, rules=rules, tape=tape, retain_graph=True)  # y again below
    # the masked scores are not in the graph: with a mask, promise mode passes relevance per unit
    promised = dynlrp.lrp(y, [q, k, v], seed, rules=rules)
    for a, b in zip(promised, eager):
        assert_close(a, b, f"{preset}: eager attention, promise != recorded", rtol=1e-9, atol=1e-12)
    fused_y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    fused = dynlrp.lrp(fused_y, [q, k, v], seed, rules=rules)
    expected = attention_reference(*detached([q, k, v]), seed, mask=mask, causal=causal,
                                   cp=preset == "cp_lrp")
    for name, a, b, e in zip("qkv", eager, fused, expected):
        assert_close(a, e, f"{preset}: eager relevance of {name} != reference", rtol=1e-6, atol=1e-10)
        assert_close(b, e, f"{preset}: fused relevance of {name} != reference", rtol=1e-6, atol=1e-10)


def test_bmm_of_two_activations_is_uniform():
    """Paper Eq. 6 (AttnLRP Prop. 3.3): Epsilon on ``A @ V`` with both operands requested gives
    each ``1/2`` of ``x * J^T (R / z)``."""
    a, v = randn(B, 4, 5), randn(B, 5, 3)
    y = torch.bmm(a, v)
    seed = torch.randn_like(y)
    ra, rv = dynlrp.lrp(y, [a, v], seed, rules={"linear": dynlrp.rules.Epsilon(EPS)})
    s = seed / stab(y.detach(), EPS)
    assert_close(ra, a.detach() * (s @ v.detach().transpose(1, 2)) / 2, "R_A")
    assert_close(rv, v.detach() * (a.detach().transpose(1, 2) @ s) / 2, "R_V")
    assert abs(float(ra.sum() + rv.sum() - seed.sum())) < 1e-8


def test_value_path_epsilon_treats_probabilities_as_constants():
    scores, v = randn(B, 4, 5), randn(B, 5, 3)
    y = torch.bmm(scores.softmax(-1), v)
    seed = torch.randn_like(y)
    rs, rv = dynlrp.lrp(y, [scores, v], seed, rules={"linear": dynlrp.rules.ValuePathEpsilon(EPS),
                                                      "softmax": dynlrp.rules.StopRelevance()})
    p = scores.detach().softmax(-1)
    assert_close(rv, v.detach() * (p.transpose(1, 2) @ (seed / stab(y.detach(), EPS))), "R_V")
    assert torch.equal(rs, torch.zeros_like(scores))
    assert softmax_factors(y.grad_fn, (0, 1)) == {0}


# -- normalisation ----------------------------------------------------------------------------
LN_W, LN_B = _const(4) + 1, _const(4)


def _ln_reference(dims, w=None, b=None, eps_ln=1e-5, eps=EPS, identity=False):
    def reference(v, r):
        if identity:
            return [r]
        x = v[0]
        mean = x.mean(dims, keepdim=True)
        rstd = (x.var(dims, unbiased=False, keepdim=True) + eps_ln).rsqrt()
        y = (x - mean) * rstd
        ww = 1.0 if w is None else w
        y = y * ww + (0.0 if b is None else b)
        c = r / stab(y, eps) * ww * rstd
        return [x * (c - c.mean(dims, keepdim=True))]
    return reference


GN_W, GN_B = _const(6) + 1, _const(6)


def _gn_reference(groups, w=None, b=None, eps_gn=1e-5, eps=EPS):
    def reference(v, r):
        x = v[0]
        n, c = x.shape[:2]
        g = x.reshape(n, groups, -1)
        mean = g.mean(-1, keepdim=True)
        rstd = (g.var(-1, unbiased=False, keepdim=True) + eps_gn).rsqrt()
        shape = (1, c) + (1,) * (x.dim() - 2)
        ww = 1.0 if w is None else w.reshape(shape)
        y = ((g - mean) * rstd).reshape(x.shape) * ww + (0.0 if b is None else b.reshape(shape))
        cc = (r / stab(y, eps) * ww).reshape(n, groups, -1) * rstd
        return [x * (cc - cc.mean(-1, keepdim=True)).reshape(x.shape)]
    return reference


NORM_RULES = {"norm": dynlrp.rules.ConstantDenominator(EPS)}
NORMS = [
    Case("layer-norm", ("NativeLayerNormBackward0",), lambda x: F.layer_norm(x, (4,), LN_W, LN_B),
         lambda: [randn(*SHAPE)], _ln_reference((-1,), LN_W, LN_B), rules=NORM_RULES, conserve=False,
         tol=1e-6),
    Case("layer-norm-no-bias", ("NativeLayerNormBackward0",), lambda x: F.layer_norm(x, (4,), LN_W),
         lambda: [randn(*SHAPE)], _ln_reference((-1,), LN_W), rules=NORM_RULES, tol=1e-6),
    Case("layer-norm-plain-2d", ("NativeLayerNormBackward0",), lambda x: F.layer_norm(x, (3, 4)),
         lambda: [randn(*SHAPE)], _ln_reference((-2, -1)), rules=NORM_RULES, tol=1e-6),
    Case("layer-norm-identity", ("NativeLayerNormBackward0",), lambda x: F.layer_norm(x, (4,), LN_W, LN_B),
         lambda: [randn(*SHAPE)], _ln_reference((-1,), identity=True),
         rules={"norm": dynlrp.rules.Identity()}),
    Case("group-norm-frozen-affine", ("NativeGroupNormBackward0",), lambda x: F.group_norm(x, 2, GN_W, GN_B),
         lambda: [randn(B, 6, 5)], _gn_reference(2, GN_W, GN_B), rules=NORM_RULES, conserve=False, tol=1e-6,
         replay="unrecoverable"),
    Case("group-norm-plain-2d", ("NativeGroupNormBackward0",), lambda x: F.group_norm(x, 3),
         lambda: [randn(B, 6, 2, 3)], _gn_reference(3), rules=NORM_RULES, tol=1e-6),
    Case("group-norm-trainable-affine", ("NativeGroupNormBackward0",),
         lambda x, w, b: F.group_norm(x, 6, w, b),
         lambda: [randn(B, 6, 5), GN_W.clone().requires_grad_(), GN_B.clone().requires_grad_()],
         lambda v, r: _gn_reference(6, v[1], v[2])(v, r), in_axes=(0, None, None), rules=NORM_RULES,
         conserve=False, tol=1e-6),
]


@pytest.mark.parametrize("case", params(NORMS))
def test_norm_relevance(case):
    check_case(case)


@pytest.mark.parametrize("case", params(NORMS, "replay"))
def test_norm_replay_before_frozen_layer(case):
    check_replay(case)


_F64 = {"dtype": torch.float64}


@pytest.mark.parametrize("op, shape", [
    (lambda x: F.layer_norm(x, (5,), torch.randn(5, **_F64)), (3, 4, 5)),
    (lambda x: F.layer_norm(x, (4, 5)), (3, 4, 5)),
    (lambda x: F.group_norm(x, 2, torch.randn(4, **_F64)), (3, 4, 5)),
    (lambda x: F.group_norm(x, 4), (3, 4, 5)),
    (lambda x: x @ torch.randn(5, 3, **_F64), (12, 5)),
    (lambda x: torch.addmm(torch.randn(3, **_F64), x, torch.randn(5, 3, **_F64), alpha=0.5), (12, 5)),
], ids=["layer-norm", "layer-norm-2d", "group-norm", "group-norm-per-channel", "mm", "addmm-alpha"])
def test_adjoint_is_autograds_through_the_linear_map(op, shape):
    """A closed-form adjoint (ConstantDenominator's, the row-wise epsilon rule's) equals the
    vector-Jacobian product of the affine view's linear map, by autograd, in float64."""
    x = torch.randn(*shape, **_F64, requires_grad=True)
    y = op(x)
    slot = 1 if y.grad_fn.name() == "AddmmBackward0" else 0
    view = dynlrp.ops.lookup(y.grad_fn.name()).affine(y.grad_fn, slot)
    assert view.adjoint is not None
    s = torch.randn_like(y)
    leaf = x.detach().requires_grad_(True)
    expected, = torch.autograd.grad(view.linear(leaf, view.weight.detach()), leaf, s)
    torch.testing.assert_close(view.adjoint(s, view.weight.detach()), expected, rtol=1e-12, atol=1e-12)


def test_norm_is_the_default_rule_of_attnlrp_and_conserves_without_bias():
    x = randn(*SHAPE)
    y = F.layer_norm(x, (4,), LN_W)
    seed = torch.randn_like(y)
    (r,) = dynlrp.lrp(y, x, seed, rules=dynlrp.presets.attnlrp(epsilon=EPS))
    assert_close(r, _ln_reference((-1,), LN_W)([x.detach()], seed)[0], "attnlrp layer norm")
    assert abs(float(r.sum() - seed.sum())) < 1e-6 * float(seed.abs().sum())


def test_instance_norm_holds_its_statistics_constant():
    """Instance norm runs as batch norm in training mode; ConstantDenominator replays it with
    the saved mean and inverse std: ``R_x = x * rstd * R / y``."""
    x = randn(B, 2, 5)
    y = F.instance_norm(x)
    seed = torch.randn_like(y)
    (r,) = dynlrp.lrp(y, x, seed, rules=dynlrp.presets.attnlrp(epsilon=EPS))
    xd = x.detach()
    rstd = (xd.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt()
    assert_close(r, xd * rstd * seed / stab(y.detach(), EPS), "instance norm", rtol=1e-6)


# -- products: uniform, normalisers and gates as constants ------------------------------------
W1, W2 = _const(4, 5), _const(4, 5)


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * LN_W


def _gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _layer_norm_written_out(x):
    centred = x - x.mean(-1, keepdim=True)
    return centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


def _centred_reference(v, r):
    x = v[0]
    c = x - x.mean(-1, keepdim=True)
    q = r / c
    return [x * (q - q.mean(-1, keepdim=True))]


def _swiglu_reference(cp):
    def reference(v, r):
        x = v[0]
        z1, z2 = x @ W1, x @ W2
        if cp:
            return [x * ((r / z2) @ W2.T)]
        return [x * ((r / 2 / z1) @ W1.T) + x * ((r / 2 / z2) @ W2.T)]
    return reference


ATTN = {"product": dynlrp.rules.UniformProduct(), "linear": dynlrp.rules.Epsilon(EPS)}
CP = {"product": dynlrp.rules.UniformProduct(activation_gates=True), "linear": dynlrp.rules.Epsilon(EPS)}
PRODUCTS = [
    Case("rms-norm", ("MulBackward0", "MulBackward0", "RsqrtBackward0", "AddBackward0", "MeanBackward1",
                      "PowBackward0"), _rms, lambda: [randn(*SHAPE)], _identity, rules=ATTN),
    Case("silu-written-out", ("MulBackward0", "SigmoidBackward0"), lambda x: x * torch.sigmoid(x),
         lambda: [randn(*SHAPE)], _identity, rules=ATTN),
    Case("gelu-new", ("MulBackward0", "MulBackward0"), _gelu_new, lambda: [randn(*SHAPE)], _identity,
         rules=ATTN),
    Case("layer-norm-written-out", ("DivBackward0", "SubBackward0"), _layer_norm_written_out,
         lambda: [randn(*SHAPE, away=0.05)], _centred_reference, rules=ATTN, conserve=False),
    Case("swiglu", ("MulBackward0", "SiluBackward0", "MmBackward0"), lambda x: F.silu(x @ W1) * (x @ W2),
         lambda: [randn(B, 4)], _swiglu_reference(False), rules=ATTN, tol=1e-6, conserve=False),
    Case("swiglu-cp", ("MulBackward0", "SiluBackward0", "MmBackward0"), lambda x: F.silu(x @ W1) * (x @ W2),
         lambda: [randn(B, 4)], _swiglu_reference(True), rules=CP, tol=1e-6, conserve=False),
    Case("rotary-factor", ("MulBackward0",), lambda q, cos: q * cos, lambda: [randn(*SHAPE), randn(1, 3, 4)],
         lambda v, r: [r / 2, (r / 2).sum(0, keepdim=True)], requested=(0, 1), in_axes=(0, None), rules=ATTN),
]


@pytest.mark.parametrize("case", params(PRODUCTS))
def test_product_relevance(case):
    check_case(case)


def test_gate_factors():
    x = randn(B, 4)
    assert gate_factors((x * torch.sigmoid(x)).grad_fn, (0, 1)) == {1}
    assert gate_factors((torch.sigmoid(x) * x).grad_fn, (0, 1)) == {0}
    assert gate_factors((x * x).grad_fn, (0, 1)) == set()
    swiglu = F.silu(x @ W1) * (x @ W2)
    assert gate_factors(swiglu.grad_fn, (0, 1)) == set()
    assert gate_factors(swiglu.grad_fn, (0, 1), activations=True) == {0}
    fused = x @ torch.cat([W1, W2], 1)
    gate, up = fused.split(5, -1)
    assert gate_factors((F.silu(gate) * up).grad_fn, (0, 1)) == set()


def test_gate_factors_decide_alike_with_the_traversal_rank():
    """The rank of the traversal only prunes the walk: every product of a small Llama (RMSNorm's
    gates, SwiGLU, rotary embeddings) gets the same gates with it as without."""
    pytest.importorskip("transformers")
    from dynlrp.graph import build
    from models import tiny_llama

    model, x, forward, _ = tiny_llama()
    x = x.clone().requires_grad_(True)
    y = forward(model, x)
    graph = build([y], [x])
    products = [gn for gn in graph.nodes if gn.name == "MulBackward0" and len(gn.reaching) == 2]
    assert len(products) >= 5
    found = []
    for gn in products:
        plain = gate_factors(gn.fn, gn.reaching)
        assert gate_factors(gn.fn, gn.reaching, rank=graph.rank) == plain
        found.append(bool(plain))
    assert any(found) and not all(found)  # (RMSNorm's gates, and products of two activations)


# -- embeddings -------------------------------------------------------------------------------
IDS = torch.tensor([[1, 4, 4, 0], [2, 3, 1, 0]])


def _embedding_reference(padding_idx=None):
    def reference(v, r):
        out = torch.zeros_like(v[0]).index_add(0, IDS.reshape(-1), r.reshape(-1, v[0].shape[1]))
        if padding_idx is not None:
            out[padding_idx] = 0
        return [out]
    return reference


EMBEDDINGS = [
    Case("embedding", ("EmbeddingBackward0",), lambda w: F.embedding(IDS, w), lambda: [randn(6, 3)],
         _embedding_reference(), in_axes=None),
    Case("embedding-padding-idx", ("EmbeddingBackward0",), lambda w: F.embedding(IDS, w, padding_idx=0),
         lambda: [randn(6, 3)], _embedding_reference(0), in_axes=None, conserve=False),
    Case("embedding-route", ("EmbeddingBackward0",), lambda w: F.embedding(IDS, w), lambda: [randn(6, 3)],
         lambda v, r: [route_reference(lambda t: F.embedding(IDS, t), v[0], r)], in_axes=None),
]


@pytest.mark.parametrize("case", params(EMBEDDINGS))
def test_embedding_relevance(case):
    check_case(case)


@pytest.mark.parametrize("case", params(EMBEDDINGS, "replay"))
def test_embedding_replay_before_frozen_layer(case):
    check_replay(case)


# -- custom autograd Functions ----------------------------------------------------------------
class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        return x * k

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


class Unregistered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.fixture
def registry_restored():
    """Custom Functions registered by a test leave the (process-wide) registry afterwards."""
    yield
    dynlrp.ops.unregister_function(Scale)
    assert dynlrp.ops.lookup("ScaleBackward") is None


def test_register_function_by_class(registry_restored):
    name = dynlrp.ops.register_function(Scale, kind="elementwise", forward=lambda node, xs: xs[0] * node.k)
    assert name == "ScaleBackward" and dynlrp.ops.custom.registered_function(name) is Scale
    x = randn(*SHAPE)
    w = torch.randn(4, 2, dtype=DT)
    y = Scale.apply(x, 3.0) @ w  # promise mode replays the Function to feed the frozen layer
    seed = torch.randn_like(y)
    (r,) = dynlrp.lrp(y, x, seed, rules={"linear": dynlrp.rules.Epsilon(EPS)})
    h = x.detach() * 3.0
    assert_close(r, h * ((seed / stab(h @ w, EPS)) @ w.T), "custom Function relevance")


def test_register_function_refuses_a_different_class_of_the_same_name(registry_restored):
    dynlrp.ops.register_function(Scale, kind="elementwise")
    other = type("Scale", (torch.autograd.Function,), {"forward": Scale.forward, "backward": Scale.backward})
    with pytest.raises(ValueError, match="replace=True"):
        dynlrp.ops.register_function(other, kind="elementwise")
    with pytest.raises(TypeError):
        dynlrp.ops.register_function(torch.nn.Linear, kind="linear")


def test_unregistered_function_names_the_class_and_the_call():
    x = randn(*SHAPE)
    y = Unregistered.apply(x)
    with pytest.raises(dynlrp.UnknownOpError, match=r"UnregisteredBackward.*register_function\(Unregistered"):
        dynlrp.lrp(y, x)


# -- kinds and contracts -------------------------------------------------------------------------
def test_kinds_and_contracts():
    expected = {
        "SoftmaxBackward0": ("softmax", "bias"),
        "ScaledDotProductFlashAttentionForCpuBackward0": ("attention", "bias"),
        "NativeLayerNormBackward0": ("norm", "bias"),
        "NativeGroupNormBackward0": ("norm", "bias"),
        "EmbeddingBackward0": ("route", "route"),
        "CumsumBackward0": ("sum", "exact"),
        "LinalgVectorNormBackward0": ("sum", "exact"),
        "PowBackward1": ("product", "exact"),
        "WhereBackward0": ("route", "route"),
    }
    for name, (kind, contract) in expected.items():
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == (kind, contract), name
    for case in POINTWISE:
        assert dynlrp.ops.lookup(case.names[0]).kind == "elementwise", case.id


def test_gpu_attention_backends_share_the_cpu_entry():
    """CUDA flash, memory-efficient, cuDNN and out-of-tree backends are not built here; they
    share every closure with the CPU flash entry tested above."""
    cpu = dynlrp.ops.lookup("ScaledDotProductFlashAttentionForCpuBackward0")
    for name in dynlrp.ops.attention.SDPA_NODES:
        entry = dynlrp.ops.lookup(name)
        for f in ("kind", "contract", "forward", "own", "taps", "inverse"):
            assert getattr(entry, f) == getattr(cpu, f), (name, f)


COVERED = {name for cases in (POINTWISE, SUMS, SELECTIONS, SOFTMAX, SDPA, NORMS, PRODUCTS, EMBEDDINGS)
           for case in cases for name in case.names}

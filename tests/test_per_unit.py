"""Values nothing can rebuild: relevance per unit of value, partial values, model parameters.

A sum with a constant autograd never saw (an eager attention mask, BERT's position and
token-type tables, a frozen bias added on its own) has an output that no node saved and no
forward closure can replay. The epsilon-family rules use such a value only as a final factor
or to divide the relevance they receive, so the engine passes relevance *per unit* of it and
the value cancels (``dynlrp.engine.PerUnit``). Each test compares promise mode with recorded
mode (which knows every value) and, where short, with the formula written out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp
from dynlrp.values import Parameters

DT = torch.float64
ATTN = dynlrp.presets.attnlrp()


def assert_close(actual, expected, what: str, rtol: float = 1e-7, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _randn(*shape: int, grad: bool = False, seed: int = 0) -> torch.Tensor:
    t = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(grad)


def _both_modes(fn, inputs, seed, rules, **kw):
    """Promise mode and recorded mode on two forwards of ``fn``."""
    promised = dynlrp.lrp(fn(*inputs), inputs, seed, rules=rules, **kw)
    with dynlrp.record() as tape:
        y = fn(*inputs)
    recorded = dynlrp.lrp(y, inputs, seed, rules=rules, tape=tape, **kw)
    return promised, recorded


C1, C2 = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
W_OUT = _randn(4, 3, seed=3)
LN_W, LN_B = _randn(4, seed=4), _randn(4, seed=5)


def _embeddings(x: torch.Tensor) -> torch.Tensor:
    """BERT's embedding block: two constant tables added, then a layer norm and a frozen head."""
    h = x + C1 + C2
    return F.layer_norm(h, (4,), LN_W, LN_B) @ W_OUT


def test_two_constants_beside_the_input():
    x = _randn(2, 5, 4, grad=True)
    seed = _randn(2, 5, 3, seed=9)
    (promised,), (recorded,) = _both_modes(_embeddings, [x], seed, ATTN)
    assert_close(promised, recorded, "promise != recorded", rtol=1e-12, atol=1e-14)
    # written out: R_x = x * R_h / h, where h = x + C1 + C2 is what the layer norm saved
    h = x + C1 + C2
    (r_h,) = dynlrp.lrp(F.layer_norm(h, (4,), LN_W, LN_B) @ W_OUT, h, seed, rules=ATTN)
    assert_close(promised, x.detach() * r_h / h.detach(), "R_x != x * R_h / h", rtol=1e-10)


def test_default_rules_give_constants_nothing_and_need_no_value():
    x = _randn(2, 5, 4, grad=True)
    seed = _randn(2, 5, 3, seed=9)
    h = x + C1 + C2
    (r_h,) = dynlrp.lrp(F.layer_norm(h, (4,), LN_W, LN_B) @ W_OUT, h, seed)
    (r_x,) = dynlrp.lrp(_embeddings(x), x, seed)
    assert_close(r_x, r_h, "the default rules pass a sum with constants unchanged")


def test_plan_cache_keeps_the_per_unit_path():
    engine = dynlrp.LRP(ATTN)
    x = _randn(2, 5, 4, grad=True)
    seed = _randn(2, 5, 3, seed=9)
    first = engine(_embeddings(x), x, seed)
    assert not engine.stats["cached_plan"]
    second = engine(_embeddings(x), x, seed)
    assert engine.stats["cached_plan"]
    assert torch.equal(first[0], second[0])


def test_epsilon_above_zero_does_not_cancel_and_refuses():
    """``R / (h1 + eps)`` of a per-unit ``R = h1 * G`` is not ``G``: the unknown ``h1`` stays."""
    x = _randn(2, 5, 4, grad=True)
    rules = ATTN.override({"sum": dynlrp.rules.SumWithConstants(1e-6)})
    with pytest.raises(dynlrp.UnrecoverableValueError, match="record"):
        dynlrp.lrp(_embeddings(x), x, _randn(2, 5, 3, seed=9), rules=rules)


W_IN = _randn(4, 6, seed=6)
C_IN = _randn(6, seed=7)
V1, V2 = _randn(3, 2, seed=8), _randn(3, 2, seed=10)


def _split_projection(x: torch.Tensor) -> torch.Tensor:
    """A fused projection with a frozen bias, split in two: the softmax keeps only its output
    (the first part is unknown), the layer norm keeps its input (the second part is known)."""
    p = x @ W_IN + C_IN
    a, b = p[:, :3], p[:, 3:]
    return a.softmax(-1) @ V1 + F.layer_norm(b, (3,)) @ V2


def test_an_op_the_gradient_fallback_routes_does_not_route_per_unit():
    """Relevance per unit of an unknown value is routed only by ops that move values (a view, a
    selection): ``v * G`` routed is ``v_in * route(G)`` there. An op without an entry that the
    gradient fallback routes by its backward (``cumprod``) is no such op: promise mode, which
    cannot rebuild that op's output, says so instead of returning wrong relevance (it used to
    route ``G`` through the backward and differ from recorded mode)."""
    import warnings

    conv = nn.Conv2d(3, 3, 3, padding=1).double().requires_grad_(False)
    x = _randn(2, 3, 4, 4, grad=True)

    def fn(x):
        return torch.cumprod(torch.relu(conv(x)), -1).sum((1, 2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the fallback warns about cumprod)
        engine = dynlrp.LRP({"linear": dynlrp.rules.Epsilon(1e-6)}, fallback="gradient")
        with pytest.raises(dynlrp.UnrecoverableValueError, match="record the forward pass"):
            engine(fn(x), x, model=conv)
        with dynlrp.record() as tape:
            y = fn(x)
        r, = engine(y, x, tape=tape)
    assert torch.isfinite(r).all()


def test_known_and_unknown_parts_of_one_tensor():
    x = _randn(4, 4, grad=True)
    seed = _randn(4, 2, seed=11)
    (promised,), (recorded,) = _both_modes(_split_projection, [x], seed, ATTN)
    assert_close(promised, recorded, "promise != recorded", rtol=1e-10, atol=1e-13)


def _parts_saved_by_consumers(x: torch.Tensor) -> torch.Tensor:
    """Each part of ``p`` is saved by its consumer: together they rebuild ``p``."""
    p = x @ W_IN + C_IN
    return F.layer_norm(p[:, :3], (3,)) @ V1 + F.layer_norm(p[:, 3:], (3,)) @ V2


def test_parts_saved_by_consumers_rebuild_the_tensor():
    x = _randn(4, 4, grad=True)
    seed = _randn(4, 2, seed=11)
    rules = {"sum": dynlrp.rules.Epsilon(1e-3), "norm": dynlrp.rules.ConstantDenominator(1e-3)}
    engine = dynlrp.LRP(rules)
    (promised,) = engine(_parts_saved_by_consumers(x), x, seed)
    assert engine.stats["inversions"] >= 1
    with dynlrp.record() as tape:
        y = _parts_saved_by_consumers(x)
    (recorded,) = dynlrp.lrp(y, x, seed, rules=rules, tape=tape)
    assert_close(promised, recorded, "promise != recorded", rtol=1e-10, atol=1e-13)


# -- operands from the model's parameters --------------------------------------------------------------
def test_parameters_match_weights_views_and_row_blocks():
    mha = nn.MultiheadAttention(4, 2, kdim=4, vdim=4).double()
    lin = nn.Linear(4, 3).double()
    model = nn.ModuleList([mha, lin])
    params = Parameters(model)
    e = 4
    assert torch.equal(params.bias_for(lin.weight), lin.bias)
    assert torch.equal(params.bias_for(lin.weight.t()), lin.bias)  # addmm saves W^T
    assert torch.equal(params.bias_for(mha.in_proj_weight[e:]), mha.in_proj_bias[e:])  # key and value rows
    assert torch.equal(params.bias_for(mha.in_proj_weight[e:].t()), mha.in_proj_bias[e:])
    assert torch.equal(params.bias_for(mha.in_proj_weight[:e]), mha.in_proj_bias[:e])
    assert params.bias_for(torch.zeros(4, 4, dtype=DT)) is None


def test_parameters_index_is_kept_per_model_and_follows_changes():
    """The index made for a model serves later calls on it; a bias or a module replaced since is
    found anew, and the index keeps no model alive."""
    import gc
    import weakref

    lin = nn.Linear(4, 3).double()
    model = nn.ModuleList([lin])
    assert torch.equal(Parameters(model).bias_for(lin.weight), lin.bias)
    kept = Parameters._INDEXES[model]
    later = Parameters(model)
    assert torch.equal(later.bias_for(lin.weight), lin.bias) and Parameters._INDEXES[model] is kept
    lin.bias = nn.Parameter(torch.ones(3, dtype=DT))  # a bias replaced: the index is made again
    assert torch.equal(Parameters(model).bias_for(lin.weight), torch.ones(3, dtype=DT))
    added = nn.Linear(4, 2).double()  # a module added since: not in the kept index, found anew
    model.append(added)
    assert torch.equal(Parameters(model).bias_for(added.weight), added.bias)
    assert Parameters(model).bias_for(torch.zeros(4, 4, dtype=DT)) is None
    gone = weakref.ref(model)
    del model, lin, added, kept, later
    gc.collect()
    assert gone() is None


class TwoNorms(nn.Module):
    """``head(bn1(lin1(x)) + bn2(lin2(x)))``: the sum needs both norms' outputs, whose frozen
    biases autograd never saw (a ResNet downsample add)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)
        self.bn1, self.bn2 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn1(self.lin1(x)) + self.bn2(self.lin2(x)))


def test_a_frozen_bias_replaced_between_calls_is_read_anew():
    """Promise mode reads a frozen batch norm's bias from the model: after the bias is replaced,
    the next call reads the new one (recorded mode, which sees the forward, agrees)."""
    model = TwoNorms().double().eval().requires_grad_(False)
    engine = dynlrp.LRP({"linear": dynlrp.rules.Epsilon(1e-6), "sum": dynlrp.rules.Epsilon(1e-6)},
                        cache=False)
    for bias in (None, torch.full((3,), 5.0, dtype=DT)):
        if bias is not None:
            model.bn1.bias = nn.Parameter(bias, requires_grad=False)
        x = _randn(2, 4, grad=True)
        r_promise, = engine(model(x), x, model=model)
        assert engine.stats["promise_internal_nodes"] >= 1  # the norms replayed, with their biases
        with dynlrp.record() as tape:
            y = model(x)
        r_recorded, = engine(y, x, tape=tape)
        assert_close(r_promise, r_recorded, "relevance")


def test_parameters_match_a_parametrized_weight():
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 3, 3).double())
    params = Parameters(conv)
    assert torch.equal(params.bias_for(conv.weight), conv.bias)  # computed anew on every access
    assert params.bias_for(torch.zeros(3, 2, 3, dtype=DT)) is None


def test_parameters_match_an_untransposed_weight():
    """GPT-2's Conv1D: ``addmm(bias, x, weight)`` with the weight stored ``(in, out)``."""

    class Conv1D(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, dtype=DT))
            self.bias = nn.Parameter(torch.randn(3, dtype=DT))

    module = Conv1D()
    assert torch.equal(Parameters(module).bias_for(module.weight), module.bias)


@pytest.mark.parametrize("same_query", [True, False])
def test_frozen_multihead_attention_with_model(same_query):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).double().eval().requires_grad_(False)
    probe = _randn(1, 1, 4, seed=12)

    def fn(x):
        q = x if same_query else probe.expand(x.shape[0], 1, 4)
        return mha(q, x, x, need_weights=False)[0]

    x = _randn(2, 5, 4, grad=True)
    seed = torch.ones_like(fn(x))
    (promised,), (recorded,) = _both_modes(fn, [x], seed, ATTN, model=mha)
    assert_close(promised, recorded, "promise != recorded", rtol=1e-9, atol=1e-12)

"""The LRP rules against independent dense references.

Every layer is turned into a matrix (the forward on basis vectors: ``M[:, k] = f(e_k) - f(0)``,
``b = f(0)``, over the whole batch, so the matrix is block-diagonal per example) and each rule
is written out as the textbook formula in matrix algebra. Inputs and weights take both signs;
biases are random; layers run frozen (the bias is not in the graph: rules recover it from the
output) and trainable (the bias is a leaf). Nothing here calls dynlrp to build a reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp import rules
from dynlrp.presets import RuleSet

DT = torch.float64


# -- references ------------------------------------------------------------------------------------

def stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``."""
    return z + eps * (2.0 * (z >= 0).to(z.dtype) - 1.0)


def as_matrix(f, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` (affine) as ``(M, b)`` over the flattened tensors: ``f(x).flatten() = M x.flatten() + b``.

    Parameters
    ----------
    f
        An affine function of one tensor.
    x
        A tensor of the input's shape.

    Returns
    -------
    tuple of torch.Tensor
        ``M`` of shape ``(out, in)`` and ``b`` of shape ``(out,)``.
    """
    with torch.no_grad():
        # f on 0 and on every basis vector at once (one kernel, so unconnected entries are exactly 0)
        points = torch.cat([torch.zeros(1, x.numel(), dtype=x.dtype), torch.eye(x.numel(), dtype=x.dtype)])
        values = torch.vmap(f)(points.reshape(-1, *x.shape)).flatten(1)
    return (values[1:] - values[0]).T, values[0]


def ref_epsilon(M, b, x, R, eps):
    return x * (M.T @ (R / stab(M @ x + b, eps)))


def ref_gamma(M, b, x, R, gamma, eps):
    up, dn = M + gamma * M.clamp(min=0), M + gamma * M.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    z = M @ x + b
    s = R * (z > 0) / stab(up @ xp + dn @ xn + b + gamma * b.clamp(min=0), eps)
    t = R * (z < 0) / stab(dn @ xp + up @ xn + b + gamma * b.clamp(max=0), eps)
    return xp * (up.T @ s) + xn * (dn.T @ s) + xp * (dn.T @ t) + xn * (up.T @ t)


def ref_alpha_beta(M, b, x, R, alpha, beta, eps):
    mp, mn = M.clamp(min=0), M.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    s = R / stab(mp @ xp + mn @ xn + b.clamp(min=0), eps)
    t = R / stab(mn @ xp + mp @ xn + b.clamp(max=0), eps)
    return alpha * (xp * (mp.T @ s) + xn * (mn.T @ s)) - beta * (xp * (mn.T @ t) + xn * (mp.T @ t))


def ref_zbox(M, b, x, R, low, high, eps):
    mp, mn = M.clamp(min=0), M.clamp(max=0)
    s = R / stab(M @ x - mp @ low - mn @ high, eps)
    return x * (M.T @ s) - low * (mp.T @ s) - high * (mn.T @ s)


def ref_flat(M, b, x, R, eps):
    connected = (M != 0).to(M.dtype)
    return connected.T @ (R / stab(connected.sum(1), eps))


def ref_wsquare(M, b, x, R, eps):
    squared = M ** 2
    return squared.T @ (R / stab(squared.sum(1) + b ** 2, eps))


EPS = 1e-6


def reference(rule: rules.Rule, M, b, x, R, shape):
    """The reference for ``rule`` on flat tensors (``shape``: the input's, for z-box bounds)."""
    if isinstance(rule, rules.Gamma):
        return ref_gamma(M, b, x, R, rule.gamma, rule.eps)
    if isinstance(rule, rules.AlphaBeta):
        return ref_alpha_beta(M, b, x, R, rule.alpha, rule.beta, rule.eps)
    if isinstance(rule, rules.ZBox):
        low = torch.as_tensor(rule.low, dtype=DT).expand(shape).flatten()
        high = torch.as_tensor(rule.high, dtype=DT).expand(shape).flatten()
        return ref_zbox(M, b, x, R, low, high, rule.eps)
    if isinstance(rule, rules.Flat):
        return ref_flat(M, b, x, R, rule.eps)
    if isinstance(rule, rules.WSquare):
        return ref_wsquare(M, b, x, R, rule.eps)
    if isinstance(rule, rules.Epsilon):
        return ref_epsilon(M, b, x, R, rule.eps)
    raise AssertionError(rule)


# -- layers ----------------------------------------------------------------------------------------

def randomize(model: nn.Module) -> nn.Module:
    """Random biases and batch-norm statistics (library inits hide mistakes); eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.0, 1.5)
    return model.to(DT).eval()


class LeftProduct(nn.Module):
    """``W @ x``: the data is the right operand of a matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight @ x


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "linear-nobias": (lambda: nn.Linear(6, 5, bias=False), (3, 6)),
    "left-product": (LeftProduct, (6, 4)),
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 5, 5)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (2, 4, 4, 4)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, dilation=2), (2, 2, 9)),
    "conv-transpose": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 3, 3)),
    "batchnorm": (lambda: nn.BatchNorm2d(3), (2, 3, 3, 3)),
}

FOLDED = {
    "conv+bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), (2, 3, 4, 4)),
    "conv-nobias+bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, bias=False), nn.BatchNorm2d(4)),
                       (2, 3, 4, 4)),
    "linear+bn": (lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), (3, 6)),
    "conv-transpose+bn": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
                                                nn.BatchNorm2d(6)), (2, 4, 3, 3)),
}

RULES = {
    "epsilon": rules.Epsilon(EPS),
    "epsilon-big": rules.Epsilon(0.5),
    "gamma": rules.Gamma(0.25, EPS),
    "gamma-big": rules.Gamma(2.0, 0.1),
    "zplus": rules.ZPlus(EPS),
    "alpha2beta1": rules.AlphaBeta(2.0, 1.0, EPS),
    "alpha3beta2": rules.AlphaBeta(3.0, 2.0, EPS),
    "zbox": rules.ZBox(-2.0, 2.5, EPS),
    "flat": rules.Flat(EPS),
    "wsquare": rules.WSquare(EPS),
}


def make(factory, shape, trainable: bool):
    torch.manual_seed(1)
    layer = randomize(factory()).requires_grad_(trainable)
    x = torch.randn(shape, dtype=DT)
    return layer, x


def lrp(layer, x, seed, rule_set, tape: bool = False):
    xx = x.clone().requires_grad_(True)
    if tape:
        with dynlrp.record() as t:
            y = layer(xx)
        return dynlrp.lrp(y, xx, seed, rules=rule_set, tape=t)[0]
    return dynlrp.lrp(layer(xx), xx, seed, rules=rule_set)[0]


def check(layer, x, rule, rule_set, tape=False):
    with torch.no_grad():
        y = layer(x)
    seed = torch.randn_like(y)
    M, b = as_matrix(layer, x)
    expected = reference(rule, M, b, x.flatten(), seed.flatten(), x.shape).reshape(x.shape)
    actual = lrp(layer, x, seed, rule_set, tape)
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9 * max(scale, 1.0))


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
@pytest.mark.parametrize("layer", list(LAYERS), ids=list(LAYERS))
def test_rule_matches_dense_reference(layer, rule, trainable):
    factory, shape = LAYERS[layer]
    model, x = make(factory, shape, trainable)
    check(model, x, rule, {"linear": rule})


@pytest.mark.parametrize("tape", [False, True], ids=["promise", "recorded"])
@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
@pytest.mark.parametrize("layer", list(FOLDED), ids=list(FOLDED))
def test_rule_on_folded_batch_norm_matches_dense_reference(layer, rule, trainable, tape):
    """With canonization the rule sees ``bn(op(x))`` as one affine map: the reference is the
    matrix of the two layers together."""
    factory, shape = FOLDED[layer]
    model, x = make(factory, shape, trainable)
    check(model, x, rule, RuleSet({"linear": rule}, canonize=True), tape)


# -- textbook forms (non-negative inputs) ------------------------------------------------------------

def test_gamma_is_the_textbook_rule_for_positive_inputs():
    """``R_i = sum_j x_i (w_ij + g w_ij+) R_j / sum_i' x_i' (w_i'j + g w_i'j+)`` where ``z_j > 0``."""
    layer = nn.Linear(6, 4, bias=False).to(DT).requires_grad_(False)
    x = torch.rand(2, 6, dtype=DT)
    g = 0.5
    w = layer.weight  # (out, in)
    z = x @ w.T
    seed = torch.rand(2, 4, dtype=DT) * (z > 0)
    expected = torch.zeros_like(x)
    for n in range(2):
        for i in range(6):
            for j in range(4):
                if z[n, j] > 0:
                    num = x[n, i] * (w[j, i] + g * w[j, i].clamp(min=0))
                    den = sum(x[n, k] * (w[j, k] + g * w[j, k].clamp(min=0)) for k in range(6))
                    expected[n, i] += num / (den + EPS) * seed[n, j]
    torch.testing.assert_close(lrp(layer, x, seed, {"linear": rules.Gamma(g, EPS)}), expected)


def test_zplus_is_the_textbook_rule_for_positive_inputs():
    """``R_i = sum_j x_i w_ij+ R_j / sum_i' x_i' w_i'j+``."""
    layer = nn.Linear(6, 4, bias=False).to(DT).requires_grad_(False)
    x = torch.rand(2, 6, dtype=DT)
    seed = torch.rand(2, 4, dtype=DT)
    wp = layer.weight.clamp(min=0)
    expected = x * ((seed / (x @ wp.T + EPS)) @ wp)
    torch.testing.assert_close(lrp(layer, x, seed, {"linear": rules.ZPlus(EPS)}), expected)


# -- properties --------------------------------------------------------------------------------------

def conv_layer(bias: bool = False):
    torch.manual_seed(2)
    layer = randomize(nn.Conv2d(3, 4, 3, padding=1, bias=bias)).requires_grad_(False)
    return layer, torch.randn(2, 3, 5, 5, dtype=DT)


@pytest.mark.parametrize("rule", [rules.ZBox(-3.0, 3.0, 1e-12), rules.Flat(1e-12), rules.WSquare(1e-12),
                                  rules.ZPlus(1e-12), rules.AlphaBeta(2.0, 1.0, 1e-12),
                                  rules.Gamma(0.25, 1e-12)], ids=repr)
def test_bias_free_rules_conserve_per_example(rule):
    layer, x = conv_layer(bias=False)
    if not isinstance(rule, (rules.ZBox, rules.Flat, rules.WSquare)):
        x = x.abs()  # z+, alpha-beta and gamma conserve where z > 0
    with torch.no_grad():
        z = layer(x)
    seed = torch.rand_like(z) * (z > 0) if isinstance(rule, rules.Gamma) else torch.rand_like(z)
    r = lrp(layer, x, seed, {"linear": rule})
    torch.testing.assert_close(r.sum((1, 2, 3)), seed.sum((1, 2, 3)))


def test_gamma_zero_is_epsilon():
    layer, x = conv_layer(bias=True)
    seed = torch.randn(2, 4, 5, 5, dtype=DT)
    torch.testing.assert_close(lrp(layer, x, seed, {"linear": rules.Gamma(0.0, EPS)}),
                               lrp(layer, x, seed, {"linear": rules.Epsilon(EPS)}))


def test_zplus_is_alpha1_beta0():
    layer, x = conv_layer(bias=True)
    seed = torch.randn(2, 4, 5, 5, dtype=DT)
    torch.testing.assert_close(lrp(layer, x, seed, {"linear": rules.ZPlus(EPS)}),
                               lrp(layer, x, seed, {"linear": rules.AlphaBeta(1.0, 0.0, EPS)}))


def test_zbox_takes_per_channel_tensor_bounds():
    layer, x = conv_layer(bias=True)
    low = -torch.rand(1, 3, 1, 1, dtype=DT) - 2.0
    high = torch.rand(1, 3, 1, 1, dtype=DT) + 2.0
    check(layer, x, rules.ZBox(low, high, EPS), {"linear": rules.ZBox(low, high, EPS)})
    # a scalar bound and a tensor bound of the same value agree
    seed = torch.randn(2, 4, 5, 5, dtype=DT)
    torch.testing.assert_close(lrp(layer, x, seed, {"linear": rules.ZBox(-2.0, 2.0)}),
                               lrp(layer, x, seed, {"linear": rules.ZBox(torch.tensor(-2.0), torch.full(
                                   (1, 3, 1, 1), 2.0, dtype=DT))}))


def test_zero_bias_option_leaves_the_bias_out():
    torch.manual_seed(3)
    layer = randomize(nn.Linear(6, 5)).requires_grad_(False)
    x = torch.randn(3, 6, dtype=DT)
    seed = torch.randn(3, 5, dtype=DT)
    M, _ = as_matrix(layer, x)
    zero = torch.zeros(M.shape[0], dtype=DT)
    for rule, ref in [(rules.Gamma(0.25, EPS, zero_bias=True), lambda: ref_gamma(M, zero, xf, sf, 0.25, EPS)),
                      (rules.ZPlus(EPS, zero_bias=True), lambda: ref_alpha_beta(M, zero, xf, sf, 1, 0, EPS)),
                      (rules.AlphaBeta(2, 1, EPS, zero_bias=True),
                       lambda: ref_alpha_beta(M, zero, xf, sf, 2, 1, EPS)),
                      (rules.WSquare(EPS, zero_bias=True), lambda: ref_wsquare(M, zero, xf, sf, EPS))]:
        xf, sf = x.flatten(), seed.flatten()
        # gamma keeps the sign masks of the true z (with bias): recompute them on the true output
        if isinstance(rule, rules.Gamma):
            z = layer(x).flatten()
            up, dn = M + 0.25 * M.clamp(min=0), M + 0.25 * M.clamp(max=0)
            xp, xn = xf.clamp(min=0), xf.clamp(max=0)
            s = sf * (z > 0) / stab(up @ xp + dn @ xn, EPS)
            t = sf * (z < 0) / stab(dn @ xp + up @ xn, EPS)
            expected = xp * (up.T @ s) + xn * (dn.T @ s) + xp * (dn.T @ t) + xn * (up.T @ t)
        else:
            expected = ref()
        torch.testing.assert_close(lrp(layer, x, seed, {"linear": rule}), expected.reshape(x.shape))


def test_rules_leave_the_model_and_inputs_untouched():
    torch.manual_seed(4)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)))
    model.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    x_before = x.clone()
    for rule in RULES.values():
        lrp(model, x, torch.randn(2, 2, 3, 3, dtype=DT), RuleSet({"linear": rule}, canonize=True), tape=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_promise_mode_equals_recorded_through_relu(rule):
    """Frozen conv -> ReLU -> frozen conv: the first conv's output (bias not in the graph) is
    recovered through the ReLU, exactly where relevance flows."""
    torch.manual_seed(5)
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))).requires_grad_(False)
    x = torch.randn(2, 3, 7, 7, dtype=DT)
    seed = torch.randn(2, 2, 3, 3, dtype=DT)
    rule_set = {"conv": rule} if not isinstance(rule, (rules.ZBox, rules.Flat, rules.WSquare)) else {
        dynlrp.presets.First("conv"): rule, "conv": rules.ZPlus()}
    torch.testing.assert_close(lrp(model, x, seed, rule_set), lrp(model, x, seed, rule_set, tape=True))


# -- where relevance vanishes (Rule.vanishes) -----------------------------------------------------------
# The engine trusts these declarations to skip a test (tests/test_cost.py): each must hold
# whatever the numbers.

def _with_zeros(x: torch.Tensor) -> torch.Tensor:
    """``x`` with about 40% of its entries exactly 0 (and one whole example's first row)."""
    gen = torch.Generator().manual_seed(7)
    x = x.masked_fill(torch.rand(x.shape, generator=gen, dtype=x.dtype) < 0.4, 0.0)
    x[0, 0] = 0.0
    return x


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
@pytest.mark.parametrize("layer", list(LAYERS), ids=list(LAYERS))
def test_rules_that_declare_it_give_no_relevance_where_the_input_is_zero(layer, rule, trainable):
    """``vanishes == "inputs"``: ``R_i = 0`` wherever ``v_i = 0``; the rules that do not say so
    (z^B, flat, w^2) may give relevance there."""
    factory, shape = LAYERS[layer]
    model, x = make(factory, shape, trainable)
    x = _with_zeros(x)
    seed = torch.randn_like(model(x).detach())
    r = lrp(model, x, seed, {"linear": rule})
    declared = rule.vanishes(None)  # (these rules declare without looking at the node)
    if isinstance(rule, (rules.ZBox, rules.Flat, rules.WSquare)):
        assert declared is None
    else:
        assert declared == "inputs"
        assert (r[x == 0] == 0).all()


ROUTES = {
    "max-pool": (lambda x: nn.functional.max_pool2d(x, 2), (2, 3, 4, 4)),
    "adaptive-max-pool": (lambda x: nn.functional.adaptive_max_pool2d(x, 2), (2, 3, 5, 5)),
    "permute": (lambda x: x.permute(0, 2, 1), (2, 3, 4)),
    "reshape": (lambda x: x.reshape(2, -1), (2, 3, 4)),
    "slice": (lambda x: x[:, 1:3], (2, 4, 3)),
    "expand": (lambda x: x.unsqueeze(1).expand(2, 3, 4), (2, 4)),
    "index": (lambda x: x[:, torch.tensor([0, 2, 2])], (2, 4)),
    "cat": (lambda x: torch.cat([x, x.flip(1)], 1), (2, 4)),
    "max": (lambda x: x.max(1).values, (3, 5)),
    "amax": (lambda x: x.amax(), (3, 5)),
    "maximum": (lambda x: torch.maximum(x, x.flip(0)), (3, 5)),
    "where": (lambda x: torch.where(torch.arange(x.shape[1]) % 2 == 0, x, x.roll(1, 1)), (3, 4)),
}


@pytest.mark.parametrize("op", list(ROUTES), ids=list(ROUTES))
def test_routes_move_relevance_with_the_values(op):
    """``vanishes == "routes"``: relevance that is 0 wherever the output is 0 is 0 wherever the
    input is 0 (it follows the values: a zero value was routed only to zero outputs). Inputs with
    zeros, ties and windows of zeros only."""
    f, shape = ROUTES[op]
    x = torch.randn(shape, dtype=DT).abs().round()  # entries 0, 1, 2, 3: zeros and ties
    x.view(-1)[: x.numel() // 3] = 0.0
    xx = x.clone().requires_grad_(True)
    y = f(xx)
    seed = y.detach() * torch.randn_like(y.detach())
    r, = dynlrp.lrp(y, xx, seed)
    assert (r[x == 0] == 0).all()
    assert torch.isclose(r.sum(), seed.sum())


def test_rules_declare_what_they_pass_on():
    """The identity passes relevance as it came (``"output"``); a sum with a constant takes the
    identity; a route routes only for ops whose contract says they move values."""
    assert rules.Identity().vanishes(None) == "output"
    assert rules.Folded(rules.Epsilon(), 0).vanishes(None) == "inputs"
    assert rules.Folded(rules.Flat(), 0).vanishes(None) is None
    assert rules.Rule().vanishes(None) is None  # a rule that says nothing


def test_a_subclass_that_changes_the_rule_inherits_no_declaration():
    """The engine trusts ``vanishes`` only from the class that defines ``__call__`` (or below):
    a user's subclass of Epsilon with its own ``__call__`` says nothing until it says so."""

    class Spread(rules.Epsilon):  # relevance for every input, zero or not
        def __call__(self, ctx):
            return [None if i not in ctx.reaching else torch.full(ctx.input_shape(i), 1.0, dtype=DT)
                    for i in range(ctx.num_inputs)]

    class Declared(Spread):
        def vanishes(self, ctx):
            return None

    class Tuned(rules.Epsilon):  # the same rule, another stabiliser: the declaration holds
        def __init__(self) -> None:
            super().__init__(0.5)

    assert rules.vanishes_of(Spread(), None) is None
    assert rules.vanishes_of(Declared(), None) is None
    assert rules.vanishes_of(Tuned(), None) == "inputs"
    assert rules.vanishes_of(rules.ZPlus(), None) == "inputs"
    assert rules.vanishes_of(rules.Folded(Spread(), 0), None) is None


def test_the_identity_moves_relevance_without_being_called_and_a_subclass_is_called():
    """The engine hands relevance past a rule that declares it ``passes`` (the identity, shapes
    unchanged) without calling it -- the same numbers; a subclass with its own ``__call__``
    inherits no such declaration and is called."""
    calls = []

    class Counted(rules.Identity):  # the identity, called: counts the nodes it runs at
        def __call__(self, ctx):
            calls.append(ctx.gn.name)
            return super().__call__(ctx)

    class Doubled(rules.Identity):  # another rule: relevance twice as large
        def __call__(self, ctx):
            return [None if r is None else 2 * r for r in super().__call__(ctx)]

    assert rules.passes_of(rules.Identity()) and not rules.passes_of(Counted())
    assert not rules.passes_of(rules.Epsilon()) and not rules.passes_of(rules.Folded(rules.Identity(), 0))
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).to(DT).requires_grad_(False)
    bias = torch.randn(1, 4, dtype=DT)

    def f(x):  # tanh: shapes unchanged; * bias: a constant operand; relu: the top
        return lin(torch.tanh(lin(x)) * bias).relu()

    def explain(elementwise, product):
        x = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        seed = torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(2))
        r, = dynlrp.lrp(f(x), x, seed, rules={"elementwise": elementwise, "product": product}, model=lin)
        return r

    fast = explain(rules.Identity(), rules.Identity())
    called = explain(Counted(), Counted())
    assert torch.equal(fast, called) and sorted(calls) == ["MulBackward0", "ReluBackward0", "TanhBackward0"]
    torch.testing.assert_close(explain(Doubled(), rules.Identity()), 4 * fast)  # (relu and tanh: twice each)


# -- validation and errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,beta", [(1.5, 1.0), (2.0, 0.0), (-1.0, -2.0), (0.5, -0.5)])
def test_alpha_beta_validates_its_parameters(alpha, beta):
    with pytest.raises(ValueError):
        rules.AlphaBeta(alpha, beta)


def test_any_alpha_beta_with_difference_one():
    assert rules.AlphaBeta(5.0, 4.0).alpha == 5.0


def test_zennit_names_are_aliases():
    assert rules.Pass is rules.Identity
    assert rules.Norm is rules.Proportional


def test_weight_rule_on_an_op_without_weights_raises():
    x = torch.randn(3, 4, requires_grad=True)
    y = x + torch.randn(3, 4)
    with pytest.raises(dynlrp.LRPError, match="not an affine map"):
        dynlrp.lrp(y, x, rules={"sum": rules.Gamma()})


def test_weight_rule_on_a_product_of_two_requested_inputs_raises():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(dynlrp.LRPError, match="one requested"):
        dynlrp.lrp(a @ b, [a, b], rules={"linear": rules.ZPlus()})


def test_rule_reprs_name_their_parameters():
    assert repr(rules.Gamma(0.5)) == "Gamma(gamma=0.5, eps=1e-06, zero_bias=False)"
    assert "low=-1.0" in repr(rules.ZBox(-1.0, 1.0))

"""Rule sets and presets: which rule applies where (op name, group, kind, module, input layer),
graph-level canonization, and the Zennit-style presets.

References compose the dense per-layer references of ``test_rules`` layer by layer (ReLU and
flatten pass relevance unchanged), so a preset is checked against its meaning, not against
itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp import ops, rules
from dynlrp.graph import build
from dynlrp.presets import PRESETS, First, Module, RuleSet
from test_rules import DT, as_matrix, randomize, reference
from test_rules import lrp as run

ZENNIT_PRESETS = ["epsilon", "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
                  "epsilon_alpha2_beta1_flat"]


def tiny_cnn() -> nn.Sequential:
    """conv -> relu -> conv -> relu -> flatten -> linear, frozen, random biases."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 3))
    return randomize(model).requires_grad_(False)


def chain_reference(model: nn.Sequential, x: torch.Tensor, seed: torch.Tensor,
                    layer_rules: dict) -> torch.Tensor:
    """LRP through ``model`` with ``layer_rules[index]`` on its affine layers, from dense matrices."""
    acts = [x]
    with torch.no_grad():
        for layer in model:
            acts.append(layer(acts[-1]))
    r = seed
    for index in reversed(range(len(model))):
        a = acts[index]
        if index in layer_rules:
            M, b = as_matrix(model[index], a)
            r = reference(layer_rules[index], M, b, a.flatten(), r.flatten(), a.shape).reshape(a.shape)
        else:  # relu and flatten: relevance passes (reshaped)
            r = r.reshape(a.shape)
    return r


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * max(float(b.abs().max()), 1.0))


@pytest.fixture
def cnn():
    model = tiny_cnn()
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    return model, x, torch.randn(2, 3, dtype=DT)


# -- presets ------------------------------------------------------------------------------------------

EPS = rules.Epsilon(1e-6)
EXPECTED = {  # preset -> rules of layers 0 (first conv), 2 (conv), 5 (dense)
    "epsilon": (EPS, EPS, EPS),
    "epsilon_plus": (rules.ZPlus(), rules.ZPlus(), EPS),
    "epsilon_plus_flat": (rules.Flat(), rules.ZPlus(), EPS),
    "epsilon_gamma_box": (rules.ZBox(-3.0, 3.0), rules.Gamma(0.25), EPS),
    "epsilon_alpha2_beta1": (rules.AlphaBeta(2, 1), rules.AlphaBeta(2, 1), EPS),
    "epsilon_alpha2_beta1_flat": (rules.Flat(), rules.AlphaBeta(2, 1), EPS),
}


@pytest.mark.parametrize("name", ZENNIT_PRESETS)
def test_preset_by_name_has_zennit_meaning(cnn, name):
    model, x, seed = cnn
    expected = chain_reference(model, x, seed, dict(zip((0, 2, 5), EXPECTED[name])))
    close(run(model, x, seed, name), expected)
    close(run(model, x, seed, PRESETS[name]()), expected)


def test_preset_objects_take_keyword_parameters(cnn):
    model, x, seed = cnn
    preset = dynlrp.presets.epsilon_gamma_box(low=-1.5, high=2.0, gamma=0.5, epsilon=0.01)
    expected = chain_reference(model, x, seed, {0: rules.ZBox(-1.5, 2.0), 2: rules.Gamma(0.5),
                                                5: rules.Epsilon(0.01)})
    close(run(model, x, seed, preset), expected)
    low = torch.full((1, 2, 1, 1), -2.0, dtype=DT)
    close(run(model, x, seed, dynlrp.presets.epsilon_gamma_box(low=low, high=2.0)),
          run(model, x, seed, dynlrp.presets.epsilon_gamma_box(low=-2.0, high=2.0)))
    with pytest.raises(TypeError):
        dynlrp.presets.epsilon_plus(1e-3)  # keywords only


def test_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="epsilon_gamma_box"):
        dynlrp.LRP("epsilon_gamma")


# -- overrides by op -----------------------------------------------------------------------------------

def test_override_by_op_group_name_and_kind(cnn):
    model, x, seed = cnn
    as_epsilon = run(model, x, seed, "epsilon")
    close(run(model, x, seed, dynlrp.presets.epsilon_plus().override({"conv": rules.Epsilon()})), as_epsilon)
    close(run(model, x, seed, dynlrp.presets.epsilon_plus().override(
        {"ConvolutionBackward0": rules.Epsilon()})), as_epsilon)
    # op name beats group beats kind
    rs = RuleSet({"linear": rules.ZPlus(), "conv": rules.Gamma(), "AddmmBackward0": rules.Flat()})
    # (flat on the dense layer sends relevance where the ReLU clipped: record the values)
    expected = chain_reference(model, x, seed, {0: rules.Gamma(), 2: rules.Gamma(), 5: rules.Flat()})
    close(run(model, x, seed, rs, tape=True), expected)


def test_override_keeps_the_original(cnn):
    base = dynlrp.presets.epsilon_plus()
    changed = base.override({"conv": rules.Epsilon()}, canonize=False)
    assert isinstance(base.mapping["conv"], rules.ZPlus) and base.canonize
    assert isinstance(changed.mapping["conv"], rules.Epsilon) and not changed.canonize


# -- overrides by module ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [Module("2"), Module("[2]"), Module(nn.Conv2d), "instance"],
                         ids=["name", "pattern", "type", "instance"])
def test_override_by_module(cnn, key):
    model, x, seed = cnn
    key = Module(model[2]) if key == "instance" else key
    rs = dynlrp.presets.epsilon().override({key: rules.ZPlus()}).bind(model)
    first = rules.ZPlus() if key == Module(nn.Conv2d) else EPS
    close(run(model, x, seed, rs), chain_reference(model, x, seed, {0: first, 2: rules.ZPlus(), 5: EPS}))


def test_module_of_a_dense_layer_and_trainable_parameters(cnn):
    model, x, seed = cnn
    model.requires_grad_(True)  # parameters are graph leaves now
    rs = dynlrp.presets.epsilon().override({Module("5"): rules.Flat()}).bind(model)
    expected = chain_reference(model, x, seed, {0: EPS, 2: EPS, 5: rules.Flat()})
    close(run(model, x, seed, rs, tape=True), expected)


def test_module_keys_need_the_model(cnn):
    model, x, seed = cnn
    with pytest.raises(dynlrp.LRPError, match="bind"):
        run(model, x, seed, dynlrp.presets.epsilon().override({Module("0"): rules.Flat()}))
    with pytest.raises(TypeError):
        RuleSet().bind("model")


def test_precedence_module_name_then_first_then_module_type_then_op(cnn):
    model, x, seed = cnn
    rs = RuleSet({
        "conv": rules.Epsilon(),
        Module(nn.Conv2d): rules.Gamma(1.0),
        First("conv"): rules.Flat(),
        Module("2"): rules.ZPlus(),
    }).bind(model)
    expected = chain_reference(model, x, seed, {0: rules.Flat(), 2: rules.ZPlus(), 5: EPS})
    close(run(model, x, seed, rs), expected)
    rs = rs.override({Module("0"): rules.WSquare()})
    close(run(model, x, seed, rs), chain_reference(model, x, seed, {0: rules.WSquare(), 2: rules.ZPlus(),
                                                                   5: EPS}))


def test_first_layer_is_found_after_input_normalisation():
    model = tiny_cnn()
    mean = torch.rand(1, 2, 1, 1, dtype=DT)

    class Normalised(nn.Module):
        def forward(self, x):
            return model((x - mean) / 2.0)

    x = torch.randn(2, 2, 5, 5, dtype=DT)
    seed = torch.randn(2, 3, dtype=DT)
    rs = dynlrp.presets.epsilon_gamma_box(low=-1.0, high=1.0, canonize=False).override(
        {"sum": rules.Pass(), "product": rules.Pass()})
    expected = chain_reference(model, (x - mean) / 2.0, seed,
                               {0: rules.ZBox(-1.0, 1.0), 2: rules.Gamma(), 5: EPS})
    close(run(Normalised(), x, seed, rs), expected)


def test_model_is_never_touched(cnn):
    model, x, seed = cnn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    rs = dynlrp.presets.epsilon_gamma_box().override({Module("2"): rules.ZPlus()}).bind(model)
    run(model, x, seed, rs)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == grads
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# -- canonization --------------------------------------------------------------------------------------------

def bn_cnn(train_bn: bool = False) -> nn.Sequential:
    torch.manual_seed(8)
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 2),
                                    nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
                                    nn.BatchNorm1d(5)))
    if train_bn:
        model.train()
    return model.requires_grad_(False)


def merged(model: nn.Sequential) -> nn.Sequential:
    """The model with every batch norm folded into the layer before it (written out here)."""
    layers = []
    for layer in model:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            prev = layers.pop()
            s = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            fused = type(prev)(*([prev.in_channels, prev.out_channels, prev.kernel_size]
                                 if isinstance(prev, nn.Conv2d) else [prev.in_features, prev.out_features]))
            fused = fused.to(DT).requires_grad_(False)
            shape = [-1] + [1] * (prev.weight.dim() - 1)
            fused.weight.copy_(prev.weight * s.reshape(shape))
            fused.bias.copy_((prev.bias - layer.running_mean) * s + layer.bias)
            layers.append(fused)
        else:
            layers.append(layer)
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("name", ZENNIT_PRESETS)
@pytest.mark.parametrize("tape", [False, True], ids=["promise", "recorded"])
def test_canonization_equals_the_merged_model(name, tape):
    model = bn_cnn()
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    seed = torch.randn(2, 5, dtype=DT)
    close(run(model, x, seed, name, tape), run(merged(model), x, seed, name, tape))


def test_canonization_can_be_turned_off():
    model = bn_cnn()
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    seed = torch.randn(2, 5, dtype=DT)
    on = run(model, x, seed, dynlrp.presets.epsilon_plus(), tape=True)
    off = run(model, x, seed, dynlrp.presets.epsilon_plus(canonize=False), tape=True)
    assert not torch.allclose(on, off)


def rules_at(rule_set: RuleSet, y: torch.Tensor, x: torch.Tensor) -> dict[str, list]:
    graph = build((y,), (x,))
    found: dict[str, list] = {}
    for i in graph.order:
        gn = graph.nodes[i]
        if not gn.is_leaf:
            found.setdefault(gn.name, []).append(rule_set.rule_at(graph, gn, ops.lookup(gn.name)))
    return found


def test_what_is_folded():
    x = torch.randn(4, 2, 5, 5, dtype=DT, requires_grad=True)
    rs = dynlrp.presets.epsilon_plus()
    found = rules_at(rs, bn_cnn()(x), x)
    assert all(isinstance(r, rules.Folded) for r in found["ConvolutionBackward0"] + found["AddmmBackward0"])
    assert all(isinstance(r, rules.Pass) for r in found["NativeBatchNormBackward0"])
    # batch norm in training mode mixes examples: nothing folds
    found = rules_at(rs, bn_cnn(train_bn=True)(x), x)
    assert not any(isinstance(r, rules.Folded) for r in found["ConvolutionBackward0"])
    # an op whose output has another consumer besides the batch norm is not folded
    conv, bn = bn_cnn()[0], bn_cnn()[1]
    h = conv(x)
    found = rules_at(rs, bn(h) + h, x)
    assert not any(isinstance(r, rules.Folded) for r in found["ConvolutionBackward0"])


def test_plan_cache_keeps_the_assignment():
    model = bn_cnn()
    engine = dynlrp.LRP(dynlrp.presets.epsilon_gamma_box().override({Module("3"): rules.Flat()}).bind(model))
    x = torch.randn(2, 2, 5, 5, dtype=DT, requires_grad=True)
    seed = torch.randn(2, 5, dtype=DT)
    first = engine(model(x), x, seed)[0]
    second = engine(model(x), x, seed)[0]
    assert engine.stats["cached_plan"]
    torch.testing.assert_close(first, second)


# -- rule set checks -----------------------------------------------------------------------------------

def test_rule_set_validates_keys_and_rules():
    with pytest.raises(TypeError):
        RuleSet({3: rules.Epsilon()})
    with pytest.raises(TypeError):
        RuleSet({"linear": "epsilon"})
    with pytest.raises(TypeError):
        First()
    with pytest.raises(TypeError):
        Module(3)


def test_selectors_compare_by_value_and_print():
    assert Module("a.b") == Module("a.b") and hash(First("conv")) == hash(First("conv"))
    assert repr(Module("features.0")) == "Module('features.0')"
    assert repr(Module(nn.Conv2d)) == "Module(Conv2d)"
    assert repr(First("conv", "dense")) == "First('conv', 'dense')"
    assert "canonize=True" in repr(dynlrp.presets.epsilon())

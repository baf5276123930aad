"""dynlrp's Zennit-style presets against Zennit 0.5.1 on torchvision CNNs.

Random init, eval mode, frozen parameters, batch 2, one-hot seed on the top logit. Biases and
batch-norm statistics and affine parameters get random values first (library inits set them
to 0 / identity, which hides mistakes). Computed in float64 so that the comparison measures
the rules, not float32 noise amplified through fifty layers (docs/rules.md lists the float32
numbers). Batch norms get ``eps = 1e-30``: Zennit's merge leaves each folded batch norm
computing ``x / sqrt(1 + eps)``, a different model by ``eps / 2`` per layer, while dynlrp
folds the exact map (``test_bn_eps_is_the_only_difference_on_vgg16_bn`` pins that effect).

Zennit has no canonizer for DenseNet, MobileNet or EfficientNet, and leaves every op that is
not a hooked module -- functional ``x + y``, ``x * gate``, ``F.adaptive_avg_pool2d`` -- to the
plain gradient. dynlrp gives those ops LRP rules. To compare the rules, those ops get
dynlrp's gradient rule (``Route``) here; ``test_functional_ops_are_where_zennit_differs`` pins
that the plain presets differ from Zennit there and only there. DenseNet's batch norms are
merged for Zennit by an explicit name map (its ``SequentialMergeBatchNorm`` would pair each
layer's last convolution with the next layer's first batch norm, which reads a concatenation).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import dynlrp
from dynlrp.rules import Route
from models import Untouched

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")

from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import NamedMergeBatchNorm, SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (  # noqa: E402
    EpsilonAlpha2Beta1,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.rules import Epsilon  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402
from zennit.types import Linear  # noqa: E402

pytestmark = pytest.mark.slow

DT = torch.float64
TOLERANCE = 1e-4  # max |dynlrp - zennit| / max |zennit|, per example


def densenet_pairs(model):
    pairs = [(("features.conv0",), "features.norm0")]
    pairs += [((name + ".conv1",), name + ".norm2") for name, m in model.named_modules()
              if type(m).__name__ == "_DenseLayer"]
    return [NamedMergeBatchNorm(pairs)]


# model -> (input size, Zennit canonizers, ops Zennit leaves to the gradient)
MODELS = {
    "vgg16": (32, lambda m: [], {}),
    "vgg16_bn": (32, lambda m: [VGGCanonizer()], {}),
    "resnet18": (64, lambda m: [ResNetCanonizer()], {}),
    "resnet50": (32, lambda m: [ResNetCanonizer()], {}),
    "densenet121": (32, densenet_pairs, {"MeanBackward1": Route()}),
    "mobilenet_v2": (64, lambda m: [SequentialMergeBatchNorm()],
                     {"AddBackward0": Route(), "MeanBackward1": Route()}),
    "efficientnet_b0": (64, lambda m: [SequentialMergeBatchNorm()],
                        {"AddBackward0": Route(), "MulBackward0": Route()}),
}

COMPOSITES = {
    "epsilon": lambda c: LayerMapComposite(layer_map_base() + [(Linear, Epsilon())], canonizers=c),
    "epsilon_plus": lambda c: EpsilonPlus(canonizers=c),
    "epsilon_gamma_box": lambda c: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=c),
    "epsilon_alpha2_beta1": lambda c: EpsilonAlpha2Beta1(canonizers=c),
    "epsilon_plus_flat": lambda c: EpsilonPlusFlat(canonizers=c),
}
PRESETS = ["epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"]
CASES = [(m, p) for m in MODELS for p in PRESETS]
CASES += [("vgg16", "epsilon_plus_flat"), ("resnet18", "epsilon_plus_flat")]

# Promise mode cannot rebuild these values from the graph alone (dynlrp.UnrecoverableValueError);
# given the model (a rule set bound to it) it reads the frozen biases from it and runs:
# - ResNet: a downsample block adds two frozen batch norms' outputs; their biases were never in the graph.
# - DenseNet: conv0 + norm0 are one folded map whose output (norm0's bias is frozen) is known only
#   through relu0, and max pooling routes relevance to clipped positions (windows of zeros). z-box,
#   the input rule of epsilon_gamma_box, needs no output there.
PROMISE_FAILS = {"resnet18", "resnet50"}
PROMISE_FAILS_WITH = {("densenet121", p) for p in ("epsilon", "epsilon_plus", "epsilon_alpha2_beta1")}


def randomize(model: torch.nn.Module, eps: float) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.uniform_(-0.2, 0.2, generator=gen)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(-0.5, 1.5, generator=gen)
                m.eps = eps
    return model


@functools.lru_cache(maxsize=1)  # VGG-16 in float64 takes 1.1 GB
def setup(name: str, bn_eps: float = 1e-30, size: int | None = None):
    torch.manual_seed(0)
    model = randomize(getattr(torchvision.models, name)(), bn_eps).to(DT).eval().requires_grad_(False)
    size = size or MODELS[name][0]
    x = torch.randn(2, 3, size, size, dtype=DT)
    with torch.no_grad():
        logits = model(x)
    seed = torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(DT)
    return model, x, seed


def ours(model, x, seed, rules, recorded=True):
    """dynlrp's relevance, recorded or promise mode; checks that the model, the input, the seed and
    the output are left as they were (:class:`models.Untouched`)."""
    xx = x.clone().requires_grad_(True)
    with dynlrp.record() if recorded else contextlib.nullcontext() as tape:
        y = model(xx)
    with Untouched(model, xx, seed, y):
        return dynlrp.lrp(y, xx, seed, rules=rules, tape=tape)[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per example: max |a - b| / max |b|."""
    return (a - b).abs().flatten(1).max(1).values / b.abs().flatten(1).max(1).values


def zennit_for(name, preset, bn_eps=1e-30, size=None):
    model, x, seed = setup(name, bn_eps, size)
    composite = COMPOSITES[preset](MODELS[name][1](model))
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x.clone().requires_grad_(True), seed)
    return relevance


@pytest.mark.parametrize("name,preset", CASES)
def test_presets_agree_with_zennit(name, preset):
    expected = zennit_for(name, preset)
    model, x, seed = setup(name)
    rules = dynlrp.presets.PRESETS[preset]().override(MODELS[name][2])
    recorded = ours(model, x, seed, rules)
    assert (relative(recorded, expected) < TOLERANCE).all(), relative(recorded, expected)
    if name in PROMISE_FAILS or (name, preset) in PROMISE_FAILS_WITH:
        with pytest.raises(dynlrp.UnrecoverableValueError):
            ours(model, x, seed, rules, recorded=False)
        rules = rules.bind(model)
    promised = ours(model, x, seed, rules, recorded=False)
    assert (relative(promised, recorded) < 1e-10).all(), relative(promised, recorded)


@pytest.mark.parametrize("name,size", [("densenet121", 64), ("mobilenet_v2", 64), ("efficientnet_b0", 64)])
def test_functional_ops_are_where_zennit_differs(name, size):
    """The plain preset gives functional sums, means and products LRP rules where Zennit passes
    the gradient: the results differ (they agree once those ops take the gradient, see
    test_presets_agree_with_zennit). DenseNet ends with functional ``F.relu`` and
    ``F.adaptive_avg_pool2d``; with a 2 x 2 last feature map (64 x 64 input) Zennit's gradient
    through the ReLU drops the relevance the mean spreads onto clipped positions, which no
    op-level override reproduces (the module ReLUs must keep the identity rule), so DenseNet
    is compared at 32 x 32, where the last map is 1 x 1."""
    expected = zennit_for(name, "epsilon_plus", size=size)
    model, x, seed = setup(name, size=size)
    plain = ours(model, x, seed, "epsilon_plus")
    assert (relative(plain, expected) > 1e-3).all(), relative(plain, expected)


def test_bn_eps_is_the_only_difference_on_vgg16_bn():
    """With the default eps = 1e-5 Zennit's merged model computes x / sqrt(1 + eps) in every
    batch norm; dynlrp folds the exact map. The results differ a little, by far less than the
    tolerance; with eps -> 0 they agree to rounding (see test_presets_agree_with_zennit)."""
    expected = zennit_for("vgg16_bn", "epsilon_plus", bn_eps=1e-5)
    model, x, seed = setup("vgg16_bn", 1e-5)
    diff = relative(ours(model, x, seed, "epsilon_plus"), expected)
    assert (diff > 1e-7).all() and (diff < TOLERANCE).all(), diff


@pytest.mark.parametrize("name", list(MODELS))
def test_every_op_is_covered(name):
    model, x, _ = setup(name)
    report = dynlrp.coverage(model(x.clone().requires_grad_(True)))
    assert report.complete, str(report)

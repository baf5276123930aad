"""Whole models, end to end: small bias-free networks conserve relevance per example (LRP-0),
and torchvision's VGG16 and ResNet18 (random init, eval, random biases and batch-norm
statistics) run in recorded mode, with promise mode equal to it wherever it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp
from models import (
    CNN,
    LRP0,
    MLP,
    DownsampleBlock,
    ResidualCNN,
    Untouched,
    assert_close,
    freeze,
    per_row_seed,
    randomize_affine,
    sequential_lrp,
)


def set_trainable(model: nn.Module, trainable: bool) -> nn.Module:
    """Eval mode, and every parameter trainable or frozen.

    Parameters
    ----------
    model
        The model, changed in place.
    trainable
        ``requires_grad`` for every parameter.

    Returns
    -------
    nn.Module
        The same model.
    """
    return model.eval().requires_grad_(trainable)


def explain_both(model: nn.Module, x: torch.Tensor, targets: list[int], rules=None,
                 pass_model: bool = False) -> tuple:
    """One forward pass under ``dynlrp.record()``; relevance of one logit per row in recorded
    mode and in promise mode (``None`` if promise mode raised
    :class:`dynlrp.UnrecoverableValueError`, which is returned instead). Checks that neither
    mode changes the model or the input, output and seed (:class:`models.Untouched`).

    Parameters
    ----------
    model
        The model.
    x
        The input batch (requires grad).
    targets
        One class per row.
    rules
        The ``rules=`` argument.
    pass_model
        Give promise mode the model (``model=``), so that it can read frozen biases.

    Returns
    -------
    tuple
        ``(seed, recorded, promised)``.
    """
    with dynlrp.record() as tape:
        y = model(x)
    seed = per_row_seed(y, targets)
    with Untouched(model, x, y, seed):  # nothing mutated, in either mode
        recorded, = dynlrp.lrp(y, x, seed, rules=rules, tape=tape, retain_graph=True)
        try:  # (the last call on the graph: the default, which frees it)
            promised, = dynlrp.lrp(y, x, seed, rules=rules, model=model if pass_model else None)
        except dynlrp.UnrecoverableValueError as exc:
            promised = exc
    return seed, recorded, promised


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_bias_free_network_conserves_per_example(arch, trainable):
    model = set_trainable(MLP() if arch == "mlp" else CNN(), trainable)
    x = torch.randn(3, 6) if arch == "mlp" else torch.randn(3, 3, 8, 8)
    x.requires_grad_(True)
    seed, recorded, promised = explain_both(model, x, [1, 3, 0], LRP0)
    dims = tuple(range(1, x.dim()))
    assert_close(promised.sum(dims), seed.sum(1))
    assert_close(promised, recorded)
    assert_close(promised, sequential_lrp(model, x, seed))
    assert (promised[0] != 0).any() and (promised[2] != 0).any()


def test_frozen_and_trainable_give_the_same_relevance():
    model = CNN()
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    _, frozen, _ = explain_both(set_trainable(model, False), x, [0, 1, 2], LRP0)
    _, _, trainable = explain_both(set_trainable(model, True), x, [0, 1, 2], LRP0)
    assert_close(trainable, frozen)


def test_residual_cnn_frozen():
    model = set_trainable(ResidualCNN(), False)
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    seed, recorded, promised = explain_both(model, x, [4, 0, 2], LRP0)
    assert_close(promised, recorded)
    assert_close(promised.sum((1, 2, 3)), seed.sum(1))


def test_downsample_block_with_frozen_batchnorms_needs_record():
    """The add sums two batch norms whose frozen biases autograd never saw: promise mode
    cannot rebuild them and says to record; with trainable biases it can."""
    block = freeze(randomize_affine(DownsampleBlock()))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with dynlrp.record() as tape:
        y = block(x)
    with pytest.raises(dynlrp.UnrecoverableValueError, match=r"dynlrp\.record\(\)"):
        dynlrp.lrp(y, x, retain_graph=True)
    recorded, = dynlrp.lrp(y, x, tape=tape, retain_graph=True)
    assert torch.isfinite(recorded).all()
    # given the model, promise mode reads the frozen biases from the batch-norm modules
    promised, = dynlrp.lrp(y, x, model=block)
    assert_close(promised, recorded)
    for name, p in block.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    with dynlrp.record() as tape:
        y = block(x)
    recorded, = dynlrp.lrp(y, x, tape=tape, retain_graph=True)
    promised, = dynlrp.lrp(y, x)
    assert_close(promised, recorded)


# --------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def vgg16():
    """torchvision VGG16, random init, eval, frozen, random biases."""
    torch.manual_seed(1)
    return freeze(randomize_affine(torchvision.models.vgg16()))


@pytest.fixture(scope="module")
def resnet18():
    """torchvision ResNet18, random init, eval, random biases and batch-norm statistics."""
    torch.manual_seed(2)
    return freeze(randomize_affine(torchvision.models.resnet18()))


@pytest.mark.slow
def test_vgg16_frozen_promise_equals_recorded(vgg16):
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    seed, recorded, promised = explain_both(vgg16, x, [3, 7])
    assert recorded.shape == x.shape and torch.isfinite(recorded).all()
    assert (recorded.abs().sum((1, 2, 3)) > 0).all()
    assert not isinstance(promised, Exception), promised
    assert_close(promised, recorded, rel=1e-4)


@pytest.mark.slow
def test_resnet18_frozen_recorded_runs_and_promise_mode_says_record(resnet18):
    resnet18.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    seed, recorded, promised = explain_both(resnet18, x, [5, 1])
    assert recorded.shape == x.shape and torch.isfinite(recorded).all()
    assert (recorded.abs().sum((1, 2, 3)) > 0).all()
    assert isinstance(promised, dynlrp.UnrecoverableValueError)
    assert "dynlrp.record()" in str(promised)
    assert "BatchNorm" in str(promised)


@pytest.mark.slow
def test_resnet18_frozen_promise_with_model_equals_recorded(resnet18):
    """Fully frozen: the Promise System reads the biases autograd never saw from the model."""
    resnet18.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    seed, recorded, promised = explain_both(resnet18, x, [5, 1], pass_model=True)
    assert not isinstance(promised, Exception), promised
    assert_close(promised, recorded, rel=1e-4)


@pytest.mark.slow
def test_resnet18_trainable_biases_promise_equals_recorded(resnet18):
    for name, p in resnet18.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    try:
        x = torch.randn(2, 3, 64, 64, requires_grad=True)
        seed, recorded, promised = explain_both(resnet18, x, [5, 1])
    finally:
        resnet18.requires_grad_(False)
    assert not isinstance(promised, Exception), promised
    assert torch.isfinite(recorded).all()
    assert_close(promised, recorded, rel=1e-4)

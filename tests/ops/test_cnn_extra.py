"""The ``affine`` views and ``group`` names of the op entries that CNN rules use
(``ops/linear.py``, ``ops/norm.py``) and :func:`dynlrp.ops.fold`, against the true forward.

An affine view says ``z = linear(x, weight) + bias``: checked against the layer's output,
for linearity in ``x``, for ``scale_out`` (one factor per output channel) and for the
parameters it names. Everything in float64, with random biases and statistics.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynlrp import ops

DT = torch.float64


def node_of(y: torch.Tensor, name: str):
    """The first autograd node called ``name`` on the way from ``y`` to the inputs."""
    stack, seen = [y.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn.name() == name:
            return fn
        stack += [child for child, _ in fn.next_functions]
    raise AssertionError(f"no {name} node")


def randomized(layer: nn.Module, trainable: bool) -> nn.Module:
    with torch.no_grad():
        for m in layer.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.uniform_(-1, 1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.weight is not None:
                    m.weight.uniform_(-1, 2)
    return layer.to(DT).eval().requires_grad_(trainable)


class Product(nn.Module):
    """``W @ x`` (data on the right) or ``x @ W`` (data on the left), optionally ``+ b`` via addmm."""

    def __init__(self, left: bool, bias: bool) -> None:
        super().__init__()
        self.left, self.weight = left, nn.Parameter(torch.randn(5, 6) if left else torch.randn(6, 5))
        self.bias = nn.Parameter(torch.randn(5, 1) if left else torch.randn(5)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return self.weight @ x if self.left else x @ self.weight
        return torch.addmm(self.bias, self.weight, x) if self.left else torch.addmm(self.bias, x, self.weight)


# name -> (layer factory, input shape, node name, data slot, group, can scale output channels)
CONV, BN = "ConvolutionBackward0", "NativeBatchNormBackward0"
CASES = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6), "AddmmBackward0", 1, "dense", True),
    "linear-nobias": (lambda: nn.Linear(6, 5, bias=False), (3, 6), "MmBackward0", 0, "dense", True),
    "mm-left-weight": (lambda: Product(True, False), (6, 4), "MmBackward0", 1, "dense", False),
    "addmm-left-weight": (lambda: Product(True, True), (6, 4), "AddmmBackward0", 2, "dense", False),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3, stride=2), (2, 2, 9), CONV, 0, "conv", True),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5), CONV, 0, "conv", True),
    "conv3d-nobias": (lambda: nn.Conv3d(2, 3, 2, bias=False), (1, 2, 3, 3, 3), CONV, 0, "conv", True),
    "conv-transpose-groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 3, 3), CONV, 0,
                              "conv", True),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), (2, 3, 4, 4), BN, 0, "batchnorm", True),
    "batchnorm1d": (lambda: nn.BatchNorm1d(5), (4, 5), BN, 0, "batchnorm", True),
    "batchnorm-noaffine": (lambda: nn.BatchNorm2d(3, affine=False), (2, 3, 4, 4), BN, 0, "batchnorm", True),
}


def view_of(case: str, trainable: bool):
    factory, shape, name, slot, _, _ = CASES[case]
    torch.manual_seed(0)
    layer = randomized(factory(), trainable)
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    y = layer(x)
    node = node_of(y, name)
    return layer, x, y, ops.lookup(name).affine(node, slot)


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("case", list(CASES))
def test_affine_view_rebuilds_the_output(case, trainable):
    layer, x, y, view = view_of(case, trainable)
    assert view is not None
    lin = view.linear(x.detach(), view.weight.detach())
    has_bias = getattr(layer, "bias", None) is not None
    if view.bias_known:
        bias = 0.0 if view.bias is None else view.bias.detach()
        torch.testing.assert_close(lin + bias, y.detach())
    else:  # a frozen bias is neither saved nor in the graph
        assert not trainable and has_bias and view.bias is None
    if trainable or not has_bias:
        assert view.bias_known


@pytest.mark.parametrize("case", list(CASES))
def test_affine_view_is_linear_in_x_and_scales_output_channels(case):
    layer, x, y, view = view_of(case, False)
    w = view.weight.detach()
    a, b = torch.randn_like(x), torch.randn_like(x)
    torch.testing.assert_close(view.linear(2.0 * a - b, w), 2.0 * view.linear(a, w) - view.linear(b, w))
    # modified weights go through the same map: linear(x, w1 + w2) = linear(x, w1) + linear(x, w2)
    w2 = torch.randn_like(w)
    torch.testing.assert_close(view.linear(a, w + w2), view.linear(a, w) + view.linear(a, w2))
    if CASES[case][5]:
        out = view.linear(a, w)
        s = torch.randn(out.shape[1], dtype=DT)
        image = s.reshape([1, -1] + [1] * (out.dim() - 2))
        torch.testing.assert_close(view.linear(a, view.scale_out(w, s)), image * out)
    else:
        assert view.scale_out is None


@pytest.mark.parametrize("case", list(CASES))
def test_affine_view_names_the_layer_parameters_and_group(case):
    layer, x, y, view = view_of(case, False)
    name = CASES[case][2]
    assert ops.lookup(name).group == CASES[case][4]
    ptrs = {p.data_ptr() for p in view.params}
    owned = [t for t in (*layer.parameters(), *layer.buffers()) if t.numel() > 1]
    assert ptrs and ptrs <= {t.data_ptr() for t in owned}
    assert view.channelwise == (CASES[case][4] == "batchnorm")


def test_affine_view_only_for_the_data_input():
    layer, x, y, view = view_of("conv2d-groups", False)
    node = node_of(y, "ConvolutionBackward0")
    assert ops.lookup("ConvolutionBackward0").affine(node, 1) is None


def test_batch_norm_in_training_mode_has_no_affine_view():
    bn = randomized(nn.BatchNorm2d(3), True).train()
    y = bn(torch.randn(4, 3, 2, 2, dtype=DT, requires_grad=True))
    node = node_of(y, "NativeBatchNormBackward0")
    assert ops.lookup(node.name()).affine(node, 0) is None


@pytest.mark.parametrize("first", ["linear", "conv2d-groups", "conv-transpose-groups", "conv3d-nobias"])
def test_fold_is_the_batch_norm_after_the_op(first):
    factory, shape, name, slot, _, _ = CASES[first]
    torch.manual_seed(0)
    layer = randomized(factory(), True)
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    h = layer(x)
    bn = randomized((nn.BatchNorm1d if h.dim() == 2 else nn.BatchNorm2d if h.dim() == 4 else nn.BatchNorm3d)(
        h.shape[1]), True)
    y = bn(h)
    folded = ops.fold(ops.lookup(name).affine(node_of(y, name), slot),
                      ops.lookup("NativeBatchNormBackward0").affine(y.grad_fn, 0))
    assert folded.bias_known
    torch.testing.assert_close(folded.linear(x.detach(), folded.weight) + folded.bias, y.detach())
    # with a frozen batch norm the bias is unknown, and so is the folded one
    y2 = bn.requires_grad_(False)(layer(x))
    folded2 = ops.fold(ops.lookup(name).affine(node_of(y2, name), slot),
                       ops.lookup("NativeBatchNormBackward0").affine(y2.grad_fn, 0))
    assert not folded2.bias_known
    torch.testing.assert_close(folded2.weight, folded.weight)


def test_fold_refuses_maps_that_cannot_absorb_a_channel_scale():
    _, _, _, left = view_of("mm-left-weight", False)
    _, _, _, bn = view_of("batchnorm1d", False)
    with pytest.raises(ValueError):
        ops.fold(left, bn)


def test_batch_norm_with_a_bias_and_no_weight():
    x = torch.randn(2, 3, 4, dtype=DT, requires_grad=True)
    mean, var = torch.randn(3, dtype=DT), torch.rand(3, dtype=DT) + 0.5
    bias = torch.randn(3, dtype=DT, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, mean, var, None, bias, False, 0.1, 1e-5)
    view = ops.lookup(y.grad_fn.name()).affine(y.grad_fn, 0)
    assert view.bias_known and view.channelwise
    torch.testing.assert_close(view.linear(x.detach(), view.weight) + view.bias, y.detach())

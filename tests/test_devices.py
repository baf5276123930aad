"""Devices: autograd node names that differ by device or backend resolve to op entries, and a
small CNN and a tiny Llama explained on CUDA agree with the CPU (skipped without a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynlrp
from dynlrp import ops

#: Node class names of CUDA (and other accelerator) kernels, which CPU runs never build.
DEVICE_NODES = {
    "ScaledDotProductFlashAttentionBackward0": "attention",
    "ScaledDotProductEfficientAttentionBackward0": "attention",
    "ScaledDotProductCudnnAttentionBackward0": "attention",
    "ScaledDotProductFusedAttentionOverrideableBackward0": "attention",
    "ScaledDotProductFlashAttentionForCpuBackward0": "attention",
    "CudnnBatchNormBackward0": "linear",
    "MiopenBatchNormBackward0": "linear",
    "NativeBatchNormBackward0": "linear",
}


@pytest.mark.parametrize("name,kind", list(DEVICE_NODES.items()))
def test_device_specific_nodes_have_entries(name, kind):
    entry = ops.lookup(name)
    assert entry is not None, name
    assert entry.kind == kind
    assert entry.forward is not None  # the Promise System can replay it


def _seed(y: torch.Tensor) -> torch.Tensor:
    t = y.argmax(-1, keepdim=True)
    return torch.zeros_like(y).scatter(-1, t, y.gather(-1, t)).detach()


def _cnn():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 5))
    return m.eval().requires_grad_(False), torch.randn(2, 3, 16, 16), lambda m, x: m(x), None


def _llama():
    pytest.importorskip("transformers")
    from models import tiny_llama

    return tiny_llama()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("build", [_cnn, _llama], ids=["cnn", "llama"])
def test_cuda_agrees_with_cpu(build):
    model, x, forward, rules = build()
    out = {}
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        xx = x.to(device).requires_grad_(True)
        y = forward(m, xx)
        r, = dynlrp.lrp(y, xx, _seed(y), rules=rules, model=m)
        assert r.device.type == device and torch.isfinite(r).all()
        out[device] = r.double().cpu()
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-3, atol=1e-5 * float(out["cpu"].abs().max()))

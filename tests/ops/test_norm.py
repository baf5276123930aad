"""Brute-force tests of the batch-norm op entries (src/dynlrp/ops/norm.py).

Batch norm at inference is the affine map ``z = (x - m) * w / sqrt(v + e) + b`` per channel;
the reference is the epsilon rule written out, with the whole shift ``b - m * w / sqrt(v + e)``
as the bias: ``R_x = x * w / sqrt(v + e) * R / (z + eps * sign(z))``. The running statistics,
weight and bias are random (never the identity defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dynlrp

from .helpers import (
    DT,
    Case,
    case_tests,
    check_closures,
    constants,
    covered,
    randn,
    stab,
)

EPS = 1e-10
RULES = {"linear": dynlrp.rules.Epsilon(EPS)}
BN_EPS = 1e-3
B = 3
C = 3
const = constants(31)
MEAN = const(C)
VAR = const(C, positive=True)
SCALE = 1 / torch.sqrt(VAR + BN_EPS)


def _channel(t, x):
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def _reference(eps):
    def reference(v, r):
        x, w, b = v
        s = SCALE if w is None else SCALE * w
        z = (x - _channel(MEAN, x)) * _channel(s, x) + (0 if b is None else _channel(b, x))
        return [x * _channel(s, x) * r / stab(z, eps)]

    return reference


def _bn(x, w, b):
    return F.batch_norm(x, MEAN, VAR, w, b, training=False, momentum=0.1, eps=BN_EPS)


def _case(spatial, affine="random", trainable=False, eps=EPS) -> Case:
    def make():
        x = randn(B, C, *spatial)
        if affine == "none":
            return [x, None, None]
        w = randn(C, grad=trainable)
        if affine == "zero-shift":  # b = m * w / sqrt(v + e): the affine map has no bias
            b = (MEAN * SCALE * w.detach()).requires_grad_(trainable)
        else:
            b = randn(C, grad=trainable)
        return [x, w, b]

    # a frozen bias is an operand autograd never saw: promise mode cannot rebuild the output
    replay = "unrecoverable" if affine != "none" and not trainable else "ok"
    tag = "trainable" if trainable else "frozen"
    return Case(f"bn{max(len(spatial), 1)}d-{'x'.join(map(str, (B, C, *spatial)))}-{affine}-{tag}",
                ("NativeBatchNormBackward0",), _bn, make, _reference(eps),
                rules=RULES if eps == EPS else {"linear": dynlrp.rules.Epsilon(eps)},
                conserve=affine == "zero-shift", in_axes=(0, None, None), replay=replay,
                tol=1e-7 if eps == EPS else 1e-5)


SPATIAL = [(), (5,), (3, 4), (2, 2, 3)]
CASES = [_case(s, p, t) for s in SPATIAL
         for p, t in (("random", False), ("random", True), ("zero-shift", True), ("none", False))]
# conservation with frozen parameters; a visible stabiliser (rules.stabilize rounds it to float32)
CASES += [_case((3, 4), "zero-shift", False), _case((4,), "random", True, eps=0.25)]


test_relevance, test_replay_before_frozen_layer = case_tests(CASES)


def test_module_in_eval_mode():
    bn = torch.nn.BatchNorm2d(C).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(MEAN)
        bn.running_var.copy_(VAR)
        bn.weight.copy_(torch.randn(C, dtype=DT))
        bn.bias.copy_(torch.randn(C, dtype=DT))
    bn.eps = BN_EPS
    x = randn(B, C, 3, 3)
    y = bn(x)
    assert y.grad_fn.name() == "NativeBatchNormBackward0"
    seed = torch.randn_like(y)
    (rx,) = dynlrp.lrp(y, x, seed, rules=RULES)
    (expected,) = _reference(EPS)([x.detach(), bn.weight.detach(), bn.bias.detach()], seed)
    torch.testing.assert_close(rx, expected)


def test_bias_without_weight():
    """A bias in the graph is added even without a weight (a frozen one is indistinguishable
    from none: autograd keeps neither)."""
    x = randn(B, C, 4)
    b = randn(C)
    y = _bn(x, None, b)
    check_closures(y)


def test_replay_at_inference_is_the_forward_bit_for_bit():
    """In float32 and float64 an eval batch norm is replayed with the forward's own kernel: the
    rebuilt output equals the one the model computed exactly (and in half the time of a
    multiply-add); in float16 the multiply-add in float32, rounded once, is close."""
    for dtype in (torch.float32, torch.float64, torch.float16):
        bn = torch.nn.BatchNorm2d(C).to(dtype).eval().requires_grad_(False)
        with torch.no_grad():
            bn.running_mean.copy_(MEAN)
            bn.running_var.copy_(VAR)
            bn.weight.normal_()
            bn.bias.normal_()
        x = torch.randn(B, C, 5, 5, dtype=dtype, requires_grad=True)
        y = bn(x)
        entry = dynlrp.ops.lookup(y.grad_fn.name())
        rebuilt = entry.forward(y.grad_fn, [x.detach(), None, bn.bias])
        if dtype == torch.float16:
            torch.testing.assert_close(rebuilt, y.detach(), rtol=1e-3, atol=1e-3)
        else:
            assert torch.equal(rebuilt, y.detach()), dtype


def test_contracts():
    for name in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"):
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("linear", "bias"), name


COVERED = covered(CASES)

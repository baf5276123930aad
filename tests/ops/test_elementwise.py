"""Brute-force tests of the single-input elementwise op entries (src/dynlrp/ops/elementwise.py).

Every nonlinearity, copy and dropout entry passes relevance unchanged (the identity rule,
``R_x = R``). What differs between them is their forward closure (replayed by the Promise
System with the parameters autograd saved: gelu's approximation, softplus' beta and
threshold, elu's alpha and scale, the slopes and bounds of the piecewise-linear ones) and,
for ReLU, copies and dtype casts, an inverse -- checked by :func:`check_closures`, by
:func:`check_replay` (a frozen layer after the op) and :func:`check_inverse_chain` (a frozen
layer with a frozen bias before it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dynlrp

from .helpers import (
    DT,
    Case,
    case_tests,
    covered,
    randn,
)

B = 3
SHAPE = (B, 3, 4)


def _identity(v, r):
    return [r.to(v[0].dtype)]


def _case(cid, name, fn, **kw) -> Case:
    return Case(cid, (name,) if isinstance(name, str) else name, fn, lambda: [randn(*SHAPE, away=0.05)],
                _identity, **kw)


def _relu_seed(y):
    # relevance flows only where the ReLU passed its input (as any rule above would give).
    return torch.randn_like(y) * (y > 0)


CASES = [
    _case("relu", "ReluBackward0", torch.relu, seed=_relu_seed),
    _case("relu-module", "ReluBackward0", lambda x: F.relu(x), seed=_relu_seed),
    _case("tanh", "TanhBackward0", torch.tanh),
    _case("sigmoid", "SigmoidBackward0", torch.sigmoid),
    _case("exp", "ExpBackward0", torch.exp),
    _case("gelu", "GeluBackward0", F.gelu),
    _case("gelu-tanh", "GeluBackward0", lambda x: F.gelu(x, approximate="tanh")),
    _case("silu", "SiluBackward0", F.silu),
    _case("softplus", "SoftplusBackward0", F.softplus),
    _case("softplus-beta2-threshold1", "SoftplusBackward0", lambda x: F.softplus(x, beta=2.0, threshold=1.0)),
    _case("elu", "EluBackward0", F.elu),
    _case("elu-alpha", "EluBackward0", lambda x: F.elu(x, alpha=0.7)),
    _case("selu", "EluBackward0", F.selu),
    _case("leaky-relu", "LeakyReluBackward0", lambda x: F.leaky_relu(x, 0.2)),
    _case("hardtanh", "HardtanhBackward0", lambda x: F.hardtanh(x, -0.7, 0.4)),
    _case("relu6", "HardtanhBackward0", F.relu6),
    _case("hardswish", "HardswishBackward0", F.hardswish),
    _case("hardsigmoid", "HardsigmoidBackward0", F.hardsigmoid),
    _case("mish", "MishBackward0", F.mish),
    _case("clamp-both", "ClampBackward1", lambda x: x.clamp(-0.5, 0.5)),
    _case("clamp-min-only", "ClampBackward1", lambda x: x.clamp(min=0.1)),
    _case("clamp-max-only", "ClampBackward1", lambda x: x.clamp(max=0.1)),
    _case("clamp_min", "ClampMinBackward0", lambda x: torch.clamp_min(x, -0.2)),
    _case("clone", "CloneBackward0", torch.clone),
    Case("contiguous", ("CloneBackward0", "TransposeBackward0"), lambda x: x.transpose(1, 2).contiguous(),
         lambda: [randn(*SHAPE)], lambda v, r: [r.transpose(1, 2)]),
    _case("alias", "AliasBackward0", torch.ops.aten.alias),
    _case("lift-fresh", ("LiftFreshBackward0", "CloneBackward0"),
          lambda x: torch.ops.aten.lift_fresh(x.clone())),
    _case("to-float32", "ToCopyBackward0", lambda x: x.to(torch.float32), tol=1e-6),
    Case("to-float64", ("ToCopyBackward0",), lambda x: x.to(DT), lambda: [randn(*SHAPE, dtype=torch.float32)],
         _identity),
    Case("double", ("ToCopyBackward0",), lambda x: x.double(), lambda: [randn(*SHAPE, dtype=torch.float32)],
         _identity),
    # training-mode dropout (seeded, so that every forward draws the same mask): the identity
    # rule passes relevance to dropped units too. The entry has no forward closure, so promise
    # mode cannot rebuild its output for a later layer.
    _case("native-dropout", "NativeDropoutBackward0", lambda x: _dropout(x), replay="unrecoverable"),
]


def _dropout(x):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        return torch.native_dropout(x, 0.5, True)[0]


INVERTIBLE = [c for c in CASES if dynlrp.ops.lookup(c.names[0]).inverse is not None and c.id != "lift-fresh"]


test_relevance, test_replay_before_frozen_layer, test_inverse_after_frozen_layer = case_tests(
    CASES, INVERTIBLE)


def test_relu_inverse_is_known_only_where_positive():
    """After a frozen affine map with a frozen bias, the ReLU's input is known only where
    the ReLU passed it: relevance flowing into the clipped part must raise, not guess."""
    u = randn(B, 4)
    a, c = torch.randn(4, 5, dtype=DT), torch.randn(5, dtype=DT)
    y = torch.relu(torch.addmm(c, u, a))
    assert (y == 0).any() and (y > 0).any()
    with pytest.raises(dynlrp.UnrecoverableValueError):
        dynlrp.lrp(y, u, torch.ones_like(y))


def test_upcast_after_float32_linear():
    x = randn(B, 4, dtype=torch.float32)
    w = torch.randn(3, 4)
    y = F.linear(x, w).double()
    seed = torch.randn_like(y)
    (rx,) = dynlrp.lrp(y, x, seed, rules={"linear": dynlrp.rules.Epsilon(1e-9)})
    xd, wd = x.detach().double(), w.double()
    expected = xd * ((seed / (xd @ wd.T)) @ wd)
    assert rx.dtype == torch.float32
    torch.testing.assert_close(rx.double(), expected, rtol=1e-4, atol=1e-5)


COPIES = {"CloneBackward0", "AliasBackward0", "ContiguousBackward0", "LiftFreshBackward0"}


def test_contracts_and_kinds():
    names = {n for c in CASES for n in c.names} - {"TransposeBackward0"}
    for name in names:
        entry = dynlrp.ops.lookup(name)
        # copies move every value in place: routing ops (relevance per unit passes them)
        expected = ("route", "route") if name in COPIES else ("elementwise", "exact")
        assert (entry.kind, entry.contract) == expected, name


COVERED = covered(CASES)

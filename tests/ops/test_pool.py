"""Brute-force tests of the pooling op entries (src/dynlrp/ops/pool.py).

Windows are enumerated with loops. Max pooling routes each output's relevance to the
window's winner (winner-take-all); average pooling shares it in proportion to the
contributions, ``R_i = sum_o (x_i / d_o) R_o / z_o`` with ``d_o`` the window's divisor.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

import dynlrp

from .helpers import (
    Case,
    case_tests,
    covered,
    inside,
    positive,
    randn,
    window_positions,
)

B = 2


def _grid(size):
    return itertools.product(*(range(n) for n in size))


def strided_windows(in_size, out_size, kernel, stride, padding, dilation=None, count_include_pad=True,
                    divisor_override=None):
    """``{output position: (input positions, divisor)}`` of a strided pool, as PyTorch defines it
    (the divisor counts the padded window clipped to the padded input, or only the valid
    positions with ``count_include_pad=False``).

    Parameters
    ----------
    in_size, out_size : sequence of int
        Spatial sizes (``out_size`` is the forward's, so ceil mode needs no special case).
    kernel, stride, padding : sequence of int
    dilation : sequence of int or None
    count_include_pad : bool
    divisor_override : int or None

    Returns
    -------
    dict
    """
    dilation = dilation or [1] * len(in_size)
    windows = {}
    for o in _grid(out_size):
        positions = [pos for _, pos in window_positions(o, kernel, stride, padding, dilation)
                     if inside(pos, in_size)]
        padded = 1
        for oo, k, s, p, n in zip(o, kernel, stride, padding, in_size):
            start = oo * s - p
            padded *= min(start + k, n + p) - start
        divisor = divisor_override or (padded if count_include_pad else len(positions))
        windows[o] = (positions, divisor)
    return windows


def adaptive_windows(in_size, out_size):
    """``{output position: (input positions, count)}`` of adaptive pooling:
    ``[floor(o * n / m), ceil((o + 1) * n / m))`` per dim."""
    windows = {}
    for o in _grid(out_size):
        ranges = [range(oo * n // m, -(-(oo + 1) * n // m)) for oo, n, m in zip(o, in_size, out_size)]
        positions = list(itertools.product(*ranges))
        windows[o] = (positions, len(positions))
    return windows


def max_reference(x, r, windows):
    """Winner-take-all: each output's relevance to the largest input of its window."""
    out = torch.zeros_like(x)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for o, (positions, _) in windows.items():
            winner = max(positions, key=lambda p: float(x[(b, c, *p)]))
            out[(b, c, *winner)] += r[(b, c, *o)]
    return out


def avg_reference(x, r, windows):
    """Proportional sharing of every window's average."""
    out = torch.zeros_like(x)
    for b, c in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for o, (positions, divisor) in windows.items():
            z = sum(float(x[(b, c, *p)]) for p in positions) / divisor
            for p in positions:
                out[(b, c, *p)] += x[(b, c, *p)] / divisor * r[(b, c, *o)] / z
    return out


def _pool_case(cid, names, fn, shape, windows_of, reference, make=randn) -> Case:
    def ref(v, r):
        x = v[0]
        return [reference(x, r, windows_of(list(x.shape[2:]), list(r.shape[2:])))]

    names = (names,) if isinstance(names, str) else tuple(names)
    return Case(cid, names, fn, lambda: [make(*shape)], ref, op=names[1] if len(names) > 1 else names[0])


def _t(v, n):
    return [v] * n if isinstance(v, int) else list(v)


def _strided(kernel, stride=None, padding=0, dilation=1, count_include_pad=True, divisor_override=None):
    def windows_of(in_size, out_size):
        n = len(in_size)
        return strided_windows(in_size, out_size, _t(kernel, n), _t(stride or kernel, n), _t(padding, n),
                               _t(dilation, n), count_include_pad, divisor_override)

    return windows_of


MAX2 = "MaxPool2DWithIndicesBackward0"
MAX3 = "MaxPool3DWithIndicesBackward0"
AVG2 = "AvgPool2DBackward0"
AVG3 = "AvgPool3DBackward0"
ONE_D = ("SqueezeBackward1", None, "UnsqueezeBackward0")  # 1-d pools run as 2-d pools on (B, C, 1, L)


def _one_d(name):
    return (ONE_D[0], name, ONE_D[2])


CASES = [
    # max pooling: winner-take-all
    _pool_case("max2d-k2", MAX2, lambda x: F.max_pool2d(x, 2), (B, 2, 4, 4), _strided(2), max_reference),
    _pool_case("max2d-k3-s2-p1-even", MAX2, lambda x: F.max_pool2d(x, 3, 2, 1), (B, 2, 6, 6),
               _strided(3, 2, 1), max_reference),
    _pool_case("max2d-dilation2", MAX2, lambda x: F.max_pool2d(x, 2, 1, 0, dilation=2), (B, 1, 5, 5),
               _strided(2, 1, 0, 2), max_reference),
    _pool_case("max2d-ceil-mode", MAX2, lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True), (B, 1, 6, 6),
               _strided(3, 2), max_reference),
    _pool_case("max2d-rect", MAX2, lambda x: F.max_pool2d(x, (2, 3), (1, 2), (1, 1)), (B, 2, 4, 5),
               _strided((2, 3), (1, 2), (1, 1)), max_reference),
    _pool_case("max1d-k2", _one_d(MAX2), lambda x: F.max_pool1d(x, 2), (B, 2, 6), _strided(2), max_reference),
    _pool_case("max1d-k3-s1-p1", _one_d(MAX2), lambda x: F.max_pool1d(x, 3, 1, 1), (B, 2, 5),
               _strided(3, 1, 1), max_reference),
    _pool_case("max3d-k2", MAX3, lambda x: F.max_pool3d(x, 2), (B, 1, 4, 4, 4), _strided(2), max_reference),
    _pool_case("max3d-k3-s2-p1", MAX3, lambda x: F.max_pool3d(x, 3, 2, 1), (B, 2, 3, 4, 4),
               _strided(3, 2, 1), max_reference),
    _pool_case("adaptive-max2d", "AdaptiveMaxPool2DBackward0", lambda x: F.adaptive_max_pool2d(x, (2, 3)),
               (B, 2, 5, 7), adaptive_windows, max_reference),
    _pool_case("adaptive-max1d", _one_d("AdaptiveMaxPool2DBackward0"), lambda x: F.adaptive_max_pool1d(x, 3),
               (B, 2, 7), adaptive_windows, max_reference),
    _pool_case("adaptive-max3d", "AdaptiveMaxPool3DBackward0", lambda x: F.adaptive_max_pool3d(x, 2),
               (B, 1, 4, 5, 3), adaptive_windows, max_reference),
    # average pooling: proportional
    _pool_case("avg2d-k2", AVG2, lambda x: F.avg_pool2d(x, 2), (B, 2, 4, 4), _strided(2), avg_reference,
               positive),
    _pool_case("avg2d-k3-s2-p1", AVG2, lambda x: F.avg_pool2d(x, 3, 2, 1), (B, 2, 6, 6), _strided(3, 2, 1),
               avg_reference, positive),
    _pool_case("avg2d-exclude-pad", AVG2, lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
               (B, 2, 5, 6), _strided(3, 2, 1, count_include_pad=False), avg_reference, positive),
    _pool_case("avg2d-ceil-mode", AVG2, lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True), (B, 1, 6, 6),
               _strided(3, 2, 1), avg_reference, positive),
    _pool_case("avg2d-ceil-mode-no-pad", AVG2, lambda x: F.avg_pool2d(x, 2, 2, 0, ceil_mode=True),
               (B, 1, 5, 5), _strided(2, 2, 0), avg_reference, positive),
    _pool_case("avg2d-divisor-override", AVG2, lambda x: F.avg_pool2d(x, 2, 1, divisor_override=3),
               (B, 2, 3, 4), _strided(2, 1, divisor_override=3), avg_reference, positive),
    _pool_case("avg2d-signed", AVG2, lambda x: F.avg_pool2d(x, 2), (B, 2, 4, 4), _strided(2), avg_reference),
    _pool_case("avg1d-k3-s2-p1", _one_d(AVG2), lambda x: F.avg_pool1d(x, 3, 2, 1), (B, 2, 7),
               _strided(3, 2, 1), avg_reference, positive),
    _pool_case("avg3d-k2", AVG3, lambda x: F.avg_pool3d(x, 2), (B, 1, 4, 4, 4), _strided(2), avg_reference,
               positive),
    _pool_case("avg3d-k3-s2-p1-exclude-pad", AVG3,
               lambda x: F.avg_pool3d(x, 3, 2, 1, count_include_pad=False), (B, 1, 4, 3, 5),
               _strided(3, 2, 1, count_include_pad=False), avg_reference, positive),
    _pool_case("adaptive-avg2d", "AdaptiveAvgPool2DBackward0", lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
               (B, 2, 5, 7), adaptive_windows, avg_reference, positive),
    _pool_case("adaptive-avg2d-global", "MeanBackward1", lambda x: F.adaptive_avg_pool2d(x, 1), (B, 2, 3, 4),
               adaptive_windows, avg_reference, positive),
    _pool_case("adaptive-avg1d", _one_d("AdaptiveAvgPool2DBackward0"), lambda x: F.adaptive_avg_pool1d(x, 3),
               (B, 2, 7), adaptive_windows, avg_reference, positive),
    _pool_case("adaptive-avg3d", "AdaptiveAvgPool3DBackward0", lambda x: F.adaptive_avg_pool3d(x, 2),
               (B, 1, 4, 5, 3), adaptive_windows, avg_reference, positive),
]


test_relevance, test_replay_before_frozen_layer = case_tests(CASES)


def test_windows_reference_matches_forward():
    """The loop windows reproduce torch's pools (so the references use the right windows)."""
    x = torch.rand(1, 1, 6, 5, dtype=torch.float64)
    for kw in (dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
               dict(kernel_size=2, stride=1, divisor_override=3)):
        y = F.avg_pool2d(x, **kw)
        windows = _strided(kw["kernel_size"], kw["stride"], kw.get("padding", 0),
                           count_include_pad=kw.get("count_include_pad", True),
                           divisor_override=kw.get("divisor_override"))([6, 5], list(y.shape[2:]))
        for o, (positions, divisor) in windows.items():
            expected = sum(float(x[(0, 0, *p)]) for p in positions) / divisor
            assert math.isclose(float(y[(0, 0, *o)]), expected, rel_tol=1e-12), (kw, o)


def test_contracts_and_kinds():
    for name in (MAX2, MAX3, "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0"):
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("route", "route"), name
    for name in (AVG2, AVG3, "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0"):
        entry = dynlrp.ops.lookup(name)
        assert (entry.kind, entry.contract) == ("sum", "exact"), name


COVERED = covered(CASES)

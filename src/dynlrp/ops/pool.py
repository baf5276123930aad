"""Pooling. Max pooling routes relevance to the window's winner (kind ``route``, the
winner-take-all rule, contract ``route``); average pooling is a sum (kind ``sum``,
proportional rule, contract ``exact``)."""

from __future__ import annotations

import torch.nn.functional as F

from ..saved import saved
from . import register
from .common import out_shape, taps_from


def _maxpool(dims):
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]

    def forward(node, x):
        return fn(x, saved(node, "kernel_size"), saved(node, "stride"), saved(node, "padding"),
                  saved(node, "dilation"), saved(node, "ceil_mode"))

    return forward


def _avgpool(dims):
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]

    def forward(node, x):
        args = [x, saved(node, "kernel_size"), saved(node, "stride"), saved(node, "padding"),
                saved(node, "ceil_mode"), saved(node, "count_include_pad")]
        if dims > 1:
            args.append(saved(node, "divisor_override"))
        return fn(*args)

    return forward


def _adaptive(fn):
    def forward(node, x):
        return fn(x, tuple(out_shape(node)[2:]))

    return forward


def _register(names, kind, contract, forward):
    def own(node):
        x = saved(node, "self")
        return None if x is None else forward(node, x)

    register(names, kind, contract, forward=lambda n, xs: forward(n, xs[0]), own=own,
             taps=taps_from((0, "self")))


for _d in (1, 2, 3):
    _register(f"MaxPool{_d}DWithIndicesBackward0", "route", "route", _maxpool(_d))
    _register(f"AvgPool{_d}DBackward0", "sum", "exact", _avgpool(_d))
_register("AdaptiveAvgPool2DBackward0", "sum", "exact", _adaptive(F.adaptive_avg_pool2d))
_register("AdaptiveAvgPool3DBackward0", "sum", "exact", _adaptive(F.adaptive_avg_pool3d))
_register("AdaptiveMaxPool2DBackward0", "route", "route",
          _adaptive(lambda x, size: F.adaptive_max_pool2d(x, size)))
_register("AdaptiveMaxPool3DBackward0", "route", "route",
          _adaptive(lambda x, size: F.adaptive_max_pool3d(x, size)))

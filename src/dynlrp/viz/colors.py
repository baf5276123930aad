"""Signed colour maps for relevance, centred at zero, on torch tensors (no matplotlib needed).

A map takes values in ``[-1, 1]`` (relevance divided by its scale, see :func:`normalize`)
and returns ``uint8`` RGB. Zero is the map's centre colour; positive relevance is red,
negative relevance blue, as is usual for LRP heatmaps.
"""

from __future__ import annotations

import torch

# Anchor colours at evenly spaced points of [-1, 1]; colours are interpolated linearly.
_ANCHORS: dict[str, list[tuple[float, float, float]]] = {
    # blue - white - red: the default signed map.
    "bwr": [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)],
    # dark blue - blue - white - red - dark red: more contrast at the extremes.
    "seismic": [(0.0, 0.0, 0.3), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)],
    # cyan - blue - black - red - yellow: signed, on a black background.
    "coldnhot": [(0.0, 1.0, 1.0), (0.0, 0.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (1.0, 1.0, 0.0)],
    # black - grey - white: signed in grey levels.
    "gray": [(0.0, 0.0, 0.0), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)],
    # positive only (negative shown as zero): black - red - yellow - white.
    "hot": [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0),
            (0.9, 0.0, 0.0), (1.0, 0.9, 0.0), (1.0, 1.0, 1.0)],
}

COLORMAPS: tuple[str, ...] = tuple(_ANCHORS)


def normalize(relevance: torch.Tensor, percentile: float | None = None) -> torch.Tensor:
    """Divide by a symmetric scale so that values lie in ``[-1, 1]``, zero staying zero.

    Parameters
    ----------
    relevance
        Any tensor (one image or one text).
    percentile
        Scale by this percentile of ``|relevance|`` (e.g. ``99.5``) and clip, so that a
        few extreme values do not wash out the rest; default: the maximum of ``|relevance|``.
    """
    r = relevance.detach().float()
    a = r.abs().flatten()
    if percentile is None or a.numel() == 0:
        scale = a.max() if a.numel() else torch.tensor(0.0)
    else:
        scale = torch.quantile(a, min(max(percentile, 0.0), 100.0) / 100.0)
    if scale <= 0:
        return torch.zeros_like(r)
    return (r / scale).clamp(-1.0, 1.0)


def colorize(values: torch.Tensor, cmap: str = "bwr") -> torch.Tensor:
    """Map values in ``[-1, 1]`` to RGB: a ``uint8`` tensor of shape ``values.shape + (3,)``.

    Parameters
    ----------
    values
        Normalised relevance (see :func:`normalize`).
    cmap
        One of :data:`COLORMAPS`.
    """
    if cmap not in _ANCHORS:
        raise ValueError(f"unknown colour map {cmap!r}; known: {', '.join(COLORMAPS)}")
    anchors = torch.tensor(_ANCHORS[cmap])
    pos = (values.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0 * (len(anchors) - 1)
    lo = pos.floor().long().clamp(max=len(anchors) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = anchors[lo] * (1.0 - frac) + anchors[lo + 1] * frac
    return (rgb * 255.0).round().to(torch.uint8)

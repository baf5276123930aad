"""Image heatmaps: relevance as colour, over the input, in grids, and as matplotlib figures.

Every function takes relevance shaped like one image ``(C, H, W)`` or ``(H, W)`` (channels
are summed) -- or a batch ``(B, C, H, W)`` for the grid functions -- and returns a ``uint8``
RGB tensor ``(H, W, 3)`` ready for :func:`~dynlrp.viz.png.write_png`. Colours are signed and
centred at zero (red positive, blue negative with the default ``"bwr"`` map), scaled per
image by the maximum of ``|relevance|`` (or a ``percentile`` of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .colors import colorize, normalize
from .png import write_png

MIN_SIDE = 128  # small images (8x8 digits) are scaled up to at least this many pixels


def _plane(relevance: torch.Tensor) -> torch.Tensor:
    r = relevance.detach().float().cpu()
    while r.dim() > 3 and r.shape[0] == 1:
        r = r[0]
    if r.dim() == 3:
        return r.sum(0)
    if r.dim() == 2:
        return r
    raise ValueError("expected relevance of one image, (C, H, W) or (H, W); "
                     f"got shape {tuple(relevance.shape)}")


def _upscale(rgb: torch.Tensor, scale: int | None) -> torch.Tensor:
    if scale is None:
        scale = max(1, math.ceil(MIN_SIDE / max(1, min(rgb.shape[0], rgb.shape[1]))))
    if scale == 1:
        return rgb
    return rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def heatmap(relevance: torch.Tensor, cmap: str = "bwr", *, percentile: float | None = None,
            scale: int | None = None) -> torch.Tensor:
    """Relevance of one image as a colour image.

    Parameters
    ----------
    relevance
        ``(C, H, W)`` or ``(H, W)``; channels are summed.
    cmap
        A signed colour map from :data:`dynlrp.viz.COLORMAPS`.
    percentile
        Scale by this percentile of ``|relevance|`` instead of its maximum (and clip).
    scale
        Integer upscaling factor (nearest neighbour); default: enough for a 128-pixel side.

    Returns
    -------
    torch.Tensor
        ``uint8`` RGB ``(H * scale, W * scale, 3)``.
    """
    return _upscale(colorize(normalize(_plane(relevance), percentile), cmap), scale)


def image_rgb(image: torch.Tensor, *, scale: int | None = None) -> torch.Tensor:
    """An input image ``(C, H, W)`` or ``(H, W)`` of any value range as ``uint8`` RGB (min-max scaled)."""
    x = image.detach().float().cpu()
    while x.dim() > 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3:
        raise ValueError(f"expected one image, (C, H, W) or (H, W); got shape {tuple(image.shape)}")
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] != 3:
        x = x.mean(0, keepdim=True).expand(3, -1, -1)
    return _upscale((x.permute(1, 2, 0) * 255.0).round().to(torch.uint8), scale)


def overlay(image: torch.Tensor, relevance: torch.Tensor, cmap: str = "bwr", *, alpha: float = 0.7,
            percentile: float | None = None, scale: int | None = None) -> torch.Tensor:
    """The heatmap over a grey version of the input; weak relevance lets the image through.

    Parameters
    ----------
    image
        The input, ``(C, H, W)`` or ``(H, W)``, any value range.
    relevance
        Its relevance, same spatial size.
    alpha
        Opacity of the strongest relevance.
    cmap, percentile, scale
        As for :func:`heatmap`.
    """
    grey = image_rgb(image, scale=1).float().mean(-1, keepdim=True).expand(-1, -1, 3)
    v = normalize(_plane(relevance), percentile)
    if v.shape != grey.shape[:2]:
        raise ValueError(f"image is {tuple(grey.shape[:2])} but relevance is {tuple(v.shape)}")
    weight = (alpha * v.abs()).unsqueeze(-1)
    mixed = grey * (1.0 - weight) + colorize(v, cmap).float() * weight
    return _upscale(mixed.round().to(torch.uint8), scale)


def grid(tiles: Sequence[torch.Tensor], ncols: int | None = None, *, pad: int = 2,
         fill: int = 255) -> torch.Tensor:
    """Arrange ``uint8`` RGB tiles in a grid (row by row) with ``pad`` pixels of ``fill`` between."""
    if not tiles:
        raise ValueError("grid needs at least one tile")
    n = len(tiles)
    ncols = ncols or min(n, 8)
    nrows = math.ceil(n / ncols)
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    size = (nrows * th + (nrows + 1) * pad, ncols * tw + (ncols + 1) * pad, 3)
    out = torch.full(size, fill, dtype=torch.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, ncols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        out[y:y + t.shape[0], x:x + t.shape[1]] = t
    return out


def explanation_tiles(
    relevance: torch.Tensor, images: torch.Tensor | None = None, cmap: str = "bwr", *,
    percentile: float | None = None, scale: int | None = None, pad: int = 2,
) -> list[torch.Tensor]:
    """One tile per example: the heatmap, or input / heatmap / overlay stacked when ``images`` is given."""
    tiles = []
    for b in range(relevance.shape[0]):
        parts = [heatmap(relevance[b], cmap, percentile=percentile, scale=scale)]
        if images is not None:
            parts = [image_rgb(images[b], scale=scale), parts[0],
                     overlay(images[b], relevance[b], cmap, percentile=percentile, scale=scale)]
        tiles.append(parts[0] if len(parts) == 1 else _vstack(parts, pad))
    return tiles


def _vstack(parts: list[torch.Tensor], pad: int) -> torch.Tensor:
    w = max(p.shape[1] for p in parts)
    gap = torch.full((pad, w, 3), 255, dtype=torch.uint8)
    rows = []
    for k, p in enumerate(parts):
        if p.shape[1] < w:
            p = torch.cat([p, torch.full((p.shape[0], w - p.shape[1], 3), 255, dtype=torch.uint8)], 1)
        rows += [p] if k == 0 else [gap, p]
    return torch.cat(rows, 0)


def batch_grid(
    relevance: torch.Tensor, images: torch.Tensor | None = None, cmap: str = "bwr", *,
    ncols: int | None = None, percentile: float | None = None, scale: int | None = None,
) -> torch.Tensor:
    """A grid for a batch ``(B, C, H, W)``: per example its heatmap (with ``images``: input,
    heatmap and overlay in a column)."""
    return grid(explanation_tiles(relevance, images, cmap, percentile=percentile, scale=scale), ncols)


def save_heatmap(relevance: torch.Tensor, path: str | Path, cmap: str = "bwr", **kwargs: Any) -> Path:
    """Write :func:`heatmap` of one image's relevance to ``path`` (PNG)."""
    return write_png(path, heatmap(relevance, cmap, **kwargs))


def save_overlay(image: torch.Tensor, relevance: torch.Tensor, path: str | Path, cmap: str = "bwr",
                 **kwargs: Any) -> Path:
    """Write :func:`overlay` to ``path`` (PNG)."""
    return write_png(path, overlay(image, relevance, cmap, **kwargs))


def save_grid(relevance: torch.Tensor, path: str | Path, images: torch.Tensor | None = None,
              cmap: str = "bwr", **kwargs: Any) -> Path:
    """Write :func:`batch_grid` of a batch's relevance to ``path`` (PNG)."""
    return write_png(path, batch_grid(relevance, images, cmap, **kwargs))


def mpl_colormap(cmap: str = "bwr") -> Any:
    """The colour map as a matplotlib ``ListedColormap`` (for colour bars, ``imshow(vmin=-1, vmax=1)``)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap((colorize(torch.linspace(-1, 1, 256), cmap).float() / 255.0).tolist(), name=cmap)


def figure(relevance: torch.Tensor, images: torch.Tensor | None = None, cmap: str = "bwr", *,
           titles: Sequence[str] | None = None, percentile: float | None = None, max_rows: int = 8) -> Any:
    """A matplotlib figure for notebooks: one row per example (input, heatmap, overlay).

    Parameters
    ----------
    relevance
        A batch ``(B, C, H, W)`` (or one image ``(C, H, W)``).
    images
        The inputs, for the input and overlay columns.
    titles
        One title per example (e.g. the predicted class).
    max_rows
        Show at most this many examples.

    Returns
    -------
    matplotlib.figure.Figure
        Not attached to pyplot; display it in a notebook or ``fig.savefig(path)``.
    """
    from matplotlib.figure import Figure

    if relevance.dim() == 3:
        relevance = relevance[None]
        images = None if images is None else images[None]
    n = min(relevance.shape[0], max_rows)
    cols = 1 if images is None else 3
    fig = Figure(figsize=(2.4 * cols + 0.6, 2.4 * n), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    cm = mpl_colormap(cmap)
    for b in range(n):
        v = normalize(_plane(relevance[b]), percentile)
        row = axes[b]
        if images is not None:
            row[0].imshow(image_rgb(images[b], scale=1).numpy())
            row[2].imshow(overlay(images[b], relevance[b], cmap, percentile=percentile, scale=1).numpy())
            row[0].set_title(titles[b] if titles else "input", fontsize=9)
            row[2].set_title("overlay", fontsize=9)
        im = row[1 if images is not None else 0].imshow(v.numpy(), cmap=cm, vmin=-1, vmax=1)
        row[1 if images is not None else 0].set_title("relevance" if images is not None or not titles
                                                      else titles[b], fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.colorbar(im, ax=axes[:, -1].tolist(), shrink=0.6, label="relevance / max |relevance|")
    return fig

"""Pictures of relevance: image heatmaps (PNG, matplotlib), token heatmaps (HTML, ANSI), tables.

PNG files are written with the standard library (:func:`write_png`); matplotlib is needed only
for :func:`figure` and the tables and curves of :mod:`dynlrp.viz.plots`; Pillow (or
torchvision) only to read images. Colour maps are signed and centred at zero: red
positive, blue negative (``"bwr"``, ``"seismic"``; ``"coldnhot"`` on black).

>>> e = dynlrp.explain(model, images)
>>> dynlrp.viz.save_grid(e.relevance, "heatmaps.png", images=images)
>>> dynlrp.viz.save_text_html(tokens, e.relevance[0], "tokens.html", merge=True)
"""

from __future__ import annotations

from .colors import COLORMAPS, colorize, normalize
from .image import (
    batch_grid,
    explanation_tiles,
    figure,
    grid,
    heatmap,
    image_rgb,
    mpl_colormap,
    overlay,
    save_grid,
    save_heatmap,
    save_overlay,
)
from .plots import bars_png, coverage_png, coverage_rows, curve_png, stats_png, table_png
from .png import encode_png, read_image, write_png
from .text import merge_subwords, save_text_html, subword_scheme, text_ansi, text_html, word_pieces

__all__ = [
    "COLORMAPS", "colorize", "normalize",
    "heatmap", "image_rgb", "overlay", "grid", "batch_grid", "explanation_tiles", "figure", "mpl_colormap",
    "save_heatmap", "save_overlay", "save_grid",
    "table_png", "curve_png", "bars_png", "coverage_png", "coverage_rows", "stats_png",
    "encode_png", "write_png", "read_image",
    "text_html", "text_ansi", "save_text_html", "merge_subwords", "subword_scheme", "word_pieces",
]

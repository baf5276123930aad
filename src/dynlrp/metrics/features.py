"""What one perturbation step occludes: pixels, patches, tokens or single elements.

A *feature set* turns an attribution into one score per feature (``scores``), says which
features may be occluded at all (``valid``: padding and special tokens may not) and turns a
boolean mask over features back into a mask over the input (``expand``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

CHANNEL_REDUCTIONS = ("sum", "abs_sum", "max", "abs_max")


def reduce_channels(attribution: torch.Tensor, how: str = "sum") -> torch.Tensor:
    """Reduce ``(B, C, H, W)`` relevance to ``(B, H, W)``; a ``(B, H, W)`` map is returned as is.

    Parameters
    ----------
    attribution
        Relevance per input element.
    how
        ``"sum"`` (signed sum, the default), ``"abs_sum"`` (the sum of magnitudes, as the
        paper's code did: positive and negative evidence rank alike), ``"max"`` or
        ``"abs_max"``.

    Returns
    -------
    torch.Tensor
        ``(B, H, W)``.
    """
    if attribution.dim() == 3:
        return attribution
    if attribution.dim() != 4:
        raise ValueError(f"expected image relevance (B, C, H, W) or (B, H, W), "
                         f"got {tuple(attribution.shape)}")
    if how == "sum":
        return attribution.sum(1)
    if how == "abs_sum":
        return attribution.abs().sum(1)
    if how == "max":
        return attribution.amax(1)
    if how == "abs_max":
        return attribution.abs().amax(1)
    raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, not {how!r}")


class Features:
    """Base class of feature sets. Subclasses implement :meth:`scores` and :meth:`expand`.

    Attributes
    ----------
    default_step
        Features occluded per step when neither ``step`` nor ``steps`` is given.
    """

    default_step: int = 1

    def scores(self, attribution: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """One relevance score per feature, ``(B, F)``."""
        raise NotImplementedError

    def valid(self, inputs: torch.Tensor, model_kwargs: Mapping[str, Any]) -> torch.Tensor | None:
        """Which features may be occluded, ``(B, F)`` bool; ``None``: all of them."""
        return None

    def expand(self, mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """A ``(B, F)`` feature mask as a mask that broadcasts against ``inputs``."""
        raise NotImplementedError


class Elements(Features):
    """Every input element is a feature (vectors, tabular data, single pixels of one channel).

    Parameters
    ----------
    step
        Default features per step.
    """

    def __init__(self, step: int = 1) -> None:
        self.default_step = int(step)

    def scores(self, attribution: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if attribution.shape != inputs.shape:
            raise ValueError(f"attribution {tuple(attribution.shape)} must be shaped like the inputs "
                             f"{tuple(inputs.shape)}")
        return attribution.reshape(len(attribution), -1)

    def expand(self, mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return mask.reshape(inputs.shape)

    def __repr__(self) -> str:
        return "Elements()"


class Pixels(Features):
    """Pixels of ``(B, C, H, W)`` images: all channels of a pixel are occluded together.

    Parameters
    ----------
    channel_reduce
        How relevance of the channels becomes one score per pixel (see :func:`reduce_channels`).
    step
        Default pixels per step: 1024, the paper's value for 224 x 224 images.
    """

    def __init__(self, channel_reduce: str = "sum", step: int = 1024) -> None:
        if channel_reduce not in CHANNEL_REDUCTIONS:
            raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, not {channel_reduce!r}")
        self.channel_reduce = channel_reduce
        self.default_step = int(step)

    def scores(self, attribution: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        r = reduce_channels(attribution, self.channel_reduce)
        if tuple(r.shape[-2:]) != tuple(inputs.shape[-2:]):
            raise ValueError(f"relevance {tuple(attribution.shape)} does not match images "
                             f"{tuple(inputs.shape)}")
        return r.reshape(len(r), -1)

    def expand(self, mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        b, _, h, w = inputs.shape
        return mask.reshape(b, 1, h, w)

    def __repr__(self) -> str:
        return f"Pixels(channel_reduce={self.channel_reduce!r})"


class Patches(Features):
    """Square patches of ``(B, C, H, W)`` images, scored by pooling the pixel relevance.

    The paper's ViT-B/16 setting: 16 x 16 patches scored by their maximum, 4 per step.

    Parameters
    ----------
    size
        Patch side in pixels; ``H`` and ``W`` must be multiples of it.
    pool
        ``"max"`` (the paper) or ``"sum"`` (the patch's total relevance).
    channel_reduce
        As for :class:`Pixels`.
    step
        Default patches per step.
    """

    def __init__(self, size: int = 16, pool: str = "max", channel_reduce: str = "sum", step: int = 4) -> None:
        if pool not in ("max", "sum"):
            raise ValueError(f"pool must be 'max' or 'sum', not {pool!r}")
        if channel_reduce not in CHANNEL_REDUCTIONS:
            raise ValueError(f"channel_reduce must be one of {CHANNEL_REDUCTIONS}, not {channel_reduce!r}")
        self.size = int(size)
        self.pool = pool
        self.channel_reduce = channel_reduce
        self.default_step = int(step)

    def _check(self, h: int, w: int) -> None:
        if h % self.size or w % self.size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.size}")

    def scores(self, attribution: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        r = reduce_channels(attribution, self.channel_reduce).unsqueeze(1)
        self._check(*r.shape[-2:])
        if self.pool == "max":
            pooled = F.max_pool2d(r, self.size)
        else:
            pooled = F.avg_pool2d(r, self.size) * self.size ** 2
        return pooled.reshape(len(r), -1)

    def expand(self, mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        b, _, h, w = inputs.shape
        self._check(h, w)
        grid = mask.reshape(b, 1, h // self.size, w // self.size)
        return grid.repeat_interleave(self.size, 2).repeat_interleave(self.size, 3)

    def __repr__(self) -> str:
        return f"Patches(size={self.size}, pool={self.pool!r})"


class Tokens(Features):
    """Tokens of ``(B, T)`` token ids; relevance ``(B, T)`` or per embedding ``(B, T, D)`` (summed).

    Padding (``attention_mask == 0`` in the model's keyword inputs) and the ``special_ids``
    (e.g. ``[CLS]``, ``[SEP]``) are never occluded; each example's curve runs over its own
    real tokens.

    Parameters
    ----------
    special_ids
        Token ids that are never occluded.
    mask_key
        The keyword input holding the attention mask.
    step
        Default tokens per step.
    """

    def __init__(self, special_ids: Sequence[int] = (), mask_key: str = "attention_mask",
                 step: int = 1) -> None:
        self.special_ids = tuple(int(i) for i in special_ids)
        self.mask_key = mask_key
        self.default_step = int(step)

    def scores(self, attribution: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if attribution.dim() == inputs.dim() + 1:
            attribution = attribution.sum(-1)
        if attribution.shape != inputs.shape:
            raise ValueError(f"token relevance {tuple(attribution.shape)} does not match token ids "
                             f"{tuple(inputs.shape)}")
        return attribution

    def valid(self, inputs: torch.Tensor, model_kwargs: Mapping[str, Any]) -> torch.Tensor | None:
        ok = torch.ones_like(inputs, dtype=torch.bool)
        mask = model_kwargs.get(self.mask_key)
        if isinstance(mask, torch.Tensor) and mask.shape == inputs.shape:
            ok &= mask.to(inputs.device).bool()
        for i in self.special_ids:
            ok &= inputs != i
        return ok

    def expand(self, mask: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return mask.reshape(inputs.shape)

    def __repr__(self) -> str:
        return f"Tokens(special_ids={self.special_ids})"


def resolve_features(features: Features | str) -> Features:
    """``"pixel"``, ``"patch"``, ``"token"``, ``"element"`` or a :class:`Features` instance."""
    if isinstance(features, Features):
        return features
    names = {"pixel": Pixels, "pixels": Pixels, "patch": Patches, "patches": Patches, "token": Tokens,
             "tokens": Tokens, "element": Elements, "elements": Elements}
    if features not in names:
        raise ValueError(f"features must be one of {sorted(set(names))} or a Features instance, "
                         f"not {features!r}")
    return names[features]()

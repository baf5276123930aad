"""What an occluded feature becomes: a blurred copy, a baseline value or a replacement token.

An occlusion computes a *reference* input once per batch; a perturbation step then takes
the occluded features from the reference and the others from the input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(kernel_size: int, sigma: float, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """A normalised 1-D Gaussian of odd length ``kernel_size``.

    Parameters
    ----------
    kernel_size
        Odd, positive.
    sigma
        Standard deviation in pixels, positive.

    Returns
    -------
    torch.Tensor
        ``(kernel_size,)``, summing to 1.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive, not {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, not {sigma}")
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(images: torch.Tensor, kernel_size: int = 51, sigma: float = 20.0) -> torch.Tensor:
    """Blur ``(B, C, H, W)`` images with a separable Gaussian, channel by channel.

    Borders are reflected (as ``torchvision.transforms.GaussianBlur`` does) when the image is
    larger than half the kernel, else replicated (a kernel of 51 on an 8 x 8 image).

    Parameters
    ----------
    images
        Floating point ``(B, C, H, W)``.
    kernel_size, sigma
        The Gaussian; defaults are the paper's (51, 20).

    Returns
    -------
    torch.Tensor
        The blurred images, same shape and dtype.
    """
    if images.dim() != 4:
        raise ValueError(f"gaussian_blur takes (B, C, H, W) images, got {tuple(images.shape)}")
    b, c, h, w = images.shape
    k = gaussian_kernel1d(kernel_size, sigma, dtype=images.dtype, device=images.device)
    pad = kernel_size // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    x = F.pad(images, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
    return x


class Occlusion:
    """Base class: :meth:`reference` gives the values occluded features take."""

    def reference(self, inputs: torch.Tensor) -> torch.Tensor:
        """The replacement values, broadcastable against ``inputs``."""
        raise NotImplementedError

    @staticmethod
    def apply(inputs: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``inputs`` with the ``mask``-ed elements taken from ``reference``."""
        return torch.where(mask, reference.to(inputs.dtype), inputs)


class Blur(Occlusion):
    """Occlude with a Gaussian-blurred copy of the image (the paper: kernel 51, sigma 20).

    Parameters
    ----------
    kernel_size
        Odd kernel side in pixels.
    sigma
        Standard deviation in pixels.
    """

    def __init__(self, kernel_size: int = 51, sigma: float = 20.0) -> None:
        gaussian_kernel1d(kernel_size, sigma)  # validates
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma)

    def reference(self, inputs: torch.Tensor) -> torch.Tensor:
        if not inputs.is_floating_point():
            raise TypeError("Blur occludes images (floating point); for token ids use TokenReplace")
        return gaussian_blur(inputs, self.kernel_size, self.sigma)

    def __repr__(self) -> str:
        return f"Blur(kernel_size={self.kernel_size}, sigma={self.sigma:g})"


class Baseline(Occlusion):
    """Occlude with a constant, or with a tensor broadcastable against one input example.

    Parameters
    ----------
    value
        A number (0: black images / zero features) or a tensor such as a per-channel mean
        shaped ``(C, 1, 1)``.
    """

    def __init__(self, value: float | torch.Tensor = 0.0) -> None:
        self.value = value

    def reference(self, inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(self.value, torch.Tensor):
            return self.value.to(device=inputs.device, dtype=inputs.dtype).expand_as(inputs)
        return torch.full_like(inputs, self.value)

    def __repr__(self) -> str:
        v = "tensor" if isinstance(self.value, torch.Tensor) else f"{self.value:g}"
        return f"Baseline({v})"


class TokenReplace(Baseline):
    """Occlude tokens by replacing their ids with ``token_id`` (e.g. ``[MASK]`` or ``[UNK]``).

    Parameters
    ----------
    token_id
        The replacement id.
    """

    def __init__(self, token_id: int) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"token_id must be a non-negative int, not {token_id!r}")
        super().__init__(token_id)

    def reference(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.is_floating_point():
            raise TypeError("TokenReplace occludes token ids (an integer tensor)")
        return torch.full_like(inputs, int(self.value))

    def __repr__(self) -> str:
        return f"TokenReplace({self.value})"


def resolve_occlusion(occlusion: Occlusion | str | float | int) -> Occlusion:
    """``"blur"``, ``"baseline"`` / ``"zero"``, a number (a :class:`Baseline`) or an instance."""
    if isinstance(occlusion, Occlusion):
        return occlusion
    if occlusion == "blur":
        return Blur()
    if occlusion in ("baseline", "zero"):
        return Baseline(0.0)
    if isinstance(occlusion, (int, float)) and not isinstance(occlusion, bool) and math.isfinite(occlusion):
        return Baseline(float(occlusion))
    raise ValueError(f"occlusion must be 'blur', 'baseline', a number or an Occlusion, not {occlusion!r}")

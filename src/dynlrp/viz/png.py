"""Write PNG files from ``uint8`` tensors with the standard library only; read images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def encode_png(rgb: torch.Tensor) -> bytes:
    """Encode a ``uint8`` image ``(H, W, 3)`` (RGB) or ``(H, W)`` (grey) as PNG bytes."""
    if rgb.dtype != torch.uint8:
        raise TypeError(f"encode_png takes a uint8 image, not {rgb.dtype}")
    if rgb.dim() == 2:
        color_type, channels = 0, 1
    elif rgb.dim() == 3 and rgb.shape[-1] == 3:
        color_type, channels = 2, 3
    else:
        raise ValueError(f"expected an image of shape (H, W, 3) or (H, W), got {tuple(rgb.shape)}")
    h, w = rgb.shape[:2]
    rows = rgb.reshape(h, w * channels).cpu()
    raw = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rows], dim=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(bytes(raw.flatten().tolist()), 6)) + _chunk(b"IEND", b""))


def write_png(path: str | Path, rgb: torch.Tensor) -> Path:
    """Write a ``uint8`` image ``(H, W, 3)`` or ``(H, W)`` to ``path`` as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))
    return path


def read_image(path: str | Path, mode: str = "RGB") -> torch.Tensor:
    """Read an image file as a float tensor ``(C, H, W)`` in ``[0, 1]``.

    Uses Pillow when installed (any format it reads), else ``torchvision.io`` (PNG, JPEG).

    Parameters
    ----------
    path
        The image file.
    mode
        ``"RGB"`` (3 channels) or ``"L"`` (grey, 1 channel).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is optional
        from torchvision.io import ImageReadMode
        from torchvision.io import read_image as tv_read

        img = tv_read(str(path), ImageReadMode.RGB if mode == "RGB" else ImageReadMode.GRAY)
        return img.float() / 255.0
    with Image.open(path) as im:
        data = im.convert(mode)
        w, h = data.size
        buf = torch.frombuffer(bytearray(data.tobytes()), dtype=torch.uint8)
    c = 3 if mode == "RGB" else 1
    t = buf.reshape(h, w, c).permute(2, 0, 1)
    return t.float() / 255.0

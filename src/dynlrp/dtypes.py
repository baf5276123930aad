"""The dtype relevance is computed in.

Relevance is carried, summed and divided in float32 for models in float16 or bfloat16 (and in
the model's own dtype otherwise); forward values stay in the dtype autograd saved them in, and
replays that fused kernels compute in float32 round once, as those kernels do. The relevance
is cast back to each input's dtype at the end (see docs/architecture.md, "Dtypes").
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype relevance is carried, summed and divided in for forward values of ``dtype``:
    float32 for floating types narrower than 32 bits (float16, bfloat16), else ``dtype``.

    Parameters
    ----------
    dtype
        The dtype of a forward value (a node's output or input).

    Returns
    -------
    torch.dtype
        ``torch.float32`` for float16 and bfloat16; ``dtype`` otherwise.
    """
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 else dtype

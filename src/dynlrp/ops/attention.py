"""Attention: softmax and fused scaled-dot-product attention.

``softmax``
    Kind ``softmax``. Its rule is AttnLRP's (paper Eq. 7; Achtibat et al. 2024, Prop. 3.1):
    ``R_x = x * (R - s * sum(R))``, a Taylor decomposition with a bias term, so the contract is
    ``bias``. Autograd keeps the output ``s``; the input ``x`` is replayed from the node below.
    There is no inverse: ``log(s)`` is ``x`` only up to a constant per softmax row, and the rule
    is not invariant to it. So an additive mask or position bias that autograd never saw
    (``scores + mask`` in eager attention, T5's position bias) makes ``x`` unrecoverable in
    promise mode -- record the forward (:func:`dynlrp.record`), or use the fused attention
    (sdpa), whose node saves its mask.

``scaled_dot_product_attention``
    One autograd node per backend: CPU flash, CUDA flash, memory-efficient, cuDNN (and the
    "overrideable" backend of out-of-tree devices). Kind ``attention``, contract ``bias``: the
    node is ``softmax(q k^T * scale + mask) v`` with an optional causal mask, which the node's
    own saved tensors describe -- nothing assumes causality. Its rules
    (:class:`dynlrp.rules.AttnLRPAttention`, :class:`dynlrp.rules.CPAttention`) use the node's
    own backward (the fused kernel), so masks, causal masks, grouped-query attention and
    long sequences cost what a gradient costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..saved import saved, saved_dim
from . import register
from .common import operand, taps_from

register("SoftmaxBackward0", "softmax", "bias", forward=lambda n, xs: torch.softmax(xs[0], saved_dim(n)),
         own=lambda n: saved(n, "result"))

#: The fused attention nodes, one per backend (CPU tests exercise the first).
SDPA_NODES = (
    "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductCudnnAttentionBackward0",
    "ScaledDotProductFusedAttentionOverrideableBackward0",
)


def sdpa_mask(node, xs=None):
    """The additive mask (or bias) the node was called with, or ``None``: CPU flash saves
    it as ``attn_mask``, the efficient and cuDNN kernels as ``attn_bias``; a bias that is in
    the graph is input 3."""
    if xs is not None and len(xs) > 3 and xs[3] is not None:
        return xs[3]
    for name in ("attn_mask", "attn_bias"):
        value = saved(node, name)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _sdpa(node, q, k, v, mask):
    kwargs = {}
    if k.shape[-3] != q.shape[-3]:
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=bool(saved(node, "is_causal")),
        scale=saved(node, "scale"), **kwargs,
    )


def _sdpa_forward(node, xs):
    q = operand(node, xs, 0, "query", "query")
    k = operand(node, xs, 1, "key", "key")
    v = operand(node, xs, 2, "value", "value")
    return _sdpa(node, q, k, v, sdpa_mask(node, xs))


register(SDPA_NODES, "attention", "bias", forward=_sdpa_forward, own=lambda n: saved(n, "output"),
         taps=taps_from((0, "query"), (1, "key"), (2, "value")))

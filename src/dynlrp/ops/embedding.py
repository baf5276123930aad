"""Embedding lookups: relevance goes back to the table rows the tokens picked.

``EmbeddingBackward0`` appears only when the table is in the graph (its weight requires
grad). Kind ``route``, contract ``route``: relevance of each looked-up vector is added to its
row (tokens sharing an id share a row). Two exceptions follow the op's own backward: the row
of ``padding_idx`` receives nothing, and ``scale_grad_by_freq`` scales rows by inverse
frequency -- use neither when explaining.

For relevance *per token* (and per example), request the looked-up vectors instead of the
table: pass ``inputs_embeds = model.get_input_embeddings()(input_ids).requires_grad_()`` to
the model and to :func:`dynlrp.lrp`; sum the result over the hidden dimension
(:func:`dynlrp.targets.token_relevance`). Gathers and index selections are routes too
(:mod:`dynlrp.ops.shape`).
"""

from __future__ import annotations

import torch.nn.functional as F

from ..saved import saved
from . import MissingOperand, register
from .common import leaf_input


def _lookup(node, weight):
    indices = saved(node, "indices")
    if indices is None or weight is None:
        raise MissingOperand(f"the indices or table of {node.name()}")
    return F.embedding(indices, weight)


def _own(node):
    try:
        return _lookup(node, leaf_input(node, 0))
    except MissingOperand:
        return None


register("EmbeddingBackward0", "route", "route", forward=lambda n, xs: _lookup(n, xs[0]), own=_own)

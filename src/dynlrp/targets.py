"""Seeds for the usual explanations: which output logit each example's relevance starts from.

Every helper returns a tensor shaped like the output it is given (what
:func:`dynlrp.lrp` takes as ``relevance=``): zero everywhere except one logit per example,
which holds that logit's value (``value="logit"``, so the relevance at the inputs sums to
the logit where the rules conserve) or 1 (``value="one"``). Padded batches: give the
attention mask, and the position of each example is its last real token, for left and
right padding alike. Relevance reaching padding positions is zero by construction (the
attention masks them out); :func:`token_relevance` also zeroes them explicitly.

>>> logits = model(inputs_embeds=emb, attention_mask=mask).logits       # (B, L, V)
>>> seed = dynlrp.targets.next_token(logits, attention_mask=mask)
>>> r, = dynlrp.lrp(logits, emb, seed, rules="attnlrp")
>>> per_token = dynlrp.targets.token_relevance(r, mask)                 # (B, L)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

Index = int | torch.Tensor | None


def primary_output(out: Any) -> torch.Tensor:
    """The tensor to explain or score in a model's output: itself, ``.logits``, or the first tensor
    (of a mapping's values or a sequence).

    Parameters
    ----------
    out
        What the model returned.

    Returns
    -------
    torch.Tensor
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find a tensor in the model output ({type(out).__name__})")


def _per_example(index: Index, batch: int, device: torch.device) -> torch.Tensor | None:
    if index is None:
        return None
    t = torch.as_tensor(index, device=device, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected one index per example ({batch}), got shape {tuple(t.shape)}")
    return t


def _seed(logits: torch.Tensor, index: tuple[torch.Tensor, ...], value: str) -> torch.Tensor:
    if value not in ("logit", "one"):
        raise ValueError(f"value must be 'logit' or 'one', not {value!r}")
    seed = torch.zeros_like(logits, requires_grad=False)
    picked = logits.detach()[index]
    seed[index] = picked if value == "logit" else torch.ones_like(picked)
    return seed


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The index of the last real (mask 1) token of each example, for left or right padding.

    Parameters
    ----------
    attention_mask
        ``(batch, length)``, 1 for real tokens and 0 for padding.

    Returns
    -------
    torch.Tensor
        ``(batch,)`` long tensor.
    """
    mask = attention_mask.detach().bool()
    if not mask.any(-1).all():
        raise ValueError("an example has no real token (its attention mask is all zero)")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(-1)


def class_logit(logits: torch.Tensor, target: Index = None, *, value: str = "logit") -> torch.Tensor:
    """Seed one class logit per example of a classifier.

    Parameters
    ----------
    logits
        ``(batch, classes)``.
    target
        The class per example (int or ``(batch,)`` tensor); default: the predicted class.
    value
        ``"logit"`` (the seed holds the logit) or ``"one"``.

    Returns
    -------
    torch.Tensor
        Shaped like ``logits``.
    """
    if logits.dim() != 2:
        raise ValueError(f"class_logit expects (batch, classes) logits, got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    target = _per_example(target, batch, logits.device)
    if target is None:
        target = logits.detach().argmax(-1)
    return _seed(logits, (torch.arange(batch, device=logits.device), target), value)


def next_token(logits: torch.Tensor, position: Index = None, token: Index = None, *,
               attention_mask: torch.Tensor | None = None, value: str = "logit") -> torch.Tensor:
    """Seed the logit of the token a causal LM predicts after ``position``.

    Parameters
    ----------
    logits
        ``(batch, length, vocab)``.
    position
        Which position's prediction (int or ``(batch,)``); default: the last real token of
        each example when ``attention_mask`` is given, else the last position.
    token
        Which token's logit (int or ``(batch,)``); default: the most likely one there.
    attention_mask
        ``(batch, length)``; locates the last real token of padded examples.
    value
        ``"logit"`` or ``"one"``.

    Returns
    -------
    torch.Tensor
        Shaped like ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"next_token expects (batch, length, vocab) logits, got shape {tuple(logits.shape)}")
    batch, length = logits.shape[:2]
    pos = _per_example(position, batch, logits.device)
    if pos is None:
        pos = (last_positions(attention_mask) if attention_mask is not None
               else torch.full((batch,), length - 1, device=logits.device, dtype=torch.long))
    pos = pos % length
    rows = torch.arange(batch, device=logits.device)
    tok = _per_example(token, batch, logits.device)
    if tok is None:
        tok = logits.detach()[rows, pos].argmax(-1)
    return _seed(logits, (rows, pos, tok), value)


def decoder_token(logits: torch.Tensor, position: Index = None, token: Index = None, *,
                  decoder_attention_mask: torch.Tensor | None = None, value: str = "logit") -> torch.Tensor:
    """Seed the logit of one decoder token of an encoder-decoder model (T5, Whisper, ...).

    The decoder's ``logits`` at ``position`` predict decoder token ``position + 1``; with
    teacher forcing (``decoder_input_ids`` given) that is the token to explain. Request the
    encoder's ``inputs_embeds`` (and, for the decoder's share, ``decoder_inputs_embeds``).

    Parameters
    ----------
    logits
        ``(batch, decoder length, vocab)``.
    position, token, value
        As in :func:`next_token`.
    decoder_attention_mask
        ``(batch, decoder length)``; locates the last real decoder token.

    Returns
    -------
    torch.Tensor
        Shaped like ``logits``.
    """
    return next_token(logits, position, token, attention_mask=decoder_attention_mask, value=value)


def qa_span(start_logits: torch.Tensor, end_logits: torch.Tensor, start: Index = None, end: Index = None, *,
            value: str = "logit") -> tuple[torch.Tensor, torch.Tensor]:
    """Seeds for extractive question answering: the start and the end logit of the answer span.

    Pass both outputs and both seeds: ``dynlrp.lrp((start_logits, end_logits), emb,
    dynlrp.targets.qa_span(start_logits, end_logits))``.

    Parameters
    ----------
    start_logits, end_logits
        ``(batch, length)`` each.
    start, end
        The span per example; default: the most likely start, then the most likely end at
        or after it.
    value
        ``"logit"`` or ``"one"``.

    Returns
    -------
    tuple of torch.Tensor
        Seeds shaped like ``start_logits`` and ``end_logits``.
    """
    if start_logits.shape != end_logits.shape or start_logits.dim() != 2:
        raise ValueError("qa_span expects two (batch, length) tensors of the same shape")
    batch, length = start_logits.shape
    rows = torch.arange(batch, device=start_logits.device)
    s = _per_example(start, batch, start_logits.device)
    if s is None:
        s = start_logits.detach().argmax(-1)
    e = _per_example(end, batch, start_logits.device)
    if e is None:
        before = torch.arange(length, device=start_logits.device)[None, :] < s[:, None]
        e = end_logits.detach().masked_fill(before, float("-inf")).argmax(-1)
    return _seed(start_logits, (rows, s), value), _seed(end_logits, (rows, e), value)


def token_relevance(relevance: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance per token: the relevance of ``inputs_embeds`` summed over the hidden dimension,
    zero at padding positions.

    Parameters
    ----------
    relevance
        ``(batch, length, hidden)``.
    attention_mask
        ``(batch, length)``, 1 for real tokens.

    Returns
    -------
    torch.Tensor
        ``(batch, length)``.
    """
    per_token = relevance.sum(-1)
    if attention_mask is not None:
        per_token = per_token * attention_mask.to(per_token.dtype)
    return per_token

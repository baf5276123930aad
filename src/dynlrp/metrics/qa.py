"""Extractive question answering: do the top attributed tokens lie in the answer span?

Section 5.2 and Table 1 of the DynamicLRP paper. Per example, with ``T`` the ``k`` (= 2)
eligible tokens of highest relevance, ``P = [start, end]`` the model's predicted span and
``E = {start, end}`` its endpoints:

=====================  ===================================================================
``top1_pred``          the top token lies in ``P`` ("top-1 (P)")
``top1_label``         the top token lies in a ground-truth span ("top-1 (L)")
``top2_pred``          ``|T & P| / k``: the share of the top-k tokens inside ``P``
                       ("top-2 (P)")
``top2_pred_strict``   ``|T & E| / k``: only the endpoints count (the parenthesised value)
``iou_pred``           ``sum |T & P| / sum (k + |T - P|)`` over the examples: ``P`` counts as
                       ``k`` targets (its two endpoints), any token inside it matches one
                       ("IoU (P)")
``iou_pred_strict``    ``sum |T & E| / sum |T | E|``: the IoU with the endpoints
=====================  ===================================================================

Examples whose predicted start is after the predicted end are skipped and counted, as in the
paper. The IoUs are pooled over examples (sums of intersections over sums of unions), as the
paper's code computed them; the accuracies are means over examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Span = tuple[int, int]


@dataclass
class QAMetrics:
    """Table 1's attribution metrics over a set of QA examples (fractions in ``[0, 1]``).

    Attributes
    ----------
    top1_pred, top1_label, top2_pred, top2_pred_strict, iou_pred, iou_pred_strict
        See the module docstring; ``top1_label`` is NaN without ground-truth spans.
    examples
        Examples scored.
    skipped
        Examples skipped (predicted start after end, or no eligible token).
    k
        The top-k of the top-k metrics.
    per_example
        Per scored example: ``top1`` (index of the top token), ``top1_pred``,
        ``top1_label``, ``hits`` (``|T & P|``) and ``endpoint_hits`` (``|T & E|``).
    """

    top1_pred: float
    top1_label: float
    top2_pred: float
    top2_pred_strict: float
    iou_pred: float
    iou_pred_strict: float
    examples: int
    skipped: int
    k: int = 2
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """The summary numbers (fractions, counts)."""
        return {"top1_label": self.top1_label, "top1_pred": self.top1_pred, "top2_pred": self.top2_pred,
                "top2_pred_strict": self.top2_pred_strict, "iou_pred": self.iou_pred,
                "iou_pred_strict": self.iou_pred_strict, "examples": float(self.examples),
                "skipped": float(self.skipped)}

    def table_row(self) -> dict[str, str]:
        """Table 1's columns, in percent: ``top-2 (P)`` and ``IoU (P)`` with the strict value
        in parentheses."""
        def pct(v: float) -> str:
            return "n/a" if v != v else f"{100 * v:.2f}"
        return {"top-1 (L)": pct(self.top1_label), "top-1 (P)": pct(self.top1_pred),
                f"top-{self.k} (P)": f"{pct(self.top2_pred)} ({pct(self.top2_pred_strict)})",
                "IoU (P)": f"{pct(self.iou_pred)} ({pct(self.iou_pred_strict)})",
                "Examples": str(self.examples), "Skipped": str(self.skipped)}


def predicted_spans(start_logits: torch.Tensor, end_logits: torch.Tensor,
                    mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's answer span: argmax of the start and of the end logits over allowed tokens.

    Start and end are chosen independently (as the paper's evaluation did), so the start can
    come after the end; :func:`qa_metrics` skips those examples.

    Parameters
    ----------
    start_logits, end_logits
        ``(N, T)``.
    mask
        ``(N, T)`` bool: tokens an answer may use (e.g. the context without padding).

    Returns
    -------
    tuple of torch.Tensor
        ``(start, end)``, each ``(N,)`` token indices (inclusive span).
    """
    if mask is not None:
        mask = mask.to(start_logits.device).bool()
        start_logits = start_logits.masked_fill(~mask, float("-inf"))
        end_logits = end_logits.masked_fill(~mask, float("-inf"))
    return start_logits.argmax(-1), end_logits.argmax(-1)


def _rows(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise ValueError(f"expected (N, T) per-token values, got {tuple(x.shape)}")
        return list(x)
    return [torch.as_tensor(r) for r in x]


def _gold(spans: object, n: int) -> list[list[Span]] | None:
    if spans is None:
        return None
    if isinstance(spans, torch.Tensor):
        spans = spans.tolist()
    out: list[list[Span]] = []
    for s in spans:  # type: ignore[union-attr]
        if len(s) == 2 and all(isinstance(v, int) for v in s):
            out.append([(int(s[0]), int(s[1]))])
        else:
            out.append([(int(a), int(b)) for a, b in s])
    if len(out) != n:
        raise ValueError(f"{len(out)} ground-truth entries for {n} examples")
    return out


def qa_metrics(
    relevance: torch.Tensor | Sequence[torch.Tensor],
    pred_start: torch.Tensor | Sequence[int],
    pred_end: torch.Tensor | Sequence[int],
    gold_spans: Sequence[Span] | Sequence[Sequence[Span]] | torch.Tensor | None = None,
    *,
    mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
    k: int = 2,
) -> QAMetrics:
    """Table 1's metrics: top-1 / top-k attributed tokens against the predicted and true spans.

    Parameters
    ----------
    relevance
        Per-token relevance: ``(N, T)`` or one 1-D tensor per example (lengths may differ).
    pred_start, pred_end
        ``(N,)`` the predicted span (inclusive token indices).
    gold_spans
        Per example one ``(start, end)`` or a list of them (SQuAD lists several answers);
        ``None``: ``top1_label`` is NaN.
    mask
        Eligible tokens per example (``(N, T)`` or a list): only they can be top tokens,
        e.g. the context tokens without special tokens and padding. Default: all.
    k
        The top-k of the top-k metrics (the paper: 2).

    Returns
    -------
    QAMetrics
    """
    rel = _rows(relevance)
    n = len(rel)
    starts = torch.as_tensor(pred_start).reshape(-1).tolist()
    ends = torch.as_tensor(pred_end).reshape(-1).tolist()
    if len(starts) != n or len(ends) != n:
        raise ValueError(f"{len(starts)} starts and {len(ends)} ends for {n} examples")
    gold = _gold(gold_spans, n)
    masks = _rows(mask) if mask is not None else [None] * n
    if len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} examples")

    top1s, p1, l1, hits, end_hits = [], [], [], [], []
    inter = union = inter_strict = union_strict = 0
    skipped = 0
    for i in range(n):
        r = rel[i].detach().double().reshape(-1)
        s, e = int(starts[i]), int(ends[i])
        eligible = masks[i].reshape(-1).bool().to(r.device) if masks[i] is not None \
            else torch.ones_like(r, dtype=torch.bool)
        if s > e or not bool(eligible.any()):
            skipped += 1
            continue
        scores = r.masked_fill(~eligible, float("-inf"))
        kk = min(k, int(eligible.sum()))
        top = scores.topk(kk).indices.tolist()
        t1 = top[0]
        in_span = [s <= t <= e for t in top]
        h = sum(in_span)
        eh = len(set(top) & {s, e})
        top1s.append(t1)
        p1.append(float(s <= t1 <= e))
        if gold is not None:
            l1.append(float(any(a <= t1 <= b for a, b in gold[i])))
        hits.append(h)
        end_hits.append(eh)
        inter += h
        union += k + (kk - h)
        inter_strict += eh
        union_strict += len(set(top) | {s, e})

    m = len(top1s)
    nan = float("nan")

    def mean(v: list[float]) -> float:
        return float(sum(v) / len(v)) if v else nan

    return QAMetrics(
        top1_pred=mean(p1), top1_label=mean(l1) if gold is not None else nan,
        top2_pred=mean([h / k for h in hits]), top2_pred_strict=mean([h / k for h in end_hits]),
        iou_pred=inter / union if union else nan, iou_pred_strict=inter_strict / union_strict if union_strict
        else nan, examples=m, skipped=skipped, k=k,
        per_example={"top1": torch.tensor(top1s, dtype=torch.long), "top1_pred": torch.tensor(p1),
                     "top1_label": torch.tensor(l1), "hits": torch.tensor(hits, dtype=torch.long),
                     "endpoint_hits": torch.tensor(end_hits, dtype=torch.long)},
    )

"""dynlrp: operation-level Layer-wise Relevance Propagation over PyTorch's autograd graph.

>>> y = model(x)                              # any forward; x.requires_grad_(True)
>>> rx, = dynlrp.lrp(y, x, relevance=seed)    # seed: a tensor shaped like y
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import baselines, metrics, ops, presets, rules, targets
from .coverage import CoverageReport, coverage
from .engine import LRP
from .errors import (
    GraphError,
    GraphFreedError,
    LRPError,
    NonFiniteRelevanceError,
    UnknownOpError,
    UnrecoverableValueError,
)
from .explain import Explanation, explain, explain_batches
from .record import Tape, record

__version__ = "0.1.0"


def lrp(
    outputs: torch.Tensor | Sequence[torch.Tensor],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    relevance: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    rules: Any = None,
    tape: Tape | None = None,
    model: torch.nn.Module | None = None,
    retain_graph: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Propagate relevance from ``outputs`` back to ``inputs``, like ``torch.autograd.grad``.

    Parameters
    ----------
    outputs
        A tensor or sequence of tensors with a ``grad_fn``.
    inputs
        A tensor or sequence of tensors: leaves (model inputs, parameters) or intermediate
        tensors of the same forward pass.
    relevance
        Seeds shaped like ``outputs`` (like ``grad_outputs``); default: the outputs' values.
    rules
        A preset name, a mapping ``{op name or kind: Rule}`` or a RuleSet.
    tape
        A :func:`record` tape of the forward pass: use recorded forward values instead of
        the Promise System.
    model
        The model that ran the forward pass (optional). Autograd never sees the biases of
        frozen layers; where the Promise System needs one, it reads it from the model's
        module whose weight the graph saved. The model is only read.
    retain_graph
        Keep the tensors the forward pass saved. By default they are freed as the
        propagation passes them, as ``torch.autograd.grad`` does, so the peak memory stays
        near a gradient's; the graph can then be explained (or differentiated) only once,
        and a second call raises :class:`GraphFreedError`. Pass ``True`` to explain one
        forward pass several times (other rules, other targets) or to call ``.backward()``
        on it afterwards.

    Returns
    -------
    tuple of torch.Tensor
        One relevance tensor per input, shaped like it, in the order given.
    """
    return LRP(rules)(outputs, inputs, relevance, tape=tape, model=model, retain_graph=retain_graph)


__all__ = [
    "lrp", "LRP", "record", "Tape", "coverage", "CoverageReport", "rules", "presets", "ops", "targets",
    "metrics", "baselines",
    "LRPError", "GraphError", "GraphFreedError", "UnknownOpError", "UnrecoverableValueError",
    "NonFiniteRelevanceError",
    "explain", "explain_batches", "Explanation",
]

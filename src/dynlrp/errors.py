"""Typed errors. Every error dynlrp raises on purpose is an :class:`LRPError`."""

from __future__ import annotations


class LRPError(RuntimeError):
    """Base class of every error dynlrp raises on purpose."""


class GraphError(LRPError):
    """The outputs, inputs or seed do not describe an explainable autograd graph."""


class GraphFreedError(GraphError):
    """The graph's saved tensors were freed by ``.backward()`` without ``retain_graph``."""


class ModifiedInPlaceError(GraphError):
    """A tensor autograd saved was modified in place after the forward pass."""


class UnknownOpError(LRPError):
    """The graph contains autograd nodes that have no registered op entry."""


class UnrecoverableValueError(LRPError):
    """A rule needs a forward value that neither the graph nor the tape can provide."""


class NonFiniteRelevanceError(LRPError):
    """NaN or infinity appeared in the seed or in the relevance an op produced."""

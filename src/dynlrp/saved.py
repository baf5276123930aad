"""The only module that reads private autograd attributes.

Autograd nodes keep what their gradient needs as ``_saved_<name>`` attributes and describe
their forward outputs in ``_input_metadata``. Both are undocumented and change between
torch releases, so every access goes through this module: an op entry asks for
``saved(node, "self")``, never for ``node._saved_self``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import GraphFreedError, ModifiedInPlaceError

_MISSING = object()
_U64 = 1 << 64


def translate_error(node: Any, exc: RuntimeError) -> Exception:
    """The typed error for autograd's ``exc`` at ``node`` (None: a node autograd's own pass ran),
    or ``exc`` itself."""
    text = str(exc)
    if "modified by an inplace operation" in text:
        return ModifiedInPlaceError(
            f"a tensor saved by {_name(node)} was modified in place after the forward pass, "
            "so the graph no longer describes the values it computed. Run the forward pass "
            "again, or clone the tensor before modifying it."
        )
    if _RELEASED in text:
        return GraphFreedError(
            f"the forward values saved by {_name(node)} were freed by an earlier "
            "`dynlrp.lrp` call, which (like `autograd.grad`) frees the graph as it goes. Run the "
            "forward pass again, or pass `retain_graph=True` to the earlier call."
        )
    if "freed" in text or "second time" in text:
        return GraphFreedError(
            f"the forward values saved by {_name(node)} were freed, most likely by a "
            "`.backward()` or `autograd.grad` call without `retain_graph=True`. Run the "
            "forward pass again, or pass `retain_graph=True` to the earlier backward."
        )
    return exc


def _name(node: Any) -> str:
    return "an op of the forward pass" if node is None else node_name(node)


def apply_node(node: Any, grads: list) -> tuple:
    """Call an autograd node on ``grads`` (one per forward output): ``J^T g`` per input."""
    try:
        out = node(*grads)
    except RuntimeError as exc:
        raise translate_error(node, exc) from exc
    return out if isinstance(out, tuple) else (out,)


def saved(node: Any, name: str) -> Any:
    """Return the value autograd saved as ``_saved_<name>`` on ``node``, or ``None``.

    Raises
    ------
    GraphFreedError
        When the saved tensors were freed by a ``.backward()`` without ``retain_graph``.
    """
    try:
        value = getattr(node, "_saved_" + name, _MISSING)
    except RuntimeError as exc:
        raise translate_error(node, exc) from exc
    return None if value is _MISSING else value


def saved_dim(node: Any, name: str = "dim") -> Any:
    """A saved dimension (int or tuple); autograd stores negative dims as unsigned 64-bit."""
    value = saved(node, name)
    if isinstance(value, (tuple, list)):
        return tuple(_signed(v) for v in value)
    return None if value is None else _signed(value)


def _signed(v: int) -> int:
    return v - _U64 if v >= (1 << 63) else v


def node_name(node: Any) -> str:
    """The autograd node's type name, e.g. ``"AddmmBackward0"`` or a custom Function's."""
    return node.name() if hasattr(node, "name") else type(node).__name__


def view_base(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``t`` is a view of (``Tensor._base``), or None."""
    return t._base


def leaf_variable(node: Any) -> torch.Tensor | None:
    """The leaf tensor of an ``AccumulateGrad`` node."""
    return getattr(node, "variable", None)


def output_meta(node: Any, index: int) -> tuple[torch.Size, torch.dtype, torch.device]:
    """Shape, dtype and device of forward output ``index`` of ``node``."""
    var = leaf_variable(node)
    if var is not None:
        return var.shape, var.dtype, var.device
    meta = node._input_metadata[index]
    return torch.Size(meta.shape), meta.dtype, meta.device


def node_facts(node: Any) -> tuple[str, torch.Tensor | None, tuple | None]:
    """``(name, leaf tensor or None, output metadata or None)`` of ``node``, read once: what the
    graph builder asks of every node (the metadata is decoded by :func:`decode_metas`)."""
    try:
        name = node.name()
    except AttributeError:
        name = type(node).__name__
    var = getattr(node, "variable", None)
    return name, var, (None if var is not None else node._input_metadata)


def decode_metas(node: Any, metadata: tuple | None) -> list[tuple[torch.Size, torch.dtype, torch.device]]:
    """:func:`output_meta` of every output, from the metadata :func:`node_facts` read."""
    if metadata is None:
        return [output_meta(node, 0)]
    size = torch.Size
    return [(size(m.shape), m.dtype, m.device) for m in metadata]


def num_outputs(node: Any) -> int:
    """How many forward outputs ``node`` has (1 for leaves)."""
    if leaf_variable(node) is not None:
        return 1
    return len(node._input_metadata)


def custom_saved_tensors(node: Any) -> tuple[torch.Tensor, ...]:
    """Tensors a custom ``autograd.Function`` saved with ``save_for_backward``."""
    return tuple(getattr(node, "saved_tensors", ()))


# -- releasing saved tensors (``retain_graph=False``) ---------------------------------------
_RELEASED = "freed by dynlrp.lrp"
_RAW_SAVED: dict[type, tuple[str, ...]] = {}  # node type -> its ``_raw_saved_*`` attribute names


def _drop(tensor: torch.Tensor) -> None:
    return None


def _released(_: None) -> torch.Tensor:
    raise RuntimeError(
        f"the forward values saved by this graph were {_RELEASED} (it frees the graph as it goes, "
        "like `autograd.grad`); run the forward pass again, or pass `retain_graph=True` to it"
    )


def _raw_names(node: Any) -> tuple[str, ...]:
    names = _RAW_SAVED.get(type(node))
    if names is None:
        names = _RAW_SAVED[type(node)] = tuple(a for a in dir(node) if a.startswith("_raw_saved_"))
    return names


def saves_tensors(node: Any) -> bool:
    """Whether ``node``'s type keeps tensors for its backward (a view or transpose keeps none)."""
    return bool(_raw_names(node))


def release(node: Any) -> bool:
    """Free the tensors ``node`` saved for its backward, as autograd's engine does after
    running a node without ``retain_graph``: reading them later raises
    :class:`GraphFreedError` here and a ``RuntimeError`` in ``.backward()``.

    Uses the public saved-tensor hooks (a pack hook registered on a saved tensor runs at once
    and the tensor is dropped); non-tensor saved attributes (sizes, dims) stay readable.
    Returns whether the node kept any tensor to free."""
    names = _raw_names(node)
    for name in names:
        try:
            raw = getattr(node, name)
        except RuntimeError:  # freed already
            continue
        for one in raw if isinstance(raw, (tuple, list)) else (raw,):
            try:
                one.register_hooks(_drop, _released)
            except (RuntimeError, AttributeError):  # undefined (None), freed, or hooked already
                pass
    return bool(names)


_CONSUMED = "dynlrp: graph freed"  # key in a root node's (public) ``metadata`` dict


def _refuse(grad_outputs: Any) -> None:
    _released(None)


def consume(node: Any) -> Callable[[], None]:
    """Mark the graph of root ``node`` as used up by a call that frees it: its large saved tensors
    are released as the call goes (:func:`release`), the small ones are not worth the time, so
    the mark makes a later call (:func:`consumed`) or ``.backward()`` through ``node`` fail
    alike, whatever the sizes. Returns a function that lifts the mark (for a call that failed
    before it freed anything)."""
    if node.metadata.get(_CONSUMED):
        return _nothing
    node.metadata[_CONSUMED] = True
    handle = node.register_prehook(_refuse)

    def undo() -> None:
        node.metadata.pop(_CONSUMED, None)
        handle.remove()

    return undo


def _nothing() -> None:
    return None


def consumed(node: Any) -> bool:
    """Whether a call that frees the graph already ran from root ``node`` (:func:`consume`)."""
    return bool(node.metadata.get(_CONSUMED))


def consumed_error(node: Any) -> GraphFreedError:
    return translate_error(node, RuntimeError(_RELEASED))

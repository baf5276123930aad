"""Every op entry in the registry is exercised by a brute-force test in tests/ops.

Each ``tests/ops/test_*.py`` module declares ``COVERED``: the autograd node names its tests
produce *and assert* (the :class:`~.helpers.Case` objects check ``grad_fn.name()`` on every
run, so a name in ``COVERED`` is a node the tests really built). Registering an op without
adding it to some module's ``COVERED`` fails :func:`test_every_registered_op_is_tested`.

Two kinds of names cannot be produced here and are checked differently:

* names this torch build does not define at all (``torch._C._functions`` has no such node
  class) -- if a later torch defines them, the test fails and asks for a case;
* GPU-only backends of an op (cuDNN / MIOpen batch norm): they must share every closure
  with the CPU entry that is tested.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch

import dynlrp

HERE = pathlib.Path(__file__).parent
# GPU-only node -> the CPU node whose entry (closures, kind, contract) it must share
GPU_ALIASES = {
    "CudnnBatchNormBackward0": "NativeBatchNormBackward0",
    "MiopenBatchNormBackward0": "NativeBatchNormBackward0",
    # fused attention on CUDA (flash, memory-efficient, cuDNN) and out-of-tree devices
    "ScaledDotProductFlashAttentionBackward0": "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductEfficientAttentionBackward0": "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductCudnnAttentionBackward0": "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductFusedAttentionOverrideableBackward0": "ScaledDotProductFlashAttentionForCpuBackward0",
}
TORCH_NODES = set(dir(torch._C._functions))


def covered_names() -> dict[str, str]:
    """``{node name: test module}`` from the ``COVERED`` sets of every ``tests/ops/test_*.py``."""
    found: dict[str, str] = {}
    for path in sorted(HERE.glob("test_*.py")):
        if path.stem == "test_coverage":
            continue
        module = importlib.import_module(f"{__package__}.{path.stem}")
        for name in getattr(module, "COVERED", ()):
            found.setdefault(name, path.name)
    return found


COVERED = covered_names()


def _same_entry(a, b) -> bool:
    fields = ("kind", "contract", "forward", "own", "taps", "inverse")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


@pytest.mark.parametrize("name", sorted(dynlrp.ops.registered()))
def test_every_registered_op_is_tested(name):
    if name in COVERED:
        return
    if name in GPU_ALIASES:
        cpu = GPU_ALIASES[name]
        assert cpu in COVERED, f"{name} is checked through {cpu}, which no test covers"
        assert _same_entry(dynlrp.ops.lookup(name), dynlrp.ops.lookup(cpu)), (
            f"{name} (GPU only, not testable here) no longer shares its entry with the tested {cpu}")
        return
    assert name not in TORCH_NODES, (
        f"op entry {name} has no brute-force test in tests/ops: add a case that builds the node and "
        f"compares its relevance with an independent reference, and list it in the module's COVERED")


def test_names_torch_does_not_define():
    """Entries for node types this torch build never creates (dead here, but harmless)."""
    dead = sorted(n for n in dynlrp.ops.registered() if n not in TORCH_NODES and n not in COVERED)
    # 1-d pools run as 2-d pools; contiguous() clones; expand_as expands; flatten views.
    assert set(dead) <= {"AvgPool1DBackward0", "MaxPool1DWithIndicesBackward0", "ContiguousBackward0",
                         "ExpandAsBackward0", "FlattenBackward0"}, dead


def test_covered_names_are_registered():
    """A test must not claim a node that has no entry (a typo would hide a gap)."""
    unknown = sorted(set(COVERED) - set(dynlrp.ops.registered()))
    assert not unknown, f"COVERED lists names with no op entry: {unknown}"

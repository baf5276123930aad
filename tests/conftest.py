"""Shared fixtures. Tests are deterministic: every test starts from the same seed."""

from __future__ import annotations

import os

import pytest
import torch

import dynlrp.engine
from dynlrp.promise import PromiseResolver

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine more threads only wait on
    each other (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def resolvers(monkeypatch):
    """Every :class:`PromiseResolver` the engine makes during the test, in order."""
    made: list[PromiseResolver] = []

    class Recording(PromiseResolver):
        keep_values = True  # the tests inspect every value the call resolved

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dynlrp.engine, "PromiseResolver", Recording)
    return made


@pytest.fixture(autouse=True)
def _free_every_tensor(monkeypatch):
    """Free saved tensors of every size (by default small ones are not worth the time), so that
    every test that explains a graph once also checks that freeing it as it goes is safe."""
    monkeypatch.setattr(dynlrp.values, "RELEASE_MIN", 0)


@pytest.fixture(autouse=True)
def _python_traversal(monkeypatch):
    """Take the Python traversal, whose every step (promises, freeing, rules) the tests inspect;
    tests/test_gradform.py runs autograd's engine (dynlrp.gradform, the default wherever the
    rules are gradients) against it and against the op references."""
    monkeypatch.setattr(dynlrp.gradform, "MAX_ELEMENTS", 0)


@pytest.fixture(autouse=True)
def _write_every_grad(monkeypatch):
    """Overwrite every grad that may be overwritten (by default only large ones are worth it),
    so that every test also checks the in-place products of :func:`dynlrp.rules._inputs_times`."""
    monkeypatch.setattr(dynlrp.rules, "WRITE_MIN", 0)

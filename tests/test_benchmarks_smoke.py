"""Smoke test of the benchmark scripts: each runs end to end at tiny size.

These check that the scripts work and write what docs/performance.md describes -- not
their numbers (timings at tiny size and on a shared CI machine mean nothing). Each script
runs in its own process, as a user would run it, writing into a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

pytest.importorskip("torchvision")


def _run(script: str, *args: str, timeout: float = 180) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _is_ratio(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def _ran_or_reported(entry: dict) -> bool:
    """A method either measured (a positive ratio) or reported why it could not run."""
    return _is_ratio(entry.get("ratio")) or bool(entry.get("error"))


def test_compare_tiny(tmp_path):
    # VGG16 only: every in-process method (dynlrp's three modes, Zennit, Captum) and one memory
    # process. The transformers rows and LxT's paired processes cost ~10 s of imports each
    # and are left to the real runs (docs/performance.md).
    pytest.importorskip("zennit")
    pytest.importorskip("captum")
    out = _run("compare.py", "--tiny", "--models", "vgg16",
               "--methods", "grad,dynlrp,dynlrp_recorded,dynlrp_cached,dynlrp_epsilon,zennit,captum",
               "--memory-methods", "grad", "--out", str(tmp_path))
    result = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text() in out
    (row,) = result["rows"]
    methods = row["methods"]
    assert set(methods) == {"grad", "dynlrp", "dynlrp_recorded", "dynlrp_cached", "dynlrp_epsilon", "zennit",
                            "captum"}
    assert methods["grad"]["ratio"] == pytest.approx(1.0)
    assert methods["grad"]["extra_peak_mib"] is not None
    assert methods["grad"]["live_peak_mib"] is not None  # the second, slack-free measurement
    assert "Extra peak **live** memory" in out
    assert all(_ran_or_reported(m) for m in methods.values()), methods
    if "error" not in methods["dynlrp"]:  # the paper's Table 4 numbers come from engine.stats
        assert methods["dynlrp"]["info"]["stats"]["nodes"] > 0
    assert "| VGG16 | 1 |" in out
    assert "dynlrp epsilon: the `epsilon` preset" in out


def test_scaling_tiny(tmp_path):
    plot = tmp_path / "scaling.png"
    _run("scaling.py", "--tiny", "--no-memory", "--passes", "1", "--methods", "grad,dynlrp,dynlrp_cached",
         "--out", str(tmp_path), "--plot", str(plot))
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert result["settings"]["variant"]
    for sweep in ("depth", "tokens"):
        assert len(result[sweep]) == 2
        for point in result[sweep]:
            assert "error" not in point, point
            assert _is_ratio(point["methods"]["dynlrp"]["ratio"])
    assert plot.stat().st_size > 0


def test_overhead_tiny(tmp_path):
    out = _run("overhead.py", "--graphs", "chain", "--nodes", "100", "--repeats", "1", "--warmup", "1",
               "--out", str(tmp_path))
    chain = json.loads((tmp_path / "overhead.json").read_text())["graphs"]["chain"]
    assert chain["autograd_nodes"] >= 90
    dynlrp = chain["methods"]["dynlrp"]
    assert _is_ratio(dynlrp["explain_ratio"]) and _is_ratio(dynlrp["alone_ratio"])
    assert dynlrp["op_seconds"]["explain"] > 0
    assert "µs / node" in out and "ops alone" in out
    # the sketch of rules inside autograd's engine computes what dynlrp computes (same input)
    sketch = chain["methods"]["hooks"]
    assert _is_ratio(sketch["ratio"])
    assert sketch["relevance_sum"] == pytest.approx(dynlrp["relevance_sum"], rel=1e-4, abs=1e-6)


def test_floor_tiny(tmp_path):
    """The hand-written EpsilonPlus of benchmarks/floor.py is a fair floor only if it computes
    what dynlrp computes: checked here on a small VGG16."""
    out = _run("floor.py", "--batches", "1", "--image", "32", "--repeats", "1", "--warmup", "0",
               "--out", str(tmp_path))
    row, = json.loads((tmp_path / "floor.json").read_text())["rows"]
    assert _is_ratio(row["by_hand"]) and _is_ratio(row["dynlrp"])
    assert row["max_difference"] < 1e-4
    assert "EpsilonPlus by hand" in out


def test_adjoints_tiny(tmp_path):
    """benchmarks/adjoints.py times the entry's vjp only where it computes the node's backward."""
    out = _run("adjoints.py", "--batches", "1", "--image", "32", "--repeats", "1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "adjoints.json").read_text())["rows"]
    assert {r["kind"] for r in rows} == {"1x1, stride 1", "1x1, stride 2", "kxk, stride 1", "kxk, stride 2"}
    assert sum(r["convolutions"] for r in rows) == 53
    for r in rows:
        assert r["entry_used"] == (r["convolutions"] if r["kind"].startswith("1x1") else 0)
        assert _is_ratio(r["ratio"]) and r["max_difference"] < 1e-5
    assert "entry's vjp" in out

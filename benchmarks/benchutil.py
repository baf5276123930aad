"""Shared helpers of the benchmark scripts: clocks, peak memory, workers, machine facts.

Timing
    :func:`interleave` runs every method once per round, in a rotated order, after a
    warm-up, so that slow phases of a shared machine hit all methods alike. Ratios are
    taken *per round* against the baseline of the same round and the median is reported.

Memory
    ``tracemalloc`` does not see torch's allocations. Each memory measurement runs in a
    fresh process (:func:`run_worker`): it builds the model, runs the method once to warm
    up, frees everything, returns free heap pages to the OS (``malloc_trim``), resets the
    kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), reads ``VmRSS``, runs
    the method once more and reads ``VmHWM``. The difference is the extra peak resident
    memory of one forward + explanation (:class:`PeakRSS`).

    Resident memory includes the allocator's slack: glibc serves a freed large block's size
    from its heap from then on (its mmap threshold grows), and how much of that heap stays
    resident depends on the order of allocations -- in three processes the same VGG16
    explanation measured 110, 136 and 145 MiB. :data:`LIVE_ENV` fixes the threshold at 64 KiB,
    so that every tensor of that size or more is mapped on its own and unmapped when freed:
    resident memory then follows the bytes the run really holds (tensors and the kernels' own
    workspaces, such as oneDNN's reordered weights), the same to 0.1 MiB from run to run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MARK = "@@RESULT@@"
SRC_ENV = "DYNLRP_BENCH_SRC"  # the dynlrp source tree to measure (default: ROOT / "src")


def src_dir() -> Path:
    """The dynlrp source tree the workers import (``$DYNLRP_BENCH_SRC`` or the repository's)."""
    return Path(os.environ.get(SRC_ENV) or ROOT / "src").resolve()


def use_src(path: Path | str | None) -> None:
    """Measure the dynlrp found under ``path`` (in this process and in every worker)."""
    if path:
        os.environ[SRC_ENV] = str(Path(path).resolve())
    src = str(src_dir())
    if src not in sys.path:
        sys.path.insert(0, src)


# -- memory -------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) if found else -1


def trim() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: The environment of a memory worker that measures live memory (see the module docstring):
#: glibc's ``M_MMAP_THRESHOLD`` fixed at 64 KiB. Other C libraries ignore it.
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


class PeakRSS:
    """Extra peak resident memory of a block, from ``/proc/self/status``.

    Examples
    --------
    >>> with PeakRSS() as mem:
    ...     run()
    >>> mem.extra_mib
    """

    def __init__(self) -> None:
        self.baseline_kib = 0
        self.peak_kib = 0
        self.reset_ok = False

    def __enter__(self) -> PeakRSS:
        trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.baseline_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_kib = _status_kib("VmHWM")

    @property
    def extra_mib(self) -> float:
        return max(self.peak_kib - self.baseline_kib, 0) / 1024.0


# -- timing -------------------------------------------------------------------------------
class Clock:
    """Named phase timer: ``with clock("forward"): ...``; ``clock.phases`` holds seconds."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._name = ""
        self._t0 = 0.0

    def __call__(self, name: str) -> Clock:
        self._name = name
        return self

    def __enter__(self) -> Clock:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.phases[self._name] = self.phases.get(self._name, 0.0) + time.perf_counter() - self._t0


def timed(fn: Callable[[Clock], Any]) -> dict[str, float]:
    """Run ``fn(clock)`` once; return its phases plus ``total`` (wall seconds)."""
    clock = Clock()
    t0 = time.perf_counter()
    fn(clock)
    total = time.perf_counter() - t0
    trim()
    return {**clock.phases, "total": total}


class OpCounter(Clock):
    """A :class:`Clock` that profiles operators instead of timing phases: ``phases`` holds, per
    phase, how many *outermost* aten operators ran (an ``aten::mm`` inside ``aten::linear``
    counts once, as ``linear``; the operators autograd's engine runs for a backward node count
    as the node's), and ``seconds`` how long they ran (each outermost operator's CPU time, its
    inner operators included, as the profiler measures it). ``seconds`` is what the phase would
    take with nothing around its operators -- no Python, no engine -- up to the profiler's own
    cost per operator."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> OpCounter:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._prof.__exit__(*exc)
        outer = [e for e in self._prof.events() if e.name.startswith("aten::")
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
        self.phases[self._name] = self.phases.get(self._name, 0) + len(outer)
        spent = sum(e.cpu_time_total for e in outer) / 1e6  # (microseconds in the profiler)
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + spent
        self._prof = None


def count_ops(fn: Callable[[Clock], Any]) -> tuple[dict[str, int], dict[str, float]]:
    """Run ``fn(clock)`` once under an :class:`OpCounter`: per phase, how many outermost
    operators ran and their seconds."""
    counter = OpCounter()
    fn(counter)
    return dict(counter.phases), dict(counter.seconds)


def interleave(methods: dict[str, Callable[[Clock], Any]], repeats: int, warmup: int = 1,
               ) -> dict[str, list[dict[str, float]]]:
    """Time every method ``repeats`` times, one run of each per round, in rotated order.

    Parameters
    ----------
    methods
        ``{name: fn}``; ``fn(clock)`` runs one forward + explanation and may time phases
        with ``with clock("explain"): ...``.
    repeats
        Rounds measured after the warm-up.
    warmup
        Unmeasured runs of each method first.

    Returns
    -------
    dict
        ``{name: [phases of round 0, phases of round 1, ...]}``.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            timed(methods[name])
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed(methods[name]))
    return samples


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(samples: list[dict], base: list[dict], phase: str = "total",
                 base_phase: str | None = None) -> float | None:
    """Median over rounds of ``samples[r][phase] / base[r][base_phase]``."""
    base_phase = base_phase or phase
    ratios = [s[phase] / b[base_phase] for s, b in zip(samples, base)
              if phase in s and base_phase in b and b[base_phase] > 0]
    return median(ratios)


# -- workers ------------------------------------------------------------------------------
def emit(result: Any) -> None:
    """Print a worker's JSON result on one marked line (the parent parses it)."""
    print(MARK + json.dumps(result), flush=True)


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: this dynlrp on the path, no network for transformers, and
    ``extra`` (e.g. :data:`LIVE_ENV`)."""
    env = dict(os.environ, **(extra or {}))
    src = str(src_dir())
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _last_line(text: str, default: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else default


def run_worker(script: Path, args: list[str], timeout: float = 3600, env: dict[str, str] | None = None,
               ) -> dict:
    """Run ``script`` with ``args`` in a fresh interpreter (``env``: more environment variables)
    and return its emitted JSON.

    A worker that crashes returns ``{"error": <last line of stderr>}``.
    """
    try:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=timeout, env=worker_env(env))
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"error": _last_line(proc.stderr, f"worker exited with {proc.returncode}")}


class Server:
    """A worker kept alive in its own process that runs one measurement per request.

    Two servers timed in alternation interleave methods that cannot share a process (LxT
    patches library modules process-wide). The worker emits one result when it is ready
    (``hello``) and one per ``run`` line it reads on stdin; any other line ends it.
    """

    def __init__(self, script: Path, args: list[str]) -> None:
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=worker_env())
        self.hello = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.proc.wait()
        self._err.seek(0)
        return {"error": _last_line(self._err.read(), f"server exited with {self.proc.returncode}")}

    def request(self, command: str = "run") -> dict:
        """Send ``command`` and return the worker's answer."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": "the server process has exited"}
        return self._read()

    def close(self) -> None:
        """Ask the worker to stop and wait for it."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=120)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._err.close()


def first_line(exc: BaseException) -> str:
    """``"TypeName: first line of the message"``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- machine ------------------------------------------------------------------------------
def image_parser(doc: str, repeats: int, repeats_help: str, out_file: str) -> argparse.ArgumentParser:
    """The options of a script that measures torchvision models on images (floor.py, adjoints.py):
    ``--batches``, ``--image``, ``--repeats``, ``--out`` (where ``out_file`` goes) and ``--src``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--image", type=int, default=224, help="image side")
    ap.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"directory for {out_file}")
    ap.add_argument("--src", type=Path, help="dynlrp source tree to measure (default: src/)")
    return ap


def write_rows(out: Path, name: str, rows: list[dict[str, Any]]) -> None:
    """``{"machine": ..., "rows": rows}`` as JSON in ``out / name``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


def machine() -> dict[str, Any]:
    """Facts that make a measurement reproducible: CPU, cores, torch and dynlrp versions."""
    import torch

    cpu = "unknown"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev = rev + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    if src_dir() != (ROOT / "src").resolve():
        rev = f"source tree {src_dir()}"
    try:
        load = os.getloadavg()
    except OSError:
        load = (-1.0, -1.0, -1.0)
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dynlrp_commit": rev,
        "loadavg": [round(v, 2) for v in load],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }

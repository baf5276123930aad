"""dynlrp against gradient x input, Zennit, Captum and LxT: time and extra peak memory.

Run from the repository root::

    PYTHONPATH=src python benchmarks/compare.py            # full: 224 px, batch 1 and 8
    PYTHONPATH=src python benchmarks/compare.py --quick    # batch 1 and 2
    PYTHONPATH=src python benchmarks/compare.py --tiny --out /tmp/x   # CI smoke size

Layout: the parent process only schedules. Each (model, batch) is timed in one fresh
process that runs every method interleaved (median of ``--repeats`` rounds after a warm-up;
each method's ratio to gradient x input is the median of per-round ratios). LxT patches
library modules process-wide, so it runs in a process of its own, kept alive and run in
alternation with gradient x input in another (:class:`benchutil.Server`). Extra peak memory
is measured in a fresh process per method (see :mod:`benchutil`), twice: resident, and live
(without the allocator's slack: :data:`benchutil.LIVE_ENV`). dynlrp uses the rules of
the method it is compared with (``--rules matched``: Zennit's EpsilonPlus on the CNNs, LxT's
AttnLRP on BERT and Llama, CP-LRP on ViT) or its defaults (``--rules default``), and is
given the model (``model=``) where its engine accepts it. Results go to
``<out>/latest.json`` and ``<out>/latest.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil as bu  # noqa: E402
import zoo  # noqa: E402

SCRIPT = Path(__file__).resolve()
METHODS = ("grad", "dynlrp", "dynlrp_recorded", "dynlrp_cached", "dynlrp_epsilon", "zennit", "captum")
TABLE4 = ("nodes", "promises", "pre_promises", "promise_internal_nodes", "mean_promise_path",
          "promise_density")


# -- workers (run in their own process) ---------------------------------------------------
def _setup(names: list[str], problem: zoo.Problem) -> tuple[dict, dict]:
    """Build and try each method once (its first warm-up); failures are reported, not raised."""
    import methods as M

    ready: dict[str, M.Method] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            method = M.make(name, problem)
            bu.timed(method.run)
            ready[name] = method
        except Exception as exc:  # noqa: BLE001 - a method that cannot run is a result
            errors[name] = bu.first_line(exc)
    return ready, errors


def _result(ready: dict, samples: dict, errors: dict) -> dict:
    out: dict[str, Any] = {"errors": errors, "methods": {}}
    for name, method in ready.items():
        out["methods"][name] = {"samples": samples[name], "info": method.info,
                                "relevance_sum": method.relevance_sum}
    return out


def _problem(args: argparse.Namespace) -> zoo.Problem:
    problem = zoo.build(args.model, args.batch, json.loads(args.cfg), attn=args.attn)
    problem.extra["rules"] = zoo.MATCHED_RULES.get(args.model) if args.rules == "matched" else None
    return problem


def worker_time(args: argparse.Namespace) -> dict:
    ready, errors = _setup(args.methods.split(","), _problem(args))
    warm = max(args.warmup - 1, 0)  # _setup already ran each method once
    samples = bu.interleave({n: m.run for n, m in ready.items()}, args.repeats, warm)
    return {**_result(ready, samples, errors), "machine": bu.machine()}


def worker_serve(args: argparse.Namespace) -> None:
    """One method, run once per ``run`` line on stdin (see :class:`benchutil.Server`)."""
    import methods as M

    try:
        if args.method == "lxt":
            M.lxt_patch(args.model)
        method = M.make(args.method, _problem(args))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        bu.emit({"error": bu.first_line(exc)})
        return
    bu.emit({"ready": True})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        try:
            phases = bu.timed(method.run)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            bu.emit({"error": bu.first_line(exc)})
            return
        bu.emit({"phases": phases, "info": method.info, "relevance_sum": method.relevance_sum})


def worker_mem(args: argparse.Namespace) -> dict:
    import methods as M

    if args.method == "lxt":
        M.lxt_patch(args.model)
    method = M.make(args.method, _problem(args))
    clock = bu.Clock()
    method.run(clock)  # warm-up: lazy initialisation is not part of the peak
    with bu.PeakRSS() as mem:
        method.run(clock)
    return {"extra_mib": mem.extra_mib, "baseline_mib": mem.baseline_kib / 1024,
            "peak_mib": mem.peak_kib / 1024, "reset_ok": mem.reset_ok}


# -- the parent: schedule, summarise, write -----------------------------------------------
def _worker_args(args: argparse.Namespace, model: str, batch: int, cfg: dict, **extra: str) -> list[str]:
    out = ["--model", model, "--batch", str(batch), "--cfg", json.dumps(cfg), "--attn", args.attn,
           "--rules", args.rules, "--repeats", str(cfg["repeats"]), "--warmup", str(cfg["warmup"])]
    for key, value in extra.items():
        out += [f"--{key}", value]
    return out


def _summary(name: str, entry: dict, base: list[dict]) -> dict:
    samples = entry["samples"]
    per_round = [s["total"] / b["total"] for s, b in zip(samples, base) if b.get("total")]
    out = {
        "time_s": bu.median([s["total"] for s in samples]),
        "ratio": bu.paired_ratio(samples, base),
        "ratio_range": [min(per_round), max(per_round)] if per_round else None,
        "samples": samples,
        "relevance_sum": entry.get("relevance_sum"),
        "info": entry.get("info", {}),
    }
    if samples and "explain" in samples[0]:
        out["explain_s"] = bu.median([s["explain"] for s in samples])
        out["forward_s"] = bu.median([s.get("forward", 0.0) for s in samples])
        out["explain_ratio"] = bu.paired_ratio(samples, base, "explain")
    return out


def measure(args: argparse.Namespace, model: str, batch: int, cfg: dict) -> dict:
    """Every method on one model and batch: timing process, LxT process, memory processes."""
    import methods as M

    names = [m for m in args.methods if M.applicable(m, model) and m != "lxt"]
    row: dict[str, Any] = {"model": model, "label": zoo.LABELS[model], "batch": batch, "methods": {}}
    t0 = time.perf_counter()
    timing = bu.run_worker(SCRIPT, ["--worker", "time", *_worker_args(args, model, batch, cfg,
                                                                      methods=",".join(names))])
    if "error" in timing:  # the worker itself crashed (e.g. out of memory)
        row["error"] = timing["error"]
        return row
    row["machine"] = timing.pop("machine", None)
    base = timing["methods"].get("grad", {}).get("samples", [])
    for name, entry in timing["methods"].items():
        row["methods"][name] = _summary(name, entry, base)
    for name, err in timing["errors"].items():
        row["methods"][name] = {"error": err}
    if "lxt" in args.methods and M.applicable("lxt", model):
        row["methods"]["lxt"] = measure_across(args, model, batch, cfg, "lxt")
    if args.memory:
        only = args.memory_methods.split(",") if args.memory_methods else None
        for name, entry in row["methods"].items():
            if "error" in entry or (only is not None and name not in only):
                continue
            worker = ["--worker", "mem", *_worker_args(args, model, batch, cfg, method=name)]
            mem = bu.run_worker(SCRIPT, worker)
            entry["extra_peak_mib"] = mem.get("extra_mib")
            entry["memory_error"] = mem.get("error")
            if args.live_memory:  # the same without the allocator's slack (benchutil.LIVE_ENV)
                entry["live_peak_mib"] = bu.run_worker(SCRIPT, worker, env=bu.LIVE_ENV).get("extra_mib")
        for key, ratio in (("extra_peak_mib", "memory_ratio"), ("live_peak_mib", "live_memory_ratio")):
            gmem = row["methods"].get("grad", {}).get(key)
            for entry in row["methods"].values():
                mem = entry.get(key)
                entry[ratio] = (mem / gmem) if mem is not None and gmem else None
    row["wall_s"] = time.perf_counter() - t0
    return row


def measure_across(args: argparse.Namespace, model: str, batch: int, cfg: dict, name: str) -> dict:
    """Time ``name`` in its own process against gradient x input in another, alternating runs."""
    servers = {n: bu.Server(SCRIPT, ["--worker", "serve", *_worker_args(args, model, batch, cfg, method=n)])
               for n in ("grad", name)}
    try:
        for server in servers.values():
            if "error" in server.hello:
                return {"error": server.hello["error"]}
        samples: dict[str, list[dict]] = {n: [] for n in servers}
        last: dict[str, dict] = {}
        order = list(servers)
        for r in range(cfg["warmup"] + cfg["repeats"]):
            for n in order if r % 2 == 0 else order[::-1]:
                got = servers[n].request()
                if "error" in got:
                    return {"error": got["error"]}
                last[n] = got
                if r >= cfg["warmup"]:
                    samples[n].append(got["phases"])
    finally:
        for server in servers.values():
            server.close()
    summary = _summary(name, {**last[name], "samples": samples[name]}, samples["grad"])
    summary["note"] = "timed in its own process, alternating with gradient x input in another"
    return summary


class _Notes:
    """Numbered footnotes for error messages, so that table cells stay short."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1

    def lines(self) -> list[str]:
        # The first sentence is enough here; latest.json keeps the whole first line.
        return [f"[{i}] {text.split('. ')[0].replace('`', '')}.  " for i, text in enumerate(self.texts, 1)]


def _cell(entry: dict | None, key: str, notes: _Notes, mem_key: str | None = None, method: str = "") -> str:
    if entry is None:
        return "–"
    if "error" in entry:
        prefix = "unsupported" if method.startswith("dynlrp") else "failed"
        return f"{prefix} [{notes.ref(entry['error'])}]"
    value = entry.get(key)
    text = "?" if value is None else f"{value:.2f}×"
    if mem_key and entry.get(mem_key) is not None:
        text += f" / {entry[mem_key]:.2f}×"
    return text


def markdown(result: dict) -> str:
    """The Markdown report: time and memory ratios, explain-only ratios, paper Table 4."""
    import methods as M

    rows = result["rows"]
    notes = _Notes()
    names = [m for m in list(METHODS) + ["lxt"] if m in result["settings"]["methods"]]
    header = ["| model | batch | gradient x input | " + " | ".join(M.LABELS[n] for n in names if n != "grad")
              + " |", "|---|---|---|" + "---|" * (len(names) - 1)]
    lines = [
        "Each cell: **time / extra peak memory, as multiples of gradient x input** on the same",
        "model and batch (time: forward + explanation, median of per-round ratios; memory: extra",
        "peak RSS of one forward + explanation in a fresh process). Baseline column: absolute.",
        "",
        *header,
    ]
    for row in rows:
        g = row["methods"].get("grad", {})
        if "error" in row:
            lines.append(f"| {row['label']} | {row['batch']} | failed: {row['error'][:80]} |")
            continue
        base = "?" if g.get("time_s") is None else f"{g['time_s']:.3f} s"
        if g.get("extra_peak_mib") is not None:
            base += f" / {g['extra_peak_mib']:.0f} MiB"
        cells = [_cell(row["methods"].get(n), "ratio", notes, "memory_ratio", n)
                 for n in names if n != "grad"]
        lines.append(f"| {row['label']} | {row['batch']} | {base} | " + " | ".join(cells) + " |")
    used = {}
    for row in rows:
        used[row["label"]] = "default"
        if result["settings"].get("rules") == "matched":
            used[row["label"]] = zoo.MATCHED_RULES.get(row["model"], "default")
        for n in M.DYNLRP:  # what the engine was actually given, where a dynlrp method ran
            info = row.get("methods", {}).get(n, {}).get("info", {})
            if info.get("rules"):
                used[row["label"]] = info["rules"] + (" (model passed)" if info.get("model_passed") else "")
    lines += ["", "dynlrp rules: " + "; ".join(f"{k}: {v}" for k, v in used.items()) + "."]
    if "dynlrp_epsilon" in names:
        lines += ["", "dynlrp epsilon: the `epsilon` preset on the CNNs, the rules of Captum's LRP "
                  "(epsilon on every convolution and dense layer; batch norms folded), model passed."]
    lines += ["", *notes.lines()]
    if any(m.get("live_peak_mib") is not None for row in rows for m in row.get("methods", {}).values()):
        lines += [
            "",
            "Extra peak **live** memory, as a multiple of gradient x input's: the same measurement",
            "with glibc's mmap threshold fixed at 64 KiB (`benchutil.LIVE_ENV`), so that resident",
            "memory follows the bytes the run holds, without the allocator's slack.",
            "",
            *header,
        ]
        for row in rows:
            if "error" in row:
                continue
            g = row["methods"].get("grad", {}).get("live_peak_mib")
            ratios = [row["methods"].get(n, {}).get("live_memory_ratio") for n in names if n != "grad"]
            cells = ["–" if ratio is None else f"{ratio:.2f}×" for ratio in ratios]
            base = "?" if g is None else f"{g:.0f} MiB"
            lines.append(f"| {row['label']} | {row['batch']} | {base} | " + " | ".join(cells) + " |")
    ours = [*M.DYNLRP, *(["dynlrp_epsilon"] if "dynlrp_epsilon" in names else [])]
    lines += [
        "",
        "Explanation only (the forward pass excluded): the `lrp` call as a multiple of the",
        "`torch.autograd.grad` call on the same graph.",
        "",
        "| model | batch | autograd.grad | " + " | ".join(M.LABELS[n] for n in ours) + " |",
        "|---|---|---|" + "---|" * len(ours),
    ]
    for row in rows:
        if "error" in row:
            continue
        g = row["methods"].get("grad", {})
        base = "?" if g.get("explain_s") is None else f"{g['explain_s']:.3f} s"
        cells = [_cell(row["methods"].get(n), "explain_ratio", notes, method=n) for n in ours]
        lines.append(f"| {row['label']} | {row['batch']} | {base} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Promise System statistics of the promise-mode call (paper Table 4; `engine.stats`).",
        "",
        "| model | batch | " + " | ".join(TABLE4) + " |",
        "|---|---|" + "---|" * len(TABLE4),
    ]
    for row in rows:
        stats = row.get("methods", {}).get("dynlrp", {}).get("info", {}).get("stats")
        if not stats:
            continue
        cells = [_fmt(stats.get(k)) for k in TABLE4]
        lines.append(f"| {row['label']} | {row['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Plan cache (paper 4.4.1) as the `dynlrp_cached` engine reported it after its last "
              "call:", ""]
    for row in rows:
        info = row.get("methods", {}).get("dynlrp_cached", {}).get("info")
        if info:
            lines.append(f"- {row['label']} batch {row['batch']}: {info.get('plan_cache')}, "
                         f"{info.get('plan_stats')}")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="batch 1 and 2 (noisy or slow machines)")
    size.add_argument("--tiny", action="store_true", help="tiny models, one round (CI smoke test)")
    ap.add_argument("--models", default=",".join(zoo.MODELS), help="comma-separated subset")
    ap.add_argument("--methods", default=",".join(METHODS + ("lxt",)), help="comma-separated subset")
    ap.add_argument("--batches", help="comma-separated batch sizes (overrides the profile)")
    ap.add_argument("--image", type=int, help="image side (overrides the profile)")
    ap.add_argument("--repeats", type=int, help="measured rounds (overrides the profile)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation of the transformers models")
    ap.add_argument("--rules", choices=("matched", "default"), default="matched",
                    help="dynlrp rules: the compared method's (EpsilonPlus, AttnLRP, CP-LRP) or the defaults")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip memory processes")
    ap.add_argument("--memory-methods", help="measure memory of these methods only (comma-separated)")
    ap.add_argument("--no-live-memory", dest="live_memory", action="store_false",
                    help="skip the second memory process per method (live memory, no allocator slack)")
    ap.add_argument("--out", type=Path, default=bu.RESULTS, help="directory for latest.json / .md")
    ap.add_argument("--src", type=Path, help="dynlrp source tree to measure (default: src/)")
    ap.add_argument("--render", type=Path, help="only print the Markdown of an existing latest.json")
    # worker-only arguments
    ap.add_argument("--worker", choices=("time", "serve", "mem"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bu.use_src(args.src)
    if args.render:
        print(markdown(json.loads(args.render.read_text())), end="")
        return 0
    if args.worker:
        worker = {"time": worker_time, "serve": worker_serve, "mem": worker_mem}[args.worker]
        answer = worker(args)
        if answer is not None:
            bu.emit(answer)
        return 0
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    cfg = dict(zoo.PROFILES[profile])
    if args.image:
        cfg["image"] = args.image
    if args.repeats:
        cfg["repeats"] = args.repeats
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    args.methods = args.methods.split(",")
    models = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "settings": {"profile": profile, **cfg, "models": models, "methods": args.methods,
                     "attn": args.attn, "rules": args.rules, "memory": args.memory,
                     "live_memory": args.live_memory},
        "machine": bu.machine(),
        "rows": [],
    }
    for model in models:
        for batch in cfg["batches"]:
            print(f"[compare] {model} batch {batch} ...", file=sys.stderr, flush=True)
            result["rows"].append(measure(args, model, batch, cfg))
            _write(args.out, result)  # keep partial results if a later model fails
    print(markdown(result))
    return 0


def _write(out: Path, result: dict) -> None:
    (out / "latest.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "latest.md").write_text(markdown(result))


if __name__ == "__main__":
    raise SystemExit(main())

"""`make project --validate`: the projection against real runs. Per model of `make bench-strategies`, its
multi-process runs (bench/run.py) in --validate_rounds rounds, or the records of --validate_from (or of
the runs folder): each cell's measured median step compared with its prediction (relative error), and its
training memory per device with the predicted one (MEMORY_TOLERANCE). bench/project.py prints the tables
and keeps them in the projection record's `validation`.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

from bench.launcher import REPO, run_group
from shared.projection import project


def model_flags_strategies() -> list[str]:
    return list(
        yaml.safe_load((REPO / "bench/strategies.yaml").read_text())["profiles"]["strategies"]["models"]
    )


def validated(models: list[str]) -> list[str]:
    """The models of bench-strategies: those a validation runs for real."""
    return [m for m in models if m in model_flags_strategies()]


def validate(args, rec: dict, hw: dict, models: list[str], profiles) -> tuple[list[dict], list[str]]:
    """Run bench-strategies now (or read --validate_from) and compare each cell with its prediction; also what
    did not validate: run now, the cells with no finished run ("model setup"); read, the unfinished records.
    Run now, each model's launches go in --validate_rounds rounds (one launch per cell each), and the model is
    profiled, with the latency-bound collectives, before each round and after the last: their mean predicts
    (Profiles.pool). The noise of one launch on this host (about 10%) is thus averaged on both sides."""
    if args.validate_from:
        where = Path(args.validate_from)
    else:
        where = Path(args.runs_dir) / "validation" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for model in validated(models):
            samples = [profiles.now(model)]
            for k in range(args.validate_rounds):
                cmd = [sys.executable, "-m", "bench.run", "--matrix", str(REPO / "bench/strategies.yaml"),
                       "--profile", "strategies", "--data_dir", args.data_dir, "--runs_dir", str(where),
                       "--models", model, "--repeats", "1"]  # fmt: skip
                print(f"validation of {model}, round {k + 1} of {args.validate_rounds}: the real runs of "
                      f"make bench-strategies, now: {' '.join(cmd)}", flush=True)  # fmt: skip
                run_group(cmd)
                samples.append(profiles.now(model))
            profiles.pool(model, samples)
    cells: dict[tuple, list] = {}
    # per cell, each run's training memory (memory/train_gib, its largest epoch), and the same less the freed
    # memory the heap kept (memory/train_in_use_gib; older records: train_gib)
    memory: dict[tuple, list] = {}
    failed = []
    for f in sorted(glob.glob(str(where / "*.json"))):
        try:
            r = json.loads(Path(f).read_text())
            steady = r.get("timing", {}).get("steady")
        except (OSError, ValueError, AttributeError):
            failed.append(f"{Path(f).name}: not a run record")
            continue
        if r.get("model") not in rec["models"] or not isinstance(r.get("setup"), dict):
            continue
        s = r["setup"]
        strategy = {"pipeline": "pipeline_1f1b" if s.get("schedule") == "1f1b" else "pipeline"}.get(
            s.get("strategy"), s.get("strategy")
        )
        if r.get("status") != "finished" or not steady:
            failed.append(f"{r['model']} {strategy} ({Path(f).name}: {r.get('status')})")
            continue
        n = len(s.get("stages") or []) if strategy == "model_split" else s["num_processes"]
        key = (r["model"], strategy, n, s["global_batch_size"], s.get("microbatches") or 4)
        cells.setdefault(key, []).append(steady["step_s"])
        trained = [
            (h["memory/train_gib"], h.get("memory/train_in_use_gib", h["memory/train_gib"]))
            for h in r.get("history", [])
            if "memory/train_gib" in h
        ]
        if trained:
            memory.setdefault(key, []).append(max(trained))
    out = []
    for (model, strategy, n, batch, micro), times in sorted(cells.items()):
        prof = rec["models"][model]
        around = (
            {"measured_collectives": prof["collectives_around_runs"]}
            if "collectives_around_runs" in prof
            else {}
        )
        p = project(
            prof, {**hw, **around}, strategy, n, batch=batch, microbatches=micro, cores=os.cpu_count()
        )
        measured = statistics.median(times)
        # the run that held the most, and what it had in use
        held, in_use = max(memory.get((model, strategy, n, batch, micro), [(None, None)]))
        out.append({"model": model, "strategy": strategy, "devices": n, "global_batch": batch,
                    "measured_step_s": measured, "measured_runs": times, "predicted_step_s": p["step_s"],
                    "error": (p["step_s"] - measured) / measured, "oversubscribed": p["oversubscribed"],
                    "bottleneck": p["bottleneck"], "assumed": p["assumed"],
                    "predicted_memory_gib": p["memory_gib_per_device"],
                    "measured_memory_gib": held, "in_use_memory_gib": in_use})  # fmt: skip
    if args.validate_from:
        return out, failed
    setups = [n for s in yaml.safe_load((REPO / "bench/strategies.yaml").read_text())["setups"] for n in s]
    ran = {c[:2] for c in cells}
    return out, [f"{m} {s}" for m in validated(models) for s in setups if (m, s) not in ran]


# what a measured training memory may exceed its prediction by: the runtime's own first-step allocations (thread
# pools, autograd's engine, modules imported on first use, the malloc arenas of the threads; 50-150 MiB
# measured on this CPU) and the allocator's rounding. The lower bound is checked on what the process held, the
# upper on what it held in use: the freed memory glibc's heap kept is the allocator's (shared/runtime.py
# training_memory_now), as CUDA's cached free blocks are, and no prediction of the model's memory can price it.
MEMORY_TOLERANCE = {"below": 0.9, "above": 1.5, "slack_gib": 0.25,
                    "text": "0.9 x predicted <= measured, measured in use <= 1.5 x predicted + 0.25 GiB"}  # fmt: skip


def memory_within(predicted: float, measured: float, in_use: float | None = None) -> bool:
    """`measured`: what training held above its start (memory/train_gib); `in_use`: the same less the freed
    memory the heap kept (memory/train_in_use_gib; `measured` where not recorded)."""
    t = MEMORY_TOLERANCE
    in_use = measured if in_use is None else in_use
    return t["below"] * predicted <= measured and in_use <= t["above"] * predicted + t["slack_gib"]


def memory_rows(check: list[dict]) -> list[dict]:
    """The validated cells with a measured training memory: predicted, measured and in-use GiB per device, and
    whether they are within MEMORY_TOLERANCE."""
    return [
        {**c, "predicted_gib": c["predicted_memory_gib"], "measured_gib": c["measured_memory_gib"],
         "in_use_gib": c.get("in_use_memory_gib"),
         "within": "yes" if memory_within(c["predicted_memory_gib"], c["measured_memory_gib"],
                                          c.get("in_use_memory_gib")) else "NO"}
        for c in check if c.get("measured_memory_gib") is not None
    ]  # fmt: skip

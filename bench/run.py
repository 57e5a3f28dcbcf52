"""Run a benchmark matrix (models x setups x seeds x repeats) with `accelerate launch`, and say which
speedups can be trusted.

Every cell is exactly what a user would launch by hand (this runner imports no script):
    accelerate launch --config_file accelerate_configs/<config>.yaml [--num_cpu_threads_per_process T] \
        scripts/<model>.py --data_dir ... [profile overrides] [setup flags]
Each run times its own steady state (shared/meter.py): warm-up apart, then the step times of up to 10
windows of consecutive steps. Each cell is launched `repeats` times (the profile's; 2 in the quick profile),
interleaved per model (its setups in order, then reversed: the baseline beside what it is compared with), and a
setup whose launches differ by more than 15% in median step is launched again, up to `max_repeats`. Launches
differ more than windows do (placement, allocator state, clock, neighbours), so the intervals resample both.

Speedup = median step time of the baseline (one device, same model, profile, hardware, global batch, data
and step budget) / this cell's, with a 95% hierarchical bootstrap interval (launches, then windows);
efficiency = speedup / devices; verdict per model: `pays off`, `does not pay off` or `cannot tell`. Flags per
cell (shared/stats.FLAGS): noisy, contended (other load during the run, or before or after it), superlinear,
warmup-dominated, oversubscribed, single-launch, launches-disagree. Ctrl-C ends the matrix: the running cell is
interrupted and recorded, the summary is written with what finished, and `--resume <batch>` continues.

    python -m bench.run --matrix bench/matrix.yaml --profile quick --data_dir data
    python -m bench.run --resume 20261129-091500 --runs_dir runs       # continue a stopped matrix
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bench.batch import Batch, Stop, parse_setups
from shared.datasets import MODEL_DATA, hub_unreachable, missing_files

REPO = Path(__file__).resolve().parent.parent


def cuda_device_count() -> int:
    """Ask a child interpreter, so this runner never initialises CUDA itself."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def preflight(todo: list[dict], data_dir: str) -> bool:
    """Every dataset the launches need, checked before the first one: a dataset that is neither in data_dir
    nor reachable on the hub ends the bench in seconds with one line each, not one failed launch per cell."""
    needed = {MODEL_DATA.get(Path(c["script"]).stem) for c in todo if "synthetic" not in map(str, c["flags"])}
    lacking = {n: m for n in sorted(needed - {None}) if (m := missing_files(data_dir, n))}
    why = hub_unreachable() if lacking else None
    if why:
        for name, files in lacking.items():
            print(
                f"bench: {name}: not in {Path(data_dir) / name}/ (missing {', '.join(files)}) and the Hugging Face "
                f"hub cannot be used ({why}); pass DATA_DIR=<folder holding {name}/>",
                file=sys.stderr,
            )
    return not why


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default=str(REPO / "bench" / "matrix.yaml"))
    ap.add_argument("--profile", default="auto", help="auto = full with a CUDA device, quick without")
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument(
        "--models",
        default="",
        help="comma-separated subset of the matrix's models, or paths to scripts of your own (path/to/x.py)",
    )
    ap.add_argument("--setups", default="", help="comma-separated subset of the matrix's setups")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per launch")
    ap.add_argument(
        "--repeats", type=int, default=0, help="launches per cell (default: the profile's repeats)"
    )
    ap.add_argument(
        "--max_repeats",
        type=int,
        default=0,
        help="launches per cell at most, where its launches disagree (default: the profile's max_repeats, else "
        "repeats + 2 when repeats > 1)",
    )
    ap.add_argument("--resume", default="", help="a stopped batch id: run only its cells that did not finish")
    return ap.parse_args(argv)


def resumed(args) -> tuple[dict, dict, dict, Path]:
    """(plan, results so far, matrix, log folder) of a stopped batch, from its state.json."""
    if not re.fullmatch(r"\d{8}-\d{6}", args.resume):
        sys.exit(f"error: --resume {args.resume!r}: not a bench batch id (like 20261129-085349)")
    log_dir = Path(args.runs_dir) / "bench" / args.resume
    try:
        state = json.loads((log_dir / "state.json").read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: --resume {args.resume}: no readable bench state in {log_dir} ({e})")
    matrix = yaml.safe_load((log_dir / "matrix.yaml").read_text())
    return state["plan"], {r["id"]: r for r in state["results"]}, matrix, log_dir


def new_plan(args, n_cuda: int) -> tuple[dict, dict, dict, Path]:
    """(plan, no results, matrix, log folder) of a new batch: the matrix's profile, models and setups asked for;
    every bad choice is one line and exit 2."""
    try:
        matrix = yaml.safe_load(Path(args.matrix).read_text())
        setups_all = parse_setups(matrix)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"error: cannot read the matrix {args.matrix}: {e}")
    for flag, v in (("--repeats", args.repeats), ("--max_repeats", args.max_repeats)):
        if v < 0:
            sys.exit(f"error: {flag} {v}: give 1 or more (0: the profile's)")
    profile = args.profile if args.profile != "auto" else ("full" if n_cuda else "quick")
    if profile not in matrix["profiles"]:
        sys.exit(f"error: profile {profile!r} not in {args.matrix} (has {', '.join(matrix['profiles'])})")
    prof = matrix["profiles"][profile]
    want_m = [m for m in args.models.split(",") if m]
    want_s = [s for s in args.setups.split(",") if s]
    own = [m for m in want_m if m.endswith(".py")]  # a script of your own: the profile's common settings
    for path in own:
        if not Path(path).is_file():
            sys.exit(f"error: --models {path}: no such script")
    if len({Path(p).stem for p in own} | set(want_m) - set(own)) < len(want_m):
        sys.exit(f"error: --models {args.models}: two entries share a model name")
    for wanted, have, what in ((want_m, [*prof["models"], *own], "model"), (want_s, setups_all, "setup")):
        if unknown := [w for w in wanted if w not in have]:
            sys.exit(f"error: unknown {what} {', '.join(unknown)} (the matrix has {', '.join(have)}, or give a "
                     "path to a script)")  # fmt: skip
    plan = {
        "batch": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S"),
        "profile": profile,
        "models": [m for m in prof["models"] if not want_m or m in want_m] + [Path(p).stem for p in own],
        "scripts": {Path(p).stem: str(Path(p).resolve()) for p in own},
        "setups": [s for s in setups_all if not want_s or s in want_s],
        "data_dir": args.data_dir,
        "runs_dir": args.runs_dir,
        "threads": prof.get("threads_per_process", matrix.get("threads_per_process")),
        "timeout": args.timeout,
        "repeats": args.repeats or int(prof.get("repeats", 1)),
        "max_repeats": args.max_repeats,
        "n_cuda": n_cuda,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    log_dir = Path(args.runs_dir) / "bench" / plan["batch"]
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "matrix.yaml").write_text(Path(args.matrix).read_text())
    return plan, {}, matrix, log_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = Stop()
    n_cuda = cuda_device_count()
    plan, done, matrix, log_dir = resumed(args) if args.resume else new_plan(args, n_cuda)
    batch = Batch(plan, done, matrix, log_dir, stop, n_cuda)
    todo = batch.todo()
    if not preflight(todo, plan["data_dir"]):
        if not args.resume:  # nothing ran: leave no empty batch behind
            shutil.rmtree(log_dir, ignore_errors=True)
        return 2
    print(
        f"bench {plan['batch']}{' (resumed)' if args.resume else ''}: profile {plan['profile']}, "
        f"{len(plan['models'])} models x {len(plan['setups'])} setups x {len(batch.seeds)} seeds x "
        f"{batch.repeats} repeats; {len(todo)} of {len(batch.cells)} launches to run; {n_cuda} CUDA devices, "
        f"{os.cpu_count()} CPU cores, {plan['threads'] or 'default'} thread(s) per process; data "
        f"{plan['data_dir']}; logs {log_dir}"
    )
    for s, reason in batch.skipped.items():
        print(f"  skip {s}: {reason}")
    batch.save_state()
    batch.run()
    return batch.summarise()


if __name__ == "__main__":
    sys.exit(main())

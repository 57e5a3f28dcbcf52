"""Run a benchmark matrix (models x setups x seeds) with `accelerate launch`, one process tree per run.

Every run is exactly what a user would launch by hand:
    accelerate launch --config_file accelerate_configs/<setup>.yaml scripts/<model>.py --data_dir ... [overrides]
This runner imports no script. It reads the run records the scripts write, prints one line per run and a
summary per model (time per epoch, speedup and efficiency vs the 1-device run at the same global batch,
final metric, status), and exits non-zero if any run failed or missed a target.

    python bench/run.py --matrix bench/matrix.yaml --profile quick --data_dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from shared.record import load_runs, write_new  # noqa: E402


def cuda_device_count() -> int:
    """Ask a child interpreter, so this runner never initialises CUDA itself."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def setup_needs(setup: str) -> tuple[int, bool]:
    """(processes, needs CUDA) read from the accelerate config itself."""
    cfg = yaml.safe_load((REPO / "accelerate_configs" / f"{setup}.yaml").read_text())
    return int(cfg.get("num_processes", 1)) * 1, not cfg.get("use_cpu", False)


def skip_reason(setup: str, n_cuda: int, flags: dict) -> str | None:
    """Why this machine cannot run `setup`, or None. CPU setups always run (oversubscribed if need be)."""
    procs, cuda = setup_needs(setup)
    devices = 2 if flags.get("strategy") == "model_split" else procs  # one process driving two GPUs
    if cuda and n_cuda < devices:
        return f"{setup}: needs {devices} CUDA device{'s' * (devices > 1)}, found {n_cuda}"
    return None


def bar(done: int, total: int, width: int = 20) -> str:
    k = round(width * done / max(total, 1))
    return "#" * k + "." * (width - k)


def fmt_s(s: float) -> str:
    return f"{s / 60:.0f}m{s % 60:02.0f}s" if s >= 60 else f"{s:.0f}s"


def launch(script, setup, seed, overrides, args, tag, log_path) -> tuple[int, float]:
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / f"{setup}.yaml"),
        str(REPO / "scripts" / f"{script}.py"),
        "--data_dir",
        args.data_dir,
        "--runs_dir",
        args.runs_dir,
        "--seed",
        str(seed),
        "--tag",
        tag,
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=args.timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def epoch_time(rec: dict) -> float | None:
    """Median training seconds per full epoch (epoch 1 included: no compile warm-up on the default path)."""
    times = sorted(h["time/train_s"] for h in rec["history"])
    return times[len(times) // 2] if times else None


def final_metric(rec: dict) -> tuple[str, float | None]:
    key = rec.get("primary_metric", "test/loss")
    v = rec.get("test", {}).get(key)
    return key, v if isinstance(v, (int, float)) else None


def check_target(value, target: str) -> bool:
    """`target` is ">= x" or "<= x"; `value` comes from the test results, else the last epoch's row."""
    op, ref = target.split()
    if not isinstance(value, (int, float)):
        return False
    return value >= float(ref) if op == ">=" else value <= float(ref)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default=str(REPO / "bench" / "matrix.yaml"))
    ap.add_argument("--profile", default="auto", help="auto = full with a CUDA device, quick without")
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--models", default="", help="comma-separated subset of the matrix's models")
    ap.add_argument("--setups", default="", help="comma-separated subset of the matrix's setups")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    args = ap.parse_args()

    try:
        matrix = yaml.safe_load(Path(args.matrix).read_text())
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"error: cannot read the matrix {args.matrix}: {e}")
    n_cuda = cuda_device_count()
    profile = args.profile if args.profile != "auto" else ("full" if n_cuda else "quick")
    if profile not in matrix["profiles"]:
        sys.exit(f"error: profile {profile!r} not in {args.matrix} (has {', '.join(matrix['profiles'])})")
    prof = matrix["profiles"][profile]
    models = [m for m in prof["models"] if not args.models or m in args.models.split(",")]
    # a setup is an accelerate_configs/<name>.yaml, optionally with script flags (strategies Accelerate has no key for)
    setup_flags = {}
    for entry in matrix["setups"]:
        name, flags = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        setup_flags[name] = flags or {}
    setups = [s for s in setup_flags if not args.setups or s in args.setups.split(",")]
    excluded = {
        (m, s): ex["reason"] for ex in matrix.get("exclude", []) for m in ex["models"] for s in ex["setups"]
    }
    seeds = prof.get("seeds", matrix.get("seeds", [0]))
    batch = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    log_dir = Path(args.runs_dir) / "bench" / batch
    log_dir.mkdir(parents=True, exist_ok=True)

    print(
        f"bench {batch}: profile {profile}, {len(models)} models x {len(setups)} setups x {len(seeds)} seeds; "
        f"{n_cuda} CUDA devices, {os.cpu_count()} CPU cores; data {args.data_dir}; logs {log_dir}"
    )
    skipped = {s: r for s in setups if (r := skip_reason(s, n_cuda, setup_flags[s]))}
    for reason in skipped.values():
        print(f"  skip {reason}")
    for (m, s), reason in excluded.items():
        if m in models and s in setups and s not in skipped:
            print(f"  skip {m} on {s}: {reason}")
    cells = [
        (m, s, seed)
        for m in models
        for s in setups
        if s not in skipped and (m, s) not in excluded
        for seed in seeds
    ]
    results, t_start = [], time.perf_counter()
    for i, (model, setup, seed) in enumerate(cells):
        overrides = {**prof.get("common", {}), **(prof["models"][model] or {}), **setup_flags[setup]}
        script = overrides.pop("script", model)  # a matrix entry may name a variant of a script
        tag = f"bench:{batch}:{profile}:{model}:{setup}:seed{seed}"
        elapsed = time.perf_counter() - t_start
        eta = elapsed / i * (len(cells) - i) if i else float("nan")
        print(
            f"[{bar(i, len(cells))}] {i + 1}/{len(cells)} ETA {fmt_s(eta) if i else '?'} | {model} {setup} seed {seed} ...",
            end="",
            flush=True,
        )
        rc, wall = launch(
            script, setup, seed, overrides, args, tag, log_dir / f"{model}-{setup}-seed{seed}.log"
        )
        recs = [r for r in load_runs(args.runs_dir)[0] if r.get("tag") == tag]
        rec = recs[0] if len(recs) == 1 else None
        status = rec["status"] if rec else "no record"
        if rc and status == "finished":
            status = f"exit {rc}"
        key, value = final_metric(rec) if rec else (None, None)
        results.append(
            {
                "model": model,
                "setup": setup,
                "seed": seed,
                "rc": rc,
                "wall_s": wall,
                "status": status,
                "run_id": rec["run_id"] if rec else None,
                "epoch_s": epoch_time(rec) if rec else None,
                "procs": setup_needs(setup)[0],
                "devices": 2
                if setup_flags[setup].get("strategy") == "model_split"
                else setup_needs(setup)[0],
                "metric": key,
                "value": value,
                "strategy": rec["setup"]["strategy"] if rec else None,
                "values": {**rec["history"][-1], **rec["test"]} if rec and rec["history"] else {},
                "global_batch": rec["setup"]["global_batch_size"] if rec else None,
            }
        )
        shown = f"{key} {value:.4g}" if value is not None else ""
        print(
            f" {status} in {wall:.0f}s {shown}" + ("" if status == "finished" else f" (log {log_dir})"),
            flush=True,
        )

    failed = [r for r in results if r["status"] != "finished"]
    missed = []
    print(
        f"\nsummary ({profile}; time = median train seconds per epoch; speedup vs the 1-process run of the "
        "same model, seed and global batch; efficiency = speedup / devices)"
    )
    for model in models:
        print(f"\n{model}")
        print(
            f"  {'setup':<22}{'seeds':>6}{'epoch s':>10}{'speedup':>9}{'effic.':>8}  {'final metric':<44}{'status'}"
        )
        rows = [r for r in results if r["model"] == model]
        for setup in setups:
            cell = [r for r in rows if r["setup"] == setup]
            if setup in skipped or (model, setup) in excluded:
                why = skipped[setup].split(": ", 1)[1] if setup in skipped else excluded[(model, setup)]
                print(f"  {setup:<22}{'':>6}{'':>10}{'':>9}{'':>8}  {'':<44}skipped: {why}")
                continue
            ok = [r for r in cell if r["status"] == "finished" and r["epoch_s"]]
            base = [
                r
                for r in rows
                if r["strategy"] == "single"
                and r["status"] == "finished"
                and r["epoch_s"]
                and ("gpu" in r["setup"]) == ("gpu" in setup)
                and r["global_batch"] == (ok[0]["global_batch"] if ok else None)
            ]
            t = sum(r["epoch_s"] for r in ok) / len(ok) if ok else None
            tb = sum(r["epoch_s"] for r in base) / len(base) if base else None
            speed = tb / t if t and tb else None
            vals = [r["value"] for r in ok if r["value"] is not None]
            metric = f"{ok[0]['metric']} {sum(vals) / len(vals):.4g}" if vals else "-"
            target = prof.get("targets", {}).get(model, {})
            for k, tgt in target.items():
                if not ok or not all(check_target(r["values"].get(k), tgt) for r in ok):
                    missed.append(f"{model} {setup}: {k} misses target {tgt}")
                    metric += f" ({k} {tgt} MISSED)"
                else:
                    metric += f" ({k} {tgt} ok)"
            statuses = ",".join(sorted({r["status"] for r in cell})) or "-"
            print(
                f"  {setup:<22}{len(cell):>6}{t or float('nan'):>10.3g}{speed or float('nan'):>9.2f}"
                f"{(speed or float('nan')) / (cell[0]['devices'] if cell else 1):>8.2f}  {metric:<44}{statuses}"
            )
    summary = {
        "batch": batch,
        "profile": profile,
        "cuda_devices": n_cuda,
        "cpu_cores": os.cpu_count(),
        "data_dir": args.data_dir,
        "skipped": skipped,
        "excluded": [{"model": m, "setup": st, "reason": r} for (m, st), r in excluded.items()],
        "results": results,
        "missed_targets": missed,
    }
    write_new(log_dir / "summary.json", summary)
    shutil.copy(args.matrix, log_dir / Path(args.matrix).name)
    for m in missed:
        print(f"MISSED: {m}")
    print(
        f"\n{len(results) - len(failed)}/{len(results)} runs finished, {len(skipped)} setups skipped; summary {log_dir}/summary.json"
    )
    sys.exit(1 if failed or missed else 0)


if __name__ == "__main__":
    main()

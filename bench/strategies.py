"""Samples/s of every parallelism strategy relative to one process at the same global batch, in one run.

Every cell is exactly what a user would launch by hand (this runner imports no script):
    accelerate launch --config_file accelerate_configs/<config>.yaml scripts/<model>.py --data_dir ... <flags>
It reads the run records the scripts write and prints one table per model. Exits non-zero if a run failed.

    python bench/strategies.py --data_dir ../shared/data [--models mlp,cnn] [--setups single,ddp,pipeline]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from shared.record import load_runs, write_new  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


def run_cell(model, setup, cell, args, tag, log_path) -> tuple[int, float]:
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--config_file",
        str(REPO / "accelerate_configs" / f"{cell['config']}.yaml"),
        "--main_process_port",
        str(free_port()),  # the configs' fixed ports would collide with other jobs
        *(["--num_cpu_threads_per_process", str(args.threads)] if args.threads else []),
        str(REPO / "scripts" / f"{model}.py"),
        "--data_dir",
        args.data_dir,
        "--runs_dir",
        args.runs_dir,
        "--tag",
        tag,
        *flags(cell["flags"]),
    ]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", default=str(REPO / "bench" / "strategies.yaml"))
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--models", default="", help="comma-separated subset of the file's models")
    ap.add_argument("--setups", default="", help="comma-separated subset of the file's setups")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = ap.parse_args()

    spec = yaml.safe_load(Path(args.matrix).read_text())
    models = [m for m in spec["models"] if not args.models or m in args.models.split(",")]
    setups = [s for s in spec["setups"] if not args.setups or s in args.setups.split(",")]
    base = spec["baseline"]
    args.threads = spec.get("threads_per_process")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    log_dir = Path(args.runs_dir) / "bench" / f"strategies-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(
        f"strategies {stamp}: {len(models)} models x {len(setups)} setups on {os.cpu_count()} CPU cores "
        f"(load average {load:.1f} at start); logs {log_dir}"
    )

    results = []
    for model in models:
        for setup in setups:
            cell = {
                "config": spec["setups"][setup]["config"],
                "flags": {
                    **spec.get("common", {}),
                    **(spec["models"][model] or {}),
                    **spec["setups"][setup].get("flags", {}),
                },
            }
            tag = f"bench-strategies:{stamp}:{model}:{setup}"
            print(f"  {model:<18}{setup:<15}...", end="", flush=True)
            rc, wall = run_cell(model, setup, cell, args, tag, log_dir / f"{model}-{setup}.log")
            recs = [r for r in load_runs(args.runs_dir)[0] if r.get("tag") == tag]
            rec = recs[0] if len(recs) == 1 and recs[0]["status"] == "finished" and rc == 0 else None
            row = {
                "model": model,
                "setup": setup,
                "rc": rc,
                "wall_s": round(wall, 1),
                "run_id": rec and rec["run_id"],
            }
            if rec:
                last, s = rec["history"][-1], rec["setup"]
                row.update(
                    {
                        "samples_per_s": last["throughput/samples_per_s"],
                        "procs": s["num_processes"],
                        "threads": rec["environment"].get("torch_threads"),
                        "global_batch": s["global_batch_size"],
                        "microbatches": s["microbatches"],
                        "mesh": s["mesh_shape"],
                        "train_loss": last["train/loss"],
                    }
                )
            results.append(row)
            status = "ok" if rec else f"FAILED (exit {rc}, log {log_dir}/{model}-{setup}.log)"
            print(f" {status} in {wall:.0f}s", flush=True)

    print(
        f"\nsamples/s of training (last epoch), relative to '{base}' at the same global batch "
        f"(load average {os.getloadavg()[0]:.1f} at the end)"
    )
    for model in models:
        rows = [r for r in results if r["model"] == model]
        ref = next((r.get("samples_per_s") for r in rows if r["setup"] == base), None)
        print(f"\n{model} (global batch {rows[0].get('global_batch', '?')})")
        print(
            f"  {'setup':<15}{'procs':>6}{'thr/proc':>9}{'micro':>6}  {'mesh':<18}{'samples/s':>10}{'vs 1 proc':>10}  train loss"
        )
        for r in rows:
            if "samples_per_s" not in r:
                print(f"  {r['setup']:<15}  failed (exit {r['rc']})")
                continue
            rel = f"{r['samples_per_s'] / ref:.2f}x" if ref else "-"
            mesh = ",".join(f"{k}{v}" for k, v in (r["mesh"] or {}).items()) or "-"
            print(
                f"  {r['setup']:<15}{r['procs']:>6}{r['threads'] or '?':>9}{r['microbatches']:>6}  {mesh:<18}"
                f"{r['samples_per_s']:>10.0f}{rel:>10}  {r['train_loss']:.4f}"
            )
    write_new(
        log_dir / "summary.json",
        {
            "stamp": stamp,
            "cpu_cores": os.cpu_count(),
            "load_at_start": load,
            "matrix": spec,
            "results": results,
        },
    )
    failed = [r for r in results if "samples_per_s" not in r]
    print(f"\n{len(results) - len(failed)}/{len(results)} runs finished; summary {log_dir}/summary.json")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

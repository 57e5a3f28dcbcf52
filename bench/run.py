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
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import launcher
from bench.cells import cell_result, model_verdicts, print_summary, summarize_cell
from shared import stats
from shared.datasets import MODEL_DATA, hub_unreachable, missing_files
from shared.record import read_record, write_replace

REPO = Path(__file__).resolve().parent.parent

LOAD_SAMPLE_S = 0.2  # the machine's load is sampled this long before and after every cell
STOP_GRACE_S = 15  # after Ctrl-C, the running cell gets this long to record itself, then is killed


class Stop:
    """SIGINT / SIGTERM: stop the matrix. The running cell's process group gets the same signal."""

    def __init__(self):
        self.signal, self.child, self.t_signal = None, None, 0.0
        signal.signal(signal.SIGINT, self.handler)
        signal.signal(signal.SIGTERM, self.handler)

    def handler(self, signum, frame):
        first = self.signal is None
        if first:
            self.t_signal = time.perf_counter()
        self.signal = signal.Signals(signum).name
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signum if first else signal.SIGKILL)
            except ProcessLookupError:
                pass


def cuda_device_count() -> int:
    """Ask a child interpreter, so this runner never initialises CUDA itself."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def parse_setups(matrix: dict) -> dict[str, dict]:
    """name -> {config, flags, procs, cuda, devices}. An entry is a config name, or {name: {config: <file>,
    <script flag>: value, ...}} for strategies Accelerate has no key for (config defaults to the name)."""
    out = {}
    for entry in matrix["setups"]:
        name, spec = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        spec = dict(spec or {})
        config = spec.pop("config", name)
        acfg = yaml.safe_load((REPO / "accelerate_configs" / f"{config}.yaml").read_text())
        procs, cuda = int(acfg.get("num_processes", 1)), not acfg.get("use_cpu", False)
        # devices doing the work: a GPU model split drives 2 GPUs from one process; on a CPU both stages share
        # the process's core, so it is one device
        devices = 2 if cuda and spec.get("strategy") == "model_split" else procs
        out[name] = {"config": config, "flags": spec, "procs": procs, "cuda": cuda, "devices": devices}
    return out


def skip_reason(setup: dict, n_cuda: int) -> str | None:
    if setup["cuda"] and n_cuda < setup["devices"]:
        n = setup["devices"]
        return f"needs {n} CUDA device{'s' * (n > 1)}, found {n_cuda}"
    return None


def baseline_of(name: str, setups: dict, matrix: dict) -> str | None:
    """The 1-device setup this one is compared with: the matrix's `baselines` for its hardware kind, else
    the first 1-device setup of the same kind with no strategy flag."""
    kind = "gpu" if setups[name]["cuda"] else "cpu"
    given = (matrix.get("baselines") or {}).get(kind)
    if given:
        return given if given in setups else None
    for other, s in setups.items():
        if (
            s["cuda"] == setups[name]["cuda"]
            and s["devices"] == 1
            and s["flags"].get("strategy") in (None, "single")
        ):
            return other
    return None


def busy_sample(seconds: float) -> float | None:
    """Share of the cores busy over `seconds` while this runner only sleeps, less the runner's own CPU time:
    other load on the machine."""
    from shared.meter import machine_busy_s

    a, own_a = machine_busy_s(), time.process_time()
    time.sleep(seconds)
    b, own_b = machine_busy_s(), time.process_time()
    if a is None or b is None:
        return None
    return max(0.0, (b - a) - (own_b - own_a)) / (seconds * (os.cpu_count() or 1))


def bar(done: int, total: int, width: int = 20) -> str:
    k = round(width * done / max(total, 1))
    return "#" * k + "." * (width - k)


def fmt_s(s: float) -> str:
    return f"{s / 60:.0f}m{s % 60:02.0f}s" if s >= 60 else f"{s:.0f}s"


def launch(cell: dict, setup: dict, opts: dict, stop: Stop, log_path: Path) -> tuple[int, float]:
    flags = [x for k, v in cell["flags"].items() for x in (f"--{k}", str(v))]
    args = [
        "--data_dir",
        opts["data_dir"],
        "--runs_dir",
        opts["runs_dir"],
        "--seed",
        cell["seed"],
        "--tag",
        cell["tag"],
    ]
    cmd = launcher.command(cell["script"], [*args, *flags], config=setup["config"], threads=opts["threads"])
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        # its own process group: Ctrl-C reaches the runner, which passes it on (Stop) and then stops the matrix
        child = stop.child = launcher.start(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = t0 + opts["timeout"]
        while child.poll() is None:
            now = time.perf_counter()
            if stop.signal and now - stop.t_signal > STOP_GRACE_S or now > deadline:
                os.killpg(child.pid, signal.SIGKILL)
            try:
                child.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        stop.child = None
    rc = child.returncode
    return (124 if time.perf_counter() > deadline else rc), time.perf_counter() - t0


def find_record(runs_dir: str, tag: str, since: float) -> dict | None:
    """The record this launch wrote: a record changed since the launch started, with its tag (a resumed matrix
    re-runs a cell under the same tag, so the newest wins). Any name: a script of your own names its model."""
    recs = []
    for path in Path(runs_dir).glob("*.json"):
        try:
            if path.stat().st_mtime >= since and (rec := read_record(path)).get("tag") == tag:
                recs.append(rec)
        except (OSError, ValueError):
            continue
    return max(recs, key=lambda r: r["started_at"]) if recs else None


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


class Batch:
    """One bench batch: its plan, the launches it runs (cells x seeds x repeats, interleaved per model), the
    results so far (state.json after every launch, so a stopped batch resumes) and its summary."""

    def __init__(self, plan: dict, done: dict, matrix: dict, log_dir: Path, stop: Stop, n_cuda: int):
        self.plan, self.done, self.matrix, self.log_dir, self.stop = plan, done, matrix, log_dir, stop
        self.n_cuda = n_cuda
        self.setups = parse_setups(matrix)
        self.prof = prof = matrix["profiles"][plan["profile"]]
        self.excluded = {  # an exclusion applies to the profiles it names, or to all
            (m, s): ex["reason"]
            for ex in matrix.get("exclude", [])
            if plan["profile"] in ex.get("profiles", [plan["profile"]])
            for m in ex["models"]
            for s in ex["setups"]
        }
        self.seeds, self.repeats = prof.get("seeds", [0]), int(plan.get("repeats") or prof.get("repeats", 1))
        # launches that disagree get more, up to this many per cell (with one launch there is nothing to compare)
        self.most = max(
            self.repeats,
            int(
                plan.get("max_repeats")
                or prof.get("max_repeats", self.repeats + 2 if self.repeats > 1 else 1)
            ),
        )
        self.spread = float(prof.get("launch_spread", stats.LAUNCH_SPREAD))
        self.skipped = plan["skipped"] = {
            s: r for s in plan["setups"] if (r := skip_reason(self.setups[s], n_cuda))
        }
        # Interleaved per model: its setups in order, then in reverse (A B C .. C B A ..), so the baseline runs
        # beside the setups it is compared with and a drift of the machine falls on both sides alike.
        self.groups = {}
        for seed in self.seeds:
            for model in plan["models"]:
                names = [
                    n for n in plan["setups"] if n not in self.skipped and (model, n) not in self.excluded
                ]
                self.groups[(seed, model)] = [
                    self.cell(model, n, seed, rep)
                    for rep in range(self.repeats)
                    for n in (names if rep % 2 == 0 else names[::-1])
                ]
        self.cells = [c for g in self.groups.values() for c in g]
        self.n_run, self.t_start = 0, time.perf_counter()

    def cell(self, model: str, name: str, seed: int, rep: int) -> dict:
        """One launch: a model of the matrix (its settings over the profile's common ones; a `script` key names
        its path) or a script of your own (--models path/to/x.py: the profile's `own_script` settings)."""
        own = self.plan.get("scripts", {})
        flags = {
            **self.prof.get("common", {}),
            **((self.prof.get("own_script") if model in own else self.prof["models"].get(model)) or {}),
            **self.setups[name]["flags"],
        }
        script = flags.pop("script", own.get(model, model))
        tag = f"bench:{self.plan['batch']}:{self.plan['profile']}:{model}:{name}:seed{seed}" + (
            f":r{rep}" if self.most > 1 else ""
        )
        return {"id": f"{model}/{name}/seed{seed}/r{rep}", "model": model, "setup": name, "seed": seed} | {
            "repeat": rep,
            "tag": tag,
            "script": script,
            "flags": flags,
        }

    def finished(self, cell: dict) -> bool:
        return self.done.get(cell["id"], {}).get("status") == "finished"

    def todo(self) -> list[dict]:
        return [c for c in self.cells if not self.finished(c)]

    def save_state(self):
        write_replace(self.log_dir / "state.json", {"plan": self.plan, "results": list(self.done.values())})

    def run_cell(self, cell: dict, total: int):
        i = self.n_run
        eta = (time.perf_counter() - self.t_start) / i * (total - i) if i else None
        print(
            f"[{bar(i, total)}] {i + 1}/{total} ETA {fmt_s(eta) if eta else '?'} | "
            f"{cell['model']} {cell['setup']} seed {cell['seed']} r{cell['repeat']} ...",
            end="",
            flush=True,
        )
        before = busy_sample(LOAD_SAMPLE_S)
        log = self.log_dir / f"{cell['id'].replace('/', '-')}.log"
        since = time.time() - 1
        rc, wall = launch(cell, self.setups[cell["setup"]], self.plan, self.stop, log)
        after = busy_sample(LOAD_SAMPLE_S) if not self.stop.signal else None
        rec = find_record(self.plan["runs_dir"], cell["tag"], since)
        res = cell_result(cell, self.setups[cell["setup"]], rc, wall, before, after, rec)
        if self.stop.signal and res["status"] != "finished":
            res["status"] = "interrupted"
        self.done[cell["id"]] = res
        self.n_run += 1
        self.save_state()
        steady = res["steady"]
        shown = (
            f" {stats.sig(steady['samples_per_s'])} samples/s" if steady.get("samples_per_s") else ""
        ) + (
            f", {res['metric']} {stats.sig(res['value'], 4)}"
            if isinstance(res["value"], (int, float))
            else ""
        )
        print(
            f" {res['status']} in {wall:.0f}s{shown}"
            + ("" if res["status"] == "finished" else f" (log {log})"),
            flush=True,
        )

    def disagreeing(self, seed: int, model: str) -> list[str]:
        """The model's setups whose finished launches differ by more than `spread` in median step."""
        out = []
        for name in dict.fromkeys(c["setup"] for c in self.groups[(seed, model)]):
            ws = [
                r["windows_step_s"]
                for r in self.done.values()
                if (r["model"], r["setup"], r["seed"]) == (model, name, seed)
                and r["status"] == "finished"
                and r["windows_step_s"]
            ]
            if len(ws) > 1 and stats.launch_spread(ws) > self.spread:
                out.append(name)
        return out

    def run(self):
        """Every launch not finished yet, model by model; where a setup's launches disagree, one more launch of
        it (a resumed batch redoes the same)."""
        total = len(self.todo())
        for (seed, model), group in self.groups.items():
            for cell in group:
                if self.stop.signal:
                    break
                if not self.finished(cell):
                    self.run_cell(cell, total)
            for rep in range(self.repeats, self.most):
                extra = [self.cell(model, n, seed, rep) for n in self.disagreeing(seed, model)]
                if self.stop.signal or not extra:
                    break
                total += sum(not self.finished(c) for c in extra)
                for cell in extra:
                    self.cells.append(cell)
                    if not self.stop.signal and not self.finished(cell):
                        self.run_cell(cell, total)

    def cell_summary(self, model: str, name: str) -> dict:
        """One cell's launches pooled and compared with its baseline's (or why it was not run)."""
        if name in self.skipped or (model, name) in self.excluded:
            return {
                "model": model,
                "setup": name,
                "skipped": self.skipped.get(name) or self.excluded[(model, name)],
            }
        rows = [r for r in self.done.values() if r["model"] == model and r["setup"] == name]
        base = baseline_of(name, self.setups, self.matrix)
        base_rows = [r for r in self.done.values() if r["model"] == model and r["setup"] == base]
        out = summarize_cell(rows, base_rows, self.setups[name])
        ok = [r for r in rows if r["status"] == "finished"]
        vals = [r["value"] for r in ok if isinstance(r["value"], (int, float))]
        return {
            "model": model,
            "setup": name,
            "config": self.setups[name]["config"],
            "strategy": ok[0]["strategy"] if ok else None,
            "procs": self.setups[name]["procs"],
            "devices": self.setups[name]["devices"],
            "baseline": base,
            "global_batch": ok[0]["global_batch"] if ok else None,
            "metric": ok[0]["metric"] if ok else None,
            "value": sum(vals) / len(vals) if vals else None,
            "values": [r["values"] for r in ok],
            "statuses": sorted({r["status"] for r in rows}),
            **out,
        }

    def summarise(self) -> int:
        """summary.json (per cell, the verdicts, every launch), the table printed; the exit status."""
        plan = self.plan
        cells_out = {f"{m}/{n}": self.cell_summary(m, n) for m in plan["models"] for n in plan["setups"]}
        missed = print_summary(plan, cells_out, self.prof)
        failed = [r for r in self.done.values() if r["status"] != "finished"]
        summary = {
            "batch": plan["batch"],
            "profile": plan["profile"],
            "plan": plan,
            "cuda_devices": self.n_cuda,
            "cpu_cores": os.cpu_count(),
            "repetition": "a launch, and inside it a timed window of consecutive steady steps (up to 10 per "
            f"launch); launches per cell: {self.repeats} (up to {self.most} where they disagree), interleaved per "
            "model (setups in order, then reversed); intervals by a hierarchical bootstrap over launches, then "
            "windows",
            "flag_definitions": stats.FLAGS,
            "cells": list(cells_out.values()),
            "verdicts": model_verdicts(plan, cells_out),
            "results": list(self.done.values()),
            "missed_targets": missed,
            "complete": not self.stop.signal and len(self.done) >= len(self.cells),
            "interrupted": self.stop.signal,
        }
        write_replace(self.log_dir / "summary.json", summary)
        for m in missed:
            print(f"MISSED: {m}")
        finished = sum(r["status"] == "finished" for r in self.done.values())
        print(
            f"\n{finished}/{len(self.cells)} launches finished, {len(self.skipped)} setups skipped; summary "
            f"{self.log_dir}/summary.json"
        )
        if self.stop.signal:
            print(
                f"stopped by {self.stop.signal}; continue with: make bench-all RESUME={plan['batch']}  "
                f"(or python -m bench.run --resume {plan['batch']} --runs_dir {plan['runs_dir']})"
            )
            return 130
        return 1 if failed or missed else 0


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

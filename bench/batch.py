"""One bench batch of bench/run.py: the matrix's setups, the launches (cells x seeds x repeats, interleaved per
model; more where a setup's launches disagree), each started through `accelerate launch` in its own process
group (Ctrl-C passed on, then killed after STOP_GRACE_S) and its record found again by its tag, the state saved
after every launch (a stopped batch resumes), and the summary: each cell's launches pooled against its
baseline's, the verdicts, summary.json.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from bench import launcher
from bench.cells import cell_result, model_verdicts, print_summary, summarize_cell
from shared import stats
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

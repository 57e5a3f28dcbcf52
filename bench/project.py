"""`make project`: will N devices pay off? Projected speedup per strategy and N, from measurements on this machine.

    python -m bench.project [--model all|mlp,cnn] [--hardware this-machine|t4-pcie|FILE] [--devices 1,2,4,8]
                            [--nodes 1] [--batch_size B] [--scaling strong|weak|both] [--validate]
                            [--validate_rounds 2] [--out FILE]

1. Profile (cached): each script runs one process through `accelerate launch` with --profile_out
   (shared/profiling.py), and bench/collectives.py times gloo collectives on 2 processes (4 only where there
   are 4 cores). Both go into one profile record, runs/profiles/profile-<host>.json; later projections
   reuse it unless --reprofile or the scripts' settings changed.
2. Project (instant): shared/projection.py per model, strategy, N and scaling, on the hardware asked for.
3. --validate: per model of `make bench-strategies`, its real multi-process runs in --validate_rounds rounds,
   the model profiled and the small collectives timed before each round and after the last; the mean of the
   profiles and the pooled collectives (a shared host drifts; a measurement predicts the machine of its own
   minutes) predict each cell, compared with its measured step time (relative error; table printed and kept
   in the record's `validation`; cells whose runs did not finish are named, exit status 1).
The projection record (runs/projection-*.json) holds `predictions`, `validation` and where each input came from.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import glob
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import launcher
from bench.launcher import run_group
from shared import nccl_tests
from shared.collective_time import latency, pool_collectives
from shared.datasets import MODEL_DATA, missing_files
from shared.projection import PROFILE_VERSION, STRATEGIES, project
from shared.record import git_commit
from shared.verdicts import load_residuals, recommendation_lines, sentence, verdict_lines, with_range

REPO = launcher.REPO

MODELS = list(MODEL_DATA)
PIPELINED = {"pipeline", "pipeline_1f1b", "hybrid"}


class UsageError(Exception):
    pass


def model_flags() -> dict:
    """Per model, the settings the profile (and the validation runs) use: bench-strategies' for the image models,
    the quick profile's for the text models."""
    strategies = yaml.safe_load((REPO / "bench/strategies.yaml").read_text())["profiles"]["strategies"]
    quick = yaml.safe_load((REPO / "bench/matrix.yaml").read_text())["profiles"]["quick"]
    flags = {}
    for name in MODELS:
        prof = strategies if name in strategies["models"] else quick
        flags[name] = {**prof["common"], **prof["models"][name]}
    return flags


def script_batch(path: Path) -> int:
    """The default `batch_size` of a script's Config, read from its source (this process stays torch-free)."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"--script {path}: not a readable Python script ({type(e).__name__})") from None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Config":
            for item in node.body:
                if (isinstance(item, ast.AnnAssign) and getattr(item.target, "id", "") == "batch_size"
                        and isinstance(item.value, ast.Constant) and isinstance(item.value.value, int)):  # fmt: skip
                    return item.value.value
    raise UsageError(
        f"--script {path}: no `batch_size: int = N` in its Config (docs/scripts.md); give --batch_size"
    )


def own_scripts(text: str, batch_size: int) -> dict[str, dict]:
    """--script a.py,b.py: per model name (the file's stem), its path and the settings it is profiled with:
    the quick bench's common settings at its Config's batch (or --batch_size), 12 steps of training rows."""
    quick = yaml.safe_load((REPO / "bench/matrix.yaml").read_text())["profiles"]["quick"]["common"]
    out = {}
    for item in filter(None, text.split(",")):
        path = Path(item).expanduser().resolve()
        if path.suffix != ".py" or not path.is_file():
            raise UsageError(f"--script {item}: no such Python script")
        name = path.stem
        if name in MODELS and path != (REPO / "scripts" / f"{name}.py").resolve():
            raise UsageError(f"--script {item}: {name} is a built-in model's name; rename your script")
        if name in out:
            raise UsageError(f"--script {text}: two scripts named {name}")
        batch = batch_size or script_batch(path)
        out[name] = {"path": str(path), "flags": {**quick, "batch_size": batch, "limit_train": 12 * batch}}
    return out


def model_flags_strategies() -> list[str]:
    return list(
        yaml.safe_load((REPO / "bench/strategies.yaml").read_text())["profiles"]["strategies"]["models"]
    )


def load_hardware(name: str) -> dict:
    path = Path(name) if name.endswith((".yaml", ".yml")) else REPO / "hardware" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (REPO / "hardware").glob("*.yaml")))
        raise UsageError(f"--hardware {name}: no such hardware file; known: {known}, or a path to a .yaml")
    try:
        hw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: not readable YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(hw, dict):
        raise UsageError(f"{path}: a hardware file is a mapping of fields (see hardware/t4-pcie.yaml)")
    need = ["name", "kind"] + ([] if hw.get("kind") == "measured" else
                               ["peak_tflops", "memory_bandwidth_GBps", "launch_overhead_s", "links"])  # fmt: skip
    missing = [k for k in need if k not in hw]
    if missing:
        raise UsageError(f"{path}: missing {', '.join(missing)} (see hardware/t4-pcie.yaml for the fields)")
    peaks = hw.get("peak_tflops", {"fp32": 1})
    if not isinstance(peaks, dict) or "fp32" not in peaks:
        raise UsageError(f"{path}: peak_tflops is a mapping of dtype to TFLOPS with at least fp32, e.g. "
                         "{fp32: 8.1, fp16: 65.0}")  # fmt: skip
    optional = ["matmul_efficiency", "memory_efficiency", "kernel_min_s", "host_link_GBps", "memory_gib"]
    numbers = (
        {k: hw[k] for k in [*need[2:], *optional] if k in hw and k != "links"}
        | {
            f"links.{name}.{k}": link.get(k)
            for name, link in hw.get("links", {}).items()
            for k in ("busbw_GBps", "latency_s", "half_bytes")
            if k in link or k != "half_bytes"
        }
        | {f"peak_tflops.{k}": v for k, v in peaks.items()}
    )
    numbers.pop("peak_tflops", None)
    bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0]
    if bad:  # YAML reads 8.1e12 as text: it wants 8.1e+12
        raise UsageError(f"{path}: {', '.join(bad)} must be non-negative numbers (write 8.1e+12, not 8.1e12)")
    if hw.get("kind") != "measured" and not peaks["fp32"]:
        raise UsageError(f"{path}: peak_tflops.fp32 must be above 0")
    return hw


def launch(cmd: list[str], log: Path, timeout: float = 900) -> None:
    """One job (bench/launcher.py's command), one thread per process (a process is one core, like one device);
    one line naming the log if it fails or times out."""
    what = " ".join(Path(x).name for x in cmd if x.endswith(".py"))
    with open(log, "w") as f:
        try:
            rc = run_group(
                cmd, timeout, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
            )
        except subprocess.TimeoutExpired:
            raise UsageError(f"{what} timed out after {timeout:.0f} s; log {log}") from None
    if rc:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise UsageError(f"{what} failed (exit {rc}): {tail[0][:200]}; log {log}")


def settings(name: str, flags: dict, args) -> dict:
    """The script flags a model is profiled with: its bench settings, at --batch_size when given (with enough
    training rows for the profile's steps at that batch: a smaller --limit_train would cut the batch short)."""
    fl = {**flags[name], **script_settings(getattr(args, "set", ""))}
    if args.batch_size:
        fl["batch_size"] = args.batch_size
        if fl.get("limit_train"):
            fl["limit_train"] = max(int(fl["limit_train"]), 12 * args.batch_size)
    return fl


def script_settings(text: str) -> dict:
    """--set "image_size=224,freeze=true": any of the script's own flags, for every model profiled."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip() or key.strip() == "batch_size":
            raise UsageError(f"--set {text}: expected key=value pairs of script flags, comma-separated "
                             "(e.g. image_size=224,freeze=true; the batch is --batch_size)")  # fmt: skip
        out[key.strip().lstrip("-")] = value.strip()
    return out


def ladder(batch: int) -> list[int]:
    """The batch sizes a model is profiled at: B, B/2, B/4, B/8 (the per-device batch of N = 1-8 devices, or a
    pipeline micro-batch; the validated cells use all four), at least 2 rows (BatchNorm needs 2). Smaller
    batches extend the ladder's last segment linearly (shared/projection.py)."""
    return sorted({max(min(2, batch), batch // 2**k) for k in range(4)}, reverse=True)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device here (asked in a child: this process stays torch-free)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def profile_config(device: str) -> str:
    """The Accelerate config of one profiling process: on the GPU (`gpu_1`, its data path, precision and fused
    optimizer as a run has them, the clock synchronised with the device) or on one CPU core."""
    return "gpu_1" if device == "cuda" else "cpu_1proc"


def profile_one(name: str, fl: dict, args, work: Path, steps_only: bool = False) -> dict:
    """One process of the script with --profile_out at fl's batch size (shared/profiling.py), on args.device."""
    f = work / f"{name}-{fl['batch_size']}.json"
    flags = ["--data_dir", args.data_dir, "--runs_dir", work / "runs", "--profile_out", f,
             "--profile_steps_only", str(steps_only).lower(), "--progress", "false",
             *[x for k, v in fl.items() for x in (f"--{k}", v)]]  # fmt: skip
    device = getattr(args, "device", "cpu")
    script = getattr(args, "scripts", {}).get(name, {}).get("path", name)  # a script of your own, or scripts/
    cmd = launcher.command(
        script, flags, config=profile_config(device), threads=None if device == "cuda" else 1
    )
    launch(cmd, work / f"{name}-{fl['batch_size']}.log")
    return json.loads(f.read_text())


class Profiles:
    """This host's profile record (runs/profiles/profile-<host>.json, or --profile): read when cached (unless
    --reprofile), measured where missing or stale, and rewritten whole after each measurement, so a later
    failure keeps what was measured. `rec` is the record; `now(model)` measures one model and the small
    collectives again, `pool(model, samples)` keeps the mean of such measurements (validation)."""

    def __init__(self, args, flags: dict):
        self.args, self.flags = args, flags
        self.path = Path(
            args.profile or Path(args.runs_dir) / "profiles" / f"profile-{socket.gethostname()}.json"
        )
        if args.profile and not self.path.is_file():
            raise UsageError(f"--profile {self.path}: no such file")
        self.cached = self.path.is_file() and not args.reprofile
        self.rec = self.read() if self.cached else {"kind": "distbench-profile-record", "models": {}}
        self.rec.setdefault("collectives", {})
        self.work = Path(args.runs_dir) / "profiles" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        # measure_s, the seconds all of the record's measurements took: those before, plus this process's
        self.earlier_s, self.started = 0.0, 0.0

    def read(self) -> dict:
        try:
            rec = json.loads(self.path.read_text())
            assert rec.get("kind") == "distbench-profile-record"
        except (OSError, ValueError, AttributeError, AssertionError):
            raise UsageError(
                f"--profile {self.path}: not a profile record (written by make project)"
            ) from None
        return rec

    def stale(self, models: list[str]) -> list[str]:
        """The models whose cached profile is missing, was measured with other settings or by another version
        of shared/profiling.py."""
        return [
            m
            for m in models
            if self.rec["models"].get(m, {}).get("flags") != settings(m, self.flags, self.args)
            or self.rec["models"][m].get("version") != PROFILE_VERSION
        ]

    def save(self, kind: str, key: str, value) -> None:
        rec = self.rec
        rec[kind][key] = value
        rec.update(
            measured_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            measure_s=self.earlier_s + time.perf_counter() - self.started,
            hostname=socket.gethostname(),
            machine=next(
                (v["device_name"] for v in rec["models"].values() if v.get("device_name")),
                f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
            ),
            git_commit=git_commit(),
            threads_per_process=1,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_suffix(".part").write_text(json.dumps(rec, indent=1))
        os.replace(self.path.with_suffix(".part"), self.path)

    def measure(self, models: list[str], collectives: bool) -> None:
        """Profile each model on one process, and (`collectives`) the collectives on 2 processes (4 where the
        cores allow); saved after each."""
        self.work.mkdir(parents=True, exist_ok=True)
        self.earlier_s, self.started = self.rec.get("measure_s", 0.0), time.perf_counter()
        if collectives:
            for n, ops in self.collectives(self.args.collective_max_mb).items():
                self.save("collectives", n, ops)
        for name in models:
            t0 = time.perf_counter()
            fl = settings(name, self.flags, self.args)
            full, *smaller = ladder(int(fl["batch_size"]))
            prof = profile_one(name, fl, self.args, self.work)
            if prof["batch_size"] != int(
                fl["batch_size"]
            ):  # what is projected is what was asked, or one line
                raise UsageError(
                    f"{name}: asked for batch {fl['batch_size']}, but its loader's batches have {prof['batch_size']} "
                    f"rows (the training split after --limit_train {fl.get('limit_train', '-')} is smaller)"
                )
            for b in smaller:  # each size in a process of its own, as a run at that batch is
                prof["sizes"] |= profile_one(
                    name, {**fl, "batch_size": b}, self.args, self.work, steps_only=True
                )["sizes"]
            self.save("models", name, {**prof, "flags": fl})
            print(f"profiled {name} at batch {', '.join(map(str, (full, *smaller)))}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip

    def collectives(self, max_mb: float) -> dict:
        """bench/collectives.py on 2 processes (4 where the cores allow), messages up to `max_mb`."""
        self.work.mkdir(parents=True, exist_ok=True)
        out = {}
        for n in [k for k in (2, 4) if k <= (os.cpu_count() or 1)]:
            t0 = time.perf_counter()
            f = self.work / f"collectives-{n}-{dt.datetime.now().strftime('%H%M%S')}.json"
            cmd = launcher.command(REPO / "bench/collectives.py", ["--out", f, "--max_mb", max_mb],
                                   config="cpu_2proc", num_processes=n, threads=1)  # fmt: skip
            launch(cmd, f.with_suffix(".log"))
            out[str(n)] = collectives_of(json.loads(f.read_text()))
            print(
                f"collectives on {n} processes, up to {max_mb:g} MB: {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        return out

    def now(self, model: str) -> tuple[dict, dict]:
        """`model`'s profile and the latency-bound collectives (up to 1 MB), measured again now."""
        self.measure([model], collectives=False)
        return self.rec["models"][model], self.collectives(max_mb=1)

    def pool(self, model: str, samples: list[tuple[dict, dict]]) -> None:
        """Keep the mean of `model`'s profiles taken around its runs (on a shared host that drifts by 10-30%
        within minutes, a profile taken before a run predicts the host of then, not the run), and the calls of
        the small collectives timed alongside them pooled (the record's larger sizes kept): what its runs met."""
        profiles = [p for p, _ in samples]
        full = str(profiles[0]["batch_size"])
        self.save("models", model, {
            **mean_of(*profiles), "bracketed_step_s": [p["sizes"][full]["step_s"] for p in profiles],
            "collectives_around_runs": pool_collectives([c for _, c in samples], rest=self.rec["collectives"]),
        })  # fmt: skip


def latencies(collectives: dict) -> dict:
    """Per process count and op, the pooled latency of the latency-bound sizes, after compute and back to back
    (shared/collective_time.py `latency`), with its interval: what the projection prices a small message at."""
    return {
        n: {op: {"after_compute": latency(t), "back_to_back": latency(t.get("back_to_back", {}))}
            for op, t in ops.items()}
        for n, ops in collectives.items()
    }  # fmt: skip


def collectives_of(result: dict) -> dict:
    """bench/collectives.py's output as the record keeps it: per op the after-compute table (what a step pays
    after computing), with the back-to-back one (after a barrier: a collective right after another)."""
    return {op: {**t, "back_to_back": result["barrier"][op]} for op, t in result["ops"].items()}


def profile_record(args, models: list[str], flags: dict, later: tuple[str, ...] = ()) -> Profiles:
    """The profile record, measured where missing or stale (or all of it with --reprofile). Models in `later`
    are left for `Profiles.now` (validation profiles each model around its runs)."""
    profiles = Profiles(args, flags)
    todo = profiles.stale(models)
    missing = [  # a script of your own checks its own data, in one line
        f"{MODEL_DATA[m]} (for {m})"
        for m in sorted({*todo, *later})
        if m in MODEL_DATA and missing_files(args.data_dir, MODEL_DATA[m])
    ]
    if missing:
        raise UsageError(
            f"no local copy under --data_dir {args.data_dir} of: {', '.join(missing)} (make data)"
        )
    todo = [m for m in todo if m not in later]
    if profiles.cached and not todo and profiles.rec["collectives"]:
        print(
            f"profile record {profiles.path} (measured {profiles.rec['measured_at']}; --reprofile to measure again)"
        )
        return profiles
    profiles.measure(todo, collectives=not profiles.rec["collectives"])
    print(f"profile record {profiles.path} ({profiles.rec['measure_s']:.0f} s)")
    return profiles


def mean_of(*profiles):
    """The element-wise mean of profiles of one model: numbers averaged, anything else (names, layouts) taken
    from the first; a figure only some of them have is the mean of those."""
    have = [p for p in profiles if p is not None]
    if not have:
        return None
    a = have[0]
    if isinstance(a, dict):
        return {k: mean_of(*(p.get(k) if isinstance(p, dict) else None for p in have)) for k in a}
    if isinstance(a, list) and all(isinstance(p, list) and len(p) == len(a) for p in have):
        return [mean_of(*xs) for xs in zip(*have, strict=True)]
    if isinstance(a, float) and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in have):
        return sum(have) / len(have)
    return a


def supported(profile: dict, strategy: str) -> bool:
    return not (strategy in PIPELINED and "pipeline" in profile.get("unsupported", []))


def predictions(rec: dict, hw: dict, models, devices, nodes, scalings, cores) -> list[dict]:
    rows, skipped = [], set()
    for name in models:
        prof = rec["models"][name]
        batch = prof["batch_size"]
        for scaling in scalings:
            for n in devices:
                k = max(nodes, hw.get("nodes", 1)) if n > 1 else 1
                k = max(k, -(-n // hw.get("devices_per_node", n)))
                if k > 1 and "inter" not in hw.get("links", {}):
                    skipped.add(
                        f"N = {n} needs {k} nodes and {hw['name']} has no inter-node link (links.inter)"
                    )
                    continue
                for strategy in ["single"] if n == 1 else STRATEGIES:
                    if not supported(prof, strategy) or (strategy == "hybrid" and (n < 4 or n % 2)) or n % k:
                        continue
                    if strategy in PIPELINED and (batch // (2 if strategy == "hybrid" else 1)) % 4:
                        continue
                    try:
                        p = project(prof, hw, strategy, n, nodes=k, batch=batch, scaling=scaling,
                                    cores=cores if hw.get("kind") == "measured" else None)  # fmt: skip
                    except ValueError as e:
                        raise UsageError(f"{name}: {e}") from None
                    rows.append({"model": name, "hardware": hw["name"], **p})
    for note in sorted(skipped):
        print(f"not projected: {note}")
    return rows


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
    memory: dict[
        tuple, list
    ] = {}  # per cell, each run's training memory (memory/train_gib, its largest epoch)
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
        trained = [h["memory/train_gib"] for h in r.get("history", []) if "memory/train_gib" in h]
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
        mem = memory.get((model, strategy, n, batch, micro))
        out.append({"model": model, "strategy": strategy, "devices": n, "global_batch": batch,
                    "measured_step_s": measured, "measured_runs": times, "predicted_step_s": p["step_s"],
                    "error": (p["step_s"] - measured) / measured, "oversubscribed": p["oversubscribed"],
                    "bottleneck": p["bottleneck"], "assumed": p["assumed"],
                    "predicted_memory_gib": p["memory_gib_per_device"],
                    "measured_memory_gib": max(mem) if mem else None})  # fmt: skip
    if args.validate_from:
        return out, failed
    setups = [n for s in yaml.safe_load((REPO / "bench/strategies.yaml").read_text())["setups"] for n in s]
    ran = {c[:2] for c in cells}
    return out, [f"{m} {s}" for m in validated(models) for s in setups if (m, s) not in ran]


# what a measured training memory may exceed its prediction by: the runtime's own first-step allocations (thread
# pools, autograd's engine, modules imported on first use, the malloc arenas of the threads; 50-150 MiB
# measured on this CPU) and the allocator's rounding
MEMORY_TOLERANCE = {"below": 0.9, "above": 1.5, "slack_gib": 0.25,
                    "text": "0.9 x predicted <= measured <= 1.5 x predicted + 0.25 GiB"}  # fmt: skip


def memory_within(predicted: float, measured: float) -> bool:
    t = MEMORY_TOLERANCE
    return t["below"] * predicted <= measured <= t["above"] * predicted + t["slack_gib"]


def memory_rows(check: list[dict]) -> list[dict]:
    """The validated cells with a measured training memory: predicted and measured GiB per device, and whether
    the measured one is within MEMORY_TOLERANCE."""
    return [
        {**c, "predicted_gib": c["predicted_memory_gib"], "measured_gib": c["measured_memory_gib"],
         "within": "yes" if memory_within(c["predicted_memory_gib"], c["measured_memory_gib"]) else "NO"}
        for c in check if c.get("measured_memory_gib") is not None
    ]  # fmt: skip


def table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(cell(r.get(c, "")) for c in cols) for r in rows]
    return "\n".join(lines)


def checked(args) -> tuple[list[str], list[int], dict, dict]:
    """(models, device counts, the hardware projected on, this machine's) from the arguments, each bad one a
    UsageError of one line before anything runs; `args.device` resolved."""
    models = MODELS if args.model == "all" else args.model.split(",")
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise UsageError(
            f"--model {','.join(bad)}: unknown; known: all, {', '.join(MODELS)}, or --script PATH"
        )
    if args.batch_size < 0:
        raise UsageError("--batch_size must be positive")
    args.scripts = own_scripts(args.script, args.batch_size)
    if args.scripts:  # your scripts, and the built-in models only where --model names them
        models = [*(m for m in models if args.model != "all" and m not in args.scripts), *args.scripts]
    try:
        devices = sorted({int(d) for d in args.devices.split(",")})
    except ValueError:
        raise UsageError(f"--devices {args.devices}: not a comma-separated list of integers") from None
    if devices[0] < 1 or args.nodes < 1 or args.batch_size < 0 or args.validate_rounds < 1:
        raise UsageError("--devices, --nodes, --batch_size and --validate_rounds must be positive")
    script_settings(args.set)  # a malformed --set: one line before anything runs
    if args.validate_from and not list(Path(args.validate_from).glob("*.json")):
        raise UsageError(f"--validate_from {args.validate_from}: no run records there")
    hw = load_hardware(args.hardware)
    if args.collectives:
        try:
            hw["measured_collectives"] = nccl_tests.load(args.collectives.split(","))
        except nccl_tests.NcclTestsError as e:
            raise UsageError(str(e)) from None
        if hw.get("kind") == "measured":
            raise UsageError("--collectives describes a GPU cluster: give it with a GPU --hardware file")
        hw["collectives_files"] = args.collectives.split(",")
    local = load_hardware("this-machine")
    args.device = ("cuda" if cuda_available() else "cpu") if args.device == "auto" else args.device
    if args.device == "cuda" and args.validate:
        raise UsageError("--validate runs the CPU strategies of bench-strategies: use --device cpu")
    return models, devices, hw, local


def report(
    args,
    models: list[str],
    hw: dict,
    preds: list[dict],
    check: list[dict],
    yours: list[dict],
    missing: list[str],
) -> tuple[dict, dict | None]:
    """Print the verdicts first, the sentences, the table, what was priced as 0, and how the projection did
    against your runs and the validation; returns (verdicts per model, the validation summary)."""
    verdicts = {m: verdict_lines(m, hw["name"], [p for p in preds if p["model"] == m]) for m in models}
    print(
        "verdicts (range: where measured figures fell in validations of the same kind, shared/residuals.yaml):"
    )
    for name in models:
        print("\n".join(verdicts[name]))
    for name in models:
        mine = [p for p in preds if p["model"] == name and p["devices"] > 1]
        print(sentence(name, hw["name"], mine))
    print(table([{**p, "step_ms": p["step_s"] * 1e3} for p in preds if p["devices"] > 1],
                ["model", "strategy", "devices", "scaling", "global_batch", "step_ms", "speedup", "efficiency",
                 "memory_gib_per_device", "bottleneck", "verdict", "compute_source"]))  # fmt: skip
    assumed: dict[tuple, set] = {}  # (model, input priced as 0): the strategies whose predictions use it
    for p in preds + check:
        for what in p["assumed"]:
            assumed.setdefault((p["model"], what), set()).add(p["strategy"])
    for (model, what), strategies in sorted(assumed.items()):
        print(f"warning: {model}: {what} in the profile (its log under runs/profiles/ says why), priced as 0: "
              f"{', '.join(sorted(strategies))} predictions are lower bounds", file=sys.stderr)  # fmt: skip
    if yours:
        errs = sorted(yours, key=lambda c: abs(c["error"]))
        print(f"your runs in {args.runs_dir}: {len(errs)} cells of this machine, predicted from the profile with "
              f"mean |error| {statistics.mean(abs(c['error']) for c in errs):.1%}, worst {errs[-1]['error']:+.1%} "
              f"({errs[-1]['model']} {errs[-1]['strategy']} at N = {errs[-1]['devices']})")  # fmt: skip
    summary = {"cells": 0, "missing": missing} if missing else None
    if check:
        errs = [abs(c["error"]) for c in check]
        summary = {"cells": len(errs), "mean_abs_error": statistics.mean(errs), "max_abs_error": max(errs),
                   "missing": missing}  # fmt: skip
        print(table([{**c, "measured_ms": c["measured_step_s"] * 1e3, "predicted_ms": c["predicted_step_s"] * 1e3}
                     for c in check], ["model", "strategy", "devices", "global_batch", "measured_ms",
                                       "predicted_ms", "error", "oversubscribed"]))  # fmt: skip
        print(f"validation: mean |error| {summary['mean_abs_error']:.1%}, max {summary['max_abs_error']:.1%} "
              f"over {len(errs)} cells")  # fmt: skip
        if mem := memory_rows(check):
            print(f"memory per device, predicted vs measured above what the process held before the model "
                  f"(memory/train_gib; tolerance: {MEMORY_TOLERANCE['text']}):")  # fmt: skip
            print(table(mem, ["model", "strategy", "devices", "global_batch", "predicted_gib", "measured_gib",
                              "within"]))  # fmt: skip
    for name in models:  # the answer, last: what to do per N, and why
        print("\n".join(recommendation_lines(name, hw["name"], [p for p in preds if p["model"] == name])))
    return verdicts, summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all", help="all, or a comma-separated list of " + ", ".join(MODELS))
    ap.add_argument("--script", default="",
                    help="your own script(s), comma-separated paths: profiled and projected like the built-in models")  # fmt: skip
    ap.add_argument("--hardware", default="this-machine", help="a name in hardware/ or a .yaml file")
    ap.add_argument("--devices", default="1,2,4,8", help="device counts, comma-separated")
    ap.add_argument("--nodes", type=int, default=1, help="spread the devices over this many nodes")
    ap.add_argument(
        "--batch_size", type=int, default=0, help="the model's batch (default: bench-strategies')"
    )
    ap.add_argument("--scaling", choices=["strong", "weak", "both"], default="both")
    ap.add_argument("--set", default="", help="script flags to profile with, e.g. image_size=224,freeze=true")
    ap.add_argument(
        "--validate", action="store_true", help="run bench-strategies now and compare (this machine)"
    )
    ap.add_argument("--validate_rounds", type=int, default=2, help="with --validate: launches per cell")
    ap.add_argument("--collectives", default="",
                    help="nccl-tests output file(s), comma-separated: your cluster's collectives at their rank count")  # fmt: skip
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the models are profiled: auto = the GPU where torch sees one, else one CPU core")  # fmt: skip
    ap.add_argument("--validate_from", default="", help="compare with the records in this folder instead")
    ap.add_argument(
        "--profile", default="", help="profile record to use (default runs/profiles/profile-<host>.json)"
    )
    ap.add_argument("--collective_max_mb", type=float, default=256, help="largest collective message timed")
    ap.add_argument("--reprofile", action="store_true", help="measure again even if a profile record matches")
    ap.add_argument("--data_dir", default=os.environ.get("DISTBENCH_DATA_DIR", "data"))
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--out", default="", help="projection record (default runs/projection-<time>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models, devices, hw, local = checked(args)
        residuals = load_residuals()
        t0 = time.perf_counter()
        later = tuple(validated(models)) if args.validate and not args.validate_from else ()
        flags = model_flags() | {name: s["flags"] for name, s in args.scripts.items()}
        profiles = profile_record(args, models, flags, later)
        rec = profiles.rec
        for h in (hw, local):
            if h.get("kind") == "measured":
                h["measured_collectives"] = rec["collectives"]
                h["collective_latency"] = latencies(rec["collectives"])
        check, missing, yours = [], [], []
        if args.validate or args.validate_from:
            check, missing = validate(args, rec, local, models, profiles)
        # the runs already in the folder: how far is the projection from them?
        elif Path(args.runs_dir).is_dir():
            yours, _ = validate(argparse.Namespace(**{**vars(args), "validate_from": args.runs_dir}), rec, local,
                                models, profiles)  # fmt: skip
        scalings = ["strong", "weak"] if args.scaling == "both" else [args.scaling]
        preds = [
            with_range(p, residuals)
            for p in predictions(rec, hw, models, devices, args.nodes, scalings, os.cpu_count())
        ]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: its processes stopped; the profile record keeps every model measured so far",
              file=sys.stderr)  # fmt: skip
        return 130
    verdicts, summary = report(args, models, hw, preds, check, yours, missing)
    out = Path(
        args.out or Path(args.runs_dir) / f"projection-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    record = {
        "kind": "distbench-projection",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hw,
        "profile": {
            k: rec[k] for k in ("measured_at", "hostname", "machine", "git_commit", "threads_per_process")
        },
        "profile_models": {
            m: {
                "batch_size": rec["models"][m]["batch_size"],
                "flags": rec["models"][m]["flags"],
                "flops_per_step": rec["models"][m]["flops_per_step"],
            }
            for m in models
        },  # fmt: skip
        "sentences": {
            m: sentence(m, hw["name"], [p for p in preds if p["model"] == m and p["devices"] > 1])
            for m in models
        },  # fmt: skip
        "verdicts": verdicts,
        "residuals": residuals,
        "predictions": preds,
        "validation": check,
        "validation_summary": summary,
        "runs_folder_check": yours,  # the runs already in --runs_dir against the profile's predictions
        "git_commit": git_commit(),
        "project_s": time.perf_counter() - t0,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".part").write_text(json.dumps(record, indent=1))
    os.replace(out.with_suffix(".part"), out)
    print(f"projection record {out} ({record['project_s']:.0f} s)")
    if missing:  # a cell whose runs failed is not a cell that validated
        print(f"error: validation incomplete, not finished: {', '.join(missing)} (see the bench's logs)",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

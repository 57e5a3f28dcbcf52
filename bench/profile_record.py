"""The profile record of `make project` (runs/profiles/profile-<host>.json, or --profile): each model's script
profiled on one process at a ladder of batch sizes (shared/profiling.py, through `accelerate launch` with
--profile_out), and this machine's gloo collectives timed on 2 processes (bench/collectives.py). A cached
record is reused unless --reprofile or the scripts' settings changed; bench/project.py projects from it.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import yaml

from bench import launcher
from bench.launcher import run_group
from shared.collective_time import pool_collectives
from shared.datasets import MODEL_DATA, missing_files
from shared.projection import PROFILE_VERSION
from shared.record import git_commit

REPO = launcher.REPO

MODELS = list(MODEL_DATA)


# a bad argument, file or measurement: bench/project.py prints it as one line and exits 2
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

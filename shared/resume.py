"""Finding what `--resume` names: a run id, a run record, a checkpoint directory or `auto`, always inside
runs_dir, and checking that the new launch is the same experiment. Every rank gets the same answer or the
same one-line error; nothing is written here (shared/checkpoint.py loads the checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

from accelerate.utils import broadcast_object_list

from shared.config import UserError
from shared.record import RUN_ID_RE, read_record

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-\d{8}$")  # complete checkpoints only (not .partial / .old)
# config keys that may change between a run and its resumption; every other key must match
RESUMABLE_CHANGES = {
    "resume",
    "runs_dir",
    "data_dir",
    "tag",
    "checkpoint_every",
    "keep_checkpoints",
    "on_nan",
    "collective_timeout_s",
    "warmup_steps",
    "progress",
}


class ResumeError(UserError):
    pass


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    d = run_dir / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "progress.json").is_file()
    )


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def find_resume(cfg, model: str) -> tuple[Path, Path, dict] | None:
    """(record path, checkpoint dir, record) named by `--resume`, or None for `auto` with nothing to resume.

    Raises ResumeError with one line when the spec names nothing resumable. Paths are resolved and must lie
    inside runs_dir; run ids must be plain names, so nothing outside runs_dir is ever opened or written.
    """
    spec, runs = cfg.resume, Path(cfg.runs_dir)
    checkpoint = None
    if spec == "auto":
        best = None
        for path in sorted(runs.glob(f"{model}-*.json")):
            try:
                rec = read_record(path)
            except ValueError:
                continue
            if (
                rec["model"] == model
                and rec["status"] != "finished"
                and complete_checkpoints(runs / rec["run_id"])
            ):
                if best is None or rec["updated_at"] > best[1]:
                    best = (path, rec["updated_at"])
        if best is None:
            return None
        record_path = best[0]
    elif RUN_ID_RE.match(spec) and "/" not in spec and (runs / f"{spec}.json").is_file():
        record_path = runs / f"{spec}.json"
    else:
        p = Path(spec)
        if p.is_dir() and (p / "progress.json").is_file():
            checkpoint = p
            record_path = p.parent.parent.parent / f"{p.parent.parent.name}.json"
        elif p.suffix == ".json" and p.is_file():
            record_path = p
        else:
            raise ResumeError(
                f"--resume {spec}: not a run id in {runs}, a run record or a complete checkpoint directory"
            )
        if not _inside(record_path, runs) or (checkpoint and not _inside(checkpoint, runs)):
            raise ResumeError(f"--resume {spec}: not inside runs_dir {runs}")
    try:
        rec = read_record(record_path)
    except ValueError as e:
        raise ResumeError(f"--resume: {record_path}: {e}") from None
    if rec["model"] != model:
        raise ResumeError(f"--resume: run {rec['run_id']} is a {rec['model']} run, not {model}")
    if rec["status"] == "finished":
        raise ResumeError(f"--resume: run {rec['run_id']} already finished")
    found = complete_checkpoints(runs / rec["run_id"])
    if checkpoint is None:
        if not found:
            raise ResumeError(
                f"--resume: run {rec['run_id']} has no complete checkpoint (start runs with --checkpoint_every N)"
            )
        checkpoint = found[-1]
    elif checkpoint.resolve() not in [f.resolve() for f in found]:
        raise ResumeError(f"--resume: {checkpoint} is not a checkpoint of run {rec['run_id']}")
    return record_path, checkpoint, rec


def check_compatible(record: dict, cfg, setup: dict):
    """The resumed run must be the same experiment: same config (but RESUMABLE_CHANGES) and the same setup."""
    saved = record["config"]
    same = lambda a, b: a == b or {a, b} in ({True, "true"}, {False, "false"})  # noqa: E731 - older records: strings
    for key, value in vars(cfg).items():
        if key not in RESUMABLE_CHANGES and key in saved and not same(saved[key], value):
            raise ResumeError(
                f"--resume: config key '{key}' is {value!r} but run {record['run_id']} used {saved[key]!r}"
            )
    for key in ("strategy", "num_processes", "mesh_shape", "microbatches"):
        if record["setup"].get(key) != setup.get(key):
            raise ResumeError(
                f"--resume: this launch has {key} {setup.get(key)!r} but run {record['run_id']} "
                f"used {record['setup'].get(key)!r}"
            )


def negotiate_resume(acc, cfg, model: str, setup: dict) -> tuple[Path, Path] | None:
    """What `--resume` names, found on the main process and checked to be the same experiment; every rank gets
    (record path, checkpoint dir), None (auto, nothing to resume) or the same one-line error. Writes nothing."""
    if not cfg.resume:
        return None
    found = None
    if acc.is_main_process:
        try:
            hit = find_resume(cfg, model)
            if hit is None:
                found = ("none",)
            else:
                record_path, checkpoint, record = hit
                check_compatible(record, cfg, setup)
                found = ("ok", str(record_path), str(checkpoint))
        except UserError as e:
            found = ("error", str(e))
    found = broadcast_object_list([found])[0]
    if found[0] == "error":
        raise ResumeError(found[1])
    if found[0] == "none":
        acc.print(
            f"--resume auto: no unfinished {model} run with a checkpoint in {cfg.runs_dir}; starting a new run"
        )
        return None
    return Path(found[1]), Path(found[2])

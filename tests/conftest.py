"""Shared test helpers: where the real data is, and how to launch a script the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import launcher
from bench.launcher import child_env, free_port  # noqa: F401 - the tests import these from here
from shared.record import record_files

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATA_DIR = Path(os.environ.get("DISTBENCH_DATA_DIR", REPO / "data")).resolve()


def require_dataset(name: str) -> Path:
    """The real dataset folder, or skip (fail under CI, where ../shared/data must be wired in)."""
    if not (DATA_DIR / name).is_dir():
        msg = f"real {name} not found under {DATA_DIR}: set DISTBENCH_DATA_DIR (README, Tests)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return DATA_DIR


def launch(
    setup: str | None,
    script: str,
    *args,
    timeout: float = 240,
    env: dict | None = None,
    nan_at_batch: int | None = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<setup>.yaml scripts/<script>.py args`, or plain
    `python scripts/<script>.py args` when setup is None (bench/launcher.py builds both). `nan_at_batch=N`:
    through tests/inject_nan.py, the Nth training batch's loss is NaN."""
    wrapper = [REPO / "tests" / "inject_nan.py", nan_at_batch] if nan_at_batch is not None else []
    return launcher.run(launcher.command(script, args, config=setup, wrapper=wrapper), timeout, env)


def records(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in record_files(runs_dir)]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"

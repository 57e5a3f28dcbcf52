"""Shared test helpers: where the real data is, and how to launch a script the way a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.record import free_port, record_files  # noqa: F401 - tests import free_port from here

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


def child_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    # one thread per process: predictable on 2 cores, and no oversubscription when launches overlap other work
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            **extra,
        }
    )
    return env


def launch(
    setup: str | None,
    script: str,
    *args,
    timeout: float = 240,
    env: dict | None = None,
    nan_at_batch: int | None = None,
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/<setup>.yaml scripts/<script>.py args`, or plain
    `python scripts/<script>.py args` when setup is None. `nan_at_batch=N`: through tests/inject_nan.py, the
    Nth training batch's loss is NaN."""
    path = [str(REPO / "scripts" / f"{script}.py")]
    if nan_at_batch is not None:
        path = [str(REPO / "tests" / "inject_nan.py"), str(nan_at_batch), *path]
    if setup is None:
        cmd = [sys.executable, *path]
    else:
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(REPO / "accelerate_configs" / f"{setup}.yaml"),
            "--main_process_port",
            str(free_port()),
            *path,
        ]
    return subprocess.run(
        cmd + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env or child_env(),
    )


def records(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in record_files(runs_dir)]


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"

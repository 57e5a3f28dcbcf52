"""A progress bar per epoch on the main process only, where someone watches: on with a terminal (or
--progress true), off in logs and pipes; the per-epoch line is printed either way."""

import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env, explain, launch, require_dataset

pytestmark = pytest.mark.slow
ARGS = ["--limit_train", 640, "--limit_eval", 64, "--epochs", 2, "--batch_size", 32]


def test_two_processes_show_one_bar_per_epoch(tmp_path):
    root = require_dataset("mnist")
    proc = launch("cpu_2proc", "mlp", "--data_dir", root, "--runs_dir", tmp_path, *ARGS, "--progress", "true")
    assert proc.returncode == 0, explain(proc)
    for epoch in (1, 2):  # each bar starts once at 0/20 steps: one process draws it
        assert proc.stderr.count(f"epoch {epoch}:   0%|") == 1, explain(proc)
    assert proc.stdout.count("epoch 1 | step 20") == 1  # the epoch line stays


def test_no_bar_without_a_terminal(tmp_path):
    root = require_dataset("mnist")
    proc = launch(None, "mlp", "--data_dir", root, "--runs_dir", tmp_path, *ARGS)
    assert proc.returncode == 0, explain(proc)
    assert "%|" not in proc.stderr and "epoch 1 | step 20" in proc.stdout


def test_a_terminal_gets_the_bar_by_default(tmp_path):
    """Under a pseudo-terminal (util-linux `script`, given a size: tqdm draws nothing on a 0-column terminal),
    as in an interactive shell."""
    root = require_dataset("mnist")
    cmd = [sys.executable, str(REPO / "scripts" / "mlp.py"), "--data_dir", str(root), "--runs_dir", str(tmp_path),
           *map(str, ARGS)]  # fmt: skip
    proc = subprocess.run(
        ["script", "-qec", "stty cols 120 rows 40; " + shlex.join(cmd), "/dev/null"], capture_output=True, text=True, cwd=REPO,
        env=child_env(), timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    assert "epoch 1:" in proc.stdout and "%|" in proc.stdout and "epoch 1 | step 20" in proc.stdout

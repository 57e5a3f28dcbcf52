"""Your own model, end to end: the template copied to a folder outside the repository and changed, then
benchmarked (2 cells), profiled and projected, and shown by the dashboard, with no file of the repository edited."""

import json
import shutil
import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from bench import new_model
from tests.conftest import REPO, child_env, require_dataset

pytestmark = pytest.mark.slow  # real launches

PROFILE = REPO / "docs/results/2026-12-07/out-of-sample/profile-vm-0921.json"  # its collectives, not re-timed


def repo_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip


def python(*args, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_script_of_your_own_is_benchmarked_projected_and_shown(tmp_path, monkeypatch):
    data = require_dataset("mnist")  # the data folder
    before = repo_state()
    own = tmp_path / "elsewhere" / "tiny_mlp.py"
    assert new_model.main(["--name", "tiny_mlp", "--dest", str(own), "--no_smoke"]) == 0
    # the user's change: a narrower MLP, 784-64-10, cut before its second Linear
    text = own.read_text()
    layers = (
        "nn.Linear(28 * 28, 250),\n        nn.ReLU(),\n        nn.Linear(250, 100),\n        nn.ReLU(),\n"
    )
    assert layers in text
    text = text.replace(layers, "nn.Linear(28 * 28, 64),\n        nn.ReLU(),\n").replace(
        "Linear(100, 10)", "Linear(64, 10)"
    )
    own.write_text(text.replace('SPLIT_POINTS = ["3", "5"]', 'SPLIT_POINTS = ["3"]'))

    # benchmarked: one process and two, one launch each, the quick profile's settings for a script of your own
    runs = tmp_path / "runs"
    python("-m", "bench.run", "--profile", "quick", "--models", own, "--setups", "cpu_1proc,cpu_2proc",
           "--repeats", 1, "--max_repeats", 1, "--data_dir", data, "--runs_dir", runs)  # fmt: skip
    (summary_file,) = runs.glob("bench/*/summary.json")
    cells = {(c["model"], c["setup"]): c for c in json.loads(summary_file.read_text())["cells"]}
    two = cells[("tiny_mlp", "cpu_2proc")]
    assert two["strategy"] == "ddp" and two["statuses"] == ["finished"] and two["speedup"] > 0
    recs = [json.loads(p.read_text()) for p in runs.glob("tiny_mlp-*.json")]
    assert len(recs) == 2 and {r["model_info"]["params"] for r in recs} == {784 * 64 + 64 + 64 * 10 + 10}
    assert {r["history"][-1]["samples_seen"] for r in recs} == {30 * 64}  # own_script: 30 steps of its batch

    # profiled and projected (this machine's collectives from a committed profile record)
    profile = tmp_path / "profile.json"
    shutil.copy(PROFILE, profile)
    out = tmp_path / "projection.json"
    proc = python("-m", "bench.project", "--script", own, "--profile", profile, "--devices", "1,2",
                  "--batch_size", 32, "--data_dir", data, "--runs_dir", tmp_path / "project", "--out", out)  # fmt: skip
    tail = proc.stdout.strip().splitlines()
    assert tail[-3] == "tiny_mlp on this-machine, what to do (weak scaling):", tail[-4:]
    assert tail[-2].startswith("  N = 2: ") and "of the step" in tail[-2]
    rec = json.loads(out.read_text())
    assert {p["model"] for p in rec["predictions"]} == {"tiny_mlp"}
    assert rec["profile_models"]["tiny_mlp"]["batch_size"] == 32

    # shown: the dashboard reads the model's name from its records
    monkeypatch.setenv("RUNS_DIR", str(runs))
    at = AppTest.from_file(str(REPO / "dashboard.py"), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(m.value.startswith("- **tiny_mlp**") for m in at.markdown), [m.value for m in at.markdown][:5]
    assert repo_state() == before  # no file of the repository written

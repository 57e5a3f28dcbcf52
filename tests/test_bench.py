"""The bench runner as a user drives it: Ctrl-C ends the whole matrix, a stopped matrix resumes with only
its missing cells, a cell disturbed by other load is flagged `contended`, a short run `warmup-dominated`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, child_env, launch, records, require_dataset

pytestmark = pytest.mark.slow


def matrix(tmp_path: Path, setups: list, mlp: dict) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "setups": setups,
                "baselines": {"cpu": "cpu_1proc"},
                "profiles": {
                    "t": {
                        "threads_per_process": 1,
                        "common": {"epochs": 1, "limit_eval": 100, "select_best": False},
                        "models": {"mlp": mlp},
                    }
                },
            }
        )
    )
    return path


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    """bench/run.py in its own process group, as a terminal's foreground job."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "run.py"), "--runs_dir", str(tmp_path / "runs"), *args],
        stdout=open(tmp_path / "bench.log", "a"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=child_env(),
        start_new_session=True,
    )


def wait_for(cond, timeout: float, what: str):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def state(tmp_path: Path) -> dict:
    (batch,) = list((tmp_path / "runs" / "bench").iterdir())
    return json.loads((batch / "state.json").read_text()) | {"dir": batch}


def cells_done(tmp_path: Path) -> int:
    """Finished cells so far; 0 until the bench has made its folder and written its state (the folder comes
    first, so a poll can fall between the two)."""
    batches = list((tmp_path / "runs" / "bench").glob("*/state.json"))
    return len(state(tmp_path)["results"]) if batches else 0


def test_ctrl_c_ends_the_matrix_and_resume_runs_only_the_missing_cells(tmp_path):
    data = require_dataset("mnist")
    setups = [
        "cpu_1proc",
        {"split": {"config": "cpu_1proc_model_split", "strategy": "model_split"}},
        "cpu_2proc",
    ]
    m = matrix(tmp_path, setups, {"batch_size": 64, "limit_train": 54000, "epochs": 2})
    proc = start(tmp_path, "--matrix", str(m), "--profile", "t", "--data_dir", str(data))
    try:
        wait_for(
            lambda: cells_done(tmp_path) == 1,
            180,
            "cell 1",
        )
        wait_for(
            lambda: any(
                p.name.startswith("mlp-") and ":split:" in p.read_text()
                for p in (tmp_path / "runs").glob("mlp-*.json")
            ),
            120,
            "cell 2's record",
        )
        time.sleep(1)  # cell 2 is training (its record is written once the data and model are set up)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "bench.log").read_text()
    assert rc == 130, log
    assert took < 25, f"the matrix took {took:.0f} s to stop"
    s = state(tmp_path)
    status = {r["setup"]: r["status"] for r in s["results"]}
    assert status == {"cpu_1proc": "finished", "split": "interrupted"}, log
    summary = json.loads((s["dir"] / "summary.json").read_text())
    assert summary["interrupted"] == "SIGINT" and not summary["complete"]
    recs = {r["tag"].split(":")[4]: r for r in records(tmp_path / "runs")}
    assert recs["split"]["status"] == "interrupted" and "cpu_2proc" not in recs
    out = subprocess.run(["pgrep", "-f", str(tmp_path / "runs")], capture_output=True, text=True)
    assert out.stdout.strip() == "", "processes of the stopped matrix are still running"
    assert f"RESUME={s['dir'].name}" in log

    proc = start(tmp_path, "--resume", s["dir"].name)
    assert proc.wait(timeout=300) == 0, (tmp_path / "bench.log").read_text()
    log = (tmp_path / "bench.log").read_text()
    assert "2 of 3 launches to run" in log
    tags = [r["tag"].split(":")[4] for r in records(tmp_path / "runs")]
    assert sorted(tags) == ["cpu_1proc", "cpu_2proc", "split", "split"]  # cell 1 not run again
    summary = json.loads((s["dir"] / "summary.json").read_text())
    assert summary["complete"] and {c["setup"] for c in summary["cells"] if "speedup" in c} == set(status) | {
        "cpu_2proc"
    }


def test_a_cell_disturbed_by_a_cpu_hog_is_flagged_contended(tmp_path):
    data = require_dataset("mnist")
    setups = ["cpu_1proc", {"split": {"config": "cpu_1proc_model_split", "strategy": "model_split"}}]
    m = matrix(tmp_path, setups, {"batch_size": 64, "limit_train": 54000, "epochs": 1})
    proc = start(tmp_path, "--matrix", str(m), "--profile", "t", "--data_dir", str(data))
    hog = None
    try:
        wait_for(lambda: list((tmp_path / "runs").glob("bench/*/mlp-split-seed0-r0.log")), 180, "cell 2")
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core busy
        assert proc.wait(timeout=180) == 0, (tmp_path / "bench.log").read_text()
    finally:
        for p in (hog, proc):
            if p is not None and p.poll() is None:
                p.kill()
    summary = json.loads(next((tmp_path / "runs").glob("bench/*/summary.json")).read_text())
    flags = {c["setup"]: c["flags"] for c in summary["cells"]}
    assert "contended" in flags["split"], summary["cells"]
    assert "contended" not in flags["cpu_1proc"], summary["cells"]
    assert "contended" in (tmp_path / "bench.log").read_text()


def test_a_short_run_is_flagged_warmup_dominated(tmp_path):
    data = require_dataset("mnist")
    args = ("--data_dir", data, "--runs_dir", tmp_path, "--epochs", 1, "--limit_eval", 100)
    short = launch(None, "mlp", *args, "--limit_train", 640, "--max_steps", 9)
    full = launch(None, "mlp", *args, "--limit_train", 6400)
    assert short.returncode == 0 and full.returncode == 0, short.stderr + full.stderr
    by_steps = {r["history"][-1]["step"]: r["timing"]["steady"] for r in records(tmp_path)}
    assert by_steps[9]["warmup_dominated"] and by_steps[9]["steps"] <= 4
    assert not by_steps[100]["warmup_dominated"] and by_steps[100]["steps"] == 100 - 5 - 1
    assert (
        by_steps[100]["samples_per_s_ci95"][0]
        <= by_steps[100]["samples_per_s"]
        <= by_steps[100]["samples_per_s_ci95"][1]
    )
    assert "WARM-UP-DOMINATED" in short.stdout


def test_launches_interleave_and_disagreeing_launches_get_one_more(tmp_path):
    """--repeats K overrides the profile's repeats; the launches of a model run its setups in order, then
    reversed (the baseline beside what it is compared with); a setup whose launches differ by more than the
    profile's launch_spread (0 here: any difference) is launched again, up to --max_repeats; the summary's
    intervals pool the launches. A negative count is one line and exit 1, with nothing started."""
    data = require_dataset("mnist")
    split = {"split": {"config": "cpu_1proc_model_split", "strategy": "model_split"}}
    m = matrix(tmp_path, ["cpu_1proc", split], {"batch_size": 64, "limit_train": 640})
    spec = yaml.safe_load(m.read_text())
    spec["profiles"]["t"] |= {"repeats": 3, "launch_spread": 0.0}
    m.write_text(yaml.safe_dump(spec))
    bad = subprocess.run([sys.executable, str(REPO / "bench/run.py"), "--matrix", str(m), "--profile", "t",
                          "--repeats", "-1", "--runs_dir", str(tmp_path / "runs")],
                         capture_output=True, text=True, cwd=REPO, env=child_env())  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: --repeats -1"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
    proc = start(tmp_path, "--matrix", str(m), "--profile", "t", "--data_dir", str(data),
                 "--repeats", "2", "--max_repeats", "3")  # fmt: skip
    assert proc.wait(timeout=400) == 0, (tmp_path / "bench.log").read_text()[-2000:]
    order = [(r["setup"], r["repeat"]) for r in state(tmp_path)["results"]]
    assert order == [("cpu_1proc", 0), ("split", 0), ("split", 1), ("cpu_1proc", 1),
                     ("cpu_1proc", 2), ("split", 2)], order  # fmt: skip
    assert len(records(tmp_path / "runs")) == 6
    summary = json.loads(next((tmp_path / "runs").glob("bench/*/summary.json")).read_text())
    cell = next(c for c in summary["cells"] if c["setup"] == "split")
    assert cell["finished"] == 3 and len(cell["launch_step_s"]) == 3 and cell["launches_compared"] == [3, 3]
    assert cell["speedup_ci95"][0] <= cell["speedup"] <= cell["speedup_ci95"][1]
    assert "single-launch" not in cell["flags"] and cell["verdict"] in (
        "pays off",
        "does not pay off",
        "cannot tell",
    )
    assert "verdict per model" in (tmp_path / "bench.log").read_text()


def test_one_launcher_builds_every_launch_command():
    """bench/launcher.py is the only builder of an `accelerate launch` command: bench/ and tests/ import it
    (no sys.path tricks), and no other file spells the launcher's command line or loads a script by hand."""
    import ast

    from bench import batch, launcher, project
    from tests import conftest

    assert batch.launcher is launcher and project.launcher is launcher and conftest.launcher is launcher
    cmd = launcher.command("mlp", ["--epochs", 1], config="cpu_2proc", threads=1, port=29555)
    assert cmd[: len(launcher.ACCELERATE_LAUNCH)] == launcher.ACCELERATE_LAUNCH
    assert cmd[len(launcher.ACCELERATE_LAUNCH) :] == [
        "--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", "29555",
        "--num_cpu_threads_per_process", "1", str(REPO / "scripts" / "mlp.py"), "--epochs", "1",
    ]  # fmt: skip
    assert launcher.command("mlp", [], config=None)[:2] == [sys.executable, str(REPO / "scripts" / "mlp.py")]
    assert launcher.load_script("mlp").Config().batch_size > 0
    for path in [*(REPO / "bench").glob("*.py"), *(REPO / "tests").glob("*.py")]:
        if path.name in ("launcher.py", "test_bench.py"):
            continue
        text = path.read_text()
        assert "sys.path.insert" not in text and "spec_from_file_location" not in text, path.name
        calls = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and n.value in
                 ("accelerate.commands.launch", "--main_process_port")]  # fmt: skip
        # the launcher traps (--cpu --num_processes 2, two machines on loopback) pass raw flags on purpose
        raw_ok = ("test_gpu_ready.py", "test_parallel.py", "test_scripts.py")
        assert not calls or path.name in raw_ok, path.name

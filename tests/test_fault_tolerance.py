"""Fault tolerance with real processes on real data: resume after SIGKILL, SIGTERM -> checkpoint and
`interrupted`, a dead rank does not hang the others, non-finite losses, and a catalogue of bad inputs that
must each give one clear line and leave every earlier run file untouched."""

import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bench import launcher
from shared.record import read_record, record_files
from tests.conftest import REPO, child_env, explain, launch, records, require_dataset

pytestmark = pytest.mark.slow  # real launches or a browser: `make test-fast` leaves these out

MLP = ["--limit_train", 6000, "--limit_eval", 500, "--epochs", 3, "--save_model"]


def popen(setup, script, *args, env=None):
    """A launch left running (bench/launcher.py's command): the test stops, kills or waits for it."""
    return subprocess.Popen(
        launcher.command(script, args, config=setup),
        cwd=REPO,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate, proc, timeout=120, what="condition"):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def only(runs_dir: Path) -> dict:
    (rec,) = records(runs_dir)
    return read_record(runs_dir / f"{rec['run_id']}.json")


def same_run(a_dir: Path, b_dir: Path):
    """Both runs end with the same parameters, history and test metrics (timings aside)."""
    a, b = only(a_dir), only(b_dir)
    pa = load_file(a_dir / a["run_id"] / "model.safetensors")
    pb = load_file(b_dir / b["run_id"] / "model.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert (pa[k] - pb[k]).abs().max().item() <= 1e-6, k

    def strip(rows):
        return [
            {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))}
            for r in rows
        ]  # noqa: E731

    assert strip(a["history"]) == strip(b["history"])
    ta = {k: v for k, v in a["test"].items() if k != "test/time_s"}
    tb = {k: v for k, v in b["test"].items() if k != "test/time_s"}
    assert ta == tb
    return a, b


@pytest.fixture(scope="module")
def mlp_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    proc = launch(None, "mlp", "--data_dir", require_dataset("mnist"), "--runs_dir", out, *MLP)
    assert proc.returncode == 0, explain(proc)
    return out


def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(mlp_reference, tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    runs = tmp_path / "runs"
    target = rng.randrange(3, 25) * 10  # a checkpoint step in epochs 1-3 (94 steps per epoch)
    proc = popen(
        None,
        "mlp",
        "--data_dir",
        require_dataset("mnist"),
        "--runs_dir",
        runs,
        *MLP,
        "--checkpoint_every",
        10,
    )
    wait_for(lambda: list(runs.glob(f"*/checkpoints/step-{target:08d}")), proc, what=f"checkpoint {target}")
    time.sleep(rng.uniform(0, 0.1))  # then somewhere inside the following steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: the run finished before the kill"
    killed = only(runs)
    assert killed["status"] == "running"  # kill -9: stale heartbeat, the dashboard shows it as crashed
    resumed = launch(
        None,
        "mlp",
        "--data_dir",
        require_dataset("mnist"),
        "--runs_dir",
        runs,
        *MLP,
        "--checkpoint_every",
        10,
        "--resume",
        "auto",
    )
    assert resumed.returncode == 0, explain(resumed)
    _, rec = same_run(mlp_reference, runs)
    assert rec["run_id"] == killed["run_id"] and rec["status"] == "finished"
    (event,) = [e for e in rec["events"] if e["kind"] == "resumed"]
    assert event["step"] >= target and event["previous_status"] == "running", (seed, event)
    assert len(list((runs / rec["run_id"] / "checkpoints").iterdir())) <= 2  # keep_checkpoints 2


def test_sigterm_on_two_processes_checkpoints_marks_interrupted_and_resumes(tmp_path):
    data = require_dataset("mnist")
    args = [
        "--data_dir",
        data,
        "--limit_train",
        3000,
        "--limit_eval",
        200,
        "--epochs",
        2,
        "--save_model",
        "--checkpoint_every",
        25,
    ]
    ref = launch("cpu_2proc", "mlp", "--runs_dir", tmp_path / "ref", *args)
    assert ref.returncode == 0, explain(ref)
    runs = tmp_path / "runs"
    proc = popen("cpu_2proc", "mlp", "--runs_dir", runs, *args)
    wait_for(lambda: list(runs.glob("*/checkpoints/step-00000025")), proc, what="the first checkpoint")
    proc.send_signal(signal.SIGTERM)  # to the launcher, which forwards it to both ranks
    out = proc.communicate(timeout=90)[0]
    assert proc.returncode != 0, out[-3000:]
    rec = only(runs)
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"], rec["error"]
    last = [e for e in rec["events"] if e["kind"] == "checkpoint"][-1]
    assert rec["error"].endswith(f"at step {last['step']}")  # the step it stopped at was checkpointed
    resumed = launch("cpu_2proc", "mlp", "--runs_dir", runs, *args, "--resume", rec["run_id"])
    assert resumed.returncode == 0, explain(resumed)
    same_run(tmp_path / "ref", runs)


def test_a_dead_rank_fails_the_run_within_60_s(tmp_path):
    proc = popen(
        "cpu_2proc", "mlp", "--data_dir", require_dataset("mnist"), "--runs_dir", tmp_path, "--epochs", 50
    )
    wait_for(lambda: record_files(tmp_path), proc, what="the record")
    pids = json.loads(record_files(tmp_path)[0].read_text())["setup"]["pids"]
    time.sleep(1.0)  # inside the training loop
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    out = proc.communicate(timeout=90)[0]
    took = time.monotonic() - t0
    assert proc.returncode != 0 and took < 60, (took, out[-3000:])
    rec = only(tmp_path)
    assert rec["status"] == "failed" and rec["error"].startswith("rank 0 of 2:"), rec["error"]
    assert f"rank 1 (pid {pids[1]}) exited" in rec["error"], rec["error"]  # which rank died


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_loss_stops_or_skips_the_step(mode, tmp_path):
    proc = launch(
        None,
        "mlp",
        "--data_dir",
        require_dataset("mnist"),
        "--runs_dir",
        tmp_path,
        "--limit_train",
        640,
        "--limit_eval",
        100,
        "--epochs",
        1,
        "--on_nan",
        mode,
        nan_at_batch=4,
    )
    rec = only(tmp_path)
    if mode == "stop":
        assert proc.returncode == 1 and rec["status"] == "failed", explain(proc)
        assert "non-finite training loss at step 4" in rec["error"]
        assert [e["step"] for e in rec["events"] if e["kind"] == "nonfinite_loss"] == [4]
    else:
        assert proc.returncode == 0 and rec["status"] == "finished", explain(proc)
        assert [e["step"] for e in rec["events"] if e["kind"] == "skipped_step"] == [4]
        assert (
            rec["history"][-1]["step"] == 9 and rec["history"][-1]["samples_seen"] == 640 - 64
        )  # 10 batches, 1 skipped


# ----------------------------------------------------------------------------- the bad-input catalogue


def digest(d: Path) -> dict:
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A runs/ dir holding a finished MLP run with a checkpoint, a CNN run that was killed with one, and a corrupt
    and a foreign JSON file: every bad input below runs against a copy and must leave all of it unchanged."""
    d = tmp_path_factory.mktemp("earlier")
    common = ["--limit_train", 320, "--limit_eval", 100, "--epochs", 1, "--checkpoint_every", 5]
    for script, data in (("mlp", "mnist"), ("cnn", "cifar10")):
        proc = launch(
            None, script, "--data_dir", require_dataset(data), "--runs_dir", d, *common, "--batch_size", 32
        )
        assert proc.returncode == 0, explain(proc)
    cnn = next(r for r in records(d) if r["model"] == "cnn")
    body = json.loads((d / f"{cnn['run_id']}.json").read_text())
    body.update(status="running", ended_at=None)  # as after kill -9
    (d / f"{cnn['run_id']}.json").write_text(json.dumps(body))
    (d / "garbage.json").write_text('{"schema_version": 1, "run_id": "x", ')
    (d / "foreign.json").write_text(json.dumps({"name": "somebody else's file"}))
    return d


def valid(d: Path) -> list[dict]:
    from shared.record import load_runs

    return load_runs(d)[0]


def mnist_copy(tmp_path, damage=None):
    src = require_dataset("mnist") / "mnist"
    dst = tmp_path / "data" / "mnist"
    shutil.copytree(src, dst)
    if damage:
        damage(dst)
    return tmp_path / "data"


def truncate(d):
    f = d / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:5000])


def corrupt(d):
    f = d / "train-labels-idx1-ubyte.gz"
    f.write_bytes(b"this is not gzip" * 100)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# (id, script, args (callable of tmp_path and the runs copy), needle in the one stderr line)
CATALOGUE = [
    (
        "yaml-malformed",
        "mlp",
        lambda t, r: ["--config", write(t, "a.yaml", "lr: [1, 2\nepochs: 3\n")],
        "malformed YAML",
    ),
    (
        "yaml-unknown-key",
        "mlp",
        lambda t, r: ["--config", write(t, "b.yaml", "learning_rate: 0.1\n")],
        "unknown config key 'learning_rate'",
    ),
    (
        "yaml-wrong-type",
        "mlp",
        lambda t, r: ["--config", write(t, "c.yaml", "epochs: ten\n")],
        "config key 'epochs': expected an integer",
    ),
    (
        "yaml-not-a-mapping",
        "mlp",
        lambda t, r: ["--config", write(t, "d.yaml", "- lr\n- 0.1\n")],
        "expected a mapping",
    ),
    ("yaml-missing", "mlp", lambda t, r: ["--config", t / "nope.yaml"], "no such file"),
    ("flag-unknown", "mlp", lambda t, r: ["--learning_rate", "0.1"], "unknown config key 'learning_rate'"),
    (
        "flag-wrong-type",
        "mlp",
        lambda t, r: ["--batch_size", "sixty"],
        "config key 'batch_size': expected an integer",
    ),
    (
        "flag-bad-value",
        "mlp",
        lambda t, r: ["--on_nan", "ignore"],
        "config key 'on_nan': expected one of stop, skip",
    ),
    ("flag-negative", "mlp", lambda t, r: ["--epochs", "-1"], "config key 'epochs': must be >= 1"),
    ("data-missing", "mlp", lambda t, r: ["--data", "local", "--data_dir", t / "empty"], "mnist"),
    (
        "data-truncated",
        "mlp",
        lambda t, r: ["--data_dir", mnist_copy(t, truncate)],
        "train-images-idx3-ubyte.gz",
    ),
    (
        "data-corrupt",
        "mlp",
        lambda t, r: ["--data_dir", mnist_copy(t, corrupt)],
        "train-labels-idx1-ubyte.gz",
    ),
    (
        "resume-other-model",
        "mlp",
        lambda t, r: ["--resume", next(x["run_id"] for x in valid(r) if x.get("model") == "cnn")],
        "is a cnn run, not mlp",
    ),
    (
        "resume-finished",
        "mlp",
        lambda t, r: ["--resume", next(x["run_id"] for x in valid(r) if x.get("model") == "mlp")],
        "already finished",
    ),
    ("resume-unknown", "mlp", lambda t, r: ["--resume", "mlp-20990101-000000-abcdef"], "not a run id"),
    ("resume-traversal", "mlp", lambda t, r: ["--resume", "../../../etc/passwd"], "not a run id"),
    (
        "resume-outside-runs",
        "mlp",
        lambda t, r: ["--resume", write(t, "elsewhere.json", "{}")],
        "not inside runs_dir",
    ),
    ("resume-corrupt-record", "mlp", lambda t, r: ["--resume", r / "garbage.json"], "not valid JSON"),
    (
        "resume-changed-config",
        "cnn",
        lambda t, r: ["--resume", "auto", "--lr", "0.5"],
        "config key 'lr' is 0.5",
    ),
]


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(case, earlier, tmp_path):
    name, script, make_args, needle = case
    runs = tmp_path / "runs"
    shutil.copytree(earlier, runs)
    before = digest(runs)
    (tmp_path / "empty").mkdir()
    base = ["--data_dir", require_dataset("cifar10" if script == "cnn" else "mnist"), "--runs_dir", runs]
    base += [
        "--limit_train",
        320,
        "--limit_eval",
        100,
        "--epochs",
        1,
        "--batch_size",
        32,
        "--checkpoint_every",
        5,
    ]
    proc = launch(None, script, *base, *make_args(tmp_path, runs))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], explain(proc)
    assert digest(runs) == before, f"{name}: an earlier run file changed"


def test_resume_refuses_a_checkpoint_that_is_not_plain_tensors(earlier, tmp_path):
    """Checkpoints load with weights_only=True: a pickle that would run code is refused and never runs."""
    runs = tmp_path / "runs"
    shutil.copytree(earlier, runs)
    cnn = next(r for r in valid(runs) if r.get("model") == "cnn")
    ckpt = sorted((runs / cnn["run_id"] / "checkpoints").iterdir())[-1]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "progress_rank0.pt").write_bytes(pickle.dumps(Evil()))
    proc = launch(
        None, "cnn", "--data_dir", require_dataset("cifar10"), "--runs_dir", runs, "--limit_train", 320, "--limit_eval", 100,
        "--epochs", 1, "--batch_size", 32, "--checkpoint_every", 5, "--resume", cnn["run_id"],
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "cannot load" in lines[0], explain(proc)
    assert not marker.exists()


def test_full_disk_is_one_line_and_loses_nothing(earlier, tmp_path):
    """Simulated full disk: a file-size limit makes every write of the new record fail (EFBIG)."""
    runs = tmp_path / "runs"
    shutil.copytree(earlier, runs)
    before = digest(runs)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "mlp.py"), "--data_dir", str(require_dataset("mnist")), "--runs_dir", str(runs),
         "--limit_train", "320", "--limit_eval", "100", "--epochs", "1"],
        capture_output=True, text=True, cwd=REPO, env=child_env(), preexec_fn=small_files, timeout=240,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "cannot write run record" in lines[0], explain(proc)
    assert digest(runs) == before and not list(runs.glob(".tmp-*"))


def test_the_dashboard_lists_corrupt_and_foreign_files_and_binds_localhost(earlier):
    from shared.record import load_runs

    runs, problems = load_runs(earlier)
    assert {r["model"] for r in runs} == {"mlp", "cnn"}
    assert dict(problems).keys() == {"garbage.json", "foreign.json"}
    assert "--server.address 127.0.0.1" in (REPO / "Makefile").read_text()
    assert 'address = "127.0.0.1"' in (REPO / ".streamlit" / "config.toml").read_text()

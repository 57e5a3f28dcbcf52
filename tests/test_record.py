import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shared.record import RunRecord, load_runs, read_record, record_files, validate

BODY = {
    "model": "mlp",
    "script": "scripts/mlp.py",
    "config": {"lr": 0.001},
    "setup": {
        "strategy": "single",
        "distributed_type": "NO",
        "num_processes": 1,
        "num_machines": 1,
        "devices": ["cpu"],
        "mixed_precision": "no",
        "global_batch_size": 64,
        "per_device_batch_size": 64,
    },
    "environment": {"python": "3.11", "torch": "2", "accelerate": "1", "git_commit": None, "hostname": "h"},
    "data": {
        "name": "mnist",
        "source": "local",
        "location": "data/mnist",
        "synthetic": False,
        "splits": {"train": 54000},
        "used": {"train": 54000},
    },
    "metrics": {"val/acc": {"label": "accuracy", "goal": "max"}},
    "timing": {"clocks": {"time/train_s": "training"}},
}
ROW = {
    "epoch": 1,
    "step": 10,
    "samples_seen": 640,
    "train/loss": 0.5,
    "time/train_s": 1.0,
    "time/eval_s": 0.1,
    "time/epoch_s": 1.1,
    "throughput/samples_per_s": 640.0,
    "memory/peak_gib": 0.5,
}


def test_lifecycle_is_schema_valid(tmp_path):
    rec = RunRecord(tmp_path, BODY)
    assert read_record(rec.path)["status"] == "running"
    rec.log_epoch(ROW)
    rec.end("finished", total_s=2.0)
    data = read_record(rec.path)
    assert data["status"] == "finished" and data["ended_at"] and data["history"][0]["step"] == 10
    assert validate(data) == []


def test_never_overwrites_and_ids_are_unique(tmp_path):
    ids = {RunRecord(tmp_path, BODY).run_id for _ in range(20)}
    assert len(ids) == 20 and len(list(tmp_path.glob("*.json"))) == 20


def test_nan_loss_still_valid_json(tmp_path):
    rec = RunRecord(tmp_path, BODY)
    rec.log_epoch({**ROW, "train/loss": float("nan")})
    data = read_record(rec.path)
    assert data["history"][0]["train/loss"] == "nan"


def test_schema_rejects_broken_records(tmp_path):
    rec = RunRecord(tmp_path, BODY)
    good = json.loads(rec.path.read_text())
    assert validate({**good, "status": "done"})
    assert validate({k: v for k, v in good.items() if k != "setup"})
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "renamed.json").write_text(rec.path.read_text())
    runs, problems = load_runs(tmp_path)
    assert [r["run_id"] for r in runs] == [rec.run_id]
    reasons = dict(problems)
    assert "not valid JSON" in reasons["garbage.json"]
    assert "schema_version" in reasons["foreign.json"]
    assert "does not match the file name" in reasons["renamed.json"]


WRITER = textwrap.dedent("""
    import sys
    from shared.record import RunRecord
    from tests.test_record import BODY, ROW
    rec = RunRecord(sys.argv[1], BODY)
    print(rec.run_id, flush=True)
    i = 0
    while True:
        i += 1
        rec.log_epoch({**ROW, "epoch": i, "step": i, "pad": "x" * (i % 5000)})
""")


@pytest.mark.slow
def test_killed_writer_never_leaves_a_corrupt_file(tmp_path):
    """SIGKILL a process that rewrites its record as fast as it can, at random moments, 100 times."""
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(tmp_path.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for _ in range(100):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.dirname(__file__)),
            env=env,
        )
        assert proc.stdout.readline().strip()
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    runs, problems = load_runs(tmp_path)
    assert problems == [] and len(runs) == 100 and len(record_files(tmp_path)) == 100


def test_a_record_being_written_is_not_listed(tmp_path):
    """write_replace writes .tmp-*.json then renames it; pathlib's glob("*.json") matches hidden names."""
    rec = RunRecord(tmp_path, BODY)
    (tmp_path / ".tmp-abc123.json").write_text('{"half": ')
    assert record_files(tmp_path) == [rec.path]


@pytest.mark.parametrize("status", ["finished", "failed", "interrupted"])
def test_end_states(tmp_path, status):
    rec = RunRecord(tmp_path, BODY)
    rec.end(status, 1.0, error=None if status == "finished" else "boom")
    assert read_record(rec.path)["status"] == status

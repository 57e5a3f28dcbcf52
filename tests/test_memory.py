"""Memory you can trust before you launch: the projection's memory per device against what real runs held.

The Transformer LM (the suite's largest activations per parameter), its committed profile at batch 64, trained for a
few steps with every data-parallel strategy and a pipeline; each run records memory/train_gib (what the most
loaded rank held above its memory before the model was built, read before evaluating). `make project
--validate_from` prices each run's cell and must find it within bench/validation.py's MEMORY_TOLERANCE."""

import json
import shutil
import subprocess
import sys

import pytest

from bench.validation import MEMORY_TOLERANCE, memory_within
from tests.conftest import REPO, child_env, explain, launch, require_dataset

pytestmark = pytest.mark.slow  # real launches

# the Transformer profiled at bench-strategies' batch (64) on this machine, with its collectives: nothing re-measured
PROFILE = REPO / "docs/results/2026-12-07/transformer-lm/validate/profile-vm.json"
SETUPS = {"cpu_1proc": [], "cpu_2proc": [], "cpu_2proc_fsdp": [], "cpu_2proc_pipeline": ["--strategy", "pipeline"]}  # fmt: skip


def test_predicted_memory_per_device_holds_for_every_strategy(tmp_path):
    data = require_dataset("multi30k")
    runs = tmp_path / "runs"
    for config, extra in SETUPS.items():
        proc = launch(config, "transformer_lm", "--data_dir", data, "--runs_dir", runs, "--batch_size", 64,
                      "--limit_train", 640, "--max_steps", 8, "--limit_eval", 64, "--epochs", 1, *extra)  # fmt: skip
        assert proc.returncode == 0, explain(proc)
    profile = tmp_path / "profile.json"
    shutil.copy(PROFILE, profile)
    out = tmp_path / "projection.json"
    proc = subprocess.run(
        [str(a) for a in (sys.executable, "-m", "bench.project", "--model", "transformer_lm", "--devices", "1,2",
         "--profile", profile, "--validate_from", runs, "--data_dir", data, "--runs_dir", tmp_path / "p",
         "--out", out)],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert MEMORY_TOLERANCE["text"] in proc.stdout and "profiled transformer_lm" not in proc.stdout  # cached
    rec = json.loads(out.read_text())
    # everything the profile measures was measured: AdamW rebuilt for the wrapper overheads (it refused Adam's
    # `decoupled_weight_decay` among its defaults, and DDP's and FSDP's overheads were priced as 0)
    assert not [p["assumed"] for p in rec["predictions"] if p["assumed"]]
    cells = rec["validation"]
    assert {c["strategy"] for c in cells} == {"single", "ddp", "fsdp", "pipeline"}
    for c in cells:
        measured, predicted = c["measured_memory_gib"], c["predicted_memory_gib"]
        assert measured and memory_within(predicted, measured), (c["strategy"], predicted, measured)
    # FSDP shards the state: the projection and the runs both put less on a device than DDP does
    by = {c["strategy"]: c for c in cells}
    assert by["fsdp"]["predicted_memory_gib"] < by["ddp"]["predicted_memory_gib"]

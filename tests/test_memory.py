"""Memory you can trust before you launch: the projection's memory per device against what real runs held.

The Transformer LM (the suite's largest activations per parameter), its committed profile at batch 64, trained for a
few steps with every data-parallel strategy and a pipeline; each run records memory/train_gib (what the most
loaded rank held above its memory before the model was built, read before evaluating). `make project
--validate_from` prices each run's cell and must find it within bench/validation.py's MEMORY_TOLERANCE."""

import ctypes
import ctypes.util
import json
import shutil
import subprocess
import sys

import pytest

from bench.validation import MEMORY_TOLERANCE, memory_rows, memory_within
from shared.host import heap_free_gib, trim_heap
from tests.conftest import REPO, child_env, explain, launch, require_dataset

# the Transformer profiled at bench-strategies' batch (64) on this machine, with its collectives: nothing re-measured
PROFILE = REPO / "docs/results/2026-12-07/transformer-lm/validate/profile-vm.json"
SETUPS = {"cpu_1proc": [], "cpu_2proc": [], "cpu_2proc_fsdp": [], "cpu_2proc_pipeline": ["--strategy", "pipeline"]}  # fmt: skip


@pytest.mark.slow  # real launches
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
        measured, predicted, in_use = (
            c["measured_memory_gib"],
            c["predicted_memory_gib"],
            c["in_use_memory_gib"],
        )
        assert measured and in_use is not None and in_use <= measured, (c["strategy"], measured, in_use)
        assert memory_within(predicted, measured, in_use), (c["strategy"], predicted, measured, in_use)
    # FSDP shards the state: the projection and the runs both put less on a device than DDP does
    by = {c["strategy"]: c for c in cells}
    assert by["fsdp"]["predicted_memory_gib"] < by["ddp"]["predicted_memory_gib"]


def test_the_freed_memory_the_heap_keeps_is_read():
    """Blocks freed in the middle of the heap stay there (glibc returns only its top): heap_free_gib must see
    them."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trim_heap()
    blocks = [
        libc.malloc(64 * 2**10) for _ in range(400)
    ]  # 25 MiB of 64 KiB blocks, under any mmap threshold
    before = heap_free_gib()  # after the blocks took what the heap had free
    assert before is not None  # this machine's glibc has mallinfo2
    for b in blocks[::2]:
        libc.free(b)  # every other one: holes the heap cannot return
    kept = heap_free_gib() - before
    for b in blocks[1::2]:
        libc.free(b)
    assert 11 / 1024 < kept < 14 / 1024, kept  # 200 blocks of 64 KiB = 12.5 MiB


def test_the_tolerance_judges_what_was_held_and_what_was_in_use():
    lo, hi = MEMORY_TOLERANCE["below"], MEMORY_TOLERANCE["above"]
    slack = MEMORY_TOLERANCE["slack_gib"]
    assert memory_within(1.0, 1.0) and memory_within(1.0, hi + slack)
    assert not memory_within(1.0, lo - 0.01)  # held less than predicted: the prediction is no floor
    assert not memory_within(1.0, hi + slack + 0.01)  # no in-use figure: what it held must be within
    # freed memory the heap kept (gloo's buffers): the upper bound applies to what was in use
    assert memory_within(0.26, 1.08, in_use=0.2) and not memory_within(0.26, 1.08, in_use=0.7)
    assert not memory_within(0.26, 0.2, in_use=0.2)  # in use or not, it held less than predicted
    rows = memory_rows([{"predicted_memory_gib": 0.26, "measured_memory_gib": 1.08, "in_use_memory_gib": 0.2},
                        {"predicted_memory_gib": 0.26, "measured_memory_gib": 1.08},
                        {"predicted_memory_gib": 0.26, "measured_memory_gib": None}])  # fmt: skip
    assert [r["within"] for r in rows] == ["yes", "NO"]


def test_on_cuda_both_figures_are_the_allocators(monkeypatch):
    """The CUDA path (no GPU here): the base is the bytes allocated, the training memory the allocator's peak above
    it, and the in-use figure the same (its cached free blocks are not counted)."""
    from types import SimpleNamespace

    import torch

    from shared import runtime

    acc = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(runtime, "_cuda_devices", lambda acc: [0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 5 * 2**30)
    base = runtime.training_memory_base(acc)
    assert base == {"held": 2.0}
    assert runtime.training_memory_now(acc, base) == (3.0, 3.0)
    assert runtime.training_memory_now(acc, None) is None

"""Every script, launched as a user would, on real data: 1 process and 2 cooperating processes."""

import subprocess

import pytest
import torch
from safetensors.torch import load_file

from bench import launcher
from shared.record import read_record
from tests.conftest import REPO, child_env, explain, free_port, launch, records, require_dataset

pytestmark = pytest.mark.slow  # real launches or a browser: `make test-fast` leaves these out

# script -> (dataset folder, tiny args, expected full val / test sizes, the metric keys the record declares)
SCRIPTS = {
    "mlp": ("mnist", ["--limit_train", 640, "--max_steps", 6], 6000, 10000, ["val/acc", "test/acc"]),
    "conv_autoencoder": (
        "mnist",
        ["--limit_train", 640, "--max_steps", 6],
        6000,
        10000,
        ["val/psnr", "test/psnr"],
    ),
    "cnn": ("cifar10", ["--limit_train", 640, "--max_steps", 6], 5000, 10000, ["val/acc", "test/acc"]),
    # the full 128.8M-parameter VGG11 at 32 px; evaluation limited to keep the test short on 2 cores
    "vgg11": (
        "cifar10",
        ["--limit_train", 640, "--max_steps", 6, "--image_size", 32, "--batch_size", 16, "--limit_eval", 100],
        100,
        100,
        ["val/acc", "test/acc"],
    ),
    "nbow": (
        "imdb",
        ["--limit_train", 640, "--max_steps", 6, "--batch_size", 64],
        6250,
        25000,
        ["val/acc", "test/acc"],
    ),
    # greedy decoding for BLEU is the slow part on 2 cores: evaluation limited
    "seq2seq": (
        "multi30k",
        ["--limit_train", 640, "--max_steps", 6, "--limit_eval", 100],
        100,
        100,
        ["val/ppl", "test/ppl", "test/bleu"],
    ),
    "transformer_lm": (
        "multi30k",
        ["--limit_train", 640, "--max_steps", 6, "--batch_size", 32],
        452,
        439,
        ["val/ppl", "test/ppl"],
    ),
}
SETUPS = {"cpu_1proc": 1, "cpu_2proc": 2}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script, setup, tmp_path):
    dataset, args, n_val, n_test, metrics = SCRIPTS[script]
    root = require_dataset(dataset)
    proc = launch(setup, script, "--data_dir", root, "--runs_dir", tmp_path, "--epochs", 2, *args)
    assert proc.returncode == 0, explain(proc)
    recs = records(tmp_path)
    assert len(recs) == 1, [r["run_id"] for r in recs]
    rec = read_record(tmp_path / f"{recs[0]['run_id']}.json")  # schema-validated
    world = SETUPS[setup]
    assert rec["status"] == "finished" and rec["ended_at"] and rec["error"] is None
    assert rec["setup"]["num_processes"] == world and len(rec["setup"]["devices"]) == world
    assert rec["setup"]["distributed_type"] == ("MULTI_CPU" if world > 1 else "NO")
    assert rec["setup"]["strategy"] == ("ddp" if world > 1 else "single")
    # every rank ended with bit-identical parameters
    shas = rec["setup"]["params_sha256_per_rank"]
    assert len(shas) == world and len(set(shas)) == 1
    # the whole validation and test splits were counted exactly once, across ranks
    assert rec["history"][-1]["val/n_samples"] == n_val
    assert rec["test"]["test/n_samples"] == n_test
    assert rec["data"]["source"] == "local" and rec["data"]["used"]["train"] == 640
    assert all(m in rec["metrics"] for m in metrics) and rec["primary_metric"] in rec["metrics"]
    # max_steps 6 over 2 epochs of 640 samples at the default global batch: stops in epoch 1
    assert rec["history"][-1]["step"] == 6
    assert rec["setup"]["global_batch_size"] == rec["setup"]["per_device_batch_size"] * world


def _train(setup, tmp_path, name, *extra):
    root = require_dataset("mnist")
    out = tmp_path / name
    proc = launch(
        setup,
        "mlp",
        "--data_dir",
        root,
        "--runs_dir",
        out,
        "--limit_train",
        1280,
        "--limit_eval",
        200,
        "--max_steps",
        15,
        "--augment",
        "false",
        "--select_best",
        "false",
        "--save_model",
        *extra,
    )
    assert proc.returncode == 0, explain(proc)
    (rec,) = records(out)
    return load_file(out / rec["run_id"] / "model.safetensors"), rec


def test_one_and_two_processes_reach_the_same_parameters(tmp_path):
    """Same seed, same global batch (64): DDP over 2 processes must not change the math."""
    one, r1 = _train("cpu_1proc", tmp_path, "one")
    two, r2 = _train("cpu_2proc", tmp_path, "two")
    assert r1["setup"]["global_batch_size"] == r2["setup"]["global_batch_size"] == 64
    assert r2["setup"]["per_device_batch_size"] == 32
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5, msg=f"{k} differs")
    # the comparison can fail: another seed lands elsewhere
    other, _ = _train("cpu_1proc", tmp_path, "other", "--seed", 1)
    assert max((other[k] - one[k]).abs().max().item() for k in one) > 1e-3


# Config errors are tested in-process for every script (tests/test_config.py); one launch per script proves
# the exit status, the single line and that no record is left running, on an error found after set-up began.
@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_one_line_no_running_record(script, tmp_path):
    (tmp_path / "empty").mkdir()
    args, needle = ["--data_dir", tmp_path / "empty"], "no local copy"
    runs = tmp_path / "runs"
    proc = launch(None, script, "--runs_dir", runs, *args, env=child_env())
    assert proc.returncode == 2, explain(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], explain(proc)
    assert not any(r["status"] == "running" for r in records(runs)) if runs.exists() else True


def test_launcher_world_size_mismatch_is_refused(monkeypatch):
    """Accelerator() without cpu=True under the multi-GPU launcher on a CPU box comes up as one lone process
    per rank (ENVIRONMENT.md); the guard must refuse that instead of training independent copies."""
    from types import SimpleNamespace

    from shared import runtime
    from shared.config import RunConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        runtime, "Accelerator", lambda **kw: SimpleNamespace(num_processes=1, distributed_type="NO")
    )
    cfg = RunConfig()
    cfg.batch_size = 64
    with pytest.raises(runtime.SetupError, match="WORLD_SIZE=2 .* independent copies"):
        runtime.make_accelerator(cfg)


def test_simple_launcher_multi_cpu_trap_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process: the script must say so, not train alone."""
    root = require_dataset("mnist")
    proc = subprocess.run(
        [
            *launcher.ACCELERATE_LAUNCH,
            "--cpu",
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            str(REPO / "scripts" / "mlp.py"),
            "--data_dir",
            str(root),
            "--runs_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=REPO,
    )
    assert proc.returncode != 0, explain(proc)
    assert "simple launcher started only this one" in proc.stderr
    assert records(tmp_path) == []


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_every_launch_config_is_accepted_by_accelerate(config):
    """`accelerate launch --config_file` rejects unknown keys; every shipped setup must load unchanged."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "accelerate_configs" / config))
    assert cfg.num_processes >= 1 and cfg.distributed_type


def test_gpu_config_without_cuda_fails_loudly(tmp_path):
    """A GPU setup on a machine without CUDA must not silently train on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = require_dataset("mnist")
    proc = launch("gpu_1", "mlp", "--data_dir", root, "--runs_dir", tmp_path, "--max_steps", 1)
    assert proc.returncode != 0, explain(proc)  # the script exits 2; accelerate's launcher reports 1
    assert (
        "error: the launch config assigns GPUs (CUDA_VISIBLE_DEVICES=0) but torch sees no CUDA device"
        in proc.stderr
    )
    assert records(tmp_path) == []

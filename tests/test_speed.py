"""The fast path on the CPU: the device-resident data path, fused optimizers, channels_last, bf16 autocast,
torch.compile, amortised checks, and the speed benchmark. GPU speed itself is measured by `make
bench-speed` where a GPU exists; these tests keep the same code paths working without one."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bench import launcher
from shared.device_data import DeviceLoader
from shared.record import load_runs, read_record
from tests.conftest import REPO, child_env, explain, launch, records, require_dataset


def test_device_loader_epochs_are_permutations_and_ranks_split_each_global_batch():
    split = {"x": torch.arange(103) * 10, "y": torch.arange(103)}
    full = DeviceLoader(split, 20, seed=3, device="cpu")
    ranks = [DeviceLoader(split, 20, seed=3, device="cpu", num_processes=2, process_index=r) for r in (0, 1)]
    orders = []
    for epoch in (1, 2):
        for dl in (full, *ranks):
            dl.set_epoch(epoch)
        batches = list(full)
        assert len(batches) == len(full) == 6 and [len(b["y"]) for b in batches][-1] == 3
        order = torch.cat([b["y"] for b in batches])
        assert (
            sorted(order.tolist()) == list(range(103))
            and (torch.cat([b["x"] for b in batches]) == order * 10).all()
        )
        for b, r0, r1 in zip(batches, *ranks, strict=True):  # rank 0 + rank 1 = the global batch, in order
            assert torch.equal(torch.cat([r0["y"], r1["y"]]), b["y"])
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new order every epoch
    dl = DeviceLoader(split, 20, seed=3, device="cpu", drop_last=True)
    assert len(dl) == 5 and all(len(b["y"]) == 20 for b in dl)


ARGS = ["--limit_train", 640, "--limit_eval", 100, "--epochs", 1, "--augment", "false", "--save_model"]


def run(tmp_path, setup, name, *extra):
    out = tmp_path / name
    proc = launch(setup, "mlp", "--data_dir", require_dataset("mnist"), "--runs_dir", out, *ARGS, *extra)
    assert proc.returncode == 0, explain(proc)
    (rec,) = records(out)
    return load_file(out / rec["run_id"] / "model.safetensors"), read_record(out / f"{rec['run_id']}.json")


@pytest.mark.slow
def test_device_data_path_1_and_2_processes_agree_and_record_it(tmp_path):
    one, rec1 = run(tmp_path, None, "one", "--data_on_device", "true", "--fused_optimizer", "true")
    two, rec2 = run(tmp_path, "cpu_2proc", "two", "--data_on_device", "true", "--fused_optimizer", "true")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-5)
    for rec in (rec1, rec2):
        assert rec["setup"]["data_path"] == "device" and rec["config"]["fused_optimizer"] is True
    assert rec2["history"][-1]["samples_seen"] == 640
    plain, rec = run(tmp_path, None, "plain")
    assert (
        rec["setup"]["data_path"] == "dataloader" and rec["config"]["fused_optimizer"] is False
    )  # auto on CPU


@pytest.mark.slow
def test_compile_is_timed_apart_and_does_not_change_the_run(tmp_path):
    eager, _ = run(tmp_path, None, "eager", "--data_on_device", "true")
    compiled, rec = run(tmp_path, None, "compiled", "--data_on_device", "true", "--compile", "default")
    assert rec["timing"]["compile_s"] > 0 and rec["config"]["compile"] == "default"
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bf16_autocast_and_channels_last_run_on_the_cpu(tmp_path):
    out = tmp_path / "cnn"
    proc = launch(
        None, "cnn", "--data_dir", require_dataset("cifar10"), "--runs_dir", out, "--limit_train", 256,
        "--limit_eval", 100, "--epochs", 1, "--mixed_precision", "bf16", "--channels_last", "true",
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    (rec,) = records(out)
    assert rec["setup"]["mixed_precision"] == "bf16" and rec["config"]["channels_last"] is True
    assert rec["status"] == "finished" and 0 <= rec["test"]["test/acc"] <= 1


@pytest.mark.slow
def test_amortised_checks_still_name_the_first_non_finite_step(tmp_path):
    proc = launch(
        None, "mlp", "--data_dir", require_dataset("mnist"), "--runs_dir", tmp_path, *ARGS[:6], "--check_every", 4,
        nan_at_batch=2,
    )  # fmt: skip
    (rec,) = records(tmp_path)
    assert proc.returncode == 1 and rec["status"] == "failed", explain(proc)
    assert "non-finite training loss at step 2 " in rec["error"] and rec["config"]["check_every"] == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad", [["--data_on_device", "yes"], ["--compile", "fast"], ["--mixed_precision", "fp8"]]
)
def test_bad_speed_flags_are_one_line(bad, tmp_path):
    proc = launch(None, "mlp", "--data_dir", tmp_path, "--runs_dir", tmp_path, *bad)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and bad[0][2:] in lines[0], explain(proc)


@pytest.mark.slow
def test_bench_speed_prints_ratios_and_writes_records(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "speed.py"), "--data_dir", str(require_dataset("mnist")), "--runs_dir",
         str(tmp_path), "--models", "mlp", "conv_autoencoder", "--steps", "3", "--warmup", "1", "--limit_train", "1000"],
        capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, explain(proc)
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith(("mlp ", "conv_autoencoder "))]
    assert len(rows) == 2 and all(r[3].endswith("x") and float(r[3][:-1]) > 0 for r in rows), proc.stdout
    runs, problems = load_runs(tmp_path)
    assert problems == [] and len(runs) == 4
    assert {r["tag"].split(":")[4] for r in runs} == {"speed-project", "speed-study"}
    assert all(r["history"][0]["throughput/samples_per_s"] > 0 for r in runs)


def test_seq2seq_segmented_decoder_equals_the_stepwise_one():
    """The fast decoder (teacher-forced runs in one LSTM call, one projection at the end) computes the
    tutorial's step-by-step function: same logits and gradients for random coin patterns (eval mode)."""
    from types import SimpleNamespace

    mod = launcher.load_script("seq2seq", "s2s")
    cfg = mod.Config(embedding_dim=16, hidden_dim=32)
    torch.manual_seed(0)
    model = mod.build_model(cfg, {"src_vocab_size": 50, "trg_vocab_size": 40}).eval()
    src, trg = torch.randint(0, 50, (6, 9)), torch.randint(0, 40, (6, 11))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        coins = (torch.rand(10, generator=gen) < 0.5).tolist()
        got = {}
        for stepwise in (True, False):
            model.zero_grad()
            logits = model(src, trg, coins, stepwise=stepwise)
            logits.square().mean().backward()
            got[stepwise] = SimpleNamespace(
                logits=logits.detach(), grads=[p.grad.clone() for p in model.parameters()]
            )
        torch.testing.assert_close(got[False].logits, got[True].logits, rtol=1e-5, atol=1e-6)
        for a, b in zip(got[False].grads, got[True].grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(coins) not in (0, len(coins))  # the last pattern mixed forced and free steps


@pytest.mark.parametrize("model", [m for m in launcher.builtin_scripts() if m != "transformer_lm"])
def test_speed_presets_are_valid_configs_with_a_larger_batch(model):

    from shared.config import parse_config

    mod = launcher.load_script(model, f"preset_{model}")
    cfg = parse_config(mod.Config, ["--config", str(REPO / "presets" / "speed" / f"{model}.yaml")])
    default = mod.Config()
    assert cfg.batch_size > default.batch_size and cfg.lr > default.lr and cfg.mixed_precision == "bf16"

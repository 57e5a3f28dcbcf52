"""What a review of the CUDA-only code paths found (docs/gpu.md), proven on the CPU where the CPU can show it:
each test fails on the code before its fix. The GPU itself is checked by `make gpu-check`."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from bench import launcher
from shared.augment import normalize
from shared.config import RunConfig
from shared.plan import SetupError, check_setup, launch_uses_cpu, named_strategy
from tests.conftest import BIN, REPO, child_env, explain, free_port, launch, records, require_dataset


def cfg(**kw):
    c = RunConfig()
    c.batch_size, c.eval_batch_size = 64, 64
    for k, v in kw.items():
        setattr(c, k, v)
    return c


# 1. normalize built its mean/std tensors on every batch: two blocking host-to-device copies per step on a GPU
def test_normalize_builds_its_statistics_once_per_device_and_dtype(monkeypatch):
    x = torch.rand(4, 3, 8, 8)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.6, 0.7]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(normalize(x, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), expected)
    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real, **k: made.append(a) or real(*a, **k))
    for _ in range(3):
        torch.testing.assert_close(normalize(x, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)), expected)
    assert made == []


# 2. FSDP2 cannot shard the non-contiguous weights channels_last makes
def test_fsdp_refuses_channels_last_and_auto_resolves_it_off():
    with pytest.raises(SetupError, match="channels_last true cannot be sharded"):
        check_setup(cfg(channels_last="true"), 2, fsdp_launch=True)
    check_setup(cfg(channels_last="auto"), 2, fsdp_launch=True)


def fake_accelerator(monkeypatch, *, cuda: bool, world: int = 1, mixed="no"):
    """runtime.make_accelerator with torch's CUDA answers and Accelerator() replaced: what it was asked for."""
    from shared import runtime

    asked = {}

    def accelerator(**kw):
        asked.update(kw)
        device = torch.device("cpu" if kw.get("cpu") else "cuda")
        return SimpleNamespace(
            num_processes=world, distributed_type="NO", device=device, mixed_precision=mixed, is_fsdp2=True
        )

    monkeypatch.setattr(runtime, "Accelerator", accelerator)
    monkeypatch.setattr(runtime, "install_signal_handlers", lambda: None)
    monkeypatch.setattr(runtime.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runtime.torch.cuda, "device_count", lambda: 1 if cuda else 0)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return runtime, asked


# 4. cpu_* setups on a machine with GPUs: Accelerator(cpu=False) put the ranks on the GPU
@pytest.mark.parametrize("how", ["simple launcher env", "setup file"])
def test_a_cpu_setup_runs_on_the_cpu_on_a_gpu_machine(monkeypatch, how, tmp_path):
    runtime, asked = fake_accelerator(monkeypatch, cuda=True)
    if how == "simple launcher env":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
        monkeypatch.setattr(
            runtime, "launch_config_file", lambda: REPO / "accelerate_configs" / "cpu_2proc.yaml"
        )
    c = cfg()
    runtime.make_accelerator(c)
    assert asked["cpu"] is True and c.channels_last is False and c.fused_optimizer is False  # resolved: bools
    assert c.collective_timeout_s == 60 and c.check_every == 1
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert launch_uses_cpu(REPO / "accelerate_configs" / "cpu_2proc.yaml")
    assert not launch_uses_cpu(REPO / "accelerate_configs" / "gpu_2_ddp.yaml")


# 6. a 60 s collective timeout under NCCL: a slow warm-up or checkpoint write aborts the job
def test_cuda_runs_get_a_collective_timeout_that_covers_slow_phases(monkeypatch):
    runtime, asked = fake_accelerator(monkeypatch, cuda=True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(runtime, "launch_config_file", lambda: None)
    c = cfg()
    runtime.make_accelerator(c)
    assert asked["cpu"] is False and c.collective_timeout_s == 1800 and c.channels_last is True
    c = cfg(collective_timeout_s=120)
    runtime.make_accelerator(c)
    assert c.collective_timeout_s == 120


# 3. FSDP2 + bf16 through Accelerate: bf16 parameters, reductions and outputs; BatchNorm fails
def test_fsdp_with_mixed_precision_is_refused(monkeypatch):
    runtime, _ = fake_accelerator(monkeypatch, cuda=False, world=2, mixed="bf16")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(runtime, "launch_config_file", lambda: None)
    with pytest.raises(SetupError, match="fsdp with mixed precision bf16 is not supported"):
        runtime.make_accelerator(cfg())


# 9. model_split cuda:0,cpu with bf16: the CPU stage got bf16 activations next to its fp32 weights
def test_a_cpu_stage_gets_activations_in_its_own_dtype():
    from shared.stages import split_over_devices

    class ToBf16(nn.Module):
        def forward(self, x):
            return x.to(torch.bfloat16)  # what CUDA autocast hands over at the stage boundary

    model = nn.Sequential(nn.Linear(4, 4), ToBf16(), nn.Linear(4, 3))
    split_over_devices(model, ["cpu", "cpu"], ["2"], torch.device("cpu"))
    out = model(torch.randn(5, 4))
    assert out.dtype == torch.float32 and out.shape == (5, 3)


# 10. DataLoader batches were pageable: every host-to-device copy blocked
def test_loaders_pin_memory_when_asked():
    from shared.data import make_loader

    split = {"x": torch.zeros(8, 2), "y": torch.zeros(8, dtype=torch.long)}
    assert make_loader(split, 4, True, 0, pin_memory=True).pin_memory
    assert not make_loader(split, 4, True, 0).pin_memory


# The setup file named for a strategy: cpu_2proc_pipeline.yaml alone trained DDP and recorded `ddp`
def test_setup_files_name_their_strategy():
    configs = REPO / "accelerate_configs"
    names = {p.name: named_strategy(p) for p in configs.glob("*.yaml")}
    assert names["cpu_2proc_pipeline.yaml"] == names["gpu_2_pipeline.yaml"] == "pipeline"
    assert names["cpu_4proc_hybrid.yaml"] == names["gpu_4_hybrid.yaml"] == "hybrid"
    assert names["cpu_1proc_model_split.yaml"] == names["gpu_2_model_split.yaml"] == "model_split"
    assert names["cpu_2proc.yaml"] is None and names["gpu_2_fsdp.yaml"] is None  # fsdp: Accelerate's env


@pytest.mark.slow
@pytest.mark.parametrize(
    "setup, strategy, world", [("cpu_2proc_pipeline", "pipeline", 2), ("cpu_4proc_hybrid", "hybrid", 4),
                               ("cpu_1proc_model_split", "model_split", 1)],
)  # fmt: skip
def test_the_setup_file_alone_runs_its_strategy(setup, strategy, world, tmp_path):
    root = require_dataset("mnist")
    args = [
        "--data_dir",
        root,
        "--limit_train",
        256,
        "--limit_eval",
        64,
        "--max_steps",
        2,
        "--batch_size",
        32,
    ]
    proc = launch(setup, "mlp", "--runs_dir", tmp_path, *args)
    assert proc.returncode == 0, explain(proc)
    (rec,) = records(tmp_path)
    assert rec["setup"]["strategy"] == strategy and rec["setup"]["num_processes"] == world
    assert rec["setup"]["launch_config"] == f"{setup}.yaml"
    other = launch(
        setup, "mlp", "--runs_dir", tmp_path / "b", *args, "--strategy", "ddp" if world > 1 else "single"
    )
    lines = [ln for ln in other.stderr.splitlines() if ln.strip() and "error" in ln]
    assert other.returncode != 0 and lines and f"is a {strategy} setup but --strategy" in lines[0], explain(
        other
    )


# 5. with checks amortised (--check_every 25, the CUDA default) a checkpoint could hold NaN weights
@pytest.mark.slow
def test_no_checkpoint_is_written_after_a_non_finite_loss(tmp_path):
    root = require_dataset("mnist")
    proc = launch(
        None, "mlp", "--data_dir", root, "--runs_dir", tmp_path, "--limit_train", 640, "--limit_eval", 64,
        "--check_every", 25, "--checkpoint_every", 5, "--epochs", 1, nan_at_batch=3,
    )  # fmt: skip
    (rec,) = records(tmp_path)
    assert proc.returncode == 1 and rec["status"] == "failed", explain(proc)
    assert "non-finite training loss at step 3 " in rec["error"]
    assert not list((tmp_path / rec["run_id"]).glob("checkpoints/step-*")), "a checkpoint after the NaN"


# 2 and 3, launched: one line and exit 2 where a crash with a traceback used to be
@pytest.mark.slow
@pytest.mark.parametrize(
    "script, flags, needle",
    [("cnn", ["--channels_last", "true"], "channels_last true cannot be sharded"),
     ("vgg11", ["--mixed_precision", "bf16", "--image_size", 32], "fsdp with mixed precision bf16")],
)  # fmt: skip
def test_fsdp_combinations_that_cannot_work_are_one_line(script, flags, needle, tmp_path):
    root = require_dataset("cifar10")
    proc = launch(
        "cpu_2proc_fsdp", script, "--data_dir", root, "--runs_dir", tmp_path, "--max_steps", 1, *flags
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error", "[rank"))]
    assert proc.returncode != 0 and lines and needle in lines[0], explain(proc)
    assert records(tmp_path) == []


# Launches a user would try that ask for 2 processes on this CPU: 2 cooperating ranks, or one line and exit != 0
COMBOS = {
    "accelerate --num_processes 2": ["launch", "--num_processes", "2"],
    "accelerate --multi_gpu --num_processes 2": ["launch", "--multi_gpu", "--num_processes", "2"],
    "accelerate --cpu --num_processes 2": ["launch", "--cpu", "--num_processes", "2"],
    "accelerate --cpu --multi_gpu --num_processes 2": ["launch", "--cpu", "--multi_gpu", "--num_processes", "2"],
    "cpu_2proc.yaml --num_processes 2": ["launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"],
    "cpu_1proc.yaml --num_processes 2": ["launch", "--config_file", "accelerate_configs/cpu_1proc.yaml",
                                         "--num_processes", "2"],
    "torchrun --nproc_per_node 2": None,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("combo", COMBOS)
def test_launcher_flags_give_two_cooperating_ranks_or_one_line(combo, tmp_path):
    root = require_dataset("mnist")
    args = ["--data_dir", str(root), "--runs_dir", str(tmp_path), "--limit_train", "256", "--limit_eval", "64",
            "--max_steps", "2", "--batch_size", "32"]  # fmt: skip
    port = str(free_port())
    if COMBOS[combo] is None:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    else:
        cmd = [*launcher.ACCELERATE_LAUNCH, *COMBOS[combo][1:], "--main_process_port", port]
    proc = subprocess.run(
        [*cmd, str(REPO / "scripts" / "mlp.py"), *args], capture_output=True, text=True, timeout=240,
        cwd=REPO, env=child_env(HF_HOME=str(tmp_path / "hf")),  # no default accelerate config of this machine
    )  # fmt: skip
    recs = records(tmp_path)
    if proc.returncode == 0:
        (rec,) = recs
        assert rec["setup"]["num_processes"] == 2 and rec["setup"]["strategy"] == "ddp", explain(proc)
        assert len(set(rec["setup"]["pids"])) == 2 and len(set(rec["setup"]["params_sha256_per_rank"])) == 1
    else:
        errors = {ln.split("error: ", 1)[1] for ln in proc.stderr.splitlines() if "error: " in ln}
        # ours: the same one line from each rank that got that far; or Accelerate's launcher refusing the
        # flags itself before any script runs (its ValueError, e.g. --cpu together with --multi_gpu)
        refused_by_launcher = not recs and "ValueError: You can only use one of" in proc.stderr
        assert len(errors) == 1 or refused_by_launcher, explain(proc)
        assert all(r["status"] != "running" for r in recs)


@pytest.mark.slow
def test_gpu_check_without_cuda_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"OUT={tmp_path / 'gc'}"], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=120)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device"), (
        explain(proc)
    )


BLOCKER = """import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"jsonschema", "datasets", "streamlit", "plotly"}:
            raise ImportError(f"{name} is not on the GPU image (blocked by the rehearsal)")
sys.meta_path.insert(0, Block())
"""


def rehearsal_copy(tmp_path):
    """A fresh copy of the checkout holding only what travels: the tracked files and `make gpu-check-prepare`'s
    data/; a PYTHONPATH entry that makes jsonschema, datasets, streamlit and plotly unimportable."""
    root = require_dataset("mnist")
    copy = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    prep = subprocess.run([sys.executable, str(copy / "bench/gpu_prepare.py"), "--data_dir", str(root), "--dest",
                           str(copy / "data")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert prep.returncode == 0 and "carry: ['data/mnist', 'data/imdb', 'data/multi30k']" in prep.stdout, prep
    assert not (copy / "data" / "cifar10").exists()  # 170 MB does not travel
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return copy, {**child_env(), "PYTHONPATH": str(blocker)}


def check_out(out):
    """What comes back from the device tool: at most 8 files, at most 2 folders deep."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu_check.tar.gz", "table.md"], files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)
    rows = [
        ln.split(" | ")
        for ln in (out / "table.md").read_text().splitlines()
        if ln.startswith("| ") and " | result | " not in ln
    ]
    return rows


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu(tmp_path):
    """make gpu-check's CPU rehearsal: the same entry point, from a fresh copy of only what travels, where
    jsonschema, datasets, streamlit and plotly cannot be imported, $OUT an empty folder: table.md and one
    tarball come back, every row has a status, the CUDA rows say SKIP: no CUDA, synthetic CIFAR says so."""
    copy, env = rehearsal_copy(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plumbing", "--data_dir", "data",
                           "--deadline_s", "900"], cwd=copy, capture_output=True, text=True, timeout=1200,
                          env={**env, "OUT": str(out)})  # fmt: skip
    rows = check_out(out)
    status = {r[0].lstrip("| "): r[1] for r in rows}
    assert proc.returncode == 0 and "NOT checked here" in proc.stdout, explain(proc)
    assert set(status.values()) <= {"PASS", "SKIP"} and "FAIL" not in status.values(), rows
    skipped = [r for r in rows if r[1] == "SKIP"]
    assert len(skipped) >= 18 + 6 and all(r[2] == "no CUDA" for r in skipped), skipped
    assert "steady epoch, CUDA graphs" in " ".join(
        status
    ) and "profiled one-device step vs a real run" in " ".join(status)
    assert all(
        status[f"{m}: 3 steps (CPU plumbing)"] == "PASS" for m in ("mlp", "cnn", "vgg11", "nbow", "seq2seq")
    )
    assert "SYNTHETIC data" in next(
        r[2] for r in rows if r[0].startswith("| cnn: 3 steps")
    )  # no CIFAR carried
    import tarfile

    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu_check/table.md" in names and any(n.startswith("gpu_check/logs/") for n in names)
    # a deadline nothing fits in: every row SKIP "not reached", and still the table and the tarball
    out2 = tmp_path / "out2"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plumbing", "--data_dir", "data",
                           "--deadline_s", "1", "--out", str(out2)], cwd=copy, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    rows = check_out(out2)
    assert proc.returncode == 0 and rows and all(r[1] == "SKIP" for r in rows), rows
    assert any("not reached" in r[2] for r in rows)


# 7. compile warm-up on one train batch: the last partial batch and the eval batch recompiled inside epoch 1
@pytest.mark.slow
def test_compile_warm_up_covers_every_shape_before_epoch_1(tmp_path):
    root = require_dataset("mnist")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "mlp.py"), "--data_dir", str(root), "--runs_dir", str(tmp_path),
         "--limit_train", "650", "--limit_eval", "100", "--epochs", "1", "--compile", "default"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, timeout=300,
        env=child_env(TORCH_LOGS="recompiles"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    first_epoch = next(i for i, ln in enumerate(lines) if ln.startswith("compiled (default) before epoch 1"))
    assert any(
        "Recompiling" in ln for ln in lines[:first_epoch]
    )  # the tail of 10 rows: compiled in the warm-up
    assert not any("Recompiling" in ln for ln in lines[first_epoch:]), "\n".join(lines[first_epoch:])[:3000]


def test_records_are_checked_without_jsonschema(monkeypatch, capsys):
    """A bare GPU image has no jsonschema: record checks fall back to the schema's required fields and types,
    said once."""
    from shared import record

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema -> ImportError
    monkeypatch.setattr(record, "_warned", [])
    good = json.loads(sorted((REPO / "docs/results/2026-11-29/quick-run3").glob("mlp-*.json"))[0].read_text())
    assert record.validate(good) == []
    bad = {k: v for k, v in good.items() if k != "run_id"}
    assert any("run_id" in e for e in record.validate(bad))
    assert any("history" in e for e in record.validate({**good, "history": "x"}))
    assert capsys.readouterr().err.count("jsonschema is not installed") == 1

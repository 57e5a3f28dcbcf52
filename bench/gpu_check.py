"""`make gpu-check`: every GPU check this project has, in one command of at most 8 minutes on one GPU,
writing everything into one folder and ending in a PASS/FAIL table.

One GPU only (the machine that can be lent has a single H100/H200-class GPU): multi-GPU NCCL (DDP, FSDP,
pipeline, hybrid, model_split over two GPUs) cannot be checked this way, and the output says so.

Items: versions and the device; every script on accelerate_configs/gpu_1.yaml for a few hundred steps on real
data (CIFAR-10 synthetic of the real shape where --data synthetic_cifar, labelled so in its record); the fast
path (bf16, channels_last, compile, fused optimizer, data resident on the device) with the epoch-time targets
of the speed issue beside the measured values; no host synchronisation inside a fast-path step
(torch.cuda.set_sync_debug_mode("warn")); a non-finite loss stops the run without a poisoned checkpoint and
--resume continues from the last good one; bench/speed.py with its MFU.

Needs on the GPU machine: this repository and ../shared (datasets under ../shared/data), Python with torch,
torchvision, accelerate, pyyaml, jsonschema, sacrebleu, safetensors installed (no network is used).

    python bench/gpu_check.py --data_dir ../shared/data --out gpu_check      # on a GPU machine
    python bench/gpu_check.py --plumbing --out /tmp/gc                       # the CPU test of the machinery

Without CUDA (and without --plumbing) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from shared.record import record_files  # noqa: E402

MODELS = ["mlp", "conv_autoencoder", "cnn", "vgg11", "nbow", "seq2seq"]
# The speed issue's H100 targets: seconds per full training epoch at the tutorial's batch (docs/speed-levers.md)
EPOCH_TARGET_S = {
    "mlp": 0.25,
    "conv_autoencoder": 1.0,
    "cnn": 1.2,
    "vgg11": 7.0,
    "nbow": 0.08,
    "seq2seq": 5.0,
}
FAST = ["--mixed_precision", "bf16", "--data_on_device", "auto", "--fused_optimizer", "true"]


class Check:
    def __init__(self, args):
        self.args, self.out, self.rows = args, Path(args.out), []
        self.out.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1"}  # fmt: skip

    def run(self, name: str, cmd: list[str], timeout: float) -> tuple[int, str]:
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=REPO, env=self.env, timeout=timeout
            )
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout:.0f} s"
        log.write_text(
            " ".join(cmd) + "\n\n" + (text if isinstance(text, str) else text.decode(errors="replace"))
        )
        return rc, text

    def launch(self, name, script, *flags, timeout=120, wrapper=(), runs_name=None):
        setup = "cpu_1proc" if self.args.plumbing else "gpu_1"
        runs = self.out / "runs" / (runs_name or name)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs" / f"{setup}.yaml"), *wrapper, str(REPO / "scripts" / f"{script}.py"),
               "--data_dir", self.args.data_dir, "--runs_dir", str(runs), *map(str, flags)]  # fmt: skip
        rc, text = self.run(name, cmd, timeout)
        recs = sorted(record_files(runs), key=lambda p: p.stat().st_mtime)
        return rc, text, (json.loads(recs[-1].read_text()) if recs else None)

    def item(self, name: str, ok: bool, measured: str = "", target: str = ""):
        self.rows.append((name, "PASS" if ok else "FAIL", measured, target))
        print(f"{'PASS' if ok else 'FAIL'}  {name}  {measured}  {target}".rstrip(), flush=True)


def project_gpu(c: Check, args, model: str = "mlp") -> None:
    """`make project` on this device for one model, then a real run at the profile's settings: the profiled
    one-device step against the run's steady step (a profile must not inflate what it measures)."""
    import socket

    where = c.out / "project"
    cmd = [sys.executable, str(REPO / "bench" / "project.py"), "--device", "cpu" if args.plumbing else "cuda",
           "--model", model, "--hardware", "h100-nvlink", "--devices", "1,2", "--collective_max_mb", "1",
           "--data_dir", args.data_dir, "--runs_dir", str(where)]  # fmt: skip
    rc, _ = c.run("project_profile", cmd, 300)
    try:
        rec = json.loads((where / "profiles" / f"profile-{socket.gethostname()}.json").read_text())
        prof = rec["models"][model]
    except (OSError, ValueError, KeyError):
        c.item(f"{model}: make project's profile on this device", False, f"exit {rc}, no profile")
        return
    flags = [x for k, v in prof["flags"].items() for x in (f"--{k}", str(v))]
    rc2, _, run = c.launch(f"project_real_{model}", model, *flags, "--epochs", 1)
    steady = ((run or {}).get("timing") or {}).get("steady") or {}
    profiled = prof["sizes"][str(prof["batch_size"])]["step_s"]
    if rc2 or not steady.get("step_s"):
        c.item(f"{model}: profiled one-device step vs a real run", False, f"run exit {rc2}, no steady step")
        return
    error = profiled / steady["step_s"] - 1
    c.item(f"{model}: profiled one-device step vs a real run (batch {prof['batch_size']})",
           rc == 0 and (args.plumbing or abs(error) <= 0.25),
           f"{profiled * 1e3:.3g} ms vs {steady['step_s'] * 1e3:.3g} ms ({error:+.0%})", "within 25%")  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="../shared/data")
    ap.add_argument("--out", default="gpu_check")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per script")
    ap.add_argument("--plumbing", action="store_true", help="run the machinery on the CPU with tiny settings")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.plumbing:
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it on a GPU machine"
        )
        sys.exit(2)
    if args.plumbing:
        args.steps = 3
    c, t0 = Check(args), time.perf_counter()
    tiny = ["--limit_eval", 200, "--eval_batch_size", 100] if args.plumbing else ["--limit_eval", 2000]
    device = (
        torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.plumbing else "CPU (plumbing)"
    )
    print(f"gpu-check on {device}: torch {torch.__version__}, CUDA {torch.version.cuda}; one device, so "
          "multi-GPU NCCL (ddp, fsdp, pipeline, hybrid, two-GPU model_split) is NOT checked here", flush=True)  # fmt: skip
    (c.out / "versions.txt").write_text(f"{device}\ntorch {torch.__version__}\ncuda {torch.version.cuda}\n")

    # 1. every script, a few hundred steps, on gpu_1.yaml, fp32 defaults
    for m in MODELS:
        extra = ["--image_size", 32] if m == "vgg11" else []
        rc, _, rec = c.launch(f"script_{m}", m, "--max_steps", args.steps, "--epochs", 100, *tiny, *extra)
        ok = rc == 0 and rec is not None and rec["status"] == "finished"
        c.item(f"{m}: {args.steps} steps on gpu_1.yaml", ok, rec["data"]["source"] if rec else "no record")

    # 2. the fast path: a full epoch at the tutorial's batch against the target
    for m in ["mlp", "conv_autoencoder", "cnn"]:
        flags = list(FAST)  # channels_last: auto, which is on for the conv models on CUDA
        flags += (
            [] if args.plumbing else ["--compile", "default"]
        )  # compiling on a CPU: minutes, not plumbing
        flags += ["--epochs", 1, *tiny] + (["--limit_train", 512] if args.plumbing else [])
        rc, _, rec = c.launch(f"fast_{m}", m, *flags, timeout=240)
        epoch = rec["history"][-1]["time/train_s"] if rec and rec["history"] else None
        target = EPOCH_TARGET_S[m]
        ok = rc == 0 and epoch is not None and (args.plumbing or epoch <= target)
        c.item(f"{m}: fast-path epoch (bf16, compile, fused, on-device)", ok,
               f"{epoch:.3g} s" if epoch else "-", f"target <= {target} s (H100)")  # fmt: skip

    # 3. no host synchronisation inside a fast-path step
    code = (
        "import warnings, torch, importlib.util as u\n"
        "from shared.augment import normalize\n"
        "dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')\n"
        "x = torch.randint(0, 255, (64, 1, 28, 28), dtype=torch.uint8, device=dev)\n"
        "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).to(dev)\n"
        "opt = torch.optim.Adam(m.parameters(), fused=dev.type == 'cuda')\n"
        "y = torch.zeros(64, dtype=torch.long, device=dev)\n"
        "def step():\n"
        "    loss = torch.nn.functional.cross_entropy(m(normalize(x.float() / 255, 0.1307, 0.3081)), y)\n"
        "    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)\n"
        "step()\n"
        "if dev.type == 'cuda': torch.cuda.set_sync_debug_mode('warn')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(20): step()\n"
        "print('syncs', sum('synchroniz' in str(x.message) for x in w))\n"
    )
    rc, text = c.run("sync_debug", [sys.executable, "-c", code], 120)
    syncs = next((int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("syncs ")), None)
    c.item(
        "no host sync in 20 fast-path steps (set_sync_debug_mode warn)",
        rc == 0 and syncs == 0,
        f"{syncs} syncs",
    )

    # 4. a non-finite loss: the run stops naming the step, no checkpoint holds it, --resume continues
    nan = ["--checkpoint_every", 5, "--check_every", 25, "--epochs", 1, *tiny, "--limit_train", 2000]
    rc, _, rec = c.launch("nan_stop", "mlp", *nan, wrapper=[str(REPO / "tests" / "inject_nan.py"), "12"])
    named = rec is not None and "non-finite training loss at step 12 " in (rec.get("error") or "")
    rc2, _, rec2 = c.launch("nan_resume", "mlp", *nan, "--resume", "auto", runs_name="nan_stop")
    resumed = (
        rc2 == 0
        and rec2 is not None
        and rec2["status"] == "finished"
        and rec2["run_id"] == (rec or {}).get("run_id")
    )
    c.item("NaN at step 12: stopped and named, resumed from step 10", rc != 0 and named and resumed)

    # 5. bench/speed.py with its MFU
    speed = [sys.executable, str(REPO / "bench" / "speed.py"), "--data_dir", args.data_dir, "--runs_dir",
             str(c.out / "runs" / "speed"), "--models", "mlp", "conv_autoencoder", "nbow", "--steps",
             "3" if args.plumbing else "200"]  # fmt: skip
    rc, text = c.run("bench_speed", speed, 300)
    c.item("bench/speed.py (project step vs study loop, MFU)", rc == 0, "see logs/bench_speed.log")

    # 6. make project's one-GPU profile against a real run at the same settings (docs/projection.md: compute
    # measured on the GPU where there is one)
    project_gpu(c, args)

    lines = [f"| {n} | {s} | {m} | {t} |" for n, s, m, t in c.rows]
    table = "| check | result | measured | target |\n|---|---|---|---|\n" + "\n".join(lines)
    (c.out / "table.md").write_text(f"gpu-check on {device}, {time.strftime('%Y-%m-%d')}\n\n{table}\n")
    failed = sum(s == "FAIL" for _, s, _, _ in c.rows)
    print(f"\n{len(c.rows) - failed} of {len(c.rows)} checks passed in {time.perf_counter() - t0:.0f} s; "
          f"table and logs in {c.out}/")  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

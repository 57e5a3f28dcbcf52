"""`make gpu-check`: every GPU check this project has, in one command that ends within a deadline (7 minutes by
default) on one borrowed GPU, writing `table.md` and one tarball of everything else into `--out` ($OUT).

Runs with the machine's own python3 and no virtual environment: nothing it reaches imports jsonschema, datasets,
streamlit or plotly (run records fall back to the schema's required fields, said once), and the repository root
is put in front of an inherited PYTHONPATH (carried wheels stay on it). Data: `data/` in the checkout
(`make gpu-check-prepare` builds it, with MNIST, IMDB and Multi30k); CIFAR-10 where it is, else CIFAR-shaped
synthetic data, labelled so in every record and in the table (timings only). One GPU only: multi-GPU NCCL (DDP,
FSDP, pipeline, hybrid, two-GPU model split) cannot be checked this way, and the output says so.

Rows: each script for a few hundred steps on gpu_1.yaml; per model a steady epoch (the second) in fp32 eager,
bf16 + compile and CUDA graphs (`--compile reduce-overhead`), the fast one against the speed targets
(docs/speed-levers.md); no host sync in fast-path steps; a NaN stop and resume; a GPU resume equal to an
uninterrupted run; a `cpu_*` setup launched here stays on the CPU; a one-rank FSDP run with channels_last and
with bf16; a model split over `cuda:0,cpu` in bf16; no recompiles after the warm-up; bench/speed.py with its MFU
(VGG11 at 224 px in bf16); `make project`'s one-GPU profile of every model with its projection to 2/4/8 GPUs and
the profiled step against a real run. An item the deadline does not reach is a SKIP row; without CUDA every CUDA
row is SKIP (`--plumbing` runs the machinery on the CPU with tiny settings: the CI rehearsal).

    python3 -m bench.gpu_check --data_dir data --out $OUT          # on the GPU machine, from the checkout's root
    python3 -m bench.gpu_check --plumbing --out /tmp/gc             # the CPU rehearsal

Without CUDA (and without --plumbing) it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench import launcher

REPO = launcher.REPO
MODELS = ["mlp", "conv_autoencoder", "cnn", "vgg11", "nbow", "seq2seq"]
DATASET = {"mlp": "mnist", "conv_autoencoder": "mnist", "cnn": "cifar10", "vgg11": "cifar10", "nbow": "imdb",
           "seq2seq": "multi30k"}  # fmt: skip
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
VARIANTS = {"fp32 eager": [], "bf16 + compile": [*FAST, "--compile", "default"],
            "CUDA graphs": [*FAST, "--compile", "reduce-overhead"]}  # fmt: skip


class Check:
    def __init__(self, args, cuda: bool):
        self.args, self.cuda, self.rows = args, cuda, []
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # logs, runs, profiles: one tarball at the end
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.deadline = time.monotonic() + args.deadline_s
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        # the checkout first, carried wheels after
        self.env = launcher.child_env(threads=None, PYTHONPATH=path)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def due(self, name: str, need_s: float = 20) -> bool:
        """Whether `name` still fits before the deadline; if not, its SKIP row."""
        if self.left() < need_s:
            self.row(
                name, "SKIP", f"not reached: {max(self.left(), 0):.0f} s left of {self.args.deadline_s:.0f} s"
            )
            return False
        return True

    def gpu(self, name: str) -> bool:
        """A CUDA-only row: SKIP without CUDA."""
        if not self.cuda:
            self.row(name, "SKIP", "no CUDA")
            return False
        return self.due(name)

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        timeout = max(1.0, min(timeout, self.left()))
        log = self.work / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        try:  # a process group of its own: a timeout ends the launcher's workers too
            proc = launcher.run(cmd, timeout, env={**self.env, **(env or {})})
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or "") + (e.stderr or "")
            rc, text = (
                124,
                f"{out.decode(errors='replace') if isinstance(out, bytes) else out}\ntimed out ({timeout:.0f} s)",
            )
        log.write_text(" ".join(cmd) + "\n\n" + text)
        return rc, text

    def launch(self, name, script, *flags, timeout=120, wrapper=(), runs_name=None, setup=None, env=None):
        setup = setup or ("cpu_1proc" if not self.cuda else "gpu_1")
        runs = self.work / "runs" / (runs_name or name)
        data = data_flags(self.args.data_dir, script)
        cmd = launcher.command(script, [*data, "--runs_dir", runs, *flags], config=setup, wrapper=wrapper)
        rc, text = self.run(name, cmd, timeout, env)
        recs = sorted(runs.glob("*.json"), key=lambda p: p.stat().st_mtime) if runs.is_dir() else []
        return rc, text, (json.loads(recs[-1].read_text()) if recs else None)

    def item(self, name: str, ok: bool, measured: str = "", target: str = ""):
        self.row(name, "PASS" if ok else "FAIL", measured, target)

    def row(self, name: str, status: str, measured: str = "", target: str = ""):
        self.rows.append((name, status, measured, target))
        print(f"{status}  {name}  {measured}  {target}".rstrip(), flush=True)

    def finish(self, device: str) -> int:
        """table.md into --out; everything else into --out/gpu_check.tar.gz (the machine sends back at most 8
        files, 2 folders deep: these are 2)."""
        lines = [f"| {n} | {s} | {m} | {t} |" for n, s, m, t in self.rows]
        table = "| check | result | measured | target |\n|---|---|---|---|\n" + "\n".join(lines)
        head = f"gpu-check on {device}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        (self.work / "table.md").write_text(f"{head}\n\n{table}\n")
        with tarfile.open(self.work.with_suffix(".tar.gz"), "w:gz") as tar:
            tar.add(self.work, arcname="gpu_check")
        # whole files or none: moved into --out when complete (the tarball first, the table last)
        shutil.move(self.work.with_suffix(".tar.gz"), self.out / ".gpu_check.tar.gz.part")
        os.replace(self.out / ".gpu_check.tar.gz.part", self.out / "gpu_check.tar.gz")
        (self.out / ".table.md.part").write_text(f"{head}\n\n{table}\n")
        os.replace(self.out / ".table.md.part", self.out / "table.md")
        failed = sum(s == "FAIL" for _, s, _, _ in self.rows)
        skipped = sum(s == "SKIP" for _, s, _, _ in self.rows)
        print(f"\n{len(self.rows) - failed - skipped} passed, {failed} failed, {skipped} skipped; "
              f"{self.out / 'table.md'} and {self.out / 'gpu_check.tar.gz'}")  # fmt: skip
        return 1 if failed else 0


def data_flags(data_dir: str, script: str) -> list[str]:
    """The script's data: the local copy, or for CIFAR-10 alone (170 MB does not travel) synthetic of its shape,
    labelled so; any other dataset missing fails its row (`--data local` refuses in one line)."""
    if DATASET[script] == "cifar10" and not (Path(data_dir) / "cifar10").is_dir():
        return ["--data_dir", data_dir, "--data", "synthetic"]
    return ["--data_dir", data_dir, "--data", "local"]


def synthetic(rec: dict | None) -> str:
    return " (SYNTHETIC data: timings only)" if rec and (rec.get("data") or {}).get("synthetic") else ""


def epoch_s(rec: dict | None) -> float | None:
    """The last epoch's training time (the steady one: the first pays for compilation and warm-up)."""
    hist = (rec or {}).get("history") or []
    times = [h["time/train_s"] for h in hist if h.get("time/train_s") is not None]
    return times[-1] if times else None


def scripts(c: Check, tiny: list) -> None:
    for m in MODELS:
        name = (
            f"{m}: {c.args.steps} steps on gpu_1.yaml"
            if c.cuda
            else f"{m}: {c.args.steps} steps (CPU plumbing)"
        )
        if not c.due(name):
            continue
        extra = ["--image_size", 32] if m == "vgg11" else []
        rc, _, rec = c.launch(f"script_{m}", m, "--max_steps", c.args.steps, "--epochs", 100, *tiny, *extra)
        ok = rc == 0 and rec is not None and rec["status"] == "finished"
        c.item(name, ok, (rec["data"]["source"] + synthetic(rec)) if rec else f"exit {rc}, no record")


def epochs(c: Check, tiny: list) -> None:
    """A steady epoch (the second) per model and variant; the fast ones against the targets."""
    for m in MODELS:
        for variant, flags in VARIANTS.items():
            name = f"{m}: steady epoch, {variant}"
            if not c.gpu(name):
                continue
            rc, _, rec = c.launch(
                f"epoch_{m}_{variant.split()[0]}", m, *flags, "--epochs", 2, *tiny, timeout=150
            )
            t = epoch_s(rec)
            target = EPOCH_TARGET_S[m] if variant != "fp32 eager" else None
            ok = rc == 0 and t is not None and (target is None or t <= target)
            c.item(name, ok, f"{t:.3g} s{synthetic(rec)}" if t else f"exit {rc}",
                   f"<= {target} s (H100)" if target else "")  # fmt: skip


def review(c: Check, tiny: list) -> None:
    """The one-GPU checks of docs/gpu.md's review findings."""
    name = "a cpu_* setup launched on this machine stays on the CPU"
    if c.due(name):
        rc, _, rec = c.launch("cpu_setup_stays", "mlp", "--max_steps", 3, *tiny, setup="cpu_1proc")
        devices = ((rec or {}).get("setup") or {}).get("devices") or []
        c.item(
            name,
            rc == 0 and bool(devices) and all("cuda" not in str(d) for d in devices),
            f"devices {devices}",
        )
    for what, flags in (
        ("channels_last", ["--channels_last", "true"]),
        ("bf16", ["--mixed_precision", "bf16"]),
    ):
        name = f"one-rank FSDP with {what} (cnn)"
        if c.gpu(name):
            rc, _, rec = c.launch(f"fsdp_{what}", "cnn", "--max_steps", 20, *tiny, *flags, setup="gpu_2_fsdp",
                                  wrapper=["--num_processes", "1"])  # fmt: skip
            c.item(
                name,
                rc == 0 and (rec or {}).get("status") == "finished",
                (rec or {}).get("status", f"exit {rc}"),
            )
    name = "model split over cuda:0,cpu in bf16 (mlp)"
    if c.gpu(name):
        rc, _, rec = c.launch("split_cuda_cpu", "mlp", "--max_steps", 20, *tiny, "--strategy", "model_split",
                              "--split_devices", "cuda:0,cpu", "--mixed_precision", "bf16")  # fmt: skip
        c.item(
            name, rc == 0 and (rec or {}).get("status") == "finished", (rec or {}).get("status", f"exit {rc}")
        )
    name = "no recompiles after the warm-up (mlp, TORCH_LOGS=recompiles)"
    if c.gpu(name):
        rc, text, _ = c.launch("recompiles", "mlp", "--compile", "default", "--epochs", 2, *tiny,
                               env={"TORCH_LOGS": "recompiles"})  # fmt: skip
        lines = text.splitlines()
        start = next(
            (i for i, ln in enumerate(lines) if ln.startswith("compiled (default) before epoch 1")), None
        )
        late = [ln for ln in lines[start or 0 :] if "Recompiling" in ln]
        c.item(name, rc == 0 and start is not None and not late, f"{len(late)} recompiles after the warm-up")
    name = "a resumed GPU run equals an uninterrupted one (mlp)"
    if c.gpu(name):
        base = ["--epochs", 2, "--checkpoint_every", 10, *tiny, "--limit_train", 6400, "--seed", 0]
        _, _, whole = c.launch("resume_whole", "mlp", *base)
        c.launch("resume_part", "mlp", *base, "--max_steps", 25, runs_name="resume_split")
        rc, _, resumed = c.launch("resume_rest", "mlp", *base, "--resume", "auto", runs_name="resume_split")
        a, b = [((r or {}).get("test") or {}).get("test/loss") for r in (whole, resumed)]
        same = a is not None and b is not None and abs(a - b) <= 1e-4 * max(abs(a), 1e-9)
        c.item(name, rc == 0 and same, f"test loss {a} vs {b}")


def nan_resume(c: Check, tiny: list) -> None:
    name = "NaN at step 12: stopped and named, resumed from step 10"
    if not c.due(name, 40):
        return
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
    c.item(name, rc != 0 and named and resumed)


def no_sync(c: Check) -> None:
    name = "no host sync in 20 fast-path steps (set_sync_debug_mode warn)"
    if not c.due(name):
        return
    code = (
        "import warnings, torch\n"
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
    c.item(name, rc == 0 and syncs == 0, f"{syncs} syncs")


def speed(c: Check) -> None:
    name = "bench/speed.py: project step vs study loop, MFU (VGG11 224 px bf16 on CUDA)"
    if not c.due(name, 60):
        return
    models = ["mlp", "conv_autoencoder", "nbow"] + (["vgg11"] if c.cuda else [])
    cmd = [sys.executable, "-m", "bench.speed", "--data_dir", c.args.data_dir, "--runs_dir",
           str(c.work / "runs" / "speed"), "--models", *models, "--steps", "200" if c.cuda else "3"]  # fmt: skip
    rc, text = c.run("bench_speed", cmd, 300)
    rows = [" ".join(ln.split()) for ln in text.splitlines() if ln.split() and ln.split()[0] in models]
    c.item(
        name,
        rc == 0,
        f"{rows[-1][:80]} (samples/s project, study, ratio, MFU, steps)" if rows else "see logs",
    )
    name = "bench/speed.py: each variant's peak memory is its own (reset between variants)"
    if not c.gpu(name):
        return
    peaks: dict = {}
    for path in (c.work / "runs" / "speed").glob("*.json"):
        rec = json.loads(path.read_text())
        model, variant = rec["tag"].split(":")[3:5]
        peaks.setdefault(model, {})[variant] = (rec.get("history") or [{}])[-1].get("memory/peak_gib")
    # not reset, the study variant (run second) would report max(project's, its own): never below project's
    own = [
        m
        for m, v in peaks.items()
        if None not in v.values() and v.get("speed-study") != v.get("speed-project")
    ]
    c.item(name, rc == 0 and len(own) == len(peaks) > 0,
           "; ".join(f"{m} {v.get('speed-project', 0):.2f}/{v.get('speed-study', 0):.2f} GiB" for m, v in peaks.items()))  # fmt: skip


def project(c: Check) -> None:
    """`make project` on this device: each model's one-GPU profile, projected on h100-nvlink at 2/4/8, and the
    profiled step against a real run at the profile's settings (a profile must not inflate what it measures)."""
    models = MODELS if c.cuda else ["mlp"]
    name = f"make project: one-{'GPU' if c.cuda else 'CPU'} profile of {', '.join(models)}"
    if not c.due(name, 90):
        return
    where = c.work / "project"
    cmd = [sys.executable, "-m", "bench.project", "--device", "cuda" if c.cuda else "cpu",
           "--model", ",".join(models), "--hardware", "h100-nvlink", "--devices", "1,2,4,8",
           "--collective_max_mb", "1", "--data_dir", c.args.data_dir, "--runs_dir", str(where),
           "--out", str(where / "projection.json")]  # fmt: skip
    rc, _ = c.run("project_profile", cmd, 240 if c.cuda else 300)
    try:
        rec = json.loads((where / "profiles" / f"profile-{socket.gethostname()}.json").read_text())
        proj = json.loads((where / "projection.json").read_text())
    except (OSError, ValueError):
        c.item(name, False, f"exit {rc}, no profile or projection (logs/project_profile.log)")
        return
    for m in models:
        prof = rec["models"].get(m)
        if prof is None:
            c.item(f"{m}: profiled and projected", False, "not profiled")
            continue
        preds = {p["devices"]: p for p in proj["predictions"] if p["model"] == m and p["strategy"] == "ddp"
                 and p["scaling"] == "strong"}  # fmt: skip
        step = prof["sizes"][str(prof["batch_size"])]["step_s"]
        c.item(f"{m}: profiled and projected ({preds[2]['compute_source'] if 2 in preds else '-'})", bool(preds),
               f"{step * 1e3:.3g} ms; ddp x" + "/".join(f"{preds[n]['speedup']:.2f}" for n in (2, 4, 8) if n in preds))  # fmt: skip
    m = models[0]
    name = f"{m}: profiled one-device step vs a real run"
    if not c.due(name, 30):
        return
    prof = rec["models"][m]
    flags = [x for k, v in prof["flags"].items() for x in (f"--{k}", str(v))]
    rc2, _, run = c.launch(f"project_real_{m}", m, *flags, "--epochs", 1)
    steady = ((run or {}).get("timing") or {}).get("steady") or {}
    profiled = prof["sizes"][str(prof["batch_size"])]["step_s"]
    if rc2 or not steady.get("step_s"):
        c.item(name, False, f"run exit {rc2}, no steady step")
        return
    error = profiled / steady["step_s"] - 1
    c.item(f"{name} (batch {prof['batch_size']})", not c.cuda or abs(error) <= 0.25,
           f"{profiled * 1e3:.3g} ms vs {steady['step_s'] * 1e3:.3g} ms ({error:+.0%})", "within 25%")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per script")
    ap.add_argument(
        "--deadline_s", type=float, default=420, help="the whole check ends within this (SKIP rows)"
    )
    ap.add_argument("--plumbing", action="store_true", help="run the machinery on the CPU with tiny settings")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.plumbing
    if not torch.cuda.is_available() and not args.plumbing:
        print(
            f"gpu-check: no CUDA device here (torch {torch.__version__} sees none); run it on a GPU machine"
        )
        return 2
    if args.plumbing:
        args.steps = 3
    c = Check(args, cuda)
    device = torch.cuda.get_device_name(0) if cuda else "CPU (plumbing: CUDA rows SKIP)"
    print(f"gpu-check on {device}: torch {torch.__version__}, CUDA {torch.version.cuda}; one device, so multi-GPU "
          "NCCL (ddp, fsdp, pipeline, hybrid, two-GPU model_split) is NOT checked here", flush=True)  # fmt: skip
    (c.work / "versions.txt").write_text(f"{device}\ntorch {torch.__version__}\ncuda {torch.version.cuda}\n")
    tiny = ["--limit_eval", 200, "--eval_batch_size", 100] if not cuda else ["--limit_eval", 2000]
    try:
        # the cheap and the unique first: the epochs (18 runs) take what time is left, then the speed bench
        scripts(c, tiny)
        no_sync(c)
        nan_resume(c, tiny)
        review(c, tiny)
        project(c)
        epochs(c, tiny)
        speed(c)
    except KeyboardInterrupt:
        c.row("interrupted", "SKIP", "Ctrl-C: the rest not run")
    return c.finish(device)


if __name__ == "__main__":
    sys.exit(main())

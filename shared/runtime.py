"""Process set-up, clocks, the run record wiring and a clean shutdown: what every script repeats.

The scripts keep their training loops; this module only holds plumbing nobody opens a script to learn.
"""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import resource
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate import __version__ as accelerate_version
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from shared.checkpoint import (
    STOP,
    Interrupted,
    check_compatible,
    find_resume,
    install_signal_handlers,
)
from shared.config import RunConfig, UserError, parse_config
from shared.parallel import SetupError, check_setup, launch_is_fsdp
from shared.record import RecordWriteError, RunRecord
from shared.stats import sig

REPO = Path(__file__).resolve().parent.parent

# What each clock in the record covers. Every clock is read after a device synchronize and a barrier,
# so all ranks agree on the interval.
CLOCKS = {
    "time/train_s": "one epoch of training steps on all ranks: batch fetch + host-to-device copy + augmentation + forward + backward + optimizer",
    "time/eval_s": "validation pass after the epoch (gather_for_metrics over the whole val split)",
    "time/epoch_s": "time/train_s + time/eval_s (no checkpointing)",
    "time/elapsed_s": "wall clock since the record was created, at the end of the epoch",
    "time/warmup_s": "the process's first warmup_steps optimizer steps (allocator, thread pools, optimizer state), not in the steady figures",
    "time/step_s": "median steady-state step time of the epoch (shared/meter.py: per-step clock on the main process; warm-up, each epoch's first and last step and checkpoint writes left out)",
    "throughput/steady_samples_per_s": "global batch / time/step_s",
    "steady": "the run's steady-state headline: median step time over up to 10 windows of consecutive steady steps with a bootstrap 95% interval, IQR over steps, samples/s, warm-up, and the other load on the machine (foreign_cpu_share)",
    "total_s": "wall clock from process set-up to the end of the test pass; excludes interpreter and launcher start-up",
    "test/time_s": "the final test pass",
}


# ----------------------------------------------------------------------------- set-up


def make_accelerator(cfg: RunConfig, **kwargs) -> Accelerator:
    """An Accelerator that really uses every process the launcher started, or a clear error.

    `batch_size` is the GLOBAL batch: `split_batches=True` cuts each batch across processes, so 1 and N
    processes take the same optimizer steps on the same samples (the study doubled it on 2 GPUs instead).
    """
    env = os.environ
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise SetupError("--device cuda was asked for, but torch sees no CUDA device")
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if cfg.device == "auto" and visible not in ("", "-1") and not cuda:
        raise SetupError(
            f"the launch config assigns GPUs (CUDA_VISIBLE_DEVICES={visible}) but torch sees no CUDA device; "
            "use an accelerate_configs/cpu_*.yaml setup on this machine"
        )
    if (
        "MASTER_ADDR" in env
        and "WORLD_SIZE" not in env
        and env.get("ACCELERATE_USE_CPU", "").lower() == "true"
    ):
        # accelerate's simple launcher (distributed_type: MULTI_CPU, or --cpu --num_processes N) exports
        # MASTER_ADDR for N > 1 but starts ONE process unless mpirun is used: refuse instead of training alone.
        raise SetupError(
            "this launch asked for several CPU processes through accelerate's simple launcher "
            "(distributed_type: MULTI_CPU or --cpu --num_processes N), which starts only one process without mpirun; "
            "use accelerate_configs/cpu_2proc.yaml (multi-GPU launcher with use_cpu)"
        )
    world = int(env.get("WORLD_SIZE", "1"))
    # Before anything is built: is --strategy possible with this launch? (Parallel re-checks against the model.)
    plan = check_setup(
        cfg,
        world,
        fsdp_launch=launch_is_fsdp(),
        n_gpus=torch.cuda.device_count() if cuda and cfg.device != "cpu" else 0,
    )
    extra = {}
    if cfg.mixed_precision:
        extra["mixed_precision"] = cfg.mixed_precision
    if cfg.compile:
        from accelerate.utils import TorchDynamoPlugin

        extra["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=cfg.compile)
    acc = Accelerator(
        # Without cpu=True on a machine with no CUDA, processes started by the multi-GPU launcher each come
        # up as a single non-distributed process and train as independent copies.
        cpu=cfg.device == "cpu" or not cuda,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        # A rank waiting longer than this in a collective fails instead of hanging (a peer died or hung).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))],
        **extra,
        **kwargs,
    )
    if acc.num_processes != world:
        raise SetupError(
            f"the launcher started WORLD_SIZE={world} processes but Accelerate sees {acc.num_processes} "
            f"({acc.distributed_type}); the processes would train as independent copies"
        )
    if plan.strategy == "fsdp":
        _enable_fsdp(acc)
    install_signal_handlers()  # SIGTERM / SIGINT: finish the step, checkpoint, record `interrupted`
    cuda_run = acc.device.type == "cuda"
    for key in ("channels_last", "fused_optimizer"):  # resolved here, so the record says what ran
        if getattr(cfg, key) == "auto":
            setattr(cfg, key, "true" if cuda_run else "false")
    cfg.check_every = cfg.check_every or (25 if cuda_run else 1)
    return acc


def memory_format(cfg) -> torch.memory_format:
    """channels_last (NHWC) for convolutional models when --channels_last resolved to true."""
    return torch.channels_last if cfg.channels_last == "true" else torch.contiguous_format


def compile_warmup(acc, cfg, par, model, loader, inputs, loss_fn) -> float | None:
    """With --compile: compile the train and eval graphs on the first batch before training, timed, then
    restore parameters, buffers and RNG states, so compilation is neither hidden in epoch 1 nor changes the
    run. `inputs(batch)` gives (x, y) as the training loop does. (A last, smaller batch may still recompile
    once inside an epoch.)"""
    if not cfg.compile:
        return None
    x, y = inputs(next(iter(loader)))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    t0 = synced_clock(acc)
    model.train()
    par.forward_backward(model, x, y, loss_fn)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    seconds = synced_clock(acc) - t0
    model.load_state_dict(state)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    return seconds


def _enable_fsdp(acc: Accelerator):
    """Make sure Accelerate will shard with FSDP2; on CPU, switch its FSDP plugin on by hand.

    Relies on Accelerate internals (1.15, accelerate/state.py): AcceleratorState upgrades MULTI_GPU and the
    like to FSDP when the launcher exported ACCELERATE_USE_FSDP, but never MULTI_CPU, so on a CPU the plugin is
    silently ignored and `prepare` wraps the model in DDP. Both shared states must be flipped: preparing the
    optimizer re-creates AcceleratorState from PartialState's, which would undo a one-sided flip
    (../shared/ENVIRONMENT.md, Part 2 section 4). Parallel.prepare then verifies the shards on any device.
    """
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP and acc.device.type == "cpu":
        plugin = (
            getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        )  # reads the FSDP_* env
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    if acc.distributed_type != DistributedType.FSDP or not acc.is_fsdp2:
        version = getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", None)
        raise SetupError(
            f"the launch config asks for FSDP but Accelerate set up {acc.distributed_type} "
            f"(fsdp_version {version}); this project shards with FSDP2: set fsdp_version: 2"
        )


def load_config(cls, argv=None):
    return parse_config(cls, sys.argv[1:] if argv is None else argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        if sha.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def num_machines() -> int:
    """Hosts in this launch: torchrun exports GROUP_WORLD_SIZE (the number of node groups) to every worker."""
    env = os.environ
    if "GROUP_WORLD_SIZE" in env:
        return int(env["GROUP_WORLD_SIZE"])
    return max(
        1,
        int(env.get("WORLD_SIZE", "1"))
        // max(1, int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))),
    )


def setup_info(acc: Accelerator, cfg, strategy: str | None = None, par=None, **extra) -> dict:
    """Collective: every rank must call it (device names are gathered from all ranks)."""
    devices = gather_object([str(acc.device)])
    names = gather_object([device_name(acc.device)])
    backend = getattr(acc.state, "backend", None)
    dp = par.plan.dp if par else acc.num_processes
    return {
        "strategy": strategy or ("ddp" if acc.num_processes > 1 else "single"),
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "backend": str(backend) if backend else None,
        "num_processes": acc.num_processes,
        "num_machines": num_machines(),
        "devices": devices,
        "device_names": names,
        "mixed_precision": str(acc.mixed_precision),
        "global_batch_size": cfg.batch_size,
        "per_device_batch_size": cfg.batch_size // dp,  # per data-parallel replica (pipeline stages share it)
        "mesh_shape": None,
        "microbatches": None,
        **(par.setup_info() if par else {}),
        **extra,
    }


# ----------------------------------------------------------------------------- clocks and meters


def synced_clock(acc: Accelerator) -> float:
    """perf_counter after all queued device work and all ranks are done: a clock every rank agrees on."""
    if acc.device.type == "cuda":
        torch.cuda.synchronize(acc.device)
    acc.wait_for_everyone()
    return time.perf_counter()


def reset_peak_memory(acc: Accelerator):
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)


def peak_memory_gib(acc: Accelerator) -> float:
    """Max over ranks of the peak CUDA allocation (GPU) or the process's peak RSS (CPU), in GiB."""
    if acc.device.type == "cuda":
        local = torch.cuda.max_memory_allocated(acc.device) / 2**30
    else:
        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return float(acc.gather(torch.tensor([local], device=acc.device)).max())


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_sha256(state: dict) -> str:
    """Digest of a state dict (names and bytes), to compare what ranks hold without moving the tensors."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BestCheckpoint:
    """Keep the weights of the epoch with the lowest validation loss in memory; the tutorials test those.

    Each rank copies what it holds and restores it: the full model (single, ddp, model_split), its FSDP
    shards (DTensors) or its pipeline stage. No communication; tests/test_parallel.py restores under each.
    """

    def __init__(self, enabled: bool = True):
        self.enabled, self.loss, self.epoch, self.state = enabled, float("inf"), None, None

    def update(self, val_loss: float, model: torch.nn.Module, epoch: int):
        if self.enabled and val_loss < self.loss:
            self.loss, self.epoch = val_loss, epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self, model: torch.nn.Module):
        if self.state is not None:
            model.load_state_dict(self.state)


# ----------------------------------------------------------------------------- the run


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


class Run:
    """The record of this run on the main process (a no-op elsewhere) and its console lines.

    Use as a context manager around training: an exception marks the record `failed` with its message,
    SIGTERM / Ctrl-C mark it `interrupted`; the exception is re-raised so the process exits non-zero.
    """

    def __init__(
        self,
        acc,
        cfg,
        *,
        model: str,
        script: str,
        data,
        metrics: dict,
        primary_metric: str,
        model_info: dict,
        strategy: str | None = None,
        par=None,
        **setup_extra,
    ):
        self.acc, self.cfg, self.par = acc, cfg, par
        self.meter = None  # Progress attaches its StepTimer
        self.t0 = time.perf_counter()
        if par is None and (cfg.strategy not in ("auto", "single", "ddp") or launch_is_fsdp()):
            wanted = "fsdp" if launch_is_fsdp() else cfg.strategy
            raise SetupError(
                f"this script does not support the {wanted} strategy yet (it does not use shared.parallel)"
            )
        setup = setup_info(acc, cfg, strategy, par, **setup_extra)
        setup["pids"] = self.pids = gather_object([os.getpid()])
        self.record, self.resume_from, self.run_id = None, None, ""
        if cfg.resume:
            self.resume_from = self._resume(acc, cfg, model, setup)  # the record is reopened by resumed()
        if acc.is_main_process and self.resume_from is None:
            self.record = RunRecord(
                cfg.runs_dir,
                {
                    "model": model,
                    "script": os.path.relpath(script, REPO) if os.path.isabs(script) else script,
                    "tag": cfg.tag,
                    "config": dict(vars(cfg)),
                    "setup": setup,
                    "environment": environment(),
                    "data": data.provenance(),
                    "model_info": model_info,
                    "metrics": metrics,
                    "primary_metric": primary_metric,
                    "timing": {"clocks": CLOCKS},
                },
            )
            self._started()
        if self.resume_from is None:
            self.run_id = gather_object([self.record.run_id if self.record else ""])[0]
        prov = data.provenance()
        acc.print(
            f"run {self.run_id}: {model} | {setup['strategy']} x{acc.num_processes} on {setup['devices'][0]} "
            f"({setup['device_names'][0]}) | mixed precision {setup['mixed_precision']}"
        )
        acc.print(
            f"data {prov['name']} from {prov['source']} ({prov['location']}) | used {prov['used']} of {prov['splits']}"
        )
        if prov["synthetic"]:
            acc.print("WARNING: SYNTHETIC data: shapes and throughput only, the metrics mean nothing")
        acc.print("config " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        acc.print("model " + " ".join(f"{k}={_fmt(v)}" for k, v in model_info.items()))

    def _started(self):
        self.record.start_heartbeat()
        STOP.on_stuck = lambda why: self.record.end("interrupted", self.elapsed(), error=why)

    def _resume(self, acc, cfg, model: str, setup: dict) -> Path | None:
        """Find what --resume names (main process) and check it is the same experiment. Every rank gets the
        checkpoint directory, or the same one-line error. Nothing is written yet."""
        found = None
        if acc.is_main_process:
            try:
                hit = find_resume(cfg, model)
                if hit is None:
                    found = ("none",)
                else:
                    record_path, checkpoint, record = hit
                    check_compatible(record, cfg, setup)
                    found = ("ok", str(checkpoint), str(record_path))
            except UserError as e:
                found = ("error", str(e))
        found = broadcast_object_list([found])[0]
        if found[0] == "error":
            raise UserError(found[1])
        if found[0] == "none":
            acc.print(
                f"--resume auto: no unfinished {model} run with a checkpoint in {cfg.runs_dir}; starting a new run"
            )
            return None
        self._resume_record = Path(found[2])
        self.run_id = self._resume_record.stem
        return Path(found[1])

    def resumed(self, epoch: int, step: int, checkpoint: Path):
        """Called once the checkpoint is loaded: continue the same record (main process)."""
        if self.acc.is_main_process:
            self.record = RunRecord.reopen(
                self._resume_record, epoch=epoch, step=step, checkpoint=checkpoint.name
            )
            self._started()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or self.record is None or self.record.data["status"] != "running":
            return False
        try:
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                self.record.end(
                    "interrupted", self.elapsed(), error=f"interrupted: {exc or 'KeyboardInterrupt'}"
                )
            elif not isinstance(exc, RecordWriteError):
                self.record.end("failed", self.elapsed(), error=describe_failure(exc, self.acc, self.pids))
        except OSError:
            pass  # the record cannot be written (disk full): the original error is what the user sees
        return False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def timing(self, **clocks):
        """Extra clocks for the record's `timing` block (None values are left out)."""
        if self.record:
            with self.record.lock:
                self.record.data["timing"].update({k: v for k, v in clocks.items() if v is not None})
            self.record.save()

    def event(self, kind: str, **fields):
        if self.record:
            self.record.event(kind, **fields)

    def log_epoch(self, row: dict):
        """One fixed-column console line and one history row, from the same dict."""
        steady = None
        if self.meter is not None:  # collective (every rank logs the epoch)
            self.meter.end_epoch()
            row.update(self.meter.epoch_row())
            steady = self.meter.summary(self.meter.foreign_share())
        row = {**row, "time/elapsed_s": self.elapsed()}
        self.acc.print(" | ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
        if self.record:
            if steady is not None:
                with self.record.lock:
                    self.record.data["timing"]["steady"] = steady
            self.record.log_epoch(row)

    def finish(self, test: dict, model: torch.nn.Module):
        """Collective: records the test results and proves the ranks hold the parameters they should."""
        par = self.par
        state = par.local_state_dict(model) if par else self.acc.unwrap_model(model).state_dict()
        digests = gather_object([params_sha256(state)])
        groups = par.same_params_groups() if par else [list(range(len(digests)))]
        self.acc.print(" | ".join(f"{k} {_fmt(v)}" for k, v in test.items()))
        if any(len({digests[r] for r in g}) > 1 for g in groups):
            self.acc.print(
                f"WARNING: parameters differ between ranks that should hold the same ones: {digests}"
            )
        if self.cfg.save_model:
            directory = Path(self.cfg.runs_dir) / self.run_id
            if par:
                par.save_model(model, directory)
            else:
                self.acc.save_model(
                    self.acc.unwrap_model(model, keep_torch_compile=False), directory, safe_serialization=True
                )
        if self.record:
            with self.record.lock:  # the heartbeat thread serialises the record concurrently
                self.record.data["setup"]["params_sha256_per_rank"] = digests
                self.record.data["setup"]["params_sha256_scope"] = (
                    par.digest_scope() if par else "each rank's full model"
                )
                self.record.data["test"] = test
            self.record.end("finished", self.elapsed())
        if self.meter is not None and self.acc.is_main_process:
            st = self.meter.summary(None)
            if st["steps"]:
                lo, hi = st["samples_per_s_ci95"]
                self.acc.print(
                    f"steady state: {sig(st['samples_per_s'])} samples/s (95% CI {sig(lo)}-{sig(hi)}; median of "
                    f"{len(st['windows_step_s'])} windows over {st['steps']} steps; warm-up {st['warmup_steps']} "
                    f"steps {sig(st['warmup_s'])} s)"
                    + (" WARM-UP-DOMINATED" if st["warmup_dominated"] else "")
                )
        self.acc.print(f"finished in {self.elapsed():.1f} s; record {self.cfg.runs_dir}/{self.run_id}.json")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def describe_failure(exc: BaseException, acc, pids: list[int] | None = None) -> str:
    """The record's one-line error: which rank, what, and when a collective failed, which ranks are gone
    (on one machine the ranks' pids are checked; across machines the launcher's log says)."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    where = f"rank {acc.process_index} of {acc.num_processes}: " if acc.num_processes > 1 else ""
    text = f"{where}{type(exc).__name__}: {msg}"
    dist_error = type(exc).__name__ in ("DistBackendError", "DistNetworkError") or any(
        s in msg
        for s in ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe")
    )
    if acc.num_processes > 1 and dist_error:
        gone = [f"rank {r} (pid {pid})" for r, pid in enumerate(pids or []) if not _alive(pid)]
        if gone and num_machines() == 1:
            text += f" (a collective failed: {', '.join(gone)} exited)"
        else:
            text += " (a collective failed: another rank died or stopped responding; see the launcher's log)"
    return text[:2000]


def shutdown(acc: Accelerator, par=None):
    """Release the wrapped model before the process group ends: gloo + DDP otherwise aborts at exit ~1 in 4.

    The caller must `del` its own references to the model and optimizer first; `par` drops a pipeline's
    schedule and stage.
    """
    if par is not None:
        par.close()
    acc.wait_for_everyone()
    acc.free_memory()
    gc.collect()
    acc.end_training()


def entry(main):
    """Run `main()`; bad input -> one line on stderr and exit 2; interruption -> 130/143; crash -> traceback, 1."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        main()
    except UserError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        code = 2
    except RecordWriteError as e:
        print(f"{prefix}error: {e.strerror}", file=sys.stderr, flush=True)
        code = 1
    except Interrupted as e:
        print(f"{prefix}interrupted ({e})", file=sys.stderr, flush=True)
        code = 143
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr, flush=True)
        code = 130
    except Exception:
        traceback.print_exc()
        code = 1
    else:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown on the error path: a live gloo/DDP state there can abort with SIGABRT and
    # bury the message above under launcher noise. The record is already fsynced.
    os._exit(code)

"""Process set-up and teardown: the Accelerator (refusing launches that would not do what they say), compile
warm-up, clocks and memory meters, the one-line failure report and a clean shutdown."""

from __future__ import annotations

import gc
import hashlib
import inspect
import math
import os
import resource
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from shared.config import RunConfig, UserError
from shared.host import heap_free_gib, steady_malloc, trim_heap
from shared.plan import (
    SetupError,
    adopt_named_strategy,
    check_setup,
    launch_config_file,
    launch_is_fsdp,
    launch_uses_cpu,
    named_strategy,
)
from shared.record import RecordWriteError, num_machines
from shared.signals import Interrupted, install_signal_handlers

# ----------------------------------------------------------------------------- set-up


def tracker_options(cfg: RunConfig) -> dict:
    """`--log_with`: Accelerate's `log_with` and a logging_dir under the runs dir, or a SetupError before
    anything is built. Accelerate itself drops a tracker whose package is missing with only a debug line."""
    name = cfg.log_with
    if name == "none":
        return {}
    from accelerate import tracking, utils

    if name == "all" and not tracking.get_available_trackers():
        raise SetupError(
            "--log_with all: no experiment tracker package is installed; "
            "pip install tensorboard (or pip install 'distbench[trackers]')"
        )
    if name != "all" and not getattr(utils, f"is_{name}_available")():
        raise SetupError(
            f"--log_with {name}: the {name} package is not installed; "
            f"pip install {name} (or pip install 'distbench[trackers]')"
        )
    # RunLog narrows it to <runs_dir>/trackers/<run_id> once the run has an id
    return {"log_with": name, "project_config": ProjectConfiguration(logging_dir=f"{cfg.runs_dir}/trackers")}


def make_accelerator(cfg: RunConfig, **kwargs) -> Accelerator:
    """An Accelerator that really uses every process the launcher started, or a clear error.

    `batch_size` is the GLOBAL batch: `split_batches=True` cuts each batch across processes, so 1 and N
    processes take the same optimizer steps on the same samples (the study doubled it on 2 GPUs instead).
    """
    config_file = launch_config_file()
    cuda = _check_launch(cfg, config_file)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = tracker_options(cfg)
    adopt_named_strategy(cfg, named_strategy(config_file), config_file)
    # Before anything is built: is --strategy possible with this launch? (Parallel re-checks against the model.)
    plan = check_setup(
        cfg, world, fsdp_launch=launch_is_fsdp(), n_gpus=torch.cuda.device_count() if cuda else 0
    )
    # gloo: a peer gone for a minute is dead. CUDA: compile warm-up or rank 0 writing a large checkpoint can
    # hold the others for minutes, and NCCL's watchdog aborts the process (no failure record) when it fires.
    cfg.collective_timeout_s = cfg.collective_timeout_s or (1800 if cuda else 60)
    if cfg.mixed_precision:
        extra["mixed_precision"] = cfg.mixed_precision
    if cfg.compile:
        from accelerate.utils import TorchDynamoPlugin

        extra["dynamo_plugin"] = TorchDynamoPlugin(backend="inductor", mode=cfg.compile)
    acc = Accelerator(
        # Without cpu=True on a machine with no CUDA, processes started by the multi-GPU launcher each come
        # up as a single non-distributed process and train as independent copies.
        cpu=not cuda,
        # non_blocking: with pinned host batches (shared.data.make_loader on CUDA) the copy does not block
        dataloader_config=DataLoaderConfiguration(
            split_batches=True, use_seedable_sampler=True, non_blocking=cuda
        ),
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
        if acc.mixed_precision != "no":
            # Accelerate's FSDP2 policy casts parameters (BatchNorm's too, beside fp32 running statistics),
            # reduces gradients and returns outputs in that precision: not the fp32-master autocast DDP runs.
            raise SetupError(
                f"fsdp with mixed precision {acc.mixed_precision} is not supported here (FSDP2 would reduce "
                "gradients and compute losses in it, and BatchNorm fails); use ddp for mixed precision"
            )
        _enable_fsdp(acc)
    install_signal_handlers()  # SIGTERM / SIGINT: finish the step, checkpoint, record `interrupted`
    _resolve_auto(cfg, acc.device.type == "cuda", plan.strategy)
    return acc


def _check_launch(cfg: RunConfig, config_file) -> bool:
    """Whether this process trains on CUDA; a SetupError where the launch would not do what the flags and
    the launch config say (a device it cannot use, one process where several were asked)."""
    env = os.environ
    # A cpu_* setup (use_cpu: true) runs on the CPU on every machine, GPUs or not: Accelerator(cpu=False)
    # would otherwise put its ranks on the GPUs (two ranks on one GPU: NCCL's "Duplicate GPU detected").
    pinned_cpu = launch_uses_cpu(config_file)
    if pinned_cpu and cfg.device == "cuda":
        raise SetupError("--device cuda was asked for, but the launch config is a CPU setup (use_cpu: true)")
    cuda = torch.cuda.is_available() and cfg.device != "cpu" and not pinned_cpu
    if cfg.device == "cuda" and not cuda:
        raise SetupError("--device cuda was asked for, but torch sees no CUDA device")
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if cfg.device == "auto" and visible not in ("", "-1") and not torch.cuda.is_available():
        raise SetupError(
            f"the launch config assigns GPUs (CUDA_VISIBLE_DEVICES={visible}) but torch sees no CUDA device; "
            "use an accelerate_configs/cpu_*.yaml setup on this machine"
        )
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "ACCELERATE_MIXED_PRECISION" in env:
        # Accelerate's simple launcher (`--num_processes N` without --multi_gpu or a multi-process setup file,
        # distributed_type: MULTI_CPU, or --cpu --num_processes N) exports MASTER_ADDR for N > 1 but starts
        # ONE process unless mpirun is used: refuse instead of training alone.
        raise SetupError(
            "this launch asked for several processes but Accelerate's simple launcher started only this one "
            "(--num_processes N without --multi_gpu, distributed_type: MULTI_CPU, or --cpu --num_processes N); "
            "use accelerate_configs/cpu_2proc.yaml (CPU) or --multi_gpu"
        )
    return cuda


def _resolve_auto(cfg: RunConfig, cuda_run: bool, strategy: str) -> None:
    """channels_last, fused_optimizer (`auto` to a bool) and check_every resolved for the device that runs."""
    for key in ("channels_last", "fused_optimizer"):  # resolved to a bool here, so the record says what ran
        if getattr(cfg, key) == "auto":
            # channels_last makes conv weights non-contiguous, which FSDP2 cannot shard
            setattr(cfg, key, cuda_run and not (key == "channels_last" and strategy == "fsdp"))
        else:
            setattr(cfg, key, getattr(cfg, key) in ("true", True))
    cfg.check_every = cfg.check_every or (25 if cuda_run else 1)


def _tail_rows(loader, batch_size: int, dp: int, rank: int) -> int:
    """Rows of this rank's last, partial train batch (0 if every batch is full or the last is dropped)."""
    n = getattr(loader, "n", None) or len(getattr(loader, "dataset", ()))
    tail = n % batch_size
    if not tail or getattr(loader, "drop_last", False):
        return 0
    if hasattr(loader, "n"):  # shared.device_data.DeviceLoader: tensor_split of the global batch
        return len(torch.tensor_split(torch.arange(tail), dp)[rank])
    return math.ceil(tail / dp)  # Accelerate's split_batches pads the last batch to split it evenly


def compile_warmup(acc, cfg, par, model, loader, inputs, loss_fn, eval_loader=None) -> float | None:
    """With --compile: compile every graph the run will use before training, timed, then restore parameters,
    buffers and RNG states, so compilation is neither hidden in epoch 1 nor changes the run. The shapes: a
    train step on the first batch and on the last, partial one, and evaluation on an eval batch (the eval batch
    size differs). `inputs(batch)` gives (x, y) as the training loop does."""
    if not cfg.compile:
        return None
    x, y = inputs(next(iter(loader)))
    x_eval = inputs(next(iter(eval_loader)))[0] if eval_loader is not None else x
    tail = _tail_rows(loader, cfg.batch_size, par.plan.dp, par.data_rank)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    t0 = synced_clock(acc)
    model.train()
    for rows in [len(y), tail] if tail and tail != len(y) else [len(y)]:
        par.forward_backward(model, x[:rows], y[:rows], loss_fn)
        model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        model(x_eval)
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
        # reads the FSDP_* env
        plugin = getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
        PartialState().distributed_type = DistributedType.FSDP
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    if acc.distributed_type != DistributedType.FSDP or not acc.is_fsdp2:
        version = getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", None)
        raise SetupError(
            f"the launch config asks for FSDP but Accelerate set up {acc.distributed_type} "
            f"(fsdp_version {version}); this project shards with FSDP2: set fsdp_version: 2"
        )


# ----------------------------------------------------------------------------- clocks and meters


def _cuda_devices(acc) -> list[int]:
    """Every CUDA device this process uses: its own, or all visible ones under model_split."""
    return list(range(torch.cuda.device_count())) if acc.device.type == "cuda" else []


def synced_clock(acc: Accelerator) -> float:
    """perf_counter after all queued device work (on every device this process uses: model_split may hold
    stages on several) and all ranks are done: a clock every rank agrees on."""
    for d in _cuda_devices(acc):
        torch.cuda.synchronize(d)
    acc.wait_for_everyone()
    return time.perf_counter()


def reset_peak_memory(acc: Accelerator):
    for d in _cuda_devices(acc):
        torch.cuda.reset_peak_memory_stats(d)


def peak_memory_gib(acc: Accelerator) -> tuple[float, float]:
    """(max, sum) over ranks (and over a model_split's devices) of the peak CUDA allocation, or of the
    process's peak RSS on a CPU, in GiB: what one device must hold, and what the whole job holds."""
    if acc.device.type == "cuda":
        local = max(torch.cuda.max_memory_allocated(d) for d in _cuda_devices(acc)) / 2**30
    else:
        local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    every = acc.gather(torch.tensor([local], device=acc.device))
    return float(every.max()), float(every.sum())


def training_memory_base(acc: Accelerator) -> dict | None:
    """Start counting the memory training adds, after the data is loaded and before the model is built: on CUDA
    the bytes allocated now, with the allocator's peak reset; on Linux the process's own (anonymous) resident
    memory now, with the kernel's peak ("high water mark") reset (/proc/self/clear_refs), and the freed memory
    the heap keeps (shared/host.py heap_free_gib). None where neither can be read."""
    if acc.device.type == "cuda":
        for d in _cuda_devices(acc):
            torch.cuda.reset_peak_memory_stats(d)
        return {"held": sum(torch.cuda.memory_allocated(d) for d in _cuda_devices(acc)) / 2**30}
    trim_heap()  # freed memory the heap kept would be reused by training without showing
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return {"held": _proc_status_gib("RssAnon"), "heap_free": heap_free_gib()}
    except OSError:
        return None


def training_memory_now(acc: Accelerator, base: dict | None) -> tuple[float, float] | None:
    """This rank's peak above its `base` (training_memory_base) so far, in GiB, and the same less the freed
    memory the heap kept since `base`: read before evaluating, the parameters, gradients, optimizer state,
    activations and the wrapper's buffers of training (what shared/projection.py predicts per device), and what
    the runtime allocated for them.

    The second figure is the CPU's counterpart of CUDA's allocated bytes (CUDA's own: the allocator's cached
    free blocks are not counted there either). It matters under gloo: its all-gathers and reduce-scatters
    allocate and free buffers the size of the message on its own threads, and glibc keeps the freed blocks in
    the middle of its heaps, unreturned (measured on this machine: 60 all-gathers of 25 MiB leave 0.5-0.65 GiB
    freed but held, which malloc_trim gives back; a Seq2Seq FSDP run held 0.89 GiB so after 12 steps). It is a
    lower bound of the memory in use at the peak: blocks freed after the peak count as kept."""
    if base is None:
        return None
    if acc.device.type == "cuda":
        now = sum(torch.cuda.max_memory_allocated(d) for d in _cuda_devices(acc)) / 2**30 - base["held"]
        return now, now
    # The process's own (anonymous) memory at its peak, bounded from below two ways: what it holds now (blocks up
    # to 32 MiB stay on the heap once freed: shared/host.py), and the resident peak less the file-backed pages
    # resident now (the library code training paged in, hundreds of MB of libtorch; larger blocks are returned
    # to the kernel when freed, so only the peak saw them). The second reads low when code is paged in after
    # the peak; the first misses freed large blocks.
    held = _proc_status_gib("RssAnon")
    peak = _proc_status_gib("VmHWM") - _proc_status_gib("RssFile") - _proc_status_gib("RssShmem")
    now = max(held, peak) - base["held"]
    free, free_base = heap_free_gib(), base.get("heap_free")
    kept = max(0.0, free - free_base) if free is not None and free_base is not None else 0.0
    return now, max(0.0, now - kept)


def training_memory_gib(acc: Accelerator, local: tuple[float, float] | None) -> tuple[float, float] | None:
    """The largest over the ranks of each of training_memory_now's two figures; None where they cannot be read
    (then on every rank)."""
    if local is None:
        return None
    every = acc.gather(torch.tensor([local], device=acc.device, dtype=torch.float64))
    return float(every[:, 0].max()), float(every[:, 1].max())


def _proc_status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20  # kB
    raise OSError(f"no {field} in /proc/self/status")


def optimizer_like(optimizer: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """A new optimizer of `optimizer`'s class and options over `params` (tensors or param groups): its defaults
    that the constructor takes (AdamW's include Adam's `decoupled_weight_decay`, which AdamW refuses)."""
    accepted = inspect.signature(type(optimizer)).parameters
    return type(optimizer)(params, **{k: v for k, v in optimizer.defaults.items() if k in accepted})


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_sha256(state: dict) -> str:
    """Digest of a state dict (names and bytes), to compare what ranks hold without moving the tensors."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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


def shutdown(acc: Accelerator, par):
    """Release the wrapped model before the process group ends: gloo + DDP otherwise aborts at exit ~1 in 4.
    Called by session.run once main() has returned, so the script's own model and optimizer references are gone;
    `par` drops a pipeline's schedule and stage."""
    par.close()
    acc.wait_for_everyone()
    acc.free_memory()
    gc.collect()
    acc.end_training()


def entry(main):
    """Run `main()`; bad input -> one line on stderr and exit 2; interruption -> 130/143; crash -> traceback, 1."""
    steady_malloc()  # before the first batch: the same allocator behaviour in every launch
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

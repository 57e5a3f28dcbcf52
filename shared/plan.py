"""Which strategy this launch runs, decided from the config and the launch alone, before anything is built.

A wrong combination fails in the first second with one sentence saying why (torchtitan's habit): the
strategy against the number of processes and the launch config, the stages against the model's split
points, the global batch against replicas and micro-batches. Pure: no process group, data or model needed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.config import UserError


class SetupError(UserError):
    """An impossible parallel setup: reported as one line, exit status 2, before anything is built."""


PIPELINED = ("pipeline", "hybrid")
DEFAULT_MICROBATCHES = 4  # pipeline / hybrid: enough to fill 2 stages, small enough for tiny batches


@dataclass
class Plan:
    """The resolved strategy: what every rank does, decided from the config and the launch alone."""

    strategy: str
    world: int
    dp: int = 1  # data-parallel replicas; each gets batch_size / dp samples per step
    pp: int = 1  # pipeline stages per replica (one process each)
    microbatches: int = 1
    schedule: str | None = None
    devices: list[str] = field(default_factory=list)  # model_split: one device per stage

    @property
    def stages(self) -> int:
        return self.pp if self.strategy in PIPELINED else len(self.devices) or 1

    @property
    def mesh_shape(self) -> dict | None:
        return {
            "single": None,
            "ddp": {"dp": self.world},
            "fsdp": {"dp_shard": self.world},
            "model_split": {"mp": self.stages},
            "pipeline": {"pp": self.pp},
            "hybrid": {"dp": self.dp, "pp": self.pp},
        }[self.strategy]


@functools.cache
def launch_config_file() -> Path | None:
    """The setup file of this launch (`accelerate launch --config_file X`), read from the launcher's command
    line: the worker's parent under Accelerate's launchers. None when launched otherwise (python, torchrun,
    SLURM's srun) or without /proc."""
    pid = os.getpid()
    for _ in range(2):  # the launcher, or the launcher's parent
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            return None
        launcher = any(Path(a).name == "accelerate" for a in argv[:2]) and "launch" in argv[:3]
        if not (launcher or "accelerate.commands.launch" in argv[:3]):
            continue
        for i, a in enumerate(argv):
            if a in ("--config_file", "--config-file") and i + 1 < len(argv):
                return Path(argv[i + 1])
            if a.startswith(("--config_file=", "--config-file=")):
                return Path(a.split("=", 1)[1])
        return None
    return None


def launch_uses_cpu(config_file: Path | None) -> bool:
    """The setup asks for the CPU (`use_cpu: true`). Accelerate's simple launcher exports ACCELERATE_USE_CPU;
    its multi-GPU launcher (the one that starts N cooperating CPU processes) drops it, so the file is read."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        return True
    if config_file is None:
        return False
    try:
        import yaml

        return yaml.safe_load(config_file.read_text()).get("use_cpu") is True
    except (OSError, AttributeError, ValueError):
        return False


def named_strategy(config_file: Path | None) -> str | None:
    """The strategy a setup file is named for (accelerate_configs/*_pipeline.yaml, *_hybrid.yaml,
    *_model_split.yaml): Accelerate passes nothing of a pipeline to the processes, so the name carries it."""
    if config_file is None:
        return None
    stem = config_file.stem
    return next((s for s in ("model_split", "pipeline", "hybrid") if stem.endswith(f"_{s}")), None)


def adopt_named_strategy(cfg, named: str | None, config_file: Path | None):
    """`--strategy auto` under a setup file named for a strategy runs that strategy; another explicit
    strategy is refused in one line (never a DDP run recorded under a pipeline setup's name)."""
    if named is None:
        return
    if cfg.strategy == "auto":
        cfg.strategy = named
    elif cfg.strategy != named:
        raise SetupError(
            f"the launch config {config_file.name} is a {named} setup but --strategy {cfg.strategy} was asked; "
            f"launch {cfg.strategy} with its own accelerate_configs/ file"
        )


def launch_is_fsdp() -> bool:
    """The launcher exported the FSDP plugin settings of a `distributed_type: FSDP` config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check_setup(
    cfg,
    world: int,
    *,
    fsdp_launch: bool = False,
    n_gpus: int = 0,
    split_points: list[str] | None = None,
    no_pipeline: str | None = None,
) -> Plan:
    """Resolve `cfg.strategy` for this launch, or raise SetupError with one sentence saying why it cannot work.

    Pure: reads only its arguments, so it runs before any process group, data or model exists.
    `split_points` (the script's) bounds the number of stages; None skips that check.
    """
    s = _strategy(cfg, world, fsdp_launch)
    plan = _layout(cfg, s, world)
    if s == "model_split":
        plan.devices = _split_devices(cfg, n_gpus)
    elif cfg.split_devices:
        raise SetupError(f"--split_devices only applies to --strategy model_split, not {s}")

    if split_points is not None and plan.stages > 1:
        if s in PIPELINED and no_pipeline:
            raise SetupError(f"{s} does not fit this model: {no_pipeline}")
        if plan.stages - 1 > len(split_points):
            raise SetupError(
                f"{s} needs {plan.stages} stages but this model can be cut into at most "
                f"{len(split_points) + 1} (split points {', '.join(split_points) or 'none'})"
            )

    plan.microbatches = cfg.microbatches or (DEFAULT_MICROBATCHES if s in PIPELINED else 1)
    _check_batches(cfg, plan)
    return plan


def _strategy(cfg, world: int, fsdp_launch: bool) -> str:
    """`--strategy` with auto resolved for this launch; one that cannot run on it is refused."""
    s = cfg.strategy
    if s == "auto":
        s = "fsdp" if fsdp_launch else "ddp" if world > 1 else "single"
    if fsdp_launch and s != "fsdp":
        raise SetupError(
            f"the launch config is an FSDP setup (distributed_type: FSDP) but --strategy {s} was asked; "
            f"launch {s} with its own accelerate_configs/ file"
        )
    if s == "fsdp" and getattr(cfg, "channels_last", "") in ("true", True):
        raise SetupError(
            "--channels_last true cannot be sharded: FSDP2 refuses the non-contiguous weights it makes "
            "(leave it at auto, which is off under fsdp)"
        )
    if s == "fsdp" and not fsdp_launch:
        raise SetupError(
            "--strategy fsdp takes its sharding options from an FSDP launch config; launch with "
            "accelerate_configs/cpu_2proc_fsdp.yaml or gpu_2_fsdp.yaml (distributed_type: FSDP)"
        )
    if s in ("single", "model_split") and world > 1:
        raise SetupError(
            f"--strategy {s} runs in one process but this launch started {world}; "
            f"use accelerate_configs/cpu_1proc{'_model_split' * (s == 'model_split')}.yaml"
        )
    if s in ("ddp", "fsdp", "pipeline", "hybrid") and world < 2:
        raise SetupError(
            f"--strategy {s} needs at least 2 processes but this launch started 1; "
            f"use accelerate_configs/cpu_{'4proc_hybrid' if s == 'hybrid' else f'2proc_{s}'}.yaml"
        )
    return s


def _layout(cfg, s: str, world: int) -> Plan:
    """The processes as data-parallel replicas x pipeline stages, and the pipeline's schedule."""
    plan = Plan(strategy=s, world=world)
    if s == "hybrid":
        plan.pp = cfg.pp_size or 2
        if plan.pp < 2 or world % plan.pp:
            raise SetupError(
                f"hybrid needs the {world} processes to factor into replicas x stages, "
                f"but --pp_size {plan.pp} is not a divisor >= 2 of {world}"
            )
        plan.dp = world // plan.pp
        if plan.dp < 2:
            raise SetupError(
                f"hybrid with {world} processes and --pp_size {plan.pp} leaves 1 replica; "
                "use --strategy pipeline, or launch more processes"
            )
    elif cfg.pp_size:
        raise SetupError(
            f"--pp_size only applies to --strategy hybrid (a pipeline has one stage per process), not {s}"
        )
    if s == "pipeline":
        plan.pp = world
    if s in ("ddp", "fsdp"):
        plan.dp = world

    if s in PIPELINED:
        plan.schedule = cfg.schedule or "gpipe"
    elif cfg.schedule:
        raise SetupError(f"--schedule only applies to pipeline and hybrid, not {s}")
    return plan


def _split_devices(cfg, n_gpus: int) -> list[str]:
    """model_split's devices: --split_devices, or by default two (the CPU twice, or the first two GPUs); each
    one a device this machine has."""
    devices = (
        [d.strip() for d in cfg.split_devices.split(",")]
        if cfg.split_devices
        else _default_split_devices(cfg, n_gpus)
    )
    if len(devices) < 2:
        raise SetupError(
            f"model_split needs at least 2 devices in --split_devices, got {cfg.split_devices!r}"
        )
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise SetupError(f"--split_devices: {d!r} is not a device name (e.g. cpu, cuda:0)") from None
        if dev.type == "cuda" and (dev.index or 0) >= n_gpus:
            raise SetupError(f"--split_devices names {d} but this machine has {n_gpus} CUDA device(s)")
    return devices


def _check_batches(cfg, plan: Plan) -> None:
    """1f1b needs a micro-batch per stage; the batches must split evenly over the replicas, and each
    replica's into the micro-batches."""
    if plan.schedule == "1f1b" and plan.microbatches < plan.pp:
        raise SetupError(
            f"1f1b needs at least as many micro-batches as stages ({plan.pp}), got --microbatches {plan.microbatches}"
        )
    batch = getattr(cfg, "batch_size", None)
    if batch is not None:
        if batch % plan.dp:
            raise SetupError(
                f"batch_size {batch} (global) is not divisible by {plan.dp} data-parallel processes"
            )
        if (batch // plan.dp) % plan.microbatches:
            raise SetupError(
                f"each replica's batch of {batch // plan.dp} samples does not split into "
                f"{plan.microbatches} equal micro-batches (batch_size {batch}, --microbatches {plan.microbatches})"
            )
    eval_batch = getattr(cfg, "eval_batch_size", None)
    if eval_batch is not None and eval_batch % plan.dp:
        raise SetupError(
            f"eval_batch_size {eval_batch} (global) is not divisible by {plan.dp} data-parallel processes"
        )


def _default_split_devices(cfg, n_gpus: int) -> list[str]:
    if n_gpus == 0 or cfg.device == "cpu":
        return ["cpu", "cpu"]  # both stages on the CPU: proves the code path and the equivalence, not speed
    if n_gpus == 1:
        raise SetupError(
            "model_split needs two devices but this machine has one GPU; "
            "pass --split_devices cuda:0,cpu (or cuda:0,cuda:0 to exercise the code path)"
        )
    return ["cuda:0", "cuda:1"]

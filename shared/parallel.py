"""Parallelism strategies behind one small interface, so every script trains the same way under each.

    accelerator = make_accelerator(cfg)                       # checks --strategy against the launch
    par = Parallel(accelerator, cfg, SPLIT_POINTS)            # ... and against the model, before anything is built
    model, optimizer, *loaders = par.prepare(model, optimizer, train_loader, val_loader, test_loader)
    loss = par.forward_backward(model, x, y, loss_fn)         # forward + backward of one optimizer step
    logits = model(x)                                         # evaluation; a pipeline relays it through its stages
    losses, hits = par.gather_for_metrics((losses, hits))     # whole split, each sample once
    loss_sum, seen = par.reduce_sum(torch.stack([loss_sum, seen]))

Strategies (`--strategy`, README "Strategies"):
  single       one process, one device.
  ddp          Accelerate's DistributedDataParallel (gradients bucketed and all-reduced during backward);
               `--microbatches N` accumulates N micro-batches under `accelerator.no_sync`, syncing once.
  fsdp         Accelerate's FSDP2 plugin (`fully_shard`), configured by the launch YAML. On CPU Accelerate
               ignores the plugin; runtime.make_accelerator switches it on and `prepare` verifies the shards.
  model_split  one process, the model's pieces on several devices (`--split_devices`), activations moved.
  pipeline     torch.distributed.pipelining: one stage per process, GPipe or 1F1B over `--microbatches`.
  hybrid       data parallel x pipeline on a 2-D mesh (dp, pp); stage gradients averaged over dp.

`batch_size` stays the global batch. Data-parallel replicas each get `batch_size / dp` samples, the stages
of one replica see the same samples, and micro-batches split a replica's samples. Mean losses over equal
micro-batches average to the full-batch gradient, so every strategy takes the optimizer steps one process
takes (tests/test_parallel.py checks the parameters).

Stages are cut out of the full model, which every rank builds from the same seed, so stage parameters start
equal to the one-process model's. A model is cut at the names in the script's SPLIT_POINTS: pieces of
its nn.Sequential containers (a child of a non-Sequential module is one piece). Pipelines need the model to be
an nn.Sequential (nested ones are fine); model_split works for any module (it moves activations with hooks).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import send_to_device

from shared.config import UserError
from shared.device_data import DeviceLoader


class SetupError(UserError):
    """An impossible parallel setup: reported as one line, exit status 2, before anything is built."""


PIPELINED = ("pipeline", "hybrid")
DEFAULT_MICROBATCHES = 4  # pipeline / hybrid: enough to fill 2 stages, small enough for tiny batches


# ----------------------------------------------------------------------------- validation


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
    s = cfg.strategy
    if s == "auto":
        s = "fsdp" if fsdp_launch else "ddp" if world > 1 else "single"
    if fsdp_launch and s != "fsdp":
        raise SetupError(
            f"the launch config is an FSDP setup (distributed_type: FSDP) but --strategy {s} was asked; "
            f"launch {s} with its own accelerate_configs/ file"
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

    if s == "model_split":
        plan.devices = (
            [d.strip() for d in cfg.split_devices.split(",")]
            if cfg.split_devices
            else _default_split_devices(cfg, n_gpus)
        )
        if len(plan.devices) < 2:
            raise SetupError(
                f"model_split needs at least 2 devices in --split_devices, got {cfg.split_devices!r}"
            )
        for d in plan.devices:
            try:
                dev = torch.device(d)
            except RuntimeError:
                raise SetupError(f"--split_devices: {d!r} is not a device name (e.g. cpu, cuda:0)") from None
            if dev.type == "cuda" and (dev.index or 0) >= n_gpus:
                raise SetupError(f"--split_devices names {d} but this machine has {n_gpus} CUDA device(s)")
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
    return plan


def _default_split_devices(cfg, n_gpus: int) -> list[str]:
    if n_gpus == 0 or cfg.device == "cpu":
        return ["cpu", "cpu"]  # both stages on the CPU: proves the code path and the equivalence, not speed
    if n_gpus == 1:
        raise SetupError(
            "model_split needs two devices but this machine has one GPU; "
            "pass --split_devices cuda:0,cpu (or cuda:0,cuda:0 to exercise the code path)"
        )
    return ["cuda:0", "cuda:1"]


# ----------------------------------------------------------------------------- cutting a model into stages


def pieces(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's pieces in forward order: children of every nn.Sequential (recursively), other modules whole.

    The root is always opened. For a non-Sequential root the order is registration order.
    """
    out = []

    def walk(module, prefix):
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential):
                walk(child, f"{prefix}{name}.")
            else:
                out.append((f"{prefix}{name}", child))

    walk(model, "")
    return out


def cut(model: nn.Module, split_points: list[str]) -> list[list[tuple[str, nn.Module]]]:
    """The model's pieces grouped into len(split_points) + 1 stages; each split point starts a stage."""
    named = pieces(model)
    names = [n for n, _ in named]
    unknown = [p for p in split_points if p not in names]
    if unknown:
        raise ValueError(
            f"split point(s) {unknown} are not pieces of {type(model).__name__}: {', '.join(names)}"
        )
    bounds = [0, *sorted(names.index(p) for p in split_points), len(named)]
    stages = [named[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    for i, stage in enumerate(stages):
        if not any(p.requires_grad for _, m in stage for p in m.parameters()):
            raise SetupError(
                f"stage {i} (from {stage[0][0] if stage else 'nothing'}) would have no trainable parameters "
                f"with split points {', '.join(split_points)}; train more layers or use fewer stages"
            )
    return stages


def stage_module(stage: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """An nn.Sequential running `stage`'s pieces in order, with the full model's parameter names
    (nested containers are recreated), so its state_dict is a slice of the full model's."""
    root = nn.Sequential()
    for qualified, module in stage:
        *path, leaf = qualified.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Sequential())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    return root


def _stage_summary(stage, device, ranks=None) -> dict:
    return {
        "first": stage[0][0],
        "last": stage[-1][0],
        "params": sum(p.numel() for _, m in stage for p in m.parameters()),
        "device": str(device),
        **({"ranks": ranks} if ranks is not None else {}),
    }


def _split(t, n):
    """`n` chunks along dim 0 of a tensor, or of each tensor in a tuple."""
    if isinstance(t, tuple):
        return list(zip(*(torch.tensor_split(u, n) for u in t), strict=True))
    return torch.tensor_split(t, n)


def _rows(t) -> int:
    return len(t[0] if isinstance(t, tuple) else t)


class PipelineModel(nn.Module):
    """This rank's pipeline stage. Training goes through `Parallel.forward_backward` (the schedule);
    calling it in eval mode relays the batch through all stages and returns the model's output on every
    stage of the replica, so evaluation code reads like the single-process one."""

    def __init__(self, stage: nn.Sequential, par: Parallel):
        super().__init__()
        self.stage = stage
        self._par = par

    def forward(self, x):
        if self.training:
            raise RuntimeError("a pipeline stage trains through Parallel.forward_backward, not model(x)")
        return self._par._relay(self.stage, x)


# ----------------------------------------------------------------------------- the strategies at run time


class Parallel:
    """One object per run; see the module docstring for the calls a script makes."""

    def __init__(
        self,
        accelerator,
        cfg,
        split_points: list[str] | tuple[str, ...] = (),
        *,
        no_pipeline: str | None = None,
    ):
        self.acc, self.split_points = accelerator, list(split_points)
        n_gpus = torch.cuda.device_count() if accelerator.device.type == "cuda" else 0
        self.plan = check_setup(
            cfg,
            accelerator.num_processes,
            fsdp_launch=launch_is_fsdp(),
            n_gpus=n_gpus,
            split_points=self.split_points,
            no_pipeline=no_pipeline,
        )
        self.strategy = self.plan.strategy
        self.pipelined = self.strategy in PIPELINED
        self.stages: list[dict] = []
        self.fsdp_shards: dict = {}
        self._schedule = self._stage = self._loss_fn = None
        self.dp_rank, self.pp_rank = (accelerator.process_index if self.plan.dp > 1 else 0), 0
        if self.pipelined:
            if getattr(cfg, "compile", ""):
                raise SetupError(
                    f"--compile is not supported with {self.strategy} (its stages bypass Accelerate)"
                )
            if accelerator.mixed_precision != "no":
                raise SetupError(
                    f"{self.strategy} runs in fp32 here; the launch config asks for mixed precision "
                    f"{accelerator.mixed_precision}"
                )
            from torch.distributed.device_mesh import init_device_mesh

            # Ranks are laid out replica-major: stages of one replica are neighbours (rank = dp_rank * pp + pp_rank).
            self.mesh = init_device_mesh(
                accelerator.device.type, (self.plan.dp, self.plan.pp), mesh_dim_names=("dp", "pp")
            )
            self.dp_rank, self.pp_rank = self.mesh.get_local_rank("dp"), self.mesh.get_local_rank("pp")
            self.dp_group, self.pp_group = self.mesh["dp"].get_group(), self.mesh["pp"].get_group()
            self.pp_ranks = dist.get_process_group_ranks(self.pp_group)

    # -- what the record says about this strategy

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def is_last_stage(self) -> bool:
        return not self.pipelined or self.pp_rank == self.plan.pp - 1

    @property
    def data_rank(self) -> int:
        """Which data shard this rank trains on: seed per-rank augmentation with it, so pipeline stages agree."""
        return self.dp_rank

    def setup_info(self) -> dict:
        info = {
            "strategy": self.strategy,
            "mesh_shape": self.plan.mesh_shape,
            "microbatches": self.plan.microbatches,
            "schedule": self.plan.schedule,
            "data_parallel_size": self.plan.dp,
            "stages": self.stages or None,
        }
        if self.fsdp_shards:
            info["fsdp_shards"] = self.fsdp_shards
        if self.pipelined:
            info["train_drop_last"] = (
                "a pipeline needs equal micro-batches every step, so the last partial train "
                "batch of each epoch is dropped"
            )
            info["eval_note"] = (
                "evaluation runs each batch through the stages in turn (no micro-batching), output broadcast to all stages"
            )
        return info

    # -- prepare

    def prepare(self, model, optimizer, *loaders):
        """Like `accelerator.prepare(model, optimizer, *loaders)`, per strategy. The first loader is the train loader."""
        acc, s = self.acc, self.strategy
        # A DeviceLoader (shared/device_data.py) is already on the device and sharded by the plan: kept as is.
        device_train = loaders[0] if loaders and isinstance(loaders[0], DeviceLoader) else None
        if device_train is not None:
            loaders = loaders[1:]
        if s in ("single", "ddp", "fsdp"):
            model, optimizer, *loaders = acc.prepare(model, optimizer, *loaders)
            if s == "fsdp":
                self.fsdp_shards = self._verify_fsdp(model)
        elif s == "model_split":
            model = self._split_over_devices(model)
            # device_placement=False: prepare would otherwise move every stage back onto one device.
            model = acc.prepare_model(model, device_placement=False)
            optimizer = acc.prepare_optimizer(optimizer, device_placement=False)
            loaders = [acc.prepare_data_loader(dl) for dl in loaders]
        else:
            model, optimizer, *loaders = self._prepare_pipeline(
                model, optimizer, loaders, device_train is None
            )
        return (model, optimizer, *([device_train] if device_train is not None else []), *loaders)

    def _split_over_devices(self, model):
        devices = [torch.device(d) for d in self.plan.devices]
        stages = cut(model, self.split_points[: len(devices) - 1])
        model.to(
            devices[0]
        )  # anything outside the pieces (e.g. parameters of a non-Sequential root) stays with stage 0
        for stage, device in zip(stages, devices, strict=True):
            for _, module in stage:
                module.to(device)
            # The activation crosses devices here (and autograd carries its gradient back).
            stage[0][1].register_forward_pre_hook(
                lambda m, args, kwargs, device=device: (
                    send_to_device(args, device),
                    send_to_device(kwargs, device),
                ),
                with_kwargs=True,
            )
        # Outputs come back to the device the targets are on, so the caller's loss and metrics code is unchanged.
        out_device = self.acc.device
        model.register_forward_hook(lambda m, args, out: send_to_device(out, out_device))
        self.stages = [_stage_summary(st, d) for st, d in zip(stages, devices, strict=True)]
        return model

    def _prepare_pipeline(self, model, optimizer, loaders, first_is_train: bool = True):
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"{self.strategy} needs an nn.Sequential model, got {type(model).__name__}")
        stages = cut(model, self.split_points[: self.plan.pp - 1])
        pp = self.plan.pp
        self.stages = [
            _stage_summary(st, self.acc.device, [d * pp + i for d in range(self.plan.dp)])
            for i, st in enumerate(stages)
        ]
        mine = stage_module(stages[self.pp_rank]).to(self.acc.device)
        # The optimizer keeps its class, options and param groups, restricted to this stage's parameters.
        keep = {id(p) for p in mine.parameters()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [p for p in g["params"] if id(p) in keep],
            }
            for g in optimizer.param_groups
        ]
        optimizer = type(optimizer)([g for g in groups if g["params"]], **optimizer.defaults)
        loaders = [
            self._pipeline_loader(dl, drop_last=first_is_train and i == 0) for i, dl in enumerate(loaders)
        ]
        return (PipelineModel(mine, self), optimizer, *loaders)

    def _pipeline_loader(self, loader, drop_last: bool):
        """Shard over the dp dimension only: the stages of one replica iterate the same batches."""
        if drop_last and not loader.drop_last:
            loader = torch.utils.data.DataLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=loader.sampler,
                collate_fn=loader.collate_fn,
                num_workers=loader.num_workers,
                drop_last=True,
            )
        return prepare_data_loader(
            loader,
            self.acc.device,
            num_processes=self.plan.dp,
            process_index=self.dp_rank,
            split_batches=True,
            put_on_device=True,
            rng_types=[],
            use_seedable_sampler=True,
        )

    def _verify_fsdp(self, model) -> dict:
        """Every parameter must be a DTensor shard of the expected local shape: no silent fallback to DDP.
        Returns {name: {"global": shape, "local": [shape per rank]}} for the record."""
        from accelerate.utils import gather_object
        from torch.distributed.tensor import DTensor, Shard

        world, rank, local = self.acc.num_processes, self.acc.process_index, {}
        for name, p in model.named_parameters():
            if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),):
                raise SetupError(
                    f"FSDP was asked for but parameter {name} is not sharded ({type(p).__name__}, "
                    f"{getattr(p, 'placements', None)}); Accelerate fell back to {self.acc.distributed_type}"
                )
            rows, chunk = (
                p.shape[0],
                math.ceil(p.shape[0] / world),
            )  # fully_shard splits dim 0 like torch.chunk
            expected = [max(0, min(chunk, rows - rank * chunk)), *p.shape[1:]]
            if list(p.to_local().shape) != expected:
                raise SetupError(
                    f"FSDP parameter {name}: local shard {list(p.to_local().shape)} on rank {rank}, "
                    f"expected {expected} of {list(p.shape)}"
                )
            local[name] = list(p.to_local().shape)
        per_rank = gather_object([local])
        return {
            name: {"global": list(p.shape), "local": [r[name] for r in per_rank]}
            for name, p in model.named_parameters()
        }

    # -- training

    def forward_backward(self, model, x, y, loss_fn):
        """Forward and backward of one optimizer step on this rank's batch; returns the mean loss (detached).

        `x` is the model's input (a tuple for several arguments), `y` what `loss_fn(output, y)` compares with;
        micro-batches split dim 0 of both. On a pipeline stage other than the last the loss is 0:
        `reduce_sum` counts only last stages.
        """
        if self.pipelined:
            return self._pipeline_step(model, x, y, loss_fn)
        n = self.plan.microbatches
        parts = (
            [(x, y)] if n == 1 else [p for p in zip(_split(x, n), _split(y, n), strict=True) if _rows(p[1])]
        )
        total = torch.zeros((), device=self.acc.device)
        for i, (xi, yi) in enumerate(parts):
            # Gradient accumulation: no all-reduce / reduce-scatter until the last micro-batch.
            with contextlib.nullcontext() if i == len(parts) - 1 else self.acc.no_sync(model):
                out = model(*xi) if isinstance(xi, tuple) else model(xi)
                loss = loss_fn(out, yi) * (_rows(yi) / _rows(y))  # weights sum to 1: the full-batch mean
                self.acc.backward(loss)
            total += loss.detach()
        return total

    def _pipeline_step(self, model, x, y, loss_fn):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if self._schedule is None:
            self._stage = PipelineStage(
                model.stage,
                stage_index=self.pp_rank,
                num_stages=self.plan.pp,
                device=self.acc.device,
                group=self.pp_group,
            )
            cls = ScheduleGPipe if self.plan.schedule == "gpipe" else Schedule1F1B
            # scale_grads (default): gradients are divided by the micro-batch count, i.e. mean losses average.
            self._schedule, self._loss_fn = (
                cls(self._stage, n_microbatches=self.plan.microbatches, loss_fn=loss_fn),
                loss_fn,
            )
        elif loss_fn is not self._loss_fn:
            raise ValueError("forward_backward: a pipeline schedule is built for one loss function")
        losses = []
        if self.pp_rank == 0:
            self._schedule.step(x)
        elif self.is_last_stage:
            self._schedule.step(target=y, losses=losses)
        else:
            self._schedule.step()
        if self.plan.dp > 1:
            self._all_reduce_grads(model.stage)
            self._broadcast_buffers(model.stage)
        if losses:
            return torch.stack([loss.detach() for loss in losses]).mean()
        return torch.zeros((), device=self.acc.device)

    def _all_reduce_grads(self, module):
        """Average this stage's gradients over the replicas: one flat all_reduce (a single bucket) per step.
        Not DDP: DDP under a GPipe schedule fails at step 2, and static_graph=True is silently wrong
        (../shared/ENVIRONMENT.md, Part 2)."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.plan.dp
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    def _broadcast_buffers(self, module):
        """Replica 0's buffers (BatchNorm running statistics) win, as DDP's broadcast_buffers does."""
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if buffers:
            flat = torch._utils._flatten_dense_tensors(buffers)
            dist.broadcast(flat, src=self.pp_rank, group=self.dp_group)  # global rank of replica 0's stage
            for b, synced in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers), strict=True):
                b.copy_(synced)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold distinct samples' results: all ranks, or the last stage of each replica."""
        if not self.pipelined:
            return self.acc.reduce(t, "sum")
        t = t.clone() if self.is_last_stage else torch.zeros_like(t)
        dist.all_reduce(t)
        return t

    # -- evaluation

    def gather_for_metrics(self, data):
        """`accelerator.gather_for_metrics` over the data-parallel dimension only (pipeline stages hold copies)."""
        if not self.pipelined:
            return self.acc.gather_for_metrics(data)
        if self.plan.dp == 1:
            return data
        if isinstance(data, (tuple, list)):
            return type(data)(self.gather_for_metrics(d) for d in data)
        parts = [torch.empty_like(data) for _ in range(self.plan.dp)]
        dist.all_gather(parts, data.contiguous(), group=self.dp_group)
        out = torch.cat(parts)
        state = (
            self.acc.gradient_state
        )  # set by the prepared loader, as for Accelerate's own gather_for_metrics
        if state.end_of_dataloader and state.remainder > 0:
            out = out[: state.remainder]  # the last batch was padded with samples from the start
        return out

    _DTYPES = (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.bool,
    )

    def _relay(self, stage: nn.Module, x):
        """Forward one batch through the stages in turn (no micro-batching), then broadcast the last stage's
        output to every stage of the replica. Any batch size works: shapes travel in a small header."""
        first, last = self.pp_rank == 0, self.is_last_stage
        if not first:
            x = self._recv(self.pp_ranks[self.pp_rank - 1])
        out = stage(x)
        if not last:
            self._send(out, self.pp_ranks[self.pp_rank + 1])
        header = torch.zeros(8, dtype=torch.int64, device=self.acc.device)
        if last:
            header[0], header[1], header[2 : 2 + out.dim()] = (
                out.dim(),
                self._DTYPES.index(out.dtype),
                torch.tensor(out.shape),
            )
        dist.broadcast(header, src=self.pp_ranks[-1], group=self.pp_group)
        if not last:
            out = torch.empty(
                header[2 : 2 + header[0]].tolist(), dtype=self._DTYPES[header[1]], device=self.acc.device
            )
        dist.broadcast(out.contiguous() if last else out, src=self.pp_ranks[-1], group=self.pp_group)
        return out

    def _send(self, t, dst):
        header = torch.zeros(8, dtype=torch.int64, device=self.acc.device)
        header[0], header[1], header[2 : 2 + t.dim()] = (
            t.dim(),
            self._DTYPES.index(t.dtype),
            torch.tensor(t.shape),
        )
        dist.send(header, dst)
        dist.send(t.contiguous(), dst)

    def _recv(self, src):
        header = torch.zeros(8, dtype=torch.int64, device=self.acc.device)
        dist.recv(header, src)
        t = torch.empty(
            header[2 : 2 + header[0]].tolist(), dtype=self._DTYPES[header[1]], device=self.acc.device
        )
        dist.recv(t, src)
        return t

    # -- the end of a run

    def local_state_dict(self, model) -> dict:
        """What this rank holds, in the full model's names: the whole model (all-gathered under FSDP) or its stage."""
        if self.pipelined:
            return model.stage.state_dict()
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # Parameters only: FSDP leaves buffers (BatchNorm statistics) unsynchronised, one copy per rank.
            names = {n for n, _ in model.named_parameters()}
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            return {k: v for k, v in full.items() if k in names}
        return self.acc.unwrap_model(model).state_dict()

    def digest_scope(self) -> str:
        return {
            "fsdp": "the full model's parameters, all-gathered on each rank (buffers stay per rank)",
            "pipeline": "each rank's stage (ranks differ by design)",
            "hybrid": "each rank's stage; replicas of a stage must match",
        }.get(self.strategy, "each rank's full model")

    def same_params_groups(self) -> list[list[int]]:
        """Ranks whose `local_state_dict` must be identical."""
        if self.pipelined:
            return [[d * self.plan.pp + i for d in range(self.plan.dp)] for i in range(self.plan.pp)]
        return [list(range(self.acc.num_processes))]

    def save_model(self, model, directory):
        """The full model in the one-process layout (`model.safetensors`, same names) for every strategy."""
        if not self.pipelined:  # without torch.compile's wrapper, so the names match an eager model's
            self.acc.save_model(
                self.acc.unwrap_model(model, keep_torch_compile=False), directory, safe_serialization=True
            )
            return
        from safetensors.torch import save_file

        mine = {k: v.detach().cpu() for k, v in model.stage.state_dict().items()} if self.dp_rank == 0 else {}
        parts = [None] * self.acc.num_processes if self.acc.is_main_process else None
        dist.gather_object(mine, parts, dst=0)
        if self.acc.is_main_process:
            full = {k: v.contiguous() for part in parts for k, v in part.items()}
            os.makedirs(directory, exist_ok=True)
            save_file(full, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        self.acc.wait_for_everyone()

    def close(self):
        """Drop the pipeline schedule and stage before the process group ends (gloo aborts at exit otherwise)."""
        self._schedule = self._stage = self._loss_fn = None
        gc.collect()

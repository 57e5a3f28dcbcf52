"""Parallelism strategies behind one small interface (the dispatcher), so every script trains the same way
under each. Scripts reach it through shared/session.py; the seams are separate modules:
shared/plan.py (which strategy, validated before anything is built), shared/stages.py (cutting a model at its
SPLIT_POINTS, model_split's placement), shared/pipeline.py (pipeline schedules, relay, replica sync).

Strategies (`--strategy`, docs/strategies.md):
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
"""

from __future__ import annotations

import contextlib
import math

import torch

from shared.device_data import DeviceLoader
from shared.plan import PIPELINED, SetupError, check_setup, launch_is_fsdp
from shared.stages import split_over_devices


def _split(t, n):
    """`n` chunks along dim 0 of a tensor, or of each tensor in a tuple."""
    if isinstance(t, tuple):
        return list(zip(*(torch.tensor_split(u, n) for u in t), strict=True))
    return torch.tensor_split(t, n)


def _rows(t) -> int:
    return len(t[0] if isinstance(t, tuple) else t)


class Parallel:
    """One object per run; see the module docstring for the calls a script makes (through Session)."""

    def __init__(self, accelerator, cfg, split_points=(), *, no_pipeline: str | None = None):
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
        self.pipeline = None
        self.data_rank = accelerator.process_index if self.plan.dp > 1 else 0  # seeds per-rank augmentation
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
            from shared.pipeline import Pipeline

            self.pipeline = Pipeline(accelerator, self.plan, self.split_points)
            self.data_rank = self.pipeline.dp_rank  # the stages of one replica train on the same samples

    def setup_info(self) -> dict:
        """What the record says about this strategy."""
        info = {
            "strategy": self.strategy,
            "mesh_shape": self.plan.mesh_shape,
            "microbatches": self.plan.microbatches,
            "schedule": self.plan.schedule,
            "data_parallel_size": self.plan.dp,
            "stages": (self.pipeline.stages if self.pipeline else self.stages) or None,
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
            self.stages = split_over_devices(model, self.plan.devices, self.split_points, acc.device)
            # device_placement=False: prepare would otherwise move every stage back onto one device.
            model = acc.prepare_model(model, device_placement=False)
            optimizer = acc.prepare_optimizer(optimizer, device_placement=False)
            loaders = [acc.prepare_data_loader(dl) for dl in loaders]
        else:
            model, optimizer, *loaders = self.pipeline.prepare(
                model, optimizer, loaders, device_train is None
            )
        return (model, optimizer, *([device_train] if device_train is not None else []), *loaders)

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
            # fully_shard splits dim 0 like torch.chunk
            rows, chunk = (
                p.shape[0],
                math.ceil(p.shape[0] / world),
            )
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
        """Forward and backward of one optimizer step in micro-batches: a pipeline schedule, or gradient
        accumulation under `accelerator.no_sync` (--microbatches N). Returns the mean loss (detached).

        `x` is the model's input (a tuple for several arguments), `y` what `loss_fn(output, y)` compares with;
        micro-batches split dim 0 of both.
        """
        if self.pipeline is not None:
            return self.pipeline.step(model, x, y, loss_fn)
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

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold distinct samples' results: all ranks, or the last stage of each replica."""
        return self.pipeline.reduce_sum(t) if self.pipeline else self.acc.reduce(t, "sum")

    def gather_for_metrics(self, data):
        """`accelerator.gather_for_metrics` over the data-parallel dimension only (pipeline stages hold copies)."""
        return self.pipeline.gather(data) if self.pipeline else self.acc.gather_for_metrics(data)

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
        return self.pipeline.same_params_groups() if self.pipeline else [list(range(self.acc.num_processes))]

    def save_model(self, model, directory):
        """The full model in the one-process layout (`model.safetensors`, same names) for every strategy."""
        if self.pipeline:
            return self.pipeline.save_model(model, directory)
        # without torch.compile's wrapper, so the names match an eager model's
        self.acc.save_model(
            self.acc.unwrap_model(model, keep_torch_compile=False), directory, safe_serialization=True
        )

    def close(self):
        if self.pipeline:
            self.pipeline.close()

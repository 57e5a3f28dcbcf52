"""pipeline and hybrid: one stage per process with torch.distributed.pipelining, replicas on a 2-D mesh.

Ranks are laid out replica-major on a (dp, pp) mesh: the stages of one replica are neighbours
(rank = dp_rank * pp + pp_rank). Training runs a GPipe or 1F1B schedule over `microbatches`; the stage
gradients are then averaged over the replicas with one flat all-reduce, and replica 0's buffers (BatchNorm
statistics) broadcast, as DDP would. Evaluation relays each batch through the stages in turn and broadcasts
the last stage's output, so evaluation code reads like the single-process one.

Not DDP around the stages: DDP under a GPipe schedule fails at step 2, and static_graph=True is silently
wrong (measured; docs/strategies.md).
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import gather_object

from shared.plan import Plan
from shared.runtime import optimizer_like
from shared.stages import cut, stage_module, stage_summary

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool)


class PipelineModel(nn.Module):
    """This rank's pipeline stage. Training goes through `Pipeline.step` (the schedule); calling it in eval
    mode relays the batch through all stages and returns the model's output on every stage of the replica."""

    def __init__(self, stage: nn.Sequential, pipeline: Pipeline):
        super().__init__()
        self.stage = stage
        self._pipeline = pipeline

    def forward(self, x):
        if self.training:
            raise RuntimeError(
                "a pipeline stage trains through its schedule (Session.micro_batch_step), not model(x)"
            )
        return self._pipeline.relay(self.stage, x)


class Pipeline:
    def __init__(self, acc, plan: Plan, split_points: list[str]):
        from torch.distributed.device_mesh import init_device_mesh

        self.acc, self.plan, self.split_points = acc, plan, split_points
        self.device = acc.device
        self.mesh = init_device_mesh(acc.device.type, (plan.dp, plan.pp), mesh_dim_names=("dp", "pp"))
        self.dp_rank, self.pp_rank = self.mesh.get_local_rank("dp"), self.mesh.get_local_rank("pp")
        self.dp_group, self.pp_group = self.mesh["dp"].get_group(), self.mesh["pp"].get_group()
        self.pp_ranks = dist.get_process_group_ranks(self.pp_group)
        self.is_last_stage = self.pp_rank == plan.pp - 1
        self.stages: list[dict] = []
        self._schedule = self._stage = self._loss_fn = None

    # -- prepare

    def prepare(self, model, optimizer, loaders, first_is_train: bool = True):
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"{self.plan.strategy} needs an nn.Sequential model, got {type(model).__name__}")
        pp = self.plan.pp
        stages = cut(model, self.split_points[: pp - 1])
        devices = gather_object([str(self.device)])  # stage i of replica 0 runs on rank i
        self.stages = [
            stage_summary(st, devices[i], [d * pp + i for d in range(self.plan.dp)])
            for i, st in enumerate(stages)
        ]
        mine = stage_module(stages[self.pp_rank]).to(self.device)
        # The optimizer keeps its class, options and param groups, restricted to this stage's parameters.
        keep = {id(p) for p in mine.parameters()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [p for p in g["params"] if id(p) in keep],
            }
            for g in optimizer.param_groups
        ]
        optimizer = optimizer_like(optimizer, [g for g in groups if g["params"]])
        loaders = [self._loader(dl, drop_last=first_is_train and i == 0) for i, dl in enumerate(loaders)]
        return (PipelineModel(mine, self), optimizer, *loaders)

    def _loader(self, loader, drop_last: bool):
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
            self.device,
            num_processes=self.plan.dp,
            process_index=self.dp_rank,
            split_batches=True,
            put_on_device=True,
            rng_types=[],
            use_seedable_sampler=True,
        )

    # -- training

    def step(self, model, x, y, loss_fn):
        """Forward and backward of one optimizer step over the micro-batches; the mean loss on the last stage,
        0 elsewhere (reduce_sum counts only last stages)."""
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if self._schedule is None:
            self._stage = PipelineStage(
                model.stage,
                stage_index=self.pp_rank,
                num_stages=self.plan.pp,
                device=self.device,
                group=self.pp_group,
            )
            cls = ScheduleGPipe if self.plan.schedule == "gpipe" else Schedule1F1B
            # scale_grads (default): gradients are divided by the micro-batch count, i.e. mean losses average.
            self._schedule = cls(self._stage, n_microbatches=self.plan.microbatches, loss_fn=loss_fn)
            self._loss_fn = loss_fn
        elif loss_fn is not self._loss_fn:
            raise ValueError("a pipeline schedule is built for one loss function")
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
        return torch.zeros((), device=self.device)

    def _all_reduce_grads(self, module):
        """Average this stage's gradients over the replicas: one flat all_reduce (a single bucket) per step."""
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
        """Sum over the last stage of each replica (the other stages hold no loss)."""
        t = t.clone() if self.is_last_stage else torch.zeros_like(t)
        dist.all_reduce(t)
        return t

    # -- evaluation

    def gather(self, data):
        """gather_for_metrics over the dp dimension only (the stages of a replica hold copies)."""
        if self.plan.dp == 1:
            return data
        if isinstance(data, (tuple, list)):
            return type(data)(self.gather(d) for d in data)
        parts = [torch.empty_like(data) for _ in range(self.plan.dp)]
        dist.all_gather(parts, data.contiguous(), group=self.dp_group)
        out = torch.cat(parts)
        # set by the prepared loader, as for Accelerate's own gather_for_metrics
        state = self.acc.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            out = out[: state.remainder]  # the last batch was padded with samples from the start
        return out

    def relay(self, stage: nn.Module, x):
        """Forward one batch through the stages in turn (no micro-batching), then broadcast the last stage's
        output to every stage of the replica. Any batch size works: shapes travel in a small header."""
        first, last = self.pp_rank == 0, self.is_last_stage
        if not first:
            x = self._recv(self.pp_ranks[self.pp_rank - 1])
        out = stage(x)
        if not last:
            self._send(out, self.pp_ranks[self.pp_rank + 1])
        header = self._header(out if last else None)
        dist.broadcast(header, src=self.pp_ranks[-1], group=self.pp_group)
        if not last:
            out = self._empty(header)
        dist.broadcast(out.contiguous() if last else out, src=self.pp_ranks[-1], group=self.pp_group)
        return out

    def _header(self, t=None):
        header = torch.zeros(8, dtype=torch.int64, device=self.device)
        if t is not None:
            header[0], header[1], header[2 : 2 + t.dim()] = (
                t.dim(),
                _DTYPES.index(t.dtype),
                torch.tensor(t.shape),
            )
        return header

    def _empty(self, header):
        return torch.empty(header[2 : 2 + header[0]].tolist(), dtype=_DTYPES[header[1]], device=self.device)

    def _send(self, t, dst):
        dist.send(self._header(t), dst)
        dist.send(t.contiguous(), dst)

    def _recv(self, src):
        header = self._header()
        dist.recv(header, src)
        t = self._empty(header)
        dist.recv(t, src)
        return t

    # -- the end of a run

    def same_params_groups(self) -> list[list[int]]:
        """The replicas of each stage must hold identical parameters."""
        return [[d * self.plan.pp + i for d in range(self.plan.dp)] for i in range(self.plan.pp)]

    def save_model(self, model, directory):
        """The full model in the one-process layout: replica 0's stages gathered on the main process."""
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
        """Drop the schedule and stage before the process group ends (gloo aborts at exit otherwise)."""
        self._schedule = self._stage = self._loss_fn = None
        gc.collect()

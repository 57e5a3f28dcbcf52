"""VGG11's step at batch 8 per rank, in interleaved rounds (one step of each way per round), on a gloo group.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/results/2026-11-30/projection-rounds/vgg11_ddp_check.py
    OMP_NUM_THREADS=1 python docs/results/2026-11-30/projection-rounds/vgg11_ddp_check.py

On 2 processes (torchrun), 5 rounds after 2 warm-up steps, the median step of: no communication, under DDP,
and with every gradient all-reduced as one flat tensor after backward. On one process (a one-rank group, as
the profile measures DDP's overhead), 6 rounds after 1 warm-up step: plain, DDP, and DDP with
gradient_as_bucket_view, and the median per-round difference from plain.
"""

import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[4] / "scripts"))
from vgg11 import VGG11  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
two = int(os.environ.get("WORLD_SIZE", 1)) > 1
if two:
    dist.init_process_group("gloo")
else:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
x = torch.randn(8, 3, 32, 32)
base = VGG11()


def make(kind):
    model = copy.deepcopy(base)
    if kind in ("ddp", "ddp_view"):
        model = DistributedDataParallel(model, gradient_as_bucket_view=kind == "ddp_view")
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def step(kind, model, opt):
    opt.zero_grad(set_to_none=True)
    model(x).sum().backward()
    if kind == "flat":
        grads = [p.grad for p in model.parameters()]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= 2
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)
    opt.step()
    if two:
        dist.all_reduce(torch.zeros(2))  # the training loop's per-step stop check


kinds = {kind: make(kind) for kind in (("none", "ddp", "flat") if two else ("plain", "ddp", "ddp_view"))}
for kind, (model, opt) in kinds.items():
    for _ in range(2 if two else 1):  # warm-up
        step(kind, model, opt)
times = {kind: [] for kind in kinds}
for _ in range(5 if two else 6):
    for kind, (model, opt) in kinds.items():
        if two:
            dist.barrier()
        t0 = time.perf_counter()
        step(kind, model, opt)
        times[kind].append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    for kind, t in times.items():
        print(kind, [round(s, 3) for s in t], "median", round(statistics.median(t), 3))
    if not two:
        for kind in ("ddp", "ddp_view"):
            diffs = [a - b for a, b in zip(times[kind], times["plain"], strict=True)]
            print(kind, "overhead median", round(statistics.median(diffs), 3))
kinds.clear()
dist.destroy_process_group()

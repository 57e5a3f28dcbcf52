"""VGG11's step at batch 8 per rank on 2 processes, three ways, in interleaved rounds (the median is printed):
no communication, under DDP, and with every gradient all-reduced as one flat tensor after backward.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/results/2026-11-30/projection-rounds/vgg11_ddp_check.py
"""

import copy
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
dist.init_process_group("gloo")
x = torch.randn(8, 3, 32, 32)
base = VGG11()


def make(kind):
    model = copy.deepcopy(base)
    if kind == "ddp":
        model = DistributedDataParallel(model)
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
    dist.all_reduce(torch.zeros(2))  # the training loop's per-step stop check


kinds = {kind: make(kind) for kind in ("none", "ddp", "flat")}
for kind, (model, opt) in kinds.items():  # 2 warm-up steps each
    step(kind, model, opt)
    step(kind, model, opt)
times = {kind: [] for kind in kinds}
for _ in range(5):
    for kind, (model, opt) in kinds.items():
        dist.barrier()
        t0 = time.perf_counter()
        step(kind, model, opt)
        times[kind].append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    for kind, t in times.items():
        print(kind, [round(s, 3) for s in t], "median", round(statistics.median(t), 3))
kinds.clear()
dist.destroy_process_group()

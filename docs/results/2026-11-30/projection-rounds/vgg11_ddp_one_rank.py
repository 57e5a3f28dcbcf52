"""DDP's own work per step for VGG11 at batch 8 on a one-rank gloo group, in a process of its own: plain,
DistributedDataParallel, and DDP with gradient_as_bucket_view, one step of each per round.

    OMP_NUM_THREADS=1 python docs/results/2026-11-30/projection-rounds/vgg11_ddp_one_rank.py
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
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
x = torch.randn(8, 3, 32, 32)
base = VGG11()


def make(kind):
    model = copy.deepcopy(base)
    if kind == "ddp":
        model = DistributedDataParallel(model)
    if kind == "ddp_view":
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def step(model, opt):
    opt.zero_grad(set_to_none=True)
    model(x).sum().backward()
    opt.step()


kinds = {kind: make(kind) for kind in ("plain", "ddp", "ddp_view")}
for model, opt in kinds.values():  # 1 warm-up step each
    step(model, opt)
times = {kind: [] for kind in kinds}
for _ in range(6):
    for kind, (model, opt) in kinds.items():
        t0 = time.perf_counter()
        step(model, opt)
        times[kind].append(time.perf_counter() - t0)
for kind, t in times.items():
    print(kind, [round(s, 3) for s in t])
for kind in ("ddp", "ddp_view"):
    diffs = [a - b for a, b in zip(times[kind], times["plain"], strict=True)]
    print(kind, "overhead median", round(statistics.median(diffs), 3))

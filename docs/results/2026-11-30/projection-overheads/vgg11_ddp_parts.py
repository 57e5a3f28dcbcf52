"""VGG11's step in two parts, forward + backward and the optimizer step, plain and under DDP, in interleaved
rounds (one step of each way per round), on a gloo group.

    OMP_NUM_THREADS=1 python docs/results/2026-11-30/projection-overheads/vgg11_ddp_parts.py      # one rank
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/results/2026-11-30/projection-overheads/vgg11_ddp_parts.py

One rank (a one-rank group, as the profile measures DDP's overhead): batch 16, 8 rounds after 2 warm-up steps;
plain, DDP, and DDP with a comm hook that only averages (no gloo call). Two ranks: batch 8 per rank, 6 rounds
after a barrier each; no communication, and DDP; the loop's stop check after each step. Prints every round's
parts, their medians, and per wrapper the median per-round difference from plain in each part.
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
x = torch.randn(8 if two else 16, 3, 32, 32)
base = VGG11()


def average_only(state, bucket):  # DDP's default hook without the all-reduce: divide by the world size
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer().div_(dist.get_world_size()))
    return fut


def make(kind):
    model = copy.deepcopy(base)
    if kind != "plain":
        model = DistributedDataParallel(model)
        if kind == "ddp_no_gloo":
            model.register_comm_hook(None, average_only)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def step(model, opt):
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(x).sum().backward()
    t1 = time.perf_counter()
    opt.step()
    t2 = time.perf_counter()
    if two:
        dist.all_reduce(torch.zeros(2))  # the training loop's per-step stop check
    return t1 - t0, t2 - t1


kinds = {kind: make(kind) for kind in (("plain", "ddp") if two else ("plain", "ddp", "ddp_no_gloo"))}
for model, opt in kinds.values():
    for _ in range(2):  # warm-up: DDP builds its buckets in step 1 and rebuilds them after it
        step(model, opt)
times = {kind: [] for kind in kinds}
for _ in range(6 if two else 8):
    for kind, (model, opt) in kinds.items():
        if two:
            dist.barrier()
        times[kind].append(step(model, opt))
if dist.get_rank() == 0:
    for kind, t in times.items():
        for i, part in enumerate(("forward+backward", "optimizer")):
            xs = [s[i] for s in t]
            print(kind, part, [round(s, 3) for s in xs], "median", round(statistics.median(xs), 3))
    for kind in [k for k in times if k != "plain"]:
        for i, part in enumerate(("forward+backward", "optimizer", "whole step")):
            diffs = [
                (sum(a) - sum(b)) if i == 2 else a[i] - b[i]
                for a, b in zip(times[kind], times["plain"], strict=True)
            ]
            print(
                kind,
                "-",
                "plain",
                part,
                [round(d, 3) for d in diffs],
                "median",
                round(statistics.median(diffs), 3),
            )
kinds.clear()
dist.destroy_process_group()

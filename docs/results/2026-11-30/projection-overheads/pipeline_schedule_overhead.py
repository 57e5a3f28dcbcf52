"""torch.distributed.pipelining's own work per step: a 1-stage GPipe and 1F1B schedule on a one-rank gloo group
against a plain loop over the same 4 micro-batches (forward, loss / 4, backward each; then Adam), the MLP of
scripts/mlp.py at batch 256, 40 interleaved rounds after 5 warm-up steps each.

    OMP_NUM_THREADS=1 python docs/results/2026-11-30/projection-overheads/pipeline_schedule_overhead.py
"""

import copy
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

torch.set_num_threads(1)
torch.manual_seed(0)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
B, M = 256, 4
model = nn.Sequential(
    nn.Flatten(), nn.Linear(784, 250), nn.ReLU(), nn.Linear(250, 100), nn.ReLU(), nn.Linear(100, 10)
)
x, y = torch.randn(B, 1, 28, 28), torch.randint(0, 10, (B,))
loss_fn = nn.functional.cross_entropy

kinds = {}
for name, cls in (("plain", None), ("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
    m = copy.deepcopy(model)
    schedule = None
    if cls is not None:
        stage = PipelineStage(m, stage_index=0, num_stages=1, device=torch.device("cpu"))
        schedule = cls(stage, n_microbatches=M, loss_fn=loss_fn)
    kinds[name] = (m, torch.optim.Adam(m.parameters()), schedule)


def step(m, opt, schedule):
    opt.zero_grad()
    if schedule is None:
        for xs, ys in zip(x.tensor_split(M), y.tensor_split(M), strict=True):
            (loss_fn(m(xs), ys) / M).backward()
    else:
        schedule.step(x, target=y, losses=[])
    opt.step()


for kind in kinds.values():
    for _ in range(5):
        step(*kind)
times = {name: [] for name in kinds}
for _ in range(40):
    for name, kind in kinds.items():
        t0 = time.perf_counter()
        step(*kind)
        times[name].append(time.perf_counter() - t0)
for name, t in times.items():
    print(name, "median step ms", round(statistics.median(t) * 1e3, 3))
for name in ("gpipe", "1f1b"):
    d = statistics.median(a - b for a, b in zip(times[name], times["plain"], strict=True))
    print(name, "- plain, per step ms", round(d * 1e3, 3), "per micro-batch ms", round(d / M * 1e3, 3))
dist.destroy_process_group()

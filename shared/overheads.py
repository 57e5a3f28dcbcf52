"""What a profile measures beside the step timing of shared/profiling.py (`--profile_out`, unless
--profile_steps_only): the host's cost of one eager aten call, DDP's and FSDP2's own overhead per step on
copies of the model, and on a CPU what sharing the machine's memory bandwidth costs the optimizer step.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from shared.runtime import optimizer_like

FSDP_MIN_PARAMS = 100_000  # accelerate_configs/*_fsdp.yaml: fsdp_min_num_params


# The neighbour of optimizer_contention: the same optimizer class over one tensor of as many parameters.
NEIGHBOUR = """import sys, torch
torch.set_num_threads(1)
p = torch.nn.Parameter(torch.zeros(int(sys.argv[1]))); p.grad = torch.ones_like(p)
opt = getattr(torch.optim, sys.argv[2])([p], lr=1e-3)
opt.step(); print("ready", flush=True)
while True: opt.step()
"""


def size_based_units(model: torch.nn.Module, min_params: int = FSDP_MIN_PARAMS) -> list[torch.nn.Module]:
    """The submodules Accelerate's SIZE_BASED_WRAP shards as units of their own (accelerate_configs/*_fsdp.yaml),
    children before parents: a module whose parameters not already in a unit below it number at least
    `min_params` (torch's size_based_auto_wrap_policy). A module called from outside its parent's forward (the
    seq2seq decoder's output layer) must be a unit of its own, or FSDP2 meets it still sharded."""
    units: list[torch.nn.Module] = []

    def visit(m: torch.nn.Module) -> int:
        """Parameters of `m` not in a unit below it."""
        free = sum(visit(c) for c in m.children()) + sum(p.numel() for p in m.parameters(recurse=False))
        if m is not model and free >= min_params:
            units.append(m)
            return 0
        return free

    visit(model)
    return units


def _surrogate_step(model, opt, args, kwargs, clock=time.perf_counter) -> tuple[float, float]:
    """One training step without the script's loss: forward, backward of the outputs' sum, optimizer step.
    Returns the seconds of forward + backward and of the optimizer step."""
    opt.zero_grad(set_to_none=True)
    t0 = clock()
    sum(o.float().sum() for o in _float_tensors(model(*args, **kwargs))).backward()
    t1 = clock()
    opt.step()
    return t1 - t0, clock() - t1


class CountOps(TorchDispatchMode):
    """Counts aten calls."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def host_s_per_op(min_s: float = 0.3) -> float:
    """What one aten call costs the host in eager PyTorch on this machine (Python, module and autograd
    bookkeeping, dispatch), from a training step of a model too small to compute anything: the floor under a
    small model's step on a GPU, whose host issues every kernel. Mean over at least `min_s`."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randn(2, 4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()

    step()
    with CountOps() as ops:
        step()
    n, t0 = 0, time.perf_counter()
    while n < 20 or time.perf_counter() - t0 < min_s:
        step()
        n += 1
    return (time.perf_counter() - t0) / (n * ops.n)


def _float_tensors(obj) -> list[torch.Tensor]:
    """The floating-point tensors in a model's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else []
    return [t for o in items for t in _float_tensors(o)]


def wrapper_overheads(
    trained,
    optimizer,
    inputs,
    device,
    unsupported=(),
    say=print,
    clock=time.perf_counter,
    min_rounds: int = 3,
    min_s: float = 1.0,
) -> dict:
    """Seconds per step DDP and FSDP2 add beyond their collectives: the same forward, backward (of a
    surrogate loss, the output's sum) and optimizer step on copies of the model, plain, wrapped in
    DistributedDataParallel, and sharded with `fully_shard` (a unit per piece of >= FSDP_MIN_PARAMS
    parameters, as the setup files wrap), each over a one-rank group, on the first batch's inputs. Timed
    in rounds of one step of each (a drifting host slows all three alike; measured one after another, 3
    steps each, VGG11's DDP figure read 0.21 s in one profile and 0.77 s in the next) until every kind has
    `min_s` and `min_rounds`; per wrapper, the median over rounds of its time minus the plain one's.

    DDP: forward + backward only. Its work (bucket copies in, averaging, copies out) all runs inside
    backward; it leaves the optimizer step as it was, and on a CPU that step's time is bimodal (VGG11's
    Adam read 0.87 s or 1.2-1.6 s by turns, plain or wrapped alike), which made the whole step's difference
    read anywhere from -0.6 to +1.0 s per round, against a steady 0.13-0.16 s in forward + backward. FSDP2:
    forward + backward (copy-in/out, hooks) and, apart, the optimizer step over the DTensor parameters: N
    ranks each step 1/N of the parameters, so the projection divides that part by N (VGG11: 0.72 s and
    0.63 s)."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if inputs is None or dist.is_initialized():
        return {}
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    args, kwargs = inputs
    mesh = init_device_mesh(device.type, (1,))
    kinds = {}
    for kind in ("plain", "ddp", "fsdp"):
        if kind in unsupported:
            continue
        try:
            model = copy.deepcopy(trained)
            if kind == "ddp":
                model = DistributedDataParallel(model)
            elif kind == "fsdp":
                for unit in size_based_units(model):  # the copy's, never the trained model's
                    fully_shard(unit, mesh=mesh)
                fully_shard(model, mesh=mesh)
            opt = optimizer_like(optimizer, model.parameters())
            for _ in range(2):  # warm-up: DDP builds its buckets in step 1 and rebuilds them after it
                _surrogate_step(model, opt, args, kwargs)
            kinds[kind] = (model, opt)
        except Exception as e:  # noqa: BLE001 - a model a wrapper cannot take: no figure for it, said so
            say(f"profile: {kind} overhead not measured ({type(e).__name__}: {str(e)[:120]})")
    times = {kind: [] for kind in kinds}  # per round: (forward + backward, optimizer) seconds
    if "plain" in kinds:
        while len(times["plain"]) < min_rounds or min(sum(map(sum, t)) for t in times.values()) < min_s:
            for kind, (model, opt) in kinds.items():
                times[kind].append(_surrogate_step(model, opt, args, kwargs, clock=clock))
    kinds.clear()
    model = opt = None  # noqa: F841 - gloo crashes at exit if a DDP model outlives its group
    dist.destroy_process_group()
    plain = times.pop("plain", None)
    if plain is None:
        return {}

    def over(kind: str, i: int) -> float:  # i: 0 forward + backward, 1 optimizer step
        return max(0.0, statistics.median(a[i] - b[i] for a, b in zip(times[kind], plain, strict=True)))

    out = {"ddp": over("ddp", 0)} if "ddp" in times else {}
    if "fsdp" in times:
        out.update(fsdp=over("fsdp", 0), fsdp_optimizer=over("fsdp", 1))
    return out


def optimizer_contention(optimizer, n_params: int, device, min_s: float = 0.5) -> float | None:
    """How much slower the optimizer step runs while the other core runs the same optimizer over as many
    parameters, as the other ranks do at the same moment in DDP, FSDP or a pipeline (on one CPU they share
    the memory bandwidth: measured, Adam over 129M parameters took 0.80 s alone and 1.1-1.8 s on both
    cores at once). The mean step over at least `min_s` and 3 steps on the last step's gradients: alone,
    beside that neighbour process, alone again (a drifting host cancels out). None on a GPU or with one
    core."""
    if device.type != "cpu" or (os.cpu_count() or 1) < 2:
        return None
    import subprocess
    import sys

    def mean_step() -> float:
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < min_s:
            optimizer.step()
            n += 1
        return (time.perf_counter() - t0) / n

    alone = mean_step()
    hog = subprocess.Popen(
        [sys.executable, "-c", NEIGHBOUR, str(n_params), type(optimizer).__name__],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        if hog.stdout.readline().strip() != "ready":
            return None
        busy = mean_step()
    finally:
        hog.kill()
        hog.wait()
    alone = (alone + mean_step()) / 2
    return max(1.0, busy / alone)

"""`--profile_out FILE`: what the projection (shared/projection.py, `make project`) needs from one process.

The script's own training loop runs unchanged at its own batch size; `Session.batches` hands it the loader's
batches and hooks time each step. After warm-up steps, timed steps until MIN_STEPS and MIN_SECONDS; the
medians (over windows, as runs time a step) of:
- forward (the model's own forward, hooks on the root), backward (from the end of forward to the last
  gradient written, the loss included), optimizer step, and the rest of the step (the batch's fetch,
  zero_grad, sums): a step timed as a run times it, from one step's end to the next;
- each piece's forward time and the bytes of its output (what would cross a cut after it; shared/stages.py
  names the pieces), and when each parameter's gradient was ready, counted from the start of backward;
- tensors saved for backward (activation memory), from the first (untimed) warm-up step.
Also: parameter / gradient / optimizer-state bytes, and the DDP bucket layout torch computes after its first
step (gradients in the order they become ready, the first bucket 1 MiB, then 25 MiB:
torch/nn/parallel/distributed.py). Unless --profile_steps_only (bench/project.py's smaller batches): the op
trace of one step (shared/optrace.py: every aten call with its FLOPs and bytes, for other hardware), the host's
cost of one eager call, DDP's and FSDP2's own overhead per step, and on a CPU what
sharing the machine's memory bandwidth costs: the optimizer step beside a neighbour on the other core.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from shared.optrace import OpTrace
from shared.projection import PROFILE_VERSION
from shared.record import device_name
from shared.stages import pieces

WARMUP_STEPS = 2
# timed steps per batch size: at least 2 s, as a run's steady windows span 1-3 s (a step's time drifts within
# a process: the autoencoder's read 28 ms over its first 80 steps, then 31)
MIN_STEPS, MAX_STEPS, MIN_SECONDS = 5, 200, 2.0
DDP_FIRST_BUCKET, DDP_BUCKET = 1024 * 1024, 25 * 1024 * 1024  # DDP's defaults (Accelerate keeps them)
FSDP_MIN_PARAMS = 100_000  # accelerate_configs/*_fsdp.yaml: fsdp_min_num_params


def window_mean(values) -> float:
    """The median over up to 5 windows of consecutive steps of each window's mean: what the run records'
    steady step time is (shared/meter.py), so a profile and a run measure the same thing."""
    values = list(values)
    k = min(5, len(values))
    windows = [values[i * len(values) // k : (i + 1) * len(values) // k] for i in range(k)]
    return statistics.median(statistics.fmean(w) for w in windows)


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
    sum(o.float().sum() for o in _tensors(model(*args, **kwargs))).backward()
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


def _bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_bytes(o) for o in obj.values())
    return 0


def _tensors(obj) -> list[torch.Tensor]:
    return [t for t in _all_tensors(obj) if t.is_floating_point()]


def _rows(batch) -> int:
    """Rows of a batch: the first dimension of its largest tensor (text lists and other fields ignored)."""
    firsts = [len(t) for t in _all_tensors(batch) if t.dim()]
    if not firsts:
        raise ValueError("--profile_out: a batch without tensors cannot be cut to smaller sizes")
    return max(firsts)


def _all_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else []
    return [t for o in items for t in _all_tensors(o)]


class Profiler:
    def __init__(self, acc, cfg, model, optimizer, split_points, unsupported=()):
        self.acc, self.cfg, self.model, self.split_points = acc, cfg, model, list(split_points)
        self.unsupported = sorted(unsupported)
        self.steps_only = getattr(cfg, "profile_steps_only", False)
        self.device = acc.device
        self.pieces = pieces(model)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps it
        self.optimizer = inner
        self.now = {}
        self._saved = self._inputs = None
        self._handles = []
        hook = self._handles.append
        hook(model.register_forward_pre_hook(self._capture, with_kwargs=True))
        hook(model.register_forward_hook(lambda m, a, o: self._mark("fwd1")))
        for i, (_, piece) in enumerate(self.pieces):
            hook(piece.register_forward_pre_hook(lambda m, a, i=i: self._piece(i, 0, None)))
            hook(piece.register_forward_hook(lambda m, a, o, i=i: self._piece(i, 1, o)))
        for j, (_, p) in enumerate(self.params):
            hook(p.register_post_accumulate_grad_hook(lambda p, j=j: self._ready(j)))
        hook(inner.register_step_pre_hook(lambda *a: self._mark("opt0")))
        hook(inner.register_step_post_hook(lambda *a: self._mark("opt1")))

    def _capture(self, module, args, kwargs):
        self._mark("fwd0")
        if self._inputs is None:  # the first batch's inputs, for the FSDP overhead measurement
            self._inputs = (args, kwargs)
            self.input_bytes = _bytes(list(args)) + _bytes(kwargs)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def phase(self) -> str:
        """The part of the step running now (the op trace's phases)."""
        n = self.now
        if "opt1" in n:
            return "other"
        return next((p for k, p in (("opt0", "optimizer"), ("fwd1", "backward"), ("fwd0", "forward")) if k in n),
                    "other")  # fmt: skip

    def _mark(self, key):
        self.now.setdefault(key, self._clock())  # first forward / step of the step counts

    def _piece(self, i, end, out):
        t = self._clock()
        if not end:
            self.now[("p", i)] = t
        else:
            self.now.setdefault("piece_s", {})
            self.now["piece_s"][i] = self.now["piece_s"].get(i, 0.0) + t - self.now.pop(("p", i), t)
            self.now.setdefault("piece_bytes", {})[i] = _bytes(out)
            calls = self.now.setdefault("piece_calls", {})  # FSDP2 gathers a unit again at every call
            calls[i] = calls.get(i, 0) + 1

    def _ready(self, j):
        self.now.setdefault("ready", {})[j] = self._clock()

    def batches(self, loader):
        """The training loop's batches: warm-up, then timed steps at the loader's own batch size (a smaller
        batch cut from a larger one, in a process that has run larger ones, times slower than a run at that
        batch: bench/project.py profiles each size of its ladder in a process of its own). The first warm-up
        step counts saved activations (and FLOPs); a short last batch of an epoch trains untimed. The profile
        is written when done."""
        it = iter(loader)

        def next_batch():
            """The next batch (a new epoch's when the loader runs out) and the seconds its fetch took: the run's
            steps include it."""
            nonlocal it
            t0 = self._clock()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            return batch, self._clock() - t0

        batch, fetch = next_batch()
        full = _rows(batch)
        out = {"flops": None}
        for k in range(WARMUP_STEPS):  # untimed
            extra = contextlib.ExitStack()
            self.now = {"step0": self._clock()}
            if k == 0:
                extra.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
                self._saved = 0
            if k == WARMUP_STEPS - 1 and not self.steps_only:  # after step 1 the optimizer has its state
                state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
                trace = extra.enter_context(OpTrace(self.phase, [p for _, p in self.params], state))
            with extra:
                yield batch
            if k == 0:
                saved, self._saved = self._saved, None
            if k == WARMUP_STEPS - 1 and not self.steps_only:
                out["op_trace"] = trace.calls
                out["flops"] = sum(c[4] * c[7] for c in trace.calls)
                out["aten_calls"] = sum(c[7] for c in trace.calls)
            batch, fetch = next_batch()
        steps, timed_s = [], 0.0
        while len(steps) < MAX_STEPS:
            self.now = {"step0": self._clock()}
            yield batch
            if _rows(batch) == full:
                steps.append(self._step(self._clock(), fetch))
                timed_s += steps[-1]["step_s"]
            if len(steps) >= MIN_STEPS and timed_s >= MIN_SECONDS:
                break
            batch, fetch = next_batch()
        out["sizes"] = {str(full): self._summarise(steps, saved)}
        self.write(out, full)

    def _pack(self, t):
        if self._saved is not None and not isinstance(t, torch.nn.Parameter):
            self._saved += t.numel() * t.element_size()
        return t

    def _step(self, t_end, fetch) -> dict:
        n = self.now
        f0, f1 = n.get("fwd0", n["step0"]), n.get("fwd1", n["step0"])
        ready = n.get("ready", {})
        last = max(ready.values(), default=f1)
        o0, o1 = n.get("opt0", last), n.get("opt1", last)
        return {
            "step_s": t_end - n["step0"] + fetch,  # as a run times its steps: from one step's end to the next
            "data_s": fetch,
            # the loop's own time before forward and after the optimizer step (batch preparation, sums,
            # logging): what a GPU's host still spends; not the gap between the last gradient and the
            # optimizer step, which on a CPU is mostly freeing the graph's memory
            "host_gaps_s": max(0.0, f0 - n["step0"]) + max(0.0, t_end - o1),
            "forward_s": f1 - f0,
            "backward_s": last - f1,
            "optimizer_s": o1 - o0,
            "piece_s": [n.get("piece_s", {}).get(i, 0.0) for i in range(len(self.pieces))],
            "piece_bytes": [n.get("piece_bytes", {}).get(i, 0) for i in range(len(self.pieces))],
            "piece_calls": [n.get("piece_calls", {}).get(i, 0) for i in range(len(self.pieces))],
            "ready_s": [ready[j] - f1 if j in ready else None for j in range(len(self.params))],
        }

    def _summarise(self, steps: list[dict], saved: int) -> dict:
        med = window_mean
        keys = ("step_s", "data_s", "forward_s", "backward_s", "optimizer_s", "host_gaps_s")
        out = {k: med(s[k] for s in steps) for k in keys}
        # the rest of the loop: the batch's fetch, the loss's reduction, logging
        out["other_s"] = max(0.0, out["step_s"] - out["forward_s"] - out["backward_s"] - out["optimizer_s"])
        out["steps"] = len(steps)
        out["step_s_iqr"] = (
            statistics.quantiles([s["step_s"] for s in steps], n=4)[::2] if len(steps) > 1 else None
        )
        out["piece_s"] = [med(s["piece_s"][i] for s in steps) for i in range(len(self.pieces))]
        out["piece_bytes"] = steps[-1]["piece_bytes"]
        out["piece_calls"] = [
            statistics.median(s["piece_calls"][i] for s in steps) for i in range(len(self.pieces))
        ]
        out["ready_s"] = [
            med(r for s in steps if (r := s["ready_s"][j]) is not None) if steps[0]["ready_s"][j] is not None
            else None
            for j in range(len(self.params))
        ]  # fmt: skip
        out["saved_activation_bytes"] = saved
        return out

    def wrapper_overheads(self, min_rounds: int = 3, min_s: float = 1.0) -> dict:
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

        if self._inputs is None or dist.is_initialized():
            return {}
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        args, kwargs = self._inputs
        mesh = init_device_mesh(self.device.type, (1,))
        kinds = {}
        for kind in ("plain", "ddp", "fsdp"):
            if kind in self.unsupported:
                continue
            try:
                model = copy.deepcopy(self.model)
                if kind == "ddp":
                    model = DistributedDataParallel(model)
                elif kind == "fsdp":
                    for unit in size_based_units(model):  # the copy's, never the trained model's
                        fully_shard(unit, mesh=mesh)
                    fully_shard(model, mesh=mesh)
                opt = type(self.optimizer)(model.parameters(), **self.optimizer.defaults)
                for _ in range(2):  # warm-up: DDP builds its buckets in step 1 and rebuilds them after it
                    _surrogate_step(model, opt, args, kwargs)
                kinds[kind] = (model, opt)
            except Exception as e:  # noqa: BLE001 - a model a wrapper cannot take: no figure for it, said so
                self.acc.print(f"profile: {kind} overhead not measured ({type(e).__name__}: {str(e)[:120]})")
        times = {kind: [] for kind in kinds}  # per round: (forward + backward, optimizer) seconds
        if "plain" in kinds:
            while len(times["plain"]) < min_rounds or min(sum(map(sum, t)) for t in times.values()) < min_s:
                for kind, (model, opt) in kinds.items():
                    times[kind].append(_surrogate_step(model, opt, args, kwargs, clock=self._clock))
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

    def optimizer_contention(self, min_s: float = 0.5) -> float | None:
        """How much slower the optimizer step runs while the other core runs the same optimizer over as many
        parameters, as the other ranks do at the same moment in DDP, FSDP or a pipeline (on one CPU they share
        the memory bandwidth: measured, Adam over 129M parameters took 0.80 s alone and 1.1-1.8 s on both
        cores at once). The mean step over at least `min_s` and 3 steps on the last step's gradients: alone,
        beside that neighbour process, alone again (a drifting host cancels out). None on a GPU or with one
        core."""
        if self.device.type != "cpu" or (os.cpu_count() or 1) < 2:
            return None
        import subprocess
        import sys

        def mean_step() -> float:
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < min_s:
                self.optimizer.step()
                n += 1
            return (time.perf_counter() - t0) / n

        alone = mean_step()
        n = sum(p.numel() for _, p in self.params)
        hog = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR, str(n), type(self.optimizer).__name__],
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

    def write(self, out: dict, full: int):
        for h in self._handles:
            h.remove()
        sizes = out["sizes"]
        ready = sizes[str(full)]["ready_s"]
        order = sorted((j for j in range(len(self.params)) if ready[j] is not None), key=lambda j: ready[j])
        # The buckets DDP rebuilds after its first step: gradients in the order they became ready.
        buckets, _ = dist._compute_bucket_assignment_by_size(
            [self.params[j][1] for j in order], [DDP_FIRST_BUCKET, DDP_BUCKET], [False] * len(order)
        )
        piece_of = {}
        for i, (_, piece) in enumerate(self.pieces):
            for p in piece.parameters():
                piece_of[id(p)] = i
        state = sum(_bytes(list(s.values())) for s in self.optimizer.state.values())
        overheads = {} if self.steps_only else self.wrapper_overheads()
        contention = None if self.steps_only else self.optimizer_contention()
        profile = {
            "kind": "distbench-profile",
            "batch_size": full,
            "device": str(self.device),
            "device_name": device_name(self.device),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "pieces": [name for name, _ in self.pieces],
            "split_points": self.split_points,
            "unsupported": self.unsupported,  # the script's UNSUPPORTED knobs ("pipeline": pipeline and hybrid)
            "params": [{"name": n, "bytes": _bytes(p), "piece": piece_of.get(id(p))} for n, p in self.params],
            "param_bytes": sum(_bytes(p) for p in self.model.parameters()),
            "grad_bytes": sum(_bytes(p) for _, p in self.params),
            "optimizer_state_bytes": state,
            "ddp_buckets": [[order[k] for k in bucket] for bucket in buckets],
            "optimizer_contention": contention,  # optimizer step with / without a neighbour streaming memory
            "version": PROFILE_VERSION,
            # DDP's own work per step beyond its all-reduces (all of it in backward)
            "ddp_overhead_s": overheads.get("ddp"),
            "fsdp_overhead_s": overheads.get("fsdp"),  # FSDP2's in forward + backward, beyond its collectives
            # FSDP2's in the optimizer step, over all the parameters on one rank (each of N ranks does 1/N)
            "fsdp_optimizer_overhead_s": overheads.get("fsdp_optimizer"),
            "flops_per_step": out["flops"],
            "aten_calls_per_step": out.get("aten_calls"),
            # one step's aten calls in order (shared/optrace.py), what shared/roofline.py prices on a GPU
            "op_trace": out.get("op_trace"),
            "host_s_per_op": None if self.steps_only else host_s_per_op(),  # eager host cost of a call here
            "input_bytes": getattr(self, "input_bytes", 0),  # the batch the model reads (the copy to a GPU)
            "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "sizes": sizes,
        }
        path = self.cfg.profile_out
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.part"
        with open(tmp, "w") as f:
            json.dump(profile, f, indent=1)
        os.replace(tmp, path)
        self.acc.print(f"profile written: {path} (batch sizes {', '.join(sizes)})")

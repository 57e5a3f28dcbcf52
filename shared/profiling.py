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
trace of one step (shared/optrace.py: every aten call with its FLOPs and bytes, for other hardware), and what
shared/overheads.py measures: the host's cost of one eager call, DDP's and FSDP2's own overhead per step, and
on a CPU what sharing the machine's memory bandwidth costs: the optimizer step beside a neighbour on the other
core.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from shared.optrace import OpTrace
from shared.overheads import host_s_per_op, optimizer_contention, wrapper_overheads
from shared.projection import PROFILE_VERSION
from shared.record import device_name
from shared.stages import pieces

WARMUP_STEPS = 2
# timed steps per batch size: at least 2 s, as a run's steady windows span 1-3 s (a step's time drifts within
# a process: the autoencoder's read 28 ms over its first 80 steps, then 31)
MIN_STEPS, MAX_STEPS, MIN_SECONDS = 5, 200, 2.0
DDP_FIRST_BUCKET, DDP_BUCKET = 1024 * 1024, 25 * 1024 * 1024  # DDP's defaults (Accelerate keeps them)


def window_mean(values) -> float:
    """The median over up to 5 windows of consecutive steps of each window's mean: what the run records'
    steady step time is (shared/meter.py), so a profile and a run measure the same thing."""
    values = list(values)
    k = min(5, len(values))
    windows = [values[i * len(values) // k : (i + 1) * len(values) // k] for i in range(k)]
    return statistics.median(statistics.fmean(w) for w in windows)


def _bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_bytes(o) for o in obj.values())
    return 0


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
        overheads, contention = {}, None
        if not self.steps_only:
            overheads = wrapper_overheads(
                self.model,
                self.optimizer,
                self._inputs,
                self.device,
                self.unsupported,
                self.acc.print,
                self._clock,
            )
            contention = optimizer_contention(
                self.optimizer, sum(p.numel() for _, p in self.params), self.device
            )
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

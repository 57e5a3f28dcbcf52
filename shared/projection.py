"""Projected step time, speedup and memory per strategy and device count, from a profile and a hardware file.

Torch-free arithmetic; docs/projection.md writes every formula down with its source. Inputs:
- a model profile (shared/profiling.py): forward / backward / optimizer / other time per step at a ladder of
  per-device batch sizes, per-piece forward time and output bytes, gradient-ready times, DDP buckets, bytes of
  parameters, gradients, optimizer state and saved activations, FLOPs and aten calls per step;
- a hardware description (hardware/*.yaml): either `measured` collectives of this machine (bench/
  collectives.py) or a latency and bus bandwidth per link, plus peak FLOP/s, an achieved efficiency, memory
  bandwidth and size, each figure with its source and whether it was measured or assumed.
The collectives' times are shared/collective_time.py's, each strategy's step is priced in shared/pricing.py,
and the ranges, verdicts and sentences said of the predictions are shared/verdicts.py's.
"""

from __future__ import annotations

from shared.collective_time import collective_s
from shared.pricing import (
    Priced,
    price_data_parallel,
    price_fsdp,
    price_model_split,
    price_pipeline,
)
from shared.roofline import gpu_step

GIB = 2**30
# the profile's format (shared/profiling.py writes it): bench/project.py measures a cached profile of another
# version again (2: DDP's overhead from forward + backward only; FSDP2's split into forward + backward and the
# optimizer step; 3: the op trace, the host's cost per call, the batch's bytes)
PROFILE_VERSION = 3
STRATEGIES = ("ddp", "fsdp", "pipeline", "pipeline_1f1b", "model_split", "hybrid")


# ----------------------------------------------------------------------------- the model's own times


class Model:
    """A profile read at any per-device batch (linear interpolation between the measured sizes), on the device it
    was measured on, or modelled on another one from its op trace (shared/roofline.py).

    `compute_source` says which: "measured on <device>" where the profile's device is the one projected (this
    machine's cores; a GPU profile projected on a hardware file of that GPU, `gpu_match`), else "modelled from
    <hardware file>"."""

    def __init__(self, profile: dict, hw: dict):
        self.p, self.hw, self._times = profile, hw, {}
        self.sizes = sorted((int(b), s) for b, s in profile["sizes"].items())
        self.full = profile["batch_size"]
        gpu = str(profile.get("device", "")).startswith("cuda")
        match = hw.get("gpu_match")
        same_gpu = gpu and bool(match) and match.lower() in str(profile.get("device_name", "")).lower()
        self.local = (hw.get("kind") == "measured" and not gpu) or same_gpu
        if self.local:
            self.compute_source = (
                f"measured on {profile.get('device_name') or profile.get('device', 'this machine')}"
            )
        elif not profile.get("op_trace"):
            raise ValueError(
                f"the profile has no op trace to model {hw.get('name')} from (measured by an older version: "
                "make project PROJECT_ARGS=--reprofile)"
            )
        else:
            self.compute_source = f"modelled from {hw.get('name', 'a hardware file')}"

    def at(self, key: str, b: float):
        """`key` of the ladder at batch b (lists element-wise); linear in b between and beyond the sizes."""
        pts = self.sizes
        lo = max((p for p in pts if p[0] <= b), default=pts[0], key=lambda p: p[0])
        hi = min((p for p in pts if p[0] >= b), default=pts[-1], key=lambda p: p[0])
        if lo[0] == hi[0] != b and len(pts) > 1:  # outside the ladder: extend its nearest segment
            lo, hi = (pts[-2], pts[-1]) if b > pts[-1][0] else (pts[0], pts[1])
        w = (b - lo[0]) / (hi[0] - lo[0]) if hi[0] != lo[0] else 0.0

        def mix(a, c):
            if isinstance(a, list):
                return [mix(x, y) for x, y in zip(a, c, strict=True)]
            if a is None or c is None:
                return None
            return max(0.0, a + w * (c - a))

        return mix(lo[1].get(key), hi[1].get(key))

    def times(self, b: float, contended: bool = False) -> dict:
        """A copy of the step's parts at per-device batch b (cached: a prediction asks for them several times,
        and a modelled GPU simulates the whole trace each time)."""
        key = (b, contended)
        if key not in self._times:
            self._times[key] = self._parts(b, contended)
        return dict(self._times[key])

    def _parts(self, b: float, contended: bool) -> dict:
        """input, forward, backward, optimizer, other (seconds) for one step at per-device batch b. `contended`:
        other processes on this CPU step their optimizers at the same moment (they share its memory bandwidth;
        the profile measured the slowdown with a neighbour streaming memory)."""
        if self.local:
            t = {k: self.at(f"{k}_s", b) for k in ("forward", "backward", "optimizer", "other")}
            t["input"] = min(self.at("data_s", b) or 0.0, t["other"])  # the batch's fetch, part of "other"
            t["other"] -= t["input"]
            if contended and self.hw.get("kind") == "measured":
                t["optimizer"] *= self.p.get("optimizer_contention") or 1.0
        else:
            fused = str(self.p.get("flags", {}).get("fused_optimizer", "auto")) != "false"
            t = gpu_step(self.p, self.hw, scale=b / self.full, fused=fused)
        return t

    def ready(self, b: float) -> list[float | None]:
        """When each parameter's gradient is ready, from the start of backward, at batch b."""
        r = self.at("ready_s", b)
        if self.local:
            return r
        scale = self.times(b)["backward"] / max(self.at("backward_s", b), 1e-12)
        return [x * scale if x is not None else None for x in r]

    def stages(self, p: int, b: float) -> list[dict]:
        """The model cut into p stages (the script's split points; for more stages than it names, cut where
        the forward time balances): per stage forward, backward, parameter share and the bytes it sends on."""
        names, pieces = self.p["pieces"], list(range(len(self.p["pieces"])))
        split = self.p["split_points"][: p - 1]
        if len(split) == p - 1 and all(s in names for s in split):
            bounds = sorted(names.index(s) for s in split)
        else:
            bounds = balanced_cuts(self.at("piece_s", self.full), p)
        edges = [0, *bounds, len(pieces)]
        t = self.times(b)
        piece_f = self.at("piece_s", b)
        scale_f = t["forward"] / max(sum(piece_f), 1e-12)
        ready = self.ready(b)
        out_bytes = self.at("piece_bytes", b)
        params = self.p["params"]
        out = []
        for s in range(p):
            lo, hi = edges[s], edges[s + 1]
            mine = [j for j, q in enumerate(params) if q["piece"] is not None and lo <= q["piece"] < hi]
            done = max((ready[j] for j in mine if ready[j] is not None), default=0.0)
            out.append({
                "forward": sum(piece_f[lo:hi]) * scale_f,
                "bwd_done": done,  # backward of stage s ends when its earliest layer's gradients are ready
                "param_bytes": sum(params[j]["bytes"] for j in mine),
                "send_bytes": out_bytes[hi - 1] if s < p - 1 else 0,
                "act_share": (sum(out_bytes[lo:hi]) /
                              max(sum(out_bytes), 1)),
            })  # fmt: skip
        total_b = t["backward"]
        for s in range(p):  # stage s's backward: from the next stage's end to its own
            after = out[s + 1]["bwd_done"] if s < p - 1 else 0.0
            out[s]["backward"] = max(0.0, out[s]["bwd_done"] - after)
        spread = sum(st["backward"] for st in out)
        for st in out:  # the measured backward in full, shared as the ready times say
            st["backward"] = total_b * st["backward"] / spread if spread else total_b / p
        return out


def balanced_cuts(piece_s: list[float], p: int) -> list[int]:
    """Cut indices giving p stages whose summed times are as even as a greedy prefix split makes them."""
    total, cuts, acc = sum(piece_s), [], 0.0
    for i, t in enumerate(piece_s):
        acc += t
        if len(cuts) < p - 1 and acc >= total * (len(cuts) + 1) / p and i + 1 < len(piece_s):
            cuts.append(i + 1)
    while len(cuts) < p - 1:
        cuts.append(min(len(piece_s) - 1, (cuts[-1] + 1) if cuts else 1))
    return cuts


# ----------------------------------------------------------------------------- one prediction


def project(profile: dict, hw: dict, strategy: str, devices: int, *, nodes: int = 1, batch: int,
            scaling: str = "strong", microbatches: int = 4, cores: int | None = None,
            min_unit_params: int = 100_000, check_every: int | None = None) -> dict:  # fmt: skip
    """One prediction: step time, speedup over one device, efficiency, memory per device and the bottleneck.

    strong scaling: `batch` is the global batch, each of R data-parallel replicas takes batch/R (speedup =
    T1/TN); weak scaling: each replica takes `batch` (global R*batch; speedup = R*T1/TN). R = N for DDP and
    FSDP, N/2 for the hybrid (pipelines of 2 stages), 1 for a pipeline or a model split."""
    m = Model(profile, hw)
    n = devices
    # data-parallel replicas: every device for DDP / FSDP, N/2 pipelines of 2 stages for the hybrid, one otherwise
    replicas = {"ddp": n, "fsdp": n, "hybrid": n // 2, "single": 1}.get(strategy, 1)
    global_batch = batch if scaling == "strong" else batch * replicas  # weak: each replica keeps `batch`
    per_dev = global_batch / replicas
    t1 = sum(m.times(batch).values())
    c = Priced(
        m,
        hw,
        profile,
        strategy,
        n,
        nodes,
        batch,
        per_dev,
        replicas,
        microbatches,
        min_unit_params,
        many=n > 1 and strategy != "model_split",
    )  # several processes on one machine step at once
    if strategy in ("ddp", "single") or n == 1 and strategy != "model_split":
        price_data_parallel(c)
    elif strategy == "fsdp":
        price_fsdp(c)
    elif strategy == "model_split":
        price_model_split(c)
    elif strategy in ("pipeline", "pipeline_1f1b", "hybrid"):
        price_pipeline(c)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    parts, memory, busy, per_dev, assumed = c.parts, c.memory, c.busy, c.per_dev, c.assumed
    if n > 1 and strategy != "model_split":
        # the loop's stop / non-finite check: one all-reduce of two floats over every rank each `check_every`
        # steps (shared/checkpoint.py; 1 on a CPU, 25 on CUDA)
        every = check_every or (1 if hw.get("kind") == "measured" else 25)
        # right after the gradients' last collective (DDP, FSDP, a hybrid's replica sync): back to back
        follows = strategy in ("ddp", "fsdp") or strategy == "hybrid" and n // 2 > 1
        control = collective_s(hw, "all_reduce", 8, n, nodes, follows=follows) / every
        parts["communication"] += control
        if busy is not None:
            busy += n * control
    step = sum(parts.values())
    oversubscribed = cores is not None and n > cores
    if oversubscribed:  # more processes than cores: the critical path, or all the work shared by the cores
        total = busy if busy is not None else n * step
        if total / cores > step:
            parts["compute"] += total / cores - step
            step = total / cores
    speedup = (t1 * global_batch / batch) / step
    cause = superlinear_cause(m, strategy, n, batch, per_dev, speedup) if speedup / n > 1 + 1e-9 else None
    memory_gib = memory / GIB
    fits = memory_gib <= hw.get("memory_gib", float("inf"))
    return {
        "strategy": strategy,
        "devices": n,
        "nodes": nodes,
        "scaling": scaling,
        "global_batch": global_batch,
        "per_device_batch": per_dev,
        "step_s": step,
        "single_step_s": t1,
        "speedup": speedup,
        "efficiency": speedup / n,
        "memory_gib_per_device": memory_gib,
        "parts_s": parts,
        "bottleneck": "memory" if not fits else max(parts, key=parts.get),
        "oversubscribed": oversubscribed,
        "assumed": assumed,
        "compute_source": m.compute_source,
        "superlinear_cause": cause,  # efficiency above 1 only with a named cause ("unexplained" otherwise)
    }


def superlinear_cause(m: Model, strategy: str, n: int, batch: int, per_dev: float, speedup: float) -> str:
    """Why N devices would be more than N times faster, from the inputs that can make them so; "unexplained"
    when none does (a test keeps committed projections free of those)."""
    causes = []
    if strategy == "fsdp" and m.times(per_dev)["optimizer"] > 0:
        causes.append("FSDP shards the optimizer step: each device updates 1/N of the parameters")
    if per_dev < batch:
        per_sample = lambda b: sum(m.times(b).values()) / b  # noqa: E731
        if per_sample(per_dev) < per_sample(batch) * (1 - 1e-9):
            causes.append(
                f"a step costs less per sample at batch {per_dev:g} than at {batch} (the profile's ladder)"
            )
    return "; ".join(causes) or "unexplained"

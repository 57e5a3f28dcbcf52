"""Projected step time, speedup and memory per strategy and device count, from a profile and a hardware file.

Torch-free arithmetic; docs/projection.md writes every formula down with its source. Inputs:
- a model profile (shared/profiling.py): forward / backward / optimizer / other time per step at a ladder of
  per-device batch sizes, per-piece forward time and output bytes, gradient-ready times, DDP buckets, bytes of
  parameters, gradients, optimizer state and saved activations, FLOPs and aten calls per step;
- a hardware description (hardware/*.yaml): either `measured` collectives of this machine (bench/
  collectives.py) or a latency and bus bandwidth per link, plus peak FLOP/s, an achieved efficiency, memory
  bandwidth and size, each figure with its source and whether it was measured or assumed.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from shared import roofline
from shared.roofline import gpu_step

GIB = 2**30
# the profile's format (shared/profiling.py writes it): bench/project.py measures a cached profile of another
# version again (2: DDP's overhead from forward + backward only; FSDP2's split into forward + backward and the
# optimizer step; 3: the op trace, the host's cost per call, the batch's bytes)
PROFILE_VERSION = 3
STRATEGIES = ("ddp", "fsdp", "pipeline", "pipeline_1f1b", "model_split", "hybrid")
FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
          "reduce_scatter": lambda n: (n - 1) / n, "send_recv": lambda n: 1.0}  # fmt: skip


# ----------------------------------------------------------------------------- collectives (alpha-beta)


def _interp(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear in log-log between measured points (x > 0); linear beyond the ends."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (x - x1) * (y1 - y0) / (x1 - x0)


def fit_alpha_beta(sizes: list[float], times: list[float], c: float) -> dict:
    """Least squares of t = latency + c * S / busbw in relative terms (weights 1/t^2, so every size counts
    alike), with the fit's median and worst relative residual."""
    a = [1 / t for t in times]
    b = [c * s / t for s, t in zip(sizes, times, strict=True)]
    saa, sab, sbb = (
        sum(x * x for x in a),
        sum(x * y for x, y in zip(a, b, strict=True)),
        sum(y * y for y in b),
    )
    det = saa * sbb - sab * sab
    lat = (sbb * sum(a) - sab * sum(b)) / det if det else statistics.fmean(times)
    inv_bw = (saa * sum(b) - sab * sum(a)) / det if det else 0.0
    lat, inv_bw = max(lat, 0.0), max(inv_bw, 1e-15)
    rel = sorted(abs(lat + c * s * inv_bw - t) / t for s, t in zip(sizes, times, strict=True))
    return {"latency_s": lat, "busbw_GBps": 1e-9 / inv_bw, "error_median": statistics.median(rel),
            "error_max": rel[-1]}  # fmt: skip


def latency(table: dict, interval: bool = True) -> dict | None:
    """The latency of one measured collective, from every call at the latency-bound sizes pooled: those whose
    bandwidth term c * S / busbw (the fit's) is at most the fit's latency. Small gloo messages on a CPU are
    scheduler-bound and bimodal (../shared/ENVIRONMENT.md part 3): per size, 30 calls' mean swings by 2x
    between measurements and is not monotone in S, so one latency from all of them, minus each call's
    bandwidth term, stands for them all. With `interval`, a 95% bootstrap interval over the calls where they
    are kept (a report's figure; pricing a collective needs only the mean). A record without per-call times
    gives the sizes' means, weighted by their calls."""
    fit, rows = table.get("fit") or {}, sorted(table.get("sizes", []), key=lambda r: r["bytes"])
    if not fit.get("busbw_GBps") or not rows:
        return None
    per_byte = table.get("factor", 1.0) / (fit["busbw_GBps"] * 1e9)
    bound = [r for r in rows if r["bytes"] * per_byte <= fit["latency_s"]] or rows[:1]
    calls = [t - r["bytes"] * per_byte for r in bound for t in r.get("times_s", [])]
    weights = [r.get("calls", 1) for r in bound]
    if calls:
        lat, n = statistics.fmean(calls), len(calls)
    else:
        n = sum(weights)
        lat = (
            sum(
                k * (r.get("mean_s", r["median_s"]) - r["bytes"] * per_byte)
                for k, r in zip(weights, bound, strict=True)
            )
            / n
        )
    low = high = None
    if calls and interval:
        rng = random.Random(0)
        means = sorted(statistics.fmean(rng.choices(calls, k=n)) for _ in range(400))
        low, high = means[10], means[389]
    return {"latency_s": max(lat, 0.0), "low_s": low, "high_s": high, "calls": n,
            "up_to_bytes": bound[-1]["bytes"], "per_byte_s": per_byte}  # fmt: skip


def _measured(table: dict, nbytes: float) -> float:
    """One measured collective at `nbytes`: the pooled latency plus the bandwidth term up to the largest
    latency-bound size; above it, the sizes' means interpolated (from that size's pooled value)."""
    points = [(r["bytes"], r.get("mean_s", r["median_s"])) for r in table["sizes"]]
    # nccl-tests' rows are already means over many iterations, monotone in S: interpolated as they are
    lat = latency(table, interval=False) if table.get("source") != "nccl-tests" else None
    if lat:
        top = lat["up_to_bytes"]
        pooled = lambda s: lat["latency_s"] + s * lat["per_byte_s"]  # noqa: E731
        if nbytes <= top:
            return pooled(nbytes)
        points = [(top, pooled(top)), *[p for p in points if p[0] > top]]
    return _interp(points, nbytes)


def pool_collectives(measurements: list[dict], rest: dict | None = None) -> dict:
    """Several measurements of this machine's collectives ({processes: {op: table}}) as one: at each size of
    the first, the calls of every measurement that has that size, pooled (mean, median, range), then `rest`'s
    larger sizes, and the fit redone; the back-to-back tables likewise."""

    def pool(tables: list[dict], more: dict | None) -> dict:
        out = {**tables[0], "sizes": []}
        top = max(r["bytes"] for r in tables[0]["sizes"])
        for row in tables[0]["sizes"] + [r for r in (more or {}).get("sizes", []) if r["bytes"] > top]:
            same = [r for t in tables for r in t["sizes"] if r["bytes"] == row["bytes"]] or [row]
            times = [x for r in same for x in r.get("times_s", [])]
            if len(times) == sum(r["calls"] for r in same):
                row = {**row, "times_s": times, "median_s": statistics.median(times),
                       "mean_s": statistics.fmean(times), "min_s": min(times), "max_s": max(times),
                       "calls": len(times)}  # fmt: skip
            out["sizes"].append(row)
        rows = out["sizes"]
        out["fit"] = fit_alpha_beta(
            [r["bytes"] for r in rows], [r["mean_s"] for r in rows], out.get("factor", 1.0)
        )
        out["measurements"] = len(tables)
        if "back_to_back" in tables[0]:
            b2b = [t.get("back_to_back", tables[0]["back_to_back"]) for t in tables]
            out["back_to_back"] = pool(b2b, (more or {}).get("back_to_back"))
        return out

    rest = rest or {}
    return {
        n: {op: pool([m[n][op] for m in measurements if op in m.get(n, {})], rest.get(n, {}).get(op))
            for op in ops}
        for n, ops in measurements[0].items()
    }  # fmt: skip


def collective_s(hw: dict, op: str, nbytes: float, n: int, nodes: int = 1, world: int | None = None,
                 follows: bool = False) -> float:  # fmt: skip
    """Seconds for one collective of `nbytes` over `n` devices (nccl-tests sizes: all_reduce moves S, all_gather
    gathers into S, reduce_scatter reduces S). One device or no bytes costs nothing. Across nodes:
    reduce-scatter inside each node, the collective on S/g between nodes, all-gather inside (hierarchical).

    `world`: the job's process count, when the collective runs in a sub-group (a hybrid's replicas, a stage
    pair). Where this machine's collectives were measured at that world size (more processes than cores: the
    scheduler's time slices set the latency), that measurement is used, at the bytes that give the
    sub-group's bandwidth term.

    `follows`: issued right after another collective of the same ranks (the loop's stop check after DDP's
    last bucket). On this machine that is the back-to-back regime, measured after a barrier: the ranks arrive
    together and gloo's threads are awake (bench/collectives.py)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    table = hw.get("measured_collectives", {})

    def pick(t: dict) -> dict:
        return t.get("back_to_back", t) if follows else t

    if world and world != n and str(world) in table and op in table[str(world)]:
        scaled = nbytes * FACTOR[op](n) / FACTOR[op](world)
        return _measured(pick(table[str(world)][op]), scaled)
    measured = table.get(str(n), {}).get(op)
    if measured:  # measured at this N (this machine, or your nccl-tests output)
        return _measured(pick(measured), nbytes)
    if nodes > 1:  # hierarchical, as NCCL runs it: NVLink inside a node, every GPU's NIC (rail) in parallel
        g = n // nodes
        if op == "all_reduce":
            inner = collective_s(hw, "reduce_scatter", nbytes, g) + collective_s(hw, "all_gather", nbytes, g)
            return inner + _link(hw, "inter", op, nbytes / max(g, 1), nodes)
        if op in ("reduce_scatter", "all_gather"):  # inside on S, then between nodes on each GPU's S/g
            return collective_s(hw, op, nbytes, g) + _link(hw, "inter", op, nbytes / max(g, 1), nodes)
        return _link(hw, "inter", op, nbytes, 2)
    return _link(hw, "intra", op, nbytes, n)


def _link(hw: dict, link: str, op: str, nbytes: float, n: int) -> float:
    """One collective on a link of a hardware file, as NCCL runs it, or on this machine's gloo beyond the N it
    was measured at.

    NCCL: latency = hops x latency_s / 2 (the file's latency_s is 2 GPUs' all-reduce: 2 hops), hops the fewer
    of a ring's (2(n-1) for all-reduce, n-1 for all-gather / reduce-scatter) and a tree's (2 log2 n, log2 n),
    as NCCL's tuner picks the faster for small messages; bus bandwidth saturating in the message size,
    busbw x S / (S + half_bytes) (nccl-tests' curves: a 25 MiB DDP bucket runs well below the peak).
    gloo (this machine): the fit, its latency along a ring's 2(n-1) steps from the N it was fitted at."""
    if "links" not in hw:
        spec = _fitted(hw, op)
        steps = 2 * (n - 1) / (2 * (spec.get("fitted_n", 2) - 1))
        return spec["latency_s"] * steps + FACTOR[op](n) * nbytes / (spec["busbw_GBps"] * 1e9)
    spec = hw["links"][link]
    log = math.ceil(math.log2(n))
    hops = min(2 * (n - 1), 2 * log) if op == "all_reduce" else min(max(n - 1, 1), max(log, 1))
    bw = spec["busbw_GBps"] * 1e9 * nbytes / (nbytes + spec.get("half_bytes", 0.0))
    return spec["latency_s"] / 2 * hops + FACTOR[op](n) * nbytes / bw


def _fitted(hw: dict, op: str) -> dict:
    """For N not measured on this machine: the fit at the largest N that was (labelled extrapolated)."""
    n = max(hw["measured_collectives"], key=int)
    fit = hw["measured_collectives"][n][op]["fit"]
    return {**fit, "fitted_n": int(n)}


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


# ----------------------------------------------------------------------------- schedules


def bubble_fraction(p: int, m: int) -> float:
    """GPipe / 1F1B idle share of the step with p equal stages and m micro-batches: (p-1)/(m+p-1)."""
    return (p - 1) / (m + p - 1)


def pipeline_makespan(fwd: list[float], bwd: list[float], comm: list[float], m: int, schedule: str) -> float:
    """Simulate the schedule: stage s runs its ops in order; F(s,j) waits for F(s-1,j) plus the activation's
    transfer comm[s-1], B(s,j) for B(s+1,j) plus the gradient's comm[s] (same bytes), the last stage's B for its
    own F. torch.distributed.pipelining posts its sends asynchronously (batch_isend_irecv), so a transfer
    delays the receiver, not the sender."""
    p = len(fwd)
    order = []
    for s in range(p):
        if schedule == "1f1b":
            warm = min(p - s - 1, m)
            ops = [("F", j) for j in range(warm)]
            for j in range(m - warm):
                ops += [("F", warm + j), ("B", j)]
            ops += [("B", j) for j in range(m - warm, m)]
        else:  # gpipe: all forwards, then all backwards
            ops = [("F", j) for j in range(m)] + [("B", j) for j in range(m)]
        order.append(ops)
    done, free, pos = {}, [0.0] * p, [0] * p
    while any(pos[s] < len(order[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(order[s]):
                continue
            kind, j = order[s][pos[s]]
            dep = (
                ("F", s - 1, j)
                if kind == "F" and s > 0
                else ("B", s + 1, j)
                if kind == "B" and s < p - 1
                else None
            )
            if kind == "B" and s == p - 1:
                dep = ("F", s, j)
            if dep is not None and dep not in done:
                continue
            edge = comm[s - 1] if kind == "F" and s > 0 else comm[s] if kind == "B" and s < p - 1 else 0.0
            start = max(free[s], done.get(dep, 0.0) + (edge if dep is not None else 0.0))
            free[s] = done[(kind, s, j)] = start + (fwd[s] if kind == "F" else bwd[s])
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocked")  # a bug in the orders above
    return max(free)


# ----------------------------------------------------------------------------- strategies


@dataclass
class _Priced:
    """One prediction being priced: its inputs, and the parts, memory, CPU-seconds and per-device batch each
    strategy's pricing fills in."""

    m: Model
    hw: dict
    profile: dict
    strategy: str
    n: int
    nodes: int
    batch: int
    per_dev: float
    replicas: int
    microbatches: int
    min_unit_params: int
    many: bool
    assumed: list = field(default_factory=list)  # inputs the profile lacks, priced as 0: a lower bound
    parts: dict = field(
        default_factory=lambda: {"input": 0.0, "compute": 0.0, "communication": 0.0, "bubble": 0.0}
    )
    memory: float = 0.0
    busy: float | None = None  # total CPU-seconds of all processes (the oversubscription check)

    @property
    def P(self) -> float:
        return self.profile["param_bytes"]

    @property
    def G(self) -> float:
        return self.profile["grad_bytes"]

    @property
    def S(self) -> float:
        return self.profile["optimizer_state_bytes"]

    def act(self, b: float) -> float:
        return self.m.at("saved_activation_bytes", b) or 0.0


def _price_data_parallel(c: _Priced) -> None:
    """DDP on N devices, or one device: each replica's step, DDP's own work, the buckets' all-reduces as
    backward releases them."""
    m, hw, profile, n, nodes, assumed = c.m, c.hw, c.profile, c.n, c.nodes, c.assumed
    P, G, S, per_dev, parts, act = c.P, c.G, c.S, c.per_dev, c.parts, c.act
    t = m.times(per_dev, contended=c.many)
    parts["input"] = t.pop("input")
    parts["compute"] = sum(t.values())
    if n > 1 and m.local:  # DDP's bucket copies and averaging, measured on a one-rank group
        parts["compute"] += _overhead(profile, "ddp_overhead_s", assumed)
    elif n > 1:  # a GPU modelled: its copies at memory bandwidth and its kernels (shared/roofline.py)
        parts["compute"] += roofline.ddp_wrapper_s(profile, hw, len(profile["ddp_buckets"]))
    if n > 1:
        ready = m.ready(per_dev)
        comm, end = 0.0, 0.0
        for bucket in profile["ddp_buckets"]:
            nbytes = sum(profile["params"][j]["bytes"] for j in bucket)
            cost = collective_s(hw, "all_reduce", nbytes, n, nodes)  # world = n
            comm += cost
            r = max((ready[j] for j in bucket if ready[j] is not None), default=t["backward"])
            end = max(r, end) + cost
        # overlapped with backward where the device computes while it communicates (GPUs: a NCCL stream);
        # on a CPU core the collective's own work competes with backward for the same core, so all of it shows
        exposed = max(0.0, end - t["backward"]) if hw.get("comm_overlaps_compute") else comm
        parts["communication"] = exposed
    c.memory = P + G + S + act(per_dev) + (G if n > 1 else 0)


def _price_fsdp(c: _Priced) -> None:
    """FSDP2 on N devices: each rank's step with the optimizer over its shard, FSDP2's own work, the units'
    all-gathers and reduce-scatters."""
    m, hw, profile, n, nodes, assumed = c.m, c.hw, c.profile, c.n, c.nodes, c.assumed
    P, G, S, per_dev, parts, act = c.P, c.G, c.S, c.per_dev, c.parts, c.act
    t = m.times(per_dev, contended=True)
    parts["input"] = t.pop("input")
    t["optimizer"] /= n
    # FSDP2's own work each step, measured on a one-rank group: copy-in/out and hooks in forward and
    # backward, and DTensor dispatch in the optimizer step, which each rank runs over its 1/N shard
    parts["compute"] = sum(t.values())
    if m.local:
        parts["compute"] += _overhead(profile, "fsdp_overhead_s", assumed)
        parts["compute"] += _overhead(profile, "fsdp_optimizer_overhead_s", assumed) / n
    units = _fsdp_units(profile, c.min_unit_params)
    # a unit is gathered again at every call of its forward (resharded after each): the decoder of a seq2seq
    # runs once per teacher-forced segment; older profiles have no call counts (once)
    calls = _fsdp_unit_calls(profile, c.min_unit_params)
    if not m.local:  # a GPU modelled: FSDP2's copies at memory bandwidth and its kernels
        parts["compute"] += roofline.fsdp_wrapper_s(profile, hw, units, calls, n)
    ag = [c * collective_s(hw, "all_gather", u, n, nodes) for u, c in zip(units, calls, strict=True)]
    rs = [collective_s(hw, "reduce_scatter", u, n, nodes) for u in units]
    if hw.get("comm_overlaps_compute"):
        # torch.distributed._tools.fsdp_ilp: the next unit's all-gather hides behind this unit's forward;
        # backward hides its all-gather and reduce-scatter behind the unit's backward. Units in forward
        # order, root first; a unit's compute is its pieces' share of the forward (and of the backward).
        share = _fsdp_unit_shares(profile, c.min_unit_params, m.at("piece_s", profile["batch_size"]))
        fwd = [t["forward"] * x for x in share]
        bwd = [t["backward"] * x for x in share]
        order = [len(units) - 1, *range(len(units) - 1)]
        exposed = ag[order[0]] + sum(max(0.0, ag[b] - fwd[a]) for a, b in zip(order, order[1:], strict=False))
        exposed += sum(max(0.0, (ag[k] if k != len(units) - 1 else 0.0) + rs[k] - bwd[k]) for k in order)
    else:  # a CPU core runs the collectives itself: every one of them shows
        # the root unit is not resharded after forward (FSDP2), so it is gathered once
        exposed = sum(ag) + sum(ag[:-1]) + sum(rs)
    parts["communication"] = exposed
    c.memory = (P + G + S) / n + act(per_dev) + max(units, default=0) + units[-1]


def _price_model_split(c: _Priced) -> None:
    """A model split in one process over N devices: the whole step, the activations sent between stages."""
    m, hw, n, parts, act = c.m, c.hw, c.n, c.parts, c.act
    P, G, S = c.P, c.G, c.S
    stages = m.stages(n, c.batch)
    t = m.times(c.batch)
    parts["input"] = t.pop("input")
    parts["compute"] = sum(t.values())
    if not hw.get("kind") == "measured" or hw.get("devices_distinct", False):
        parts["communication"] = sum(2 * collective_s(hw, "send_recv", st["send_bytes"], 2) for st in stages)
    per_stage = [
        (st["param_bytes"] / max(P, 1)) * (P + G + S) + st["act_share"] * act(c.batch) for st in stages
    ]
    c.memory = max(per_stage)
    c.per_dev = c.batch


def _price_pipeline(c: _Priced) -> None:
    """A pipeline (GPipe or 1F1B) of N stages, or the hybrid's N/2 replicas of 2 stages: the schedule's
    makespan, its bubble, the transfers on the critical path, the replicas' gradient sync."""
    m, hw, n, parts, act = c.m, c.hw, c.n, c.parts, c.act
    P, G, S, per_dev = c.P, c.G, c.S, c.per_dev
    dp = c.replicas
    pp = n // dp
    sched = "1f1b" if c.strategy == "pipeline_1f1b" else "gpipe"
    b_rep = per_dev
    micro = b_rep / c.microbatches
    stages = m.stages(pp, micro)
    comm = [collective_s(hw, "send_recv", st["send_bytes"], 2) for st in stages]
    fwd, bwd = [st["forward"] for st in stages], [st["backward"] for st in stages]
    span = pipeline_makespan(fwd, bwd, comm, c.microbatches, sched)
    span0 = pipeline_makespan(fwd, bwd, [0.0] * len(comm), c.microbatches, sched)  # transfers free
    t = m.times(b_rep, contended=True)
    share = [st["param_bytes"] / max(P, 1) for st in stages]
    opt = max(t["optimizer"] * s for s in share)
    work = [c.microbatches * (st["forward"] + st["backward"]) for st in stages]
    sync = 0.0
    if dp > 1:  # each stage's gradients all-reduced over its replicas (after the schedule, not overlapped)
        sync = max(collective_s(hw, "all_reduce", G * s, dp, 1) for s in share)
    parts["compute"] = max(work) + opt + t["other"]
    parts["input"] = t["input"]
    parts["communication"] = span - span0 + sync  # transfers on the critical path, then the replica sync
    parts["bubble"] = max(0.0, span0 - max(work))
    # CPU-seconds of all processes: on a CPU, gloo's transfers are the cores' own copies and system calls
    # (a 4-process hybrid on 2 cores spent 10 s of its 54 CPU-seconds in the kernel), so they count as work
    c.busy = (
        dp * (sum(work) + t["optimizer"] + sum(comm) * c.microbatches * 2 + pp * sync + t["input"])
        + dp * pp * t["other"]
    )
    in_flight = c.microbatches if sched == "gpipe" else min(c.microbatches, pp)
    c.memory = max(
        s * (P + G + S) + st["act_share"] * act(micro) * in_flight
        for s, st in zip(share, stages, strict=True)
    )
    c.per_dev = b_rep


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
    c = _Priced(
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
        _price_data_parallel(c)
    elif strategy == "fsdp":
        _price_fsdp(c)
    elif strategy == "model_split":
        _price_model_split(c)
    elif strategy in ("pipeline", "pipeline_1f1b", "hybrid"):
        _price_pipeline(c)
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


def _overhead(profile: dict, key: str, assumed: list) -> float:
    """A wrapper's own work per step (profile[key], seconds), as contended as the optimizer; 0 when the profile
    could not measure it, noted in `assumed`."""
    if profile.get(key) is None:
        assumed.append(f"{key} = 0 (not measured)")
        return 0.0
    return profile[key] * (profile.get("optimizer_contention") or 1.0)


def _fsdp_unit_pieces(profile: dict, min_params: int) -> tuple[list[int], list[float]]:
    """FSDP units: every piece with at least `min_params` parameters is its own unit (Accelerate's
    SIZE_BASED_WRAP, accelerate_configs/*_fsdp.yaml), the rest stays in the root unit (last). Returns the
    pieces of the own units and the bytes of every unit."""
    by_piece: dict[int, float] = {}
    for q in profile["params"]:
        by_piece[q["piece"]] = by_piece.get(q["piece"], 0) + q["bytes"]
    elem = 4 if profile.get("dtype", "float32") == "float32" else 2
    own = [k for k, v in by_piece.items() if k is not None and v / elem >= min_params]
    units = [by_piece[k] for k in own]
    return own, [*units, profile["param_bytes"] - sum(units)]


def _fsdp_units(profile: dict, min_params: int) -> list[float]:
    """Bytes per FSDP unit, root last."""
    return _fsdp_unit_pieces(profile, min_params)[1]


def _fsdp_unit_calls(profile: dict, min_params: int) -> list[float]:
    """Forward calls per step of each FSDP unit (units as _fsdp_units, root last: once)."""
    own, _ = _fsdp_unit_pieces(profile, min_params)
    per_piece = profile["sizes"][str(profile["batch_size"])].get("piece_calls")
    return [max(1.0, per_piece[k]) if per_piece else 1.0 for k in own] + [1.0]


def _fsdp_unit_shares(profile: dict, min_params: int, piece_s: list[float]) -> list[float]:
    """Each FSDP unit's share of the forward time (units as _fsdp_units, root last)."""
    own, _ = _fsdp_unit_pieces(profile, min_params)
    total = sum(piece_s) or 1.0
    shares = [piece_s[k] / total for k in own]
    return [*shares, max(0.0, 1.0 - sum(shares))]


def sentence(model: str, hw_name: str, preds: list[dict]) -> str:
    """One line answering "does N devices pay off?" for a model on a hardware profile: at the same global
    batch (strong scaling) first, then with the batch per replica kept (weak), else what holds it back."""

    def pays(scaling):
        ok = [
            p
            for p in preds
            if p["scaling"] == scaling and p["speedup"] > 1.05 and p["bottleneck"] != "memory"
        ]
        if not ok:
            return None
        first = min(ok, key=lambda p: (p["devices"], -p["speedup"]))
        best = max(ok, key=lambda p: p["speedup"])
        return (
            f"{first['strategy']} pays off from N = {first['devices']} (x{first['speedup']:.2f}, global batch "
            f"{first['global_batch']}); best {best['strategy']} at N = {best['devices']} (x{best['speedup']:.2f})"
        )

    def held_back(scaling):
        mine = [p for p in preds if p["scaling"] == scaling]
        if not mine:
            return "nothing projected"
        top = max(mine, key=lambda p: p["speedup"])
        share = top["parts_s"]["communication"] / top["step_s"]
        return (
            f"nothing pays off (best {top['strategy']} at N = {top['devices']}: x{top['speedup']:.2f}, "
            f"{top['bottleneck']}-bound, communication {share:.0%} of the step)"
        )

    strong, weak = pays("strong"), pays("weak")
    if strong:
        return f"{model} on {hw_name}: at the same global batch {strong}"
    if weak:
        return f"{model} on {hw_name}: at the same global batch {held_back('strong')}; with the batch per replica kept, {weak}"
    return f"{model} on {hw_name}: at the same global batch {held_back('strong')}; with the batch per replica kept, {held_back('weak')}"


# ----------------------------------------------------------------------------- ranges and verdicts

VERDICTS = ("pays off", "does not pay off", "cannot tell")
SIMPLEST = ("single", "ddp", "fsdp", "model_split", "pipeline_1f1b", "pipeline", "hybrid")


def load_residuals(path: str | Path | None = None) -> dict:
    """The validation residuals every prediction's range comes from (shared/residuals.yaml)."""
    import yaml

    return yaml.safe_load(Path(path or Path(__file__).with_name("residuals.yaml")).read_text())


def with_range(pred: dict, residuals: dict) -> dict:
    """`pred` with the range its kind of figure has shown in validation, and a verdict.

    `residuals` (shared/residuals.yaml): per kind, `measured` (compute measured on the device projected) or
    `modelled` (a GPU modelled from its op trace), the lowest and highest relative error, predicted over
    measured minus 1, of the step time and of the speedup over one device. The truth was within
    prediction / (1 + high) .. prediction / (1 + low) there, so that is the range. Verdict: `pays off` when the
    whole speedup range is above 1, `does not pay off` when it is below, else `cannot tell`; one device is
    the baseline (no verdict)."""
    kind = "measured" if pred["compute_source"].startswith("measured") else "modelled"
    r = residuals.get(kind) or {}

    def span(value: float, errors: dict | None) -> list[float] | None:
        if not errors:
            return None
        return [value / (1 + errors["high"]), value / (1 + errors["low"])]

    step, speedup = span(pred["step_s"], r.get("step")), span(pred["speedup"], r.get("speedup"))
    if pred["devices"] == 1 and pred["strategy"] == "single":
        verdict = "baseline"
    elif speedup is None:
        verdict = "cannot tell"
    else:
        verdict = VERDICTS[0] if speedup[0] > 1 else VERDICTS[1] if speedup[1] < 1 else VERDICTS[2]
    return {**pred, "compute_kind": kind, "step_range_s": step, "speedup_range": speedup, "verdict": verdict,
            "range_source": r.get("source", "no validation of this kind: no range")}  # fmt: skip


def verdict_lines(model: str, hw_name: str, preds: list[dict]) -> list[str]:
    """Per N > 1, one line: the strategy with the highest speedup (a batch that does not fit is no option),
    its speedup and range, the verdict, whether compute was measured or modelled, and the bottleneck."""
    out = []
    for scaling in ("strong", "weak"):
        for n in sorted({p["devices"] for p in preds if p["devices"] > 1 and p["scaling"] == scaling}):
            mine = [
                p
                for p in preds
                if p["devices"] == n and p["scaling"] == scaling and p["bottleneck"] != "memory"
            ]
            if not mine:
                out.append(f"{model} on {hw_name}, N = {n} ({scaling}): no strategy fits in memory")
                continue
            top = max(p["speedup"] for p in mine)
            # the simplest strategy within 5% of the fastest: FSDP or a pipeline only where the figures say so
            best = min(
                (p for p in mine if p["speedup"] >= 0.95 * top), key=lambda p: SIMPLEST.index(p["strategy"])
            )
            rng = best.get("speedup_range")
            band = f" [{rng[0]:.2f}-{rng[1]:.2f}]" if rng else ""
            verdict = best.get("verdict", "cannot tell")
            figure = f"{best['strategy']} x{best['speedup']:.2f}{band}, {best['bottleneck']}-bound"
            advice = f"stay on one device (best: {figure})" if verdict == VERDICTS[1] else figure
            out.append(f"{model} on {hw_name}, N = {n} ({scaling} scaling): {verdict}: {advice}, compute "
                       f"{best['compute_source']}")  # fmt: skip
    return out


WHY = {  # the part of the step that dominates: why it pays off, and why not
    "compute": ("the step is mostly compute, which the devices share",
                "the devices do not finish it sooner here (a smaller batch per device runs less efficiently, or "
                "the processes share the host's cores and memory bandwidth)"),
    "communication": ("the exchange of gradients or activations is small next to the compute saved",
                      "exchanging gradients or activations costs more than the compute it saves"),
    "input": ("each process brings its own input pipeline, and the pipeline sets the pace",
              "the input pipeline, not the device, sets the pace"),
    "bubble": ("the pipeline's stages overlap", "the pipeline's stages wait for each other (its bubble)"),
}  # fmt: skip


def recommendation_lines(model: str, hw_name: str, preds: list[dict]) -> list[str]:
    """What to do, one line per N > 1 at the same batch per device (weak scaling; strong where no weak was
    projected): the strategy to use (the simplest within 5% of the fastest; model_split only when nothing else
    fits, as it runs one device at a time), its expected speedup and range, and why, from the part of the step
    that dominates; or "stay on one device" and why; or "cannot tell" where the range spans 1.0."""
    scaling = "weak" if any(p["scaling"] == "weak" for p in preds) else "strong"
    out = [f"{model} on {hw_name}, what to do ({scaling} scaling):"]
    for n in sorted({p["devices"] for p in preds if p["devices"] > 1 and p["scaling"] == scaling}):
        fit = [
            p for p in preds if p["devices"] == n and p["scaling"] == scaling and p["bottleneck"] != "memory"
        ]
        fit = [p for p in fit if p["strategy"] != "model_split"] or fit
        if not fit:
            out.append(
                f"  N = {n}: no strategy fits this batch in a device's memory: a smaller batch, or more memory"
            )
            continue
        top = max(p["speedup"] for p in fit)
        best = min(
            (p for p in fit if p["speedup"] >= 0.95 * top), key=lambda p: SIMPLEST.index(p["strategy"])
        )
        rng = best.get("speedup_range")
        # the range first: where measured speedups fell against predictions of this kind (it may lie wholly
        # below the point, where validations found the model optimistic)
        figure = (
            f"x{rng[0]:.2f}-{rng[1]:.2f} (point x{best['speedup']:.2f}"
            if rng
            else f"x{best['speedup']:.2f} ("
        )
        figure += f"{', ' if rng else ''}{best['compute_source'].split(' ')[0]})"
        verdict = best.get("verdict", "cannot tell")
        part = best["bottleneck"]
        share = best["parts_s"].get(part, 0.0) / best["step_s"] if best["step_s"] else 0.0
        gain, loss = WHY.get(part, ("it dominates", "it dominates"))
        why = f"{part} is {share:.0%} of the step: {gain if verdict == VERDICTS[0] else loss}"
        if verdict == VERDICTS[0]:
            out.append(f"  N = {n}: use {best['strategy']}, expected {figure}; {why}")
        elif verdict == VERDICTS[1]:
            out.append(f"  N = {n}: stay on one device (best: {best['strategy']} {figure}); {why}")
        else:
            out.append(f"  N = {n}: cannot tell ({best['strategy']} {figure}: the range spans 1.0); {why}; "
                       "measure it (make bench-all)")  # fmt: skip
    return out

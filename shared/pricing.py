"""Each strategy's step priced on N devices: the parts of the step (input, compute, communication, the
pipeline's bubble), the memory per device and, for pipelines, the CPU-seconds of all processes, from a profile
read at any batch (shared/projection.py `Model`) and the collectives' times (shared/collective_time.py).
Torch-free; docs/projection.md writes every formula down with its source. shared/projection.py `project`
picks the pricing of a strategy and turns its parts into a step time, speedup and bottleneck."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import roofline
from shared.collective_time import collective_s

if TYPE_CHECKING:
    from shared.projection import Model


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
class Priced:
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


def price_data_parallel(c: Priced) -> None:
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


def price_fsdp(c: Priced) -> None:
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


def price_model_split(c: Priced) -> None:
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


def price_pipeline(c: Priced) -> None:
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

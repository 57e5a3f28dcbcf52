"""Seconds for one collective (alpha-beta): from this machine's measured collectives (bench/collectives.py,
the latency-bound calls pooled, the larger sizes interpolated), or from a hardware file's links as NCCL runs
them. Torch-free; docs/projection.md writes every formula down with its source (shared/pricing.py prices each
strategy's step with these)."""

from __future__ import annotations

import math
import random
import statistics

# nccl-tests' bus-bandwidth factor of each collective on n devices (its doc/PERFORMANCE.md)
FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
          "reduce_scatter": lambda n: (n - 1) / n, "send_recv": lambda n: 1.0}  # fmt: skip


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

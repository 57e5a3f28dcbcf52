"""Which runs may be compared, and their speedups with intervals and flags (the dashboard's numbers).

A comparison group holds the runs that did the same work under the same conditions: same model, script,
profile (and bench batch: ratios are measured within one bench run), hardware, global batch, data and step
budget, i.e. the same configuration except the parallelism knobs and the seed. Within a group a cell is one
setup (strategy x processes x devices); its runs (seeds, repeats) are pooled. The baseline of a group is its
one-device single-strategy cell. A run with no such baseline in its group shows no speedup.

Step-time samples per run: the steady-state windows of the run's `timing.steady` (records since the steady
timer); for older records the per-epoch seconds per step, without epoch 1 (it carries the warm-up) when
there are two or more epochs, else flagged warm-up-dominated. The study's files go through the same code
with the study's own baseline (its 1-GPU Colab run).
"""

from __future__ import annotations

import hashlib
import json
import math

from board.reference import HARDWARE_1GPU
from shared import stats

# config keys that choose how the work is parallelised or bookkept, not what work is done
NOT_WORK = {
    "seed",
    "tag",
    "runs_dir",
    "data_dir",
    "save_model",
    "resume",
    "strategy",
    "microbatches",
    "schedule",
    "pp_size",
    "split_devices",
    "checkpoint_every",
    "keep_checkpoints",
    "collective_timeout_s",
    "on_nan",
    "check_every",
    "warmup_steps",
    "source_file",
    "entry",
}


def bench_tag(rec: dict) -> dict:
    """bench:<batch>:<profile>:<matrix model>:<setup>:seed<k>[:r<rep>] -> its parts; {} for other tags."""
    parts = (rec.get("tag") or "").split(":")
    if len(parts) >= 6 and parts[0] == "bench":
        return {"batch": parts[1], "profile": parts[2], "entry": parts[3], "setup": parts[4]}
    return {}


def hardware(rec: dict) -> str:
    s = rec.get("setup") or {}
    return str((s.get("device_names") or s.get("devices") or ["?"])[0])


def devices(rec: dict) -> int:
    """Devices doing the work: distinct GPUs, or CPU processes (each pinned to one core by the benches).
    A model split over cpu,cpu in one process is one device; over cuda:0,cuda:1 it is two."""
    s = rec.get("setup") or {}
    if rec.get("kind") == "study":
        return int(s.get("num_processes") or 1) if s.get("strategy") != "model_split" else 2
    gpus = {str(d) for d in s.get("devices") or [] if not str(d).startswith("cpu")}
    mesh = math.prod(int(v) for v in (s.get("mesh_shape") or {}).values() if isinstance(v, int)) or 1
    if gpus:
        return max(
            len(gpus), int(s.get("num_processes") or 1), mesh if s.get("strategy") == "model_split" else 1
        )
    return int(s.get("num_processes") or 1)


def group_key(rec: dict) -> str:
    """The comparison group: everything that defines the work, without the parallelism knobs and the seed."""
    if rec.get("kind") == "study":
        return f"study:{rec['model']}"
    bt = bench_tag(rec)
    d = rec.get("data") or {}
    cfg = {k: v for k, v in (rec.get("config") or {}).items() if k not in NOT_WORK}
    key = [
        rec.get("model"),
        rec.get("script"),
        bt.get("profile", "adhoc"),
        bt.get("batch"),
        bt.get("entry"),
        hardware(rec),
        (rec.get("setup") or {}).get("global_batch_size"),
        d.get("source"),
        d.get("synthetic"),
        d.get("used"),
        cfg,
    ]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def step_samples(rec: dict) -> tuple[list[float], bool]:
    """(seconds-per-step samples, warm-up-dominated) of one run."""
    steady = (rec.get("timing") or {}).get("steady") or {}
    wins = [w for w in steady.get("windows_step_s") or [] if _num(w)]
    if wins:
        return wins, bool(steady.get("warmup_dominated"))
    rows, prev_step, out = rec.get("history") or [], 0, []
    for h in rows:
        t, step = _num(h.get("time/train_s")), h.get("step")
        n = step - prev_step if isinstance(step, int) and step > prev_step else None
        if isinstance(step, int):
            prev_step = step
        if t is not None:
            out.append((t / n) if n else t)  # the study's files carry no step count: seconds per epoch
    if len(out) >= 2:
        return out[1:], False
    return out, True


def pooled_warm(members: list[dict]) -> bool:
    """Warm-up-dominated over a cell's launches together (as bench/cells.py judges it): each launch of a
    repeated cell may be short on its own. Records without the figures: any of them flagged."""
    steadies = [((m["rec"].get("timing") or {}).get("steady") or {}) for m in members]
    if not all("steps" in st for st in steadies):
        return any(m["warm"] for m in members)
    steps = sum(st["steps"] for st in steadies)
    warm = sum(_num(st.get("warmup_s")) or 0.0 for st in steadies)
    steady = sum(_num(st.get("steady_s")) or 0.0 for st in steadies)
    return steps < stats.MIN_STEADY_STEPS or warm > steady


def contended(rec: dict) -> bool:
    return bool(((rec.get("timing") or {}).get("steady") or {}).get("contended"))


def _grouped(runs: list[dict]) -> dict[tuple, list[dict]]:
    """(group, setup) -> its runs with their step samples, in a fixed order (seed, repeat)."""
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("status", "finished") not in ("finished", "running") and r.get("kind") != "study":
            continue
        samples, warm = step_samples(r)
        if not samples:
            continue
        s = r.get("setup") or {}
        setup = bench_tag(r).get("setup") or f"{s.get('strategy')} x{devices(r)}"
        if r.get("kind") == "study":
            setup = f"{s.get('strategy')} x{devices(r)} ({hardware(r)})"
        by.setdefault((group_key(r), setup), []).append({"rec": r, "samples": samples, "warm": warm})
    for members in by.values():  # a fixed order (seed, repeat), so paired cells line their windows up
        members.sort(
            key=lambda m: (
                (m["rec"].get("config") or {}).get("seed") or 0,
                m["rec"].get("tag") or "",
                m["rec"]["run_id"],
            )
        )
    return by


def _cell(group: str, setup: str, members: list[dict]) -> dict:
    """One cell: its runs' samples pooled, the median step with its interval, and what may flag it."""
    first = members[0]["rec"]
    s = first.get("setup") or {}
    samples = [x for m in members for x in m["samples"]]
    # one list of windows per launch: the hierarchical bootstrap
    launches = [m["samples"] for m in members]
    step, ci = stats.launches_median_ci(launches)
    return {
        "group": group,
        "setup": setup,
        "model": first["model"],
        "kind": first.get("kind", "ours"),
        "strategy": s.get("strategy"),
        "devices": devices(first),
        "processes": int(s.get("num_processes") or 1),
        "hardware": hardware(first),
        "global_batch": s.get("global_batch_size"),
        "profile": bench_tag(first).get("profile", "study" if first.get("kind") == "study" else "adhoc"),
        "bench_batch": bench_tag(first).get("batch"),
        "runs": len(members),
        "run_ids": [m["rec"]["run_id"] for m in members],
        "samples": samples,
        "launches": launches,
        "pair_key": [
            (
                (m["rec"].get("config") or {}).get("seed"),
                m["rec"].get("kind") == "study",
                len(m["samples"]),
            )
            for m in members
        ],
        "step_s": step,
        "step_s_ci95": ci,
        "warm": pooled_warm(members),
        "contended": any(contended(m["rec"]) for m in members),
        "oversubscribed": not any(str(d).startswith("cuda") for d in s.get("devices") or [])
        and first.get("kind") != "study"
        and int(s.get("num_processes") or 1)
        > int(((first.get("timing") or {}).get("steady") or {}).get("cpu_cores") or 10**6),
    }


def _compare(c: dict, out: list[dict]) -> None:
    """The cell's speedup over its group's 1-device run, intervals and flags (none without a baseline)."""
    base = [b for b in out if b["group"] == c["group"] and b["devices"] == 1 and b["strategy"] == "single"]
    if c["kind"] == "study":  # the study compared with its 1-GPU Colab run
        base = [b for b in base if b["hardware"] == HARDWARE_1GPU] or base
    if not base:
        c.update(speedup=None, speedup_ci95=None, efficiency=None, efficiency_ci95=None)
        c["flags"] = [f for f, on in (("contended", c["contended"]), ("warmup-dominated", c["warm"])) if on]
        return
    b = base[0]
    c["baseline_setup"] = b["setup"]
    c.update(
        stats.comparison(
            b["launches"],
            c["launches"],
            c["devices"],
            contended=c["contended"] or b["contended"],
            warmup_dominated=c["warm"] or b["warm"],
            oversubscribed=c["oversubscribed"],
            paired=c["kind"] != "study" and c["pair_key"] == b["pair_key"],
        )
    )
    if c["kind"] == "study":  # one sample per epoch of one rank; its flaws are named elsewhere
        c["flags"] = [f for f in c["flags"] if f != "warmup-dominated"]


def cells(runs: list[dict]) -> list[dict]:
    """One dict per (group, setup) with pooled samples, speedup, intervals and flags."""
    out = [_cell(group, setup, members) for (group, setup), members in _grouped(runs).items()]
    for c in out:
        _compare(c, out)
    return out


def run_comparisons(runs: list[dict]) -> dict[str, dict]:
    """run_id -> its cell's speedup, interval and flags (every run of a cell shares them)."""
    return {rid: c for c in cells(runs) for rid in c["run_ids"]}

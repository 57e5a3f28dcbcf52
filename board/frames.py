"""Run records as DataFrames behind `dashboard.py`: one row per run, one row per (run, epoch), filters and
the helpers every view shares (numbers, times, setup names, seeds, metric labels).

No Streamlit, torch or accelerate here, so every view is testable on its own and the page starts in a second.
Our run records and the study's files (converted by `board.reference`) go through the same code: a run is
a dict shaped like a record (`model`, `status`, `setup`, `data`, `config`, `metrics`, `history`, `test`).
Metric names, labels and goals come from each record's `metrics` block, so no view has per-model code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math

import pandas as pd

from board import comparisons
from shared import stats
from shared.record import HEARTBEAT_S

# A `running` record whose heartbeat (updated_at) is older than this is shown as crashed. Scripts rewrite a
# running record every HEARTBEAT_S (30 s) from a thread, so 4 missed beats mean the process is gone.
STALE_S = 4 * HEARTBEAT_S
# Keys every record's history carries; their labels and goals are the same for every model.
BUILTIN = {
    "time/train_s": {"label": "training time per epoch", "unit": "s", "goal": "min"},
    "time/eval_s": {"label": "evaluation time per epoch", "unit": "s", "goal": "min"},
    "time/epoch_s": {"label": "epoch time (train + eval)", "unit": "s", "goal": "min"},
    "time/elapsed_s": {"label": "wall-clock seconds since start", "unit": "s", "goal": "min"},
    "throughput/samples_per_s": {"label": "throughput", "unit": "samples/s", "goal": "max"},
    "memory/peak_gib": {"label": "peak memory", "unit": "GiB", "goal": "min"},
    "test/time_s": {"label": "test pass time", "unit": "s", "goal": "min"},
    "speedup": {"label": "speedup vs 1 device", "unit": "x", "goal": "max"},
    "efficiency": {"label": "scaling efficiency", "unit": "fraction", "goal": "max"},
}
NOT_CURVES = {"epoch", "step", "samples_seen", "time/elapsed_s"}
# Config keys that do not change what is trained: runs differing only in these are repeats (seeds) of one experiment.
NOT_EXPERIMENT = {"seed", "tag", "runs_dir", "data_dir", "save_model", "source_file", "entry"}


STRATEGY_NAMES = {
    "single": "one device",
    "ddp": "DDP",
    "fsdp": "FSDP",
    "model_split": "model split",
    "pipeline": "pipeline",
    "pipeline_1f1b": "pipeline (1F1B)",
    "hybrid": "hybrid (DDP x pipeline)",
}


def strategy_name(strategy) -> str:
    return STRATEGY_NAMES.get(strategy, str(strategy))


def number(v) -> float | None:
    """JSON value -> float; "nan"/"inf" strings (diverged runs) become floats; anything else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v.strip().lower().replace("infinity", "inf"))
    return None


def finite(v) -> bool:
    return v is not None and isinstance(v, float) and math.isfinite(v)


def parse_time(s) -> dt.datetime | None:
    if not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def setup_name(rec: dict) -> str:
    """The bench setup from the tag (bench:<batch>:<profile>:<model>:<setup>:seed<k>), else e.g. "ddp x2 cpu"."""
    parts = (rec.get("tag") or "").split(":")
    if len(parts) >= 6 and parts[0] == "bench":
        return parts[4]
    s = rec["setup"]
    kind = "gpu" if any(not str(d).startswith("cpu") for d in s.get("devices") or []) else "cpu"
    return f"{s['strategy']} x{workers(rec)} {kind}"


def workers(rec: dict) -> int:
    """Devices doing the work (board.comparisons.devices): distinct GPUs, or CPU processes; a model split
    over cpu,cpu in one process is one device."""
    return comparisons.devices(rec)


def seed_of(rec: dict):
    seed = rec.get("config", {}).get("seed")
    if seed is None:
        last = (rec.get("tag") or "").rsplit(":", 1)[-1]
        seed = int(last[4:]) if last.startswith("seed") and last[4:].isdigit() else None
    return seed


def metric_info(runs: list[dict]) -> dict[str, dict]:
    """Label / unit / goal for every metric key, from the records' own `metrics` blocks. Where the runs shown
    disagree (train/loss is cross-entropy for one model, MSE for another) the label is the key itself."""
    seen: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r.get("kind") == "study"):
        for k, v in (r.get("metrics") or {}).items():
            if r.get("kind") != "study" or k not in seen:  # ours describe a key better than the study's
                seen.setdefault(k, []).append(v)
    info = dict(BUILTIN)
    for k, vs in seen.items():
        labels, units = {v.get("label") for v in vs}, {v.get("unit") for v in vs}
        info[k] = {
            "label": labels.pop() if len(labels) == 1 else k,
            "goal": vs[0].get("goal"),
            **({"unit": units.pop()} if len(units) == 1 and None not in units else {}),
        }
    return info


def metric_label(key: str, info: dict) -> str:
    m = info.get(key, {})
    unit = m.get("unit")
    return f"{m.get('label', key)}{f' ({unit})' if unit and unit != 'fraction' else ''}"


def experiment(rec: dict) -> str:
    """Short hash of everything that defines the experiment: config without the seed and paths, and the setup."""
    cfg = {k: v for k, v in (rec.get("config") or {}).items() if k not in NOT_EXPERIMENT}
    key = [
        rec["model"],
        setup_name(rec),
        cfg,
        (rec["setup"].get("device_names") or [None])[0],
        rec.get("data", {}).get("source"),
        rec.get("data", {}).get("used"),
    ]
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]


def metric_choice(key: str, info: dict) -> str:
    """How a metric key reads in a drop-down: the key, and its label when that says more."""
    label = metric_label(key, info)
    return key if label == key else f"{key}: {label}"


def effective_status(rec: dict, now: dt.datetime, stale_s: float) -> str:
    if rec.get("status") == "running":
        t = parse_time(rec.get("updated_at"))
        if t is not None and (now - t).total_seconds() > stale_s:
            return "crashed"
    return rec.get("status", "unknown")


def _median(values) -> float | None:
    vals = [v for v in values if finite(v)]
    return float(pd.Series(vals).median()) if vals else None


def final_metric(rec: dict) -> tuple[str | None, float | None]:
    """The primary test metric; for a run without test results, the last epoch's validation counterpart."""
    key = rec.get("primary_metric")
    if not key:
        return None, None
    v = number(rec.get("test", {}).get(key))
    if v is not None:
        return key, v
    val_key = key.replace("test/", "val/", 1)
    for row in reversed(rec.get("history") or []):
        v = number(row.get(val_key))
        if v is not None:
            return f"{val_key} (epoch {row.get('epoch')})", v
    return key, None


def chance_level(rec: dict, key: str | None) -> float | None:
    """What guessing scores on metric `key`: the record's own `metrics[key].chance` when the script declares
    it, else 1 / classes for an accuracy reported per class (`<key>_per_class`); None when unknown."""
    if not key:
        return None
    base = key.split(" (")[0]
    declared = number(((rec.get("metrics") or {}).get(base) or {}).get("chance"))
    if declared is not None:
        return declared
    per_class = (rec.get("test") or {}).get(base.replace("val/", "test/", 1) + "_per_class")
    return 1.0 / len(per_class) if isinstance(per_class, dict) and per_class else None


def near_chance(value, chance, goal) -> bool:
    """Within a tenth of the way from guessing to perfect (accuracy 0.19 on ten classes, 0.55 on two)."""
    if value is None or chance is None or goal != "max" or not finite(float(value)):
        return False
    return float(value) < chance + 0.1 * (1.0 - chance)


def newest_batches(df: pd.DataFrame) -> pd.DataFrame:
    """Of our bench runs, only each model's newest batch per hardware and profile (ad-hoc runs and the
    study's kept): what the summary views show unless every batch is asked for."""
    bench = (df["kind"] == "ours") & df["bench_batch"].notna()
    if not bench.any():
        return df
    newest = df[bench].groupby(["model", "hardware", "profile"])["bench_batch"].transform("max")
    keep = ~bench
    keep[bench] = df.loc[bench, "bench_batch"] == newest
    return df[keep]


def _baseline_group(r: dict, hardware: str, synthetic: bool) -> list:
    """Runs whose epoch times are comparable (see add_speedup); the study's compare among themselves."""
    kind = r.get("kind", "ours")
    return (
        [r["model"], "study"]
        if kind == "study"
        else [
            r["model"],
            hardware,
            r["setup"].get("global_batch_size"),
            synthetic,
            (r.get("data", {}).get("used") or {}).get("train"),
            (r.get("config") or {}).get("max_steps") or None,
        ]
    )


def _cell_columns(c: dict, steady: dict) -> dict:
    """A run's columns from its cell (comparisons.cells: the cell's runs share them), and its steady
    throughput."""
    return {
        "comparison": c.get("group"),
        "cell": c.get("setup"),
        "step_s": c.get("step_s"),
        "step_lo": (c.get("step_s_ci95") or [None, None])[0],
        "step_hi": (c.get("step_s_ci95") or [None, None])[1],
        "steady_samples_per_s": steady.get("samples_per_s"),
        "speedup": c.get("speedup"),
        "speedup_lo": (c.get("speedup_ci95") or [None, None])[0],
        "speedup_hi": (c.get("speedup_ci95") or [None, None])[1],
        "efficiency": c.get("efficiency"),
        "flags": ", ".join(c.get("flags") or []),
        "verdict": c.get("verdict"),
        "cell_runs": c.get("runs"),
        "baseline_setup": c.get("baseline_setup"),
    }


def _row(r: dict, c: dict, now: dt.datetime, stale_s: float) -> dict:
    """One run's row of runs_frame; `c`: its cell's comparison."""
    steady = (r.get("timing") or {}).get("steady") or {}
    s, hist = r["setup"], r.get("history") or []
    names = s.get("device_names") or s.get("devices") or ["?"]
    synthetic = bool(r.get("data", {}).get("synthetic"))
    key, value = final_metric(r)
    updated = parse_time(r.get("updated_at"))
    kind = r.get("kind", "ours")
    return {
        "run_id": r["run_id"],
        "label": r["run_id"] + (" [SYNTHETIC]" if synthetic else ""),
        "kind": kind,
        "model": r["model"],
        "setup": setup_name(r),
        "strategy": s["strategy"],
        "processes": int(s.get("num_processes") or 1),
        "workers": workers(r),
        "hardware": names[0],
        "global_batch": s.get("global_batch_size"),
        "train_samples": (r.get("data", {}).get("used") or {}).get("train"),
        "experiment": experiment(r),
        "source": r.get("data", {}).get("source", "?"),
        "synthetic": synthetic,
        "seed": seed_of(r),
        "status": effective_status(r, now, stale_s),
        "heartbeat_age_s": (now - updated).total_seconds() if updated else None,
        "epochs": len(hist),
        "epoch_s": _median(number(h.get("time/train_s")) for h in hist),
        "throughput": _median(number(h.get("throughput/samples_per_s")) for h in hist),
        "peak_gib": max((v for h in hist if finite(v := number(h.get("memory/peak_gib")))), default=None),
        "all_ranks_gib": max(
            (v for h in hist if finite(v := number(h.get("memory/all_ranks_gib")))), default=None
        ),
        "metric": key,
        "value": value,
        "chance": chance_level(r, key),
        "goal": (r.get("metrics") or {}).get(r.get("primary_metric") or "", {}).get("goal"),
        "total_s": number((r.get("timing") or {}).get("total_s")),
        "started_at": r.get("started_at"),
        "updated_at": r.get("updated_at"),
        "tag": r.get("tag"),
        "note": "; ".join(r.get("reference", {}).get("notes", [])) or (r.get("error") or ""),
        "baseline_group": json.dumps(_baseline_group(r, names[0], synthetic)),
        **_cell_columns(c, steady),
        "bench_batch": comparisons.bench_tag(r).get("batch"),
        "profile": comparisons.bench_tag(r).get("profile") or ("study" if kind == "study" else "adhoc"),
    }


def runs_frame(
    runs: list[dict], now: dt.datetime, stale_s: float = STALE_S, comp: dict | None = None
) -> pd.DataFrame:
    """One row per run with everything the filters, tables and summary figures use. `comp`: the runs'
    comparisons.run_comparisons, when the caller has them cached."""
    if comp is None:  # on every run: a filter never removes a shown run's baseline
        comp = comparisons.run_comparisons(runs)
    rows = [_row(r, comp.get(r["run_id"], {}), now, stale_s) for r in runs]
    df = pd.DataFrame(rows)
    for col in ("speedup", "speedup_lo", "speedup_hi", "efficiency", "step_s", "step_lo", "step_hi"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def history_frame(runs: list[dict]) -> pd.DataFrame:
    """One row per (run, epoch); every numeric history value as a float (NaN/inf kept, non-numbers dropped)."""
    rows = []
    for r in runs:
        for h in r.get("history") or []:
            row = {"run_id": r["run_id"]}
            row.update({k: v for k, v in ((k, number(v)) for k, v in h.items()) if v is not None})
            rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "epoch"])


def apply_filters(df: pd.DataFrame, chosen: dict[str, list]) -> pd.DataFrame:
    """Keep rows whose column value is among the chosen ones; an empty choice means no filter."""
    mask = pd.Series(True, index=df.index)
    for col, values in chosen.items():
        if values:
            mask &= df[col].fillna("?").astype(str).isin([str(v) for v in values])
    return df[mask]


def seed_groups(df: pd.DataFrame, min_runs: int = 2) -> dict[str, list[str]]:
    """Runs of one experiment (same config but the seed, same setup, hardware and data) with at least
    `min_runs` different seeds -> group label."""
    out = {}
    for key, g in df.groupby("experiment", sort=False):
        if g["seed"].nunique() >= min_runs:  # launches of one seed are repeats, not a spread over seeds
            r = g.iloc[0]
            size = f" · {int(r['train_samples'])} train" if pd.notna(r["train_samples"]) else ""
            entry = comparisons.bench_tag({"tag": r["tag"]}).get("entry") or r["model"]
            out[
                f"{entry} · {r['setup']} · {r['hardware']} · batch {r['global_batch']}{size} · config {key[:6]} "
                f"({len(g)} runs, {g['seed'].nunique()} seeds)"
            ] = list(g["run_id"])
    return dict(sorted(out.items()))


def curve_keys(hist: pd.DataFrame, info: dict) -> list[str]:
    """Plottable history keys: losses and validation metrics first, then timings, throughput, memory."""
    keys = [
        c
        for c in hist.columns
        if c != "run_id" and c not in NOT_CURVES and not c.endswith("/n_samples") and hist[c].notna().any()
    ]

    def order(k):
        return (
            0
            if k == "train/loss"
            else 1
            if k.startswith(("val/", "train/"))
            else 2
            if k.startswith("time/")
            else 3,
            k,
        )

    return sorted(keys, key=order)


def not_learning(hist: pd.DataFrame, df: pd.DataFrame, y: str, info: dict) -> list[str]:
    """Runs shown whose `y` (a metric to minimise) ends within 2% of its first epoch's value after three or
    more epochs: a model that does not learn (the study's CNN stuck at ln 10 = 2.30)."""
    if y not in hist or (info.get(y) or {}).get("goal", "min" if "loss" in y else None) != "min":
        return []
    out = []
    names = df.set_index("run_id")
    for rid, g in hist[hist["run_id"].isin(df["run_id"])].dropna(subset=[y]).groupby("run_id"):
        v = [float(x) for x in g.sort_values("epoch")[y] if finite(float(x))]
        if len(v) >= 3 and v[0] > 0 and v[-1] >= 0.98 * v[0]:
            r = names.loc[rid]
            out.append(f"{r['model']} · {r['setup']} ({stats.sig(v[0])} -> {stats.sig(v[-1])})")
    return sorted(out)


def synthetic_note(df: pd.DataFrame) -> str | None:
    syn = df[df["synthetic"]]
    return (
        f"{len(syn)} run(s) on SYNTHETIC data (random tensors: timing only, metrics meaningless): "
        + ", ".join(syn["run_id"])
        if len(syn)
        else None
    )

"""The dashboard's tables: the per-cell overview, a run against a baseline, and the config differences.

Plain functions from the runs frame (`board.frames.runs_frame`) and run records to DataFrames; no Streamlit,
torch or accelerate here.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from board.frames import NOT_CURVES, number, strategy_name
from shared import stats


def ci_text(v, lo, hi) -> str:
    """'1.45 [1.39-1.54]' (3 significant figures), or '—'."""
    if v is None or pd.isna(v):
        return "—"
    return (
        f"{stats.sig(v)} [{stats.sig(lo)}-{stats.sig(hi)}]" if pd.notna(lo) and pd.notna(hi) else stats.sig(v)
    )


def verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """The answer per model and hardware: in the newest bench batch (or the ad-hoc runs) of ours, the best
    strategy on more than one device (oversubscribed cells aside), its speedup [interval] and verdict: `pays
    off` (interval above 1), `does not pay off` (below), `cannot tell` (spans 1); the flags that make it
    doubtful. One launch per side: the interval is the noise inside that launch, said in the column."""
    d = df[(df["kind"] == "ours") & df["speedup"].notna() & (df["workers"] > 1)]
    d = d[~d["flags"].fillna("").str.contains("oversubscribed")]
    rows = []
    for (model, hw), g in d.groupby(["model", "hardware"], sort=True):
        newest = g.sort_values("started_at", na_position="first").iloc[-1]["bench_batch"]
        g = g[g["bench_batch"] == newest] if pd.notna(newest) else g[g["bench_batch"].isna()]
        best = g.loc[g["speedup"].idxmax()]
        lo, hi = best["speedup_lo"], best["speedup_hi"]
        verdict = stats.verdict([lo, hi]) if pd.notna(lo) and pd.notna(hi) else "cannot tell"
        flags = best["flags"] or ""
        rows.append(
            {
                "model": model,
                "hardware": hw,
                "best strategy": f"{strategy_name(best['strategy'])} on {int(best['workers'])}",
                "speedup [interval]": ci_text(best["speedup"], lo, hi),
                "interval": "within one launch" if "single-launch" in flags else "95%, over launches",
                "verdict": verdict
                if verdict != "does not pay off"
                else "does not pay off: stay on one device",
                "doubtful because": flags,
                "from": f"bench {newest}" if pd.notna(newest) else "ad-hoc runs",
            }
        )
    return pd.DataFrame(rows)


def overview(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and comparison cell (setup, hardware, batch, data, profile): runs, steady step time and the
    speedup with their 95% intervals, flags, final metric (mean ± std), statuses."""
    keys = ["model", "setup", "hardware", "global_batch", "source", "profile"]
    d = df.assign(profile=df["profile"].fillna("-"))
    out = []
    for k, g in d.groupby(keys, dropna=False, sort=True):
        vals = g["value"].dropna()
        first = g.iloc[0]
        out.append(
            {
                **dict(zip(keys, k, strict=True)),
                "devices": int(g["workers"].max()),
                "runs": len(g),
                "step s [95% CI]": ci_text(first["step_s"], first["step_lo"], first["step_hi"]),
                "speedup [95% CI]": ci_text(first["speedup"], first["speedup_lo"], first["speedup_hi"]),
                "efficiency": stats.sig(first["efficiency"], 2) if pd.notna(first["efficiency"]) else "—",
                "flags": first["flags"] or "",
                "best epoch s": g["epoch_s"].min(),
                "speedup": first["speedup"],
                "metric": g["metric"].dropna().iloc[0] if g["metric"].notna().any() else None,
                "metric mean": vals.mean() if len(vals) else None,
                "metric std": vals.std() if len(vals) > 1 else None,
                "status": ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().sort_index().items()),
                "study": (g["kind"] == "study").all(),
            }
        )
    table = pd.DataFrame(out)
    if len(table):  # per model: ours first, fewest devices first
        table = table.sort_values(["model", "study", "devices", "setup"]).drop(columns="study")
        table = table.rename(columns={"global_batch": "batch"}).reset_index(drop=True)
    return table


def default_baseline(df: pd.DataFrame) -> str:
    """A finished 1-device run of ours, of the model with the most runs shown; else the first run."""
    pool = df[df["kind"] == "ours"] if (df["kind"] == "ours").any() else df
    model = pool["model"].value_counts().index[0]
    pool = pool[pool["model"] == model].assign(unfinished=lambda d: d["status"] != "finished")
    return pool.sort_values(["workers", "unfinished", "run_id"])["run_id"].iloc[0]


def table_height(rows: int, most: int = 10_000) -> int:
    """Pixels for a dataframe showing every row (up to `most`) without inner scrolling."""
    return 38 + 35 * max(1, min(rows, most))


def run_metrics(rec: dict, row: pd.Series) -> dict[str, float]:
    """Every number one run can be compared on: timings, throughput, memory, speedup, test and last epoch."""
    out = {
        "time/train_s (median)": row["epoch_s"],
        "throughput/samples_per_s (median)": row["throughput"],
        "memory/peak_gib (max)": row["peak_gib"],
        "speedup": row["speedup"],
        "efficiency": row["efficiency"],
        "timing/total_s": row["total_s"],
    }
    for k, v in (rec.get("test") or {}).items():
        if k not in ("test/n_samples", "test/epoch") and (x := number(v)) is not None:
            out[k] = x
    last = (rec.get("history") or [{}])[-1]
    for k, v in last.items():
        if k not in NOT_CURVES and not k.endswith("/n_samples") and (x := number(v)) is not None:
            out[f"last epoch {k}"] = x
    return {k: float(v) for k, v in out.items() if v is not None and not pd.isna(v)}


def goal_of(key: str, info: dict) -> str | None:
    base = key.removeprefix("last epoch ").split(" (")[0]
    if base in info:
        return info[base].get("goal")
    return "min" if "loss" in base or base.startswith(("time", "timing", "memory")) else None


def baseline_table(
    runs: dict[str, dict], df: pd.DataFrame, base_id: str, others: list[str], info: dict
) -> pd.DataFrame:
    """Long table: for each compared run and metric, value, baseline value, delta, ratio and better/worse."""
    rows_by_id = df.set_index("run_id")
    base = run_metrics(runs[base_id], rows_by_id.loc[base_id])
    out = []
    for rid in others:
        mine = run_metrics(runs[rid], rows_by_id.loc[rid])
        for k in sorted(set(base) & set(mine), key=lambda k: (k.startswith("last epoch"), k)):
            v, b = mine[k], base[k]
            delta = v - b
            ratio = v / b if b != 0 and math.isfinite(b) else None
            goal = goal_of(k, info)
            better = (
                ("=" if delta == 0 else "better" if (delta < 0) == (goal == "min") else "worse")
                if goal and math.isfinite(delta)
                else ""
            )
            out.append(
                {
                    "run": rid,
                    "metric": k,
                    "value": v,
                    "baseline": b,
                    "delta": delta,
                    "ratio": ratio,
                    "vs baseline": better,
                }
            )
    return pd.DataFrame(out, columns=["run", "metric", "value", "baseline", "delta", "ratio", "vs baseline"])


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(runs: list[dict]) -> pd.DataFrame:
    """Rows = config / setup / data keys whose values differ between the runs; columns = runs."""
    flat = {}
    for r in runs:
        f = _flatten(r.get("config") or {}, "config.")
        s = r["setup"]
        f.update(
            {
                f"setup.{k}": s.get(k)
                for k in (
                    "strategy",
                    "num_processes",
                    "global_batch_size",
                    "per_device_batch_size",
                    "mixed_precision",
                    "mesh_shape",
                    "microbatches",
                )
            }
        )
        f["setup.hardware"] = (s.get("device_names") or s.get("devices") or [None])[0]
        f.update({"data.name": r.get("data", {}).get("name"), "data.source": r.get("data", {}).get("source")})
        flat[r["run_id"]] = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in f.items()}
    keys = sorted({k for f in flat.values() for k in f})
    missing = "—"
    diff = {k: [flat[rid].get(k, missing) for rid in flat] for k in keys}
    diff = {k: v for k, v in diff.items() if len({str(x) for x in v}) > 1}
    return (
        pd.DataFrame.from_dict(diff, orient="index", columns=list(flat)).astype(str)
        if diff
        else pd.DataFrame(columns=list(flat))
    )

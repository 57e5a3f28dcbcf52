"""The dashboard's tables: the per-cell overview, a run against a baseline, and the config differences.

Plain functions from the runs frame (`board.frames.runs_frame`) and run records to DataFrames; no Streamlit,
torch or accelerate here.
"""

from __future__ import annotations

import json
import math

import pandas as pd

from board.frames import NOT_CURVES, near_chance, number, strategy_name
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


def verdict_lines(answer: pd.DataFrame) -> list[str]:
    """The answer table as one Markdown line per model and hardware, verdict first."""
    return [
        f"**{r['model']}** on {r['hardware']}: **{r['verdict']}**. Best: {r['best strategy']}, "
        f"speedup {r['speedup [interval]']} ({r['interval']})"
        + (f"; doubtful: {r['doubtful because']}" if r["doubtful because"] else "")
        for r in answer.to_dict("records")
    ]


def unmeasured(cells: list[dict], df: pd.DataFrame) -> pd.DataFrame:
    """The bench cells of the batches and models shown that have no measurement: skipped (with the bench's
    reason), refused by the script, or failed (launched, nothing finished)."""
    shown = set(zip(df["model"], df["bench_batch"].astype(str), strict=True))
    rows = [
        {
            "model": c["model"],
            "strategy": f"{strategy_name(c['strategy'])} x{c['devices']}",
            "setup": c["setup"],
            "": c["what"],
            "why": c["reason"],
            "bench batch": c["bench_batch"],
        }
        for c in cells
        if (c["model"], c["bench_batch"]) in shown
    ]
    return pd.DataFrame(rows, columns=["model", "strategy", "setup", "", "why", "bench batch"])


def overview(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and comparison cell (setup, hardware, batch, data, profile): runs, steady step time and the
    speedup with their 95% intervals, flags, final metric (mean ± std, flagged near chance), statuses. Rows
    per model: the baseline, then by speedup, best first; the study's after ours."""
    keys = ["model", "setup", "hardware", "global_batch", "source", "profile"]
    d = df.assign(profile=df["profile"].fillna("-"))
    out = []
    for k, g in d.groupby(keys, dropna=False, sort=True):
        vals = g["value"].dropna()
        first = g.iloc[0]
        study = (g["kind"] == "study").all()
        baseline = pd.notna(first["cell"]) and first["cell"] == first["baseline_setup"]
        mean = vals.mean() if len(vals) else None
        chance = g["chance"].dropna().iloc[0] if g["chance"].notna().any() else None
        metric = g["metric"].dropna().iloc[0] if g["metric"].notna().any() else None
        value = "—"
        if mean is not None:
            value = stats.sig(mean) + (f" ± {stats.sig(vals.std())}" if len(vals) > 1 else "")
            if near_chance(mean, chance, first["goal"]):
                value += f" (near chance, {stats.sig(chance, 2)})"
        out.append(
            {
                **dict(zip(keys, k, strict=True)),
                "strategy": f"{strategy_name(first['strategy'])} x{int(g['workers'].max())}",
                "devices": int(g["workers"].max()),
                "runs": len(g),
                # the study's files hold seconds per epoch, not per step: its step column stays empty
                "step ms [95% CI]": "—"
                if study
                else ci_text(*(first[c] * 1e3 for c in ("step_s", "step_lo", "step_hi"))),
                "speedup [95% CI]": "baseline (1 device)"
                if baseline
                else ci_text(first["speedup"], first["speedup_lo"], first["speedup_hi"]),
                "efficiency": "—"
                if baseline or pd.isna(first["efficiency"])
                else stats.sig(first["efficiency"]),
                "flags": first["flags"] or "",
                "best epoch s": stats.sig(g["epoch_s"].min()),
                "metric": metric or "—",
                "value (mean ± std)": value,
                "status": ", ".join(f"{n} {s}" for s, n in g["status"].value_counts().sort_index().items()),
                "_study": study,
                "_order": -1e9 if baseline else -(first["speedup"] if pd.notna(first["speedup"]) else -1e6),
                "_speedup": first["speedup"],
            }
        )
    table = pd.DataFrame(out)
    if len(table):
        table = table.sort_values(
            ["model", "_study", "profile", "hardware", "global_batch", "_order", "setup"]
        )
        table = table.rename(columns={"global_batch": "batch"}).reset_index(drop=True)
        # the answer's columns first (what a reader compares), the conditions after
        table = table[["model", "strategy", "speedup [95% CI]", "efficiency", "step ms [95% CI]", "flags",
                       "value (mean ± std)", "metric", "setup", "profile", "hardware", "batch", "source", "runs",
                       "best epoch s", "status", "_speedup"]]  # fmt: skip
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


SAME = (
    0.01  # a difference under 1% of the baseline is no difference (timings alone vary more between launches)
)


def comparable(df: pd.DataFrame, base_id: str) -> tuple[list[str], dict[str, str]]:
    """The runs that did the same work as `base_id` (same model, hardware, global batch, data and step budget:
    its `baseline_group`), and for every other run of its model why it is not compared."""
    rows = df.set_index("run_id")
    base = rows.loc[base_id]
    same, why = [], {}
    for rid, r in rows[rows["model"] == base["model"]].iterrows():
        if rid == base_id:
            continue
        if r["baseline_group"] == base["baseline_group"]:
            same.append(rid)
            continue
        diffs = [
            f"{name} {r[col]} vs {base[col]}"
            for col, name in (("hardware", "hardware"), ("global_batch", "global batch"),
                              ("train_samples", "train samples"), ("synthetic", "synthetic"), ("kind", "source"))
            if str(r[col]) != str(base[col])
        ]  # fmt: skip
        why[rid] = ", ".join(diffs) or "another step budget"
    return same, why


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
                (
                    "same (within 1%)"
                    if abs(delta) <= SAME * abs(b)
                    else "better"
                    if (delta < 0) == (goal == "min")
                    else "worse"
                )
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
    missing = "—"  # a key the run does not have, or holds no value for
    diff = {k: [missing if (v := flat[rid].get(k)) is None else v for rid in flat] for k in keys}
    diff = {k: v for k, v in diff.items() if len({str(x) for x in v}) > 1}
    return (
        pd.DataFrame.from_dict(diff, orient="index", columns=list(flat)).astype(str)
        if diff
        else pd.DataFrame(columns=list(flat))
    )

"""Tables and figures behind `dashboard.py`: plain functions from run records to DataFrames and Plotly figures.

No Streamlit, torch or accelerate here, so every view is testable on its own and the page starts in a second.
Our run records and the study's files (converted by `shared.reference`) go through the same code: a run is
a dict shaped like a record (`model`, `status`, `setup`, `data`, `config`, `metrics`, `history`, `test`).
Metric names, labels and goals come from each record's `metrics` block, so no view has per-model code.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from shared import comparisons, stats
from shared.record import HEARTBEAT_S, read_record
from shared.reference import convert, is_study_format, load_reference

# A `running` record whose heartbeat (updated_at) is older than this is shown as crashed. Scripts rewrite a
# running record every HEARTBEAT_S (30 s) from a thread, so 4 missed beats mean the process is gone.
STALE_S = 4 * HEARTBEAT_S
X_AXES = {"epoch": "epoch", "wall-clock seconds": "time/elapsed_s", "samples seen": "samples_seen"}
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
COLORS = px.colors.qualitative.Dark24
PNG = {"toImageButtonOptions": {"format": "png", "scale": 2}, "displaylogo": False}


# ----------------------------------------------------------------------------- loading


MAX_FILE_BYTES = 16 * 2**20  # a run record is ~0.1-1 MB; anything far larger is not one
MAX_DEPTH = 8  # folders below the runs folder that are searched
SKIP_DIRS = {"checkpoints", "bench", ".git"}  # checkpoints, bench logs/summaries: not run records
SKIP_NAMES = {"progress.json", "summary.json", "state.json"}


def json_files(folder: str | Path | None) -> list[Path]:
    """Every *.json below `folder` (subfolders too, MAX_DEPTH deep), without checkpoint and bench files."""
    d = Path(folder) if folder else None
    if not d or not d.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(d):
        depth = len(Path(root).relative_to(d).parts)
        dirs[:] = sorted(
            x for x in dirs if x not in SKIP_DIRS and not x.startswith(".") and depth < MAX_DEPTH
        )
        out += [
            Path(root) / f
            for f in sorted(files)
            if f.endswith(".json") and not f.startswith(".tmp-") and f not in SKIP_NAMES
        ]
    return out


def _read_one(path: Path) -> list[dict]:
    """One file as runs (ours, or the study's format); ValueError with a one-line reason, never a path."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise ValueError(
            f"too large for a run record ({size / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)"
        )
    try:
        return [{**read_record(path), "kind": "ours"}]
    except ValueError as err:
        reason = str(err)
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
    except RecursionError:
        raise ValueError("nested too deeply to be a run record") from None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        obj = None
    if is_study_format(obj):
        return [{**r, "kind": "study"} for r in convert(obj, path.name)]
    raise ValueError(reason)


def load_folder(
    runs_dir: str | Path, reference_dir: str | Path | None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Our records below `runs_dir` (subfolders too; study-format files found there are read as such) and
    the study's files in `reference_dir`. Returns (runs, [(file, reason)]): each file that cannot be read,
    for whatever reason, is one line in the notice and nothing else is affected."""
    runs, problems = [], []
    d = Path(runs_dir)
    for path in json_files(d):
        name = path.relative_to(d).as_posix()
        try:
            runs.extend(_read_one(path))
        except ValueError as err:
            problems.append((name, str(err)[:300]))
        except Exception as err:  # anything else a hostile file provokes stays with that file
            problems.append((name, f"could not be read ({type(err).__name__})"))
    if reference_dir:
        try:
            ref, ref_problems = load_reference(reference_dir)
        except Exception as err:
            ref, ref_problems = [], [("(folder)", f"could not be read ({type(err).__name__})")]
        seen = {r["run_id"] for r in runs}
        runs += [{**r, "kind": "study"} for r in ref if r["run_id"] not in seen]
        problems += [(f"{Path(reference_dir).name}/{name}", reason) for name, reason in ref_problems]
    ids: dict[str, int] = {}
    unique = []
    for r in runs:  # the same record copied into two folders is one run
        if r["run_id"] in ids:
            continue
        ids[r["run_id"]] = 1
        unique.append(r)
    return unique, problems


def folder_signature(*folders) -> tuple:
    """(name, mtime, size) of every JSON file: the cache key of the loader and the live-refresh trigger."""
    sig = []
    for folder in folders:
        for e in json_files(folder):
            try:
                st = e.stat()
            except OSError:  # removed between listing and stat (a temp file being renamed)
                continue
            sig.append((str(e), st.st_mtime_ns, st.st_size))
    return tuple(sig)


# ----------------------------------------------------------------------------- one row per run


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
    """Devices doing the work (shared.comparisons.devices): distinct GPUs, or CPU processes; a model split
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


def runs_frame(runs: list[dict], now: dt.datetime, stale_s: float = STALE_S) -> pd.DataFrame:
    """One row per run with everything the filters, tables and summary figures use."""
    rows = []
    comp = comparisons.run_comparisons(runs)  # on every run: a filter never removes a shown run's baseline
    for r in runs:
        s, hist = r["setup"], r.get("history") or []
        c = comp.get(r["run_id"], {})
        steady = (r.get("timing") or {}).get("steady") or {}
        names = s.get("device_names") or s.get("devices") or ["?"]
        synthetic = bool(r.get("data", {}).get("synthetic"))
        key, value = final_metric(r)
        updated = parse_time(r.get("updated_at"))
        kind = r.get("kind", "ours")
        # runs whose epoch times are comparable (see add_speedup); the study's compare among themselves
        group = (
            [r["model"], "study"]
            if kind == "study"
            else [
                r["model"],
                names[0],
                s.get("global_batch_size"),
                synthetic,
                (r.get("data", {}).get("used") or {}).get("train"),
                (r.get("config") or {}).get("max_steps") or None,
            ]
        )
        rows.append(
            {
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
                "peak_gib": max(
                    (v for h in hist if finite(v := number(h.get("memory/peak_gib")))), default=None
                ),
                "metric": key,
                "value": value,
                "goal": (r.get("metrics") or {}).get(r.get("primary_metric") or "", {}).get("goal"),
                "total_s": number((r.get("timing") or {}).get("total_s")),
                "started_at": r.get("started_at"),
                "updated_at": r.get("updated_at"),
                "tag": r.get("tag"),
                "note": "; ".join(r.get("reference", {}).get("notes", [])) or (r.get("error") or ""),
                "baseline_group": json.dumps(group),
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
                "cell_runs": c.get("runs"),
                "baseline_setup": c.get("baseline_setup"),
                "bench_batch": comparisons.bench_tag(r).get("batch"),
                "profile": comparisons.bench_tag(r).get("profile")
                or ("study" if kind == "study" else "adhoc"),
            }
        )
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


# ----------------------------------------------------------------------------- tables


def ci_text(v, lo, hi) -> str:
    """'1.45 [1.39-1.54]' (3 significant figures), or '—'."""
    if v is None or pd.isna(v):
        return "—"
    return (
        f"{stats.sig(v)} [{stats.sig(lo)}-{stats.sig(hi)}]" if pd.notna(lo) and pd.notna(hi) else stats.sig(v)
    )


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


# ----------------------------------------------------------------------------- figures


MODEL_COLORS = {
    "mlp": "#1f77b4",
    "conv_autoencoder": "#ff7f0e",
    "cnn": "#2ca02c",
    "vgg11": "#d62728",
    "nbow": "#9467bd",
    "seq2seq": "#8c564b",
}
STRATEGY_COLORS = {
    "single": "#7f7f7f",
    "ddp": "#1f77b4",
    "fsdp": "#ff7f0e",
    "model_split": "#2ca02c",
    "pipeline": "#d62728",
    "hybrid": "#9467bd",
}


def stable_color(name) -> str:
    """The same colour for the same name in every folder and filter (a hash, not the order of appearance)."""
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    if name in STRATEGY_COLORS:
        return STRATEGY_COLORS[name]
    h = int(hashlib.sha1(str(name).encode()).hexdigest(), 16)
    return COLORS[h % len(COLORS)]


def color_map(names) -> dict[str, str]:
    return {n: stable_color(n) for n in names}


def colors_for(ids) -> dict[str, str]:
    return color_map(ids)


def cells_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per comparison cell shown (its runs pooled), with the speedup interval as error bars."""
    d = df.dropna(subset=["step_s"])
    if d.empty:
        return d
    g = d.groupby(["comparison", "cell"], sort=False)
    out = g.first().reset_index()
    out["runs"] = g.size().values
    out["devices"] = out["workers"]
    out["conditions"] = [
        f"{r.hardware} · batch {r.global_batch} · {r.profile or '-'}"
        + (" · study: 2 machines, global batch doubled" if r.kind == "study" else "")
        for r in out.itertuples()
    ]
    out["err_plus"] = out["speedup_hi"] - out["speedup"]
    out["err_minus"] = out["speedup"] - out["speedup_lo"]
    out["step_plus"] = out["step_hi"] - out["step_s"]
    out["step_minus"] = out["step_s"] - out["step_lo"]
    out["source_label"] = [
        "the study (published)"
        if r.kind == "study"
        else f"ours · {r.profile or 'adhoc'}"
        + (f" {r.bench_batch}" if isinstance(r.bench_batch, str) else "")
        for r in out.itertuples()
    ]
    out["speedup_text"] = [
        f"{stats.sig(r.speedup)} [{stats.sig(r.speedup_lo)}-{stats.sig(r.speedup_hi)}]"
        + (f" ⚑ {r.flags}" if r.flags else "")
        if pd.notna(r.speedup)
        else ""
        for r in out.itertuples()
    ]
    return out


def fig_speedup(df: pd.DataFrame) -> go.Figure:
    """Per model: measured speedup by setup as bars with 95% intervals, ours beside the study's, a 1.0
    break-even line; flags written on the bars."""
    c = cells_frame(df)
    if len(c):  # the baselines themselves are the break-even line
        c = c.dropna(subset=["speedup"])
        c = c[c["cell"] != c["baseline_setup"]]
    if c.empty:
        return go.Figure(layout={"title": {"text": "Speedup over 1 device: no comparable runs shown"}})
    c = c.sort_values(["model", "kind", "devices", "cell"])
    groups = sorted(set(c["source_label"]), key=lambda g: (g.startswith("the study"), g))
    models = list(dict.fromkeys(c["model"]))
    rows = math.ceil(len(models) / 2)
    fig = px.bar(
        c,
        x="cell",
        y="speedup",
        color="source_label",
        error_y="err_plus",
        error_y_minus="err_minus",
        text="flags",
        facet_col="model",
        facet_col_wrap=2,
        facet_row_spacing=0.5 / rows if rows > 1 else 0.0,
        facet_col_spacing=0.06,
        barmode="group",
        category_orders={"model": models, "source_label": groups},
        color_discrete_map={g: "#b0b0b0" if g.startswith("the study") else stable_color(g) for g in groups},
        hover_name="cell",
        hover_data={
            "speedup_text": True,
            "conditions": True,
            "devices": True,
            "runs": True,
            "speedup": False,
            "err_plus": False,
            "err_minus": False,
            "flags": False,
            "source_label": False,
            "cell": False,
            "model": False,
        },
        labels={"speedup_text": "speedup [95% CI]", "cell": "", "source_label": ""},
        height=200 + 330 * rows,
        title="Speedup over 1 device by setup, with 95% intervals (break-even = 1)",
    )
    fig.add_hline(
        y=1.0,
        line_dash="dash",
        line_color="black",
        annotation_text="break-even",
        annotation_position="top left",
    )
    fig.update_traces(textposition="outside", textfont_size=10, cliponaxis=False)
    fig.update_yaxes(matches=None, showticklabels=True, rangemode="tozero")
    fig.update_xaxes(matches=None, showticklabels=True, tickangle=-30)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_layout(legend={"orientation": "h", "y": 1.02 + 0.02 * rows, "x": 0.5, "xanchor": "center"})
    return fig


def fig_epoch_time(df: pd.DataFrame, log_y: bool = False) -> go.Figure:
    """Median steady-state step time per setup and hardware with its 95% interval (runs pooled)."""
    c = cells_frame(df)
    if c.empty:
        return go.Figure(layout={"title": {"text": "Steady-state step time by setup: none shown"}})
    c = c.sort_values(["model", "kind", "devices", "cell"])
    rows = max(1, math.ceil(c["model"].nunique() / 3))
    fig = px.bar(
        c,
        x="cell",
        y="step_s",
        color="hardware",
        error_y="step_plus",
        error_y_minus="step_minus",
        facet_col="model",
        facet_col_wrap=3,
        facet_row_spacing=0.6 / rows if rows > 1 else 0.0,
        facet_col_spacing=0.06,
        barmode="group",
        color_discrete_map=color_map(c["hardware"].unique()),
        hover_data={"runs": True, "conditions": True, "flags": True, "step_minus": False, "step_plus": False},
        height=160 + 300 * rows,
        labels={"step_s": "s / step", "cell": ""},
        title="Steady-state step time by setup (median, 95% interval)",
    )
    fig.update_traces(hovertemplate=None)
    fig.update_yaxes(matches=None, showticklabels=True, type="log" if log_y else None, tickformat=".3~g")
    fig.update_xaxes(matches=None, showticklabels=True)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_layout(legend={"orientation": "h", "y": -0.15 / rows, "title": "hardware"})
    return fig


def fig_scaling(df: pd.DataFrame, y: str) -> go.Figure:
    """Speedup or efficiency vs devices per cell: colour = strategy, symbol = model, 95% intervals, the
    ideal and the break-even lines."""
    c = cells_frame(df)
    c = c.dropna(subset=[y]) if len(c) else c
    title = (
        "Speedup vs devices (ideal = devices, break-even = 1)"
        if y == "speedup"
        else "Scaling efficiency vs devices (ideal = 1)"
    )
    if c.empty:
        return go.Figure(layout={"title": {"text": title}})
    div = 1 if y == "speedup" else c["devices"]
    c = c.assign(
        plus=(c["speedup_hi"] - c["speedup"]) / div,
        minus=(c["speedup"] - c["speedup_lo"]) / div,
        value_text=[stats.sig(v) for v in c[y]],
        label=c["model"] + " · " + c["cell"],
    )
    fig = px.scatter(
        c,
        x="devices",
        y=y,
        color="strategy",
        symbol="model",
        error_y="plus",
        error_y_minus="minus",
        hover_name="label",
        color_discrete_map=color_map(c["strategy"].unique()),
        hover_data={
            "value_text": True,
            "conditions": True,
            "flags": True,
            "plus": False,
            "minus": False,
            y: False,
        },
        labels={
            "devices": "devices (GPUs, or CPU processes of one core each)",
            y: BUILTIN[y]["label"],
            "value_text": y,
        },
        title=title,
    )
    top = max([2, *c["devices"].tolist()])
    ideal = [1, top] if y == "speedup" else [1, 1]
    fig.add_trace(
        go.Scatter(x=[1, top], y=ideal, mode="lines", name="ideal", line={"dash": "dash", "color": "gray"})
    )
    if y == "speedup":
        fig.add_trace(
            go.Scatter(
                x=[1, top], y=[1, 1], mode="lines", name="break-even", line={"dash": "dot", "color": "black"}
            )
        )
    fig.update_traces(marker={"size": 11}, selector={"mode": "markers"})
    fig.update_xaxes(dtick=1)
    return fig


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); non-finite points are skipped."""
    out, last, n = [], 0.0, 0
    for v in values:
        if not finite(v):
            out.append(float("nan"))
            continue
        n += 1
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**n) if weight else v)
    return out


def fig_curves(hist: pd.DataFrame, df: pd.DataFrame, y: str, x: str, weight: float, info: dict) -> go.Figure:
    """`y` per run against epoch / wall-clock / samples, one panel per model (their scales differ): raw points
    faint, the smoothed line solid, each line named by its setup and seed."""
    from plotly.subplots import make_subplots

    xcol = X_AXES[x]
    meta = df.set_index("run_id")
    models = sorted(df["model"].unique()) if len(df) else []
    rows = max(1, len(models))
    fig = make_subplots(rows=rows, cols=1, subplot_titles=models or [""], vertical_spacing=0.25 / rows)
    if y in hist and xcol in hist:
        shown = hist.dropna(subset=[xcol])
        for rid, g in shown.groupby("run_id", sort=True):
            if rid not in meta.index or y not in g or g[y].isna().all():
                continue
            m = meta.loc[rid]
            row = models.index(m["model"]) + 1
            seed = f" · seed {int(m['seed'])}" if pd.notna(m["seed"]) else ""
            name = f"{m['model']} · {m['setup']}{seed}" + (" [SYNTHETIC]" if m["synthetic"] else "")
            if m["kind"] == "study":
                name = f"{m['model']} · study {m['setup']}"
            g = g.sort_values(xcol)
            vals = [float(v) for v in g[y]]
            ok = [finite(v) for v in vals]
            c = stable_color(f"{m['setup']}-{m['seed']}-{rid}")
            fig.add_trace(
                go.Scatter(
                    x=g[xcol][ok],
                    y=[v for v, k in zip(vals, ok, strict=True) if k],
                    mode="markers",
                    marker={"color": c, "size": 7},
                    opacity=0.3,
                    legendgroup=rid,
                    showlegend=False,
                    name=f"{name} (raw)",
                    hovertext=rid,
                ),
                row=row,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=g[xcol],
                    y=ema(vals, weight),
                    mode="lines",
                    line={"color": c},
                    legendgroup=rid,
                    name=name,
                    hovertext=rid,
                    connectgaps=False,
                    hovertemplate="%{hovertext}<br>%{x}: %{y:.3~g}<extra>" + name + "</extra>",
                ),
                row=row,
                col=1,
            )
    if x == "epoch" and len(hist) and hist["epoch"].max() <= 20:
        fig.update_xaxes(dtick=1)
    fig.update_yaxes(title_text=metric_label(y, info), tickformat=".3~g")
    fig.update_xaxes(title_text=x, row=rows, col=1)
    n = sum(1 for tr in fig.data if tr.showlegend is not False)
    fig.update_layout(
        title=f"{metric_label(y, info)} vs {x}"
        + (f" (EMA {weight:g})" if weight else "")
        + ", one panel per model",
        legend_title="model · setup · seed",
        height=max(360 * rows, 200 + 22 * n),
    )
    return fig


def fig_per_run(df: pd.DataFrame, col: str, title: str, unit: str, log_x: bool = True) -> go.Figure:
    """One horizontal bar per run (long run ids stay readable), coloured by setup; a log axis, since models
    differ by orders of magnitude."""
    d = df.dropna(subset=[col]).sort_values(["model", "workers", "label"], ascending=False)
    d = d.assign(value_text=[stats.sig(v) for v in d[col]])
    fig = px.bar(
        d,
        y="label",
        x=col,
        color="setup",
        orientation="h",
        log_x=log_x,
        color_discrete_map=color_map(d["setup"].unique()),
        hover_data={"model": True, "hardware": True, "global_batch": True, "value_text": True, col: False},
        labels={col: unit + (" (log scale)" if log_x else ""), "label": "", "value_text": unit},
        title=title,
        height=160 + 26 * max(len(d), 4),
    )
    fig.update_yaxes(categoryorder="array", categoryarray=list(d["label"]))
    return fig


def seed_groups(df: pd.DataFrame, min_runs: int = 2) -> dict[str, list[str]]:
    """Runs of one experiment (same config but the seed, same setup, hardware and data) -> group label."""
    out = {}
    for key, g in df.groupby("experiment", sort=False):
        if len(g) >= min_runs:
            r = g.iloc[0]
            size = f" · {int(r['train_samples'])} train" if pd.notna(r["train_samples"]) else ""
            entry = comparisons.bench_tag({"tag": r["tag"]}).get("entry") or r["model"]
            out[
                f"{entry} · {r['setup']} · {r['hardware']} · batch {r['global_batch']}{size} · config {key[:6]} (n={len(g)})"
            ] = list(g["run_id"])
    return dict(sorted(out.items()))


def fig_seed_bands(hist: pd.DataFrame, groups: dict[str, list[str]], y: str, info: dict) -> go.Figure:
    """Per group of seeds: the mean per epoch as a line, ± one standard deviation as a band."""
    fig = go.Figure()
    if y in hist:
        for i, (name, ids) in enumerate(groups.items()):
            h = hist[hist["run_id"].isin(ids) & hist[y].map(lambda v: finite(float(v)))]
            if h.empty:
                continue
            stats = h.groupby("epoch")[y].agg(["mean", "std"]).reset_index()
            stats["std"] = stats["std"].fillna(0.0)
            c, xs = COLORS[i % len(COLORS)], list(stats["epoch"])
            fig.add_trace(
                go.Scatter(
                    x=xs + xs[::-1],
                    y=list(stats["mean"] + stats["std"]) + list(stats["mean"] - stats["std"])[::-1],
                    fill="toself",
                    fillcolor=c,
                    opacity=0.2,
                    line={"width": 0},
                    hoverinfo="skip",
                    legendgroup=name,
                    showlegend=False,
                    name=f"{name} ± std",
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=stats["mean"],
                    mode="lines+markers",
                    line={"color": c},
                    legendgroup=name,
                    name=name,
                )
            )
    fig.update_xaxes(dtick=1 if len(hist) and hist["epoch"].max() <= 20 else None)
    fig.update_layout(
        title=f"Mean ± std across seeds: {metric_label(y, info)}",
        xaxis_title="epoch",
        yaxis_title=metric_label(y, info),
        legend={"orientation": "h", "y": -0.2, "title": "group"},
        height=480 + 20 * len(groups),
    )
    return fig


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


def synthetic_note(df: pd.DataFrame) -> str | None:
    syn = df[df["synthetic"]]
    return (
        f"{len(syn)} run(s) on SYNTHETIC data (random tensors: timing only, metrics meaningless): "
        + ", ".join(syn["run_id"])
        if len(syn)
        else None
    )

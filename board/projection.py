"""The Projection tab: `make project`'s records (runs/projection-*.json), projected speedup and efficiency
against N per strategy, with the validation's measured points over the curves. No Streamlit here."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import plotly.graph_objects as go

from board.figures import STRATEGY_COLORS
from board.load import MAX_FILE_BYTES, PROJECTION_PREFIX, file_size, walk

COLORS = {**STRATEGY_COLORS, "pipeline_1f1b": "#e377c2"}
SYMBOLS = {
    "compute": "circle",
    "communication": "x",
    "bubble": "triangle-up",
    "memory": "square",
    "input": "star",
}


def projection_files(runs_dir: str | Path) -> list[Path]:
    """`make project`'s records in `runs_dir` and its subfolders (as deep as the run records are searched)."""
    return walk(runs_dir, lambda f: f.startswith(PROJECTION_PREFIX) and f.endswith(".json"))


def load_projections(runs_dir: str | Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every projection record in `runs_dir` or below (by path, last first: dated folders newest first);
    unreadable ones as (file, reason)."""
    recs, problems = [], []
    for path in projection_files(runs_dir):
        name = path.relative_to(runs_dir).as_posix()
        try:
            if file_size(path) > MAX_FILE_BYTES:
                raise ValueError(f"too large for a projection record (> {MAX_FILE_BYTES // 2**20} MiB)")
            rec = json.loads(path.read_text(encoding="utf-8"))
            ok = isinstance(rec, dict) and rec.get("kind") == "distbench-projection"
            preds = rec.get("predictions") if ok else None
            if not (isinstance(preds, list) and all(isinstance(x, dict) and "model" in x for x in preds)):
                raise ValueError("not a projection record")
            if not isinstance(rec.get("hardware"), dict) or not isinstance(rec.get("profile"), dict):
                raise ValueError("a projection record without its hardware or profile")
            recs.append({**rec, "file": name})
        except (OSError, ValueError, RecursionError, UnicodeDecodeError) as e:
            problems.append((name, str(e).splitlines()[0][:200] if str(e) else type(e).__name__))
    recs.sort(key=lambda r: r["file"], reverse=True)  # dated folders: the newest first
    return recs, problems


def label(rec: dict) -> str:
    hw = rec["hardware"]
    return f"{hw['name']} ({hw['kind']}) · {rec['created_at'][:16]} · {rec['file']}"


def models(rec: dict) -> list[str]:
    return sorted({p["model"] for p in rec["predictions"]})


def measured_points(rec: dict, model: str) -> list[dict]:
    """The validation's cells as speedups over the measured one-process step at the same batch (strong
    scaling); the interval is the range over launches (each launch a median of steady windows)."""
    rows = [v for v in rec.get("validation") or [] if v["model"] == model]
    single = [v for v in rows if v["strategy"] == "single"]
    if not single:
        return []
    t1 = statistics.median(single[0]["measured_runs"])
    out = []
    for v in rows:
        if v["strategy"] == "single":
            continue
        runs = v["measured_runs"]
        out.append({**v, "speedup": t1 / v["measured_step_s"], "lo": t1 / max(runs), "hi": t1 / min(runs)})
    return out


def _band(strategy: str, pts: list[dict], metric: str) -> go.Scatter | None:
    """The range a strategy's kind of figure showed in validation (shared/residuals.yaml), shaded around its
    curve from N = 1 (exactly 1); None where its predictions carry no range."""
    band = [(p["devices"], *p["speedup_range"]) for p in pts if p.get("speedup_range") and p["devices"] > 1]
    if not band:
        return None
    band = [(1, 1.0, 1.0), *band]
    div = [n if metric == "efficiency" else 1 for n, _, _ in band]
    return go.Scatter(
        x=[n for n, _, _ in band] + [n for n, _, _ in reversed(band)],
        y=[hi / d for (_, _, hi), d in zip(band, div, strict=True)]
        + [lo / d for (_, lo, _), d in reversed(list(zip(band, div, strict=True)))],
        fill="toself",
        mode="lines",
        fillcolor=_alpha(COLORS[strategy], 0.15),
        line={"width": 0},
        hoverinfo="skip",
        name=f"{strategy} range",
        legendgroup=strategy,
        showlegend=False,
    )


def _curve(strategy: str, pts: list[dict], metric: str, kind: str) -> go.Scatter:
    """A strategy's projected curve; each marker names the bottleneck at its N."""
    label = {"measured": "measured compute", "modelled": "modelled compute"}
    return go.Scatter(
        x=[p["devices"] for p in pts],
        y=[p[metric] for p in pts],
        mode="lines+markers",
        legendgroup=strategy,
        name=f"{strategy} ({label.get(kind, 'projected')})",
        line={"color": COLORS[strategy], "dash": "dot"},
        marker={"symbol": [SYMBOLS.get(p["bottleneck"], "circle") for p in pts], "size": 9},
        customdata=[
            [
                p["bottleneck"],
                p["step_s"] * 1e3,
                p["memory_gib_per_device"],
                p["global_batch"],
                p.get("verdict", ""),
                "; ".join(
                    ["oversubscribed"] * bool(p.get("oversubscribed"))
                    + [f"assumes {a}" for a in p.get("assumed", [])]
                ),
            ]
            for p in pts
        ],  # fmt: skip
        hovertemplate=(
            f"{strategy}, N = %{{x}}<br>{metric} %{{y:.2f}}<br>bottleneck: %{{customdata[0]}}<br>"
            "step %{customdata[1]:.3g} ms, %{customdata[2]:.3g} GiB/device<br>global batch "
            "%{customdata[3]}<br>%{customdata[4]} %{customdata[5]}<extra>projected</extra>"
        ),
    )


def _measured(p: dict, metric: str) -> go.Scatter:
    """A real run's point (validation) with its range over launches and the prediction's error."""
    y, lo, hi = (p[k] / (p["devices"] if metric == "efficiency" else 1) for k in ("speedup", "lo", "hi"))
    return go.Scatter(
        x=[p["devices"]],
        y=[y],
        mode="markers",
        name=f"{p['strategy']} (measured)",
        marker={
            "color": COLORS.get(p["strategy"], "black"),
            "size": 12,
            "symbol": "diamond",
            "line": {"color": "black", "width": 1},
        },  # fmt: skip
        error_y={"type": "data", "symmetric": False, "array": [hi - y], "arrayminus": [y - lo]},
        hovertemplate=(
            f"{p['strategy']}, N = {p['devices']}: measured {metric} %{{y:.2f}} "
            f"(range {lo:.2f}-{hi:.2f} over {len(p['measured_runs'])} launches)<br>"
            f"prediction error {p['error']:+.0%}<extra>measured</extra>"
        ),
    )


def fig_projection(rec: dict, model: str, scaling: str, metric: str = "speedup") -> go.Figure:
    """Projected `metric` (speedup | efficiency) against N, one line per strategy; markers name the
    bottleneck; measured points (validation) drawn over the curves with their range."""
    fig = go.Figure()
    preds = [p for p in rec["predictions"] if p["model"] == model and p["scaling"] == scaling]
    one = [p for p in preds if p["devices"] == 1]
    # older records say nothing of it: compute was measured where the hardware was this machine
    here = "measured" if (rec.get("hardware") or {}).get("kind") == "measured" else "modelled"
    kinds = sorted({p.get("compute_kind") or (p["compute_source"].split()[0] if p.get("compute_source") else here)
                    for p in preds})  # fmt: skip
    for strategy in [s for s in COLORS if any(p["strategy"] == s for p in preds)]:
        pts = sorted((p for p in preds if p["strategy"] == strategy), key=lambda p: p["devices"])
        pts = one + pts if one else pts
        if (band := _band(strategy, pts, metric)) is not None:
            fig.add_trace(band)
        fig.add_trace(_curve(strategy, pts, metric, pts[-1].get("compute_kind") or kinds[0]))
    if scaling == "strong":
        for p in measured_points(rec, model):
            fig.add_trace(_measured(p, metric))
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey")
    source = sorted({p.get("compute_source", "") for p in preds if p["devices"] > 1} - {""})
    if source:
        fig.add_annotation(
            text="compute " + "; ".join(source) + (" · bands: validation range" if any(
                p.get("speedup_range") for p in preds) else ""),  # fmt: skip
            xref="paper", yref="paper", x=0, y=1.0, yanchor="bottom", showarrow=False, font={"size": 12},
        )  # fmt: skip
    fig.update_layout(
        xaxis_title="devices N",
        yaxis_title=metric,
        xaxis={"type": "log", "dtick": 0.30103, "tickformat": "d"},
        legend_title="strategy",
        height=460,
        margin={"t": 40},
    )
    return fig


def _alpha(color: str, a: float) -> str:
    """A hex colour as rgba with opacity `a` (the bands)."""
    h = color.lstrip("#")
    if len(h) != 6:
        return f"rgba(128,128,128,{a})"
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{a})"


def verdicts(rec: dict, model: str) -> list[str]:
    """The record's verdict lines for `model` (make project prints them first); none in older records."""
    return list((rec.get("verdicts") or {}).get(model) or [])


def validation_table(rec: dict, model: str | None = None) -> list[dict]:
    return [
        {
            "model": v["model"],
            "strategy": v["strategy"],
            "N": v["devices"],
            "global batch": v["global_batch"],
            "measured ms": round(v["measured_step_s"] * 1e3, 3),
            "predicted ms": round(v["predicted_step_s"] * 1e3, 3),
            "error": f"{v['error']:+.1%}",
            "launches": len(v["measured_runs"]),
            "note": "oversubscribed (4 processes, 2 cores)" if v.get("oversubscribed") else "",
        }
        for v in rec.get("validation") or []
        if model is None or v["model"] == model
    ]


def study_table(rec: dict) -> list[dict]:
    """Older records' study rows (bench/project.py --study, before bench/gpu_validation.py replaced it)."""
    return [
        {
            "model": r["model"],
            "batch per GPU": r["batch_per_gpu"],
            "study, published": round(r["study_published_speedup"], 2),
            "projected, weak (as the study ran)": round(r["projected_weak_speedup"], 2),
            "projected, same global batch": round(r["projected_strong_speedup"], 2),
            "bottleneck": r["projected_bottleneck"],
        }
        for r in rec.get("study") or []
        if isinstance(r, dict) and "study_published_speedup" in r
    ]

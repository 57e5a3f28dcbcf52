"""The dashboard's figures of the runs' histories: a metric's curves with EMA smoothing, and seed bands.

Plain functions from the frames of `board.frames` to Plotly figures; no Streamlit, torch or accelerate here.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from board.figures import COLORS, stable_color
from board.frames import finite, metric_label

X_AXES = {"epoch": "epoch", "wall-clock seconds": "time/elapsed_s", "samples seen": "samples_seen"}


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
    named: set[str] = set()
    if y in hist and xcol in hist:
        shown = hist.dropna(subset=[xcol])
        for rid, g in shown.groupby("run_id", sort=True):
            if rid not in meta.index or y not in g or g[y].isna().all():
                continue
            m = meta.loc[rid]
            row = models.index(m["model"]) + 1
            # one colour and one legend entry per setup (its seeds and launches share them; the hover names
            # the run), the same setup the same colour in every model's panel
            group = f"study {m['setup']}" if m["kind"] == "study" else str(m["setup"])
            group += " [SYNTHETIC]" if m["synthetic"] else ""
            seed = f" · seed {int(m['seed'])}" if pd.notna(m["seed"]) else ""
            g = g.sort_values(xcol)
            vals = [float(v) for v in g[y]]
            ok = [finite(v) for v in vals]
            c = stable_color(group)
            fig.add_trace(
                go.Scatter(
                    x=g[xcol][ok],
                    y=[v for v, k in zip(vals, ok, strict=True) if k],
                    mode="markers",
                    marker={"color": c, "size": 7},
                    opacity=0.3,
                    legendgroup=group,
                    showlegend=False,
                    name=f"{group} (raw)",
                    hovertext=rid,
                ),
                row=row,
                col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=g[xcol],
                    y=ema(vals, weight),
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": c},
                    legendgroup=group,
                    showlegend=group not in named,
                    name=group,
                    hovertext=rid,
                    connectgaps=False,
                    hovertemplate="%{hovertext}<br>%{x}: %{y:.3~g}<extra>"
                    + f"{m['model']} · {group}{seed}"
                    + "</extra>",
                ),
                row=row,
                col=1,
            )
            named.add(group)
    if x == "epoch" and len(hist) and hist["epoch"].max() <= 20:
        fig.update_xaxes(dtick=1)
    fig.update_yaxes(title_text=metric_label(y, info), tickformat=".3~g")
    fig.update_xaxes(title_text=x, row=rows, col=1)
    fig.update_layout(
        title=f"{metric_label(y, info)} vs {x}"
        + (f" (EMA {weight:g})" if weight else "")
        + ", one panel per model",
        legend={"title": "setup (its seeds and launches)"},
        height=max(360 * rows, 200 + 22 * len(named)),
    )
    return fig


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

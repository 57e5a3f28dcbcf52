"""The dashboard's Plotly figures: stable colours, speedup and step-time bars, scaling, curves with EMA
smoothing, per-run bars and seed bands.

Plain functions from the frames of `board.frames` to Plotly figures; no Streamlit, torch or accelerate here.
"""

from __future__ import annotations

import hashlib
import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from board.frames import BUILTIN, finite, metric_label, strategy_name
from shared import stats

X_AXES = {"epoch": "epoch", "wall-clock seconds": "time/elapsed_s", "samples seen": "samples_seen"}
COLORS = px.colors.qualitative.Dark24
PNG = {"toImageButtonOptions": {"format": "png", "scale": 2}, "displaylogo": False}


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


STUDY_PANEL = "the study (published: 2 T4 machines, global batch doubled)"


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
    # bars named by strategy (DDP x2), not by setup file; the study's (2 machines, batch doubled: not
    # comparable with ours) in a panel of their own, never among ours
    study = c["kind"] == "study"
    c["bar"] = [f"{strategy_name(r.strategy)} x{int(r.devices)}" for r in c.itertuples()]
    c.loc[study, "bar"] = [
        f"{m}: {b}" for m, b in zip(c.loc[study, "model"], c.loc[study, "bar"], strict=True)
    ]
    dup = c.duplicated(["model", "source_label", "bar"], keep=False) & ~study
    c.loc[dup, "bar"] = [f"{b} ({s})" for b, s in zip(c.loc[dup, "bar"], c.loc[dup, "cell"], strict=True)]
    c["panel"] = c["model"].where(~study, STUDY_PANEL)
    groups = sorted(set(c["source_label"]), key=lambda g: (g.startswith("the study"), g))
    models = [m for m in dict.fromkeys(c["panel"]) if m != STUDY_PANEL] + (
        [STUDY_PANEL] if study.any() else []
    )
    rows = math.ceil(len(models) / 2)
    fig = px.bar(
        c,
        x="bar",
        y="speedup",
        color="source_label",
        error_y="err_plus",
        error_y_minus="err_minus",
        text="flags",
        facet_col="panel",
        facet_col_wrap=2,
        facet_row_spacing=0.5 / rows if rows > 1 else 0.0,
        facet_col_spacing=0.06,
        barmode="group",
        category_orders={"panel": models, "source_label": groups},
        color_discrete_map={g: "#b0b0b0" if g.startswith("the study") else stable_color(g) for g in groups},
        hover_name="bar",
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
            "cell": True,
            "model": False,
            "bar": False,
            "panel": False,
        },
        labels={"speedup_text": "speedup [95% CI]", "cell": "setup", "bar": "", "source_label": ""},
        height=200 + 330 * rows,
        title="Speedup over 1 device by strategy, with 95% intervals (break-even = 1; the study apart)",
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

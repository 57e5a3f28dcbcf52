"""The dashboard's Plotly figures: stable colours, speedup and step-time bars, scaling and per-run bars (the
curves and seed bands, from the runs' histories: board/curves.py).

Plain functions from the frames of `board.frames` to Plotly figures; no Streamlit, torch or accelerate here.
"""

from __future__ import annotations

import hashlib
import math

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from board.frames import BUILTIN, strategy_name
from shared import stats

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


LEGEND_MAX = 8  # more entries than this and the legend goes; the hover names each trace


def top_legend(fig: go.Figure, height: int, title: str | None = None, most: int = LEGEND_MAX) -> go.Figure:
    """Title on top, a horizontal legend under it, the plot under both (container coordinates: nothing
    overlaps whatever the width); no legend at all past LEGEND_MAX entries."""
    n = len({tr.legendgroup or tr.name for tr in fig.data if tr.showlegend is not False and tr.name})
    shown = 0 < n <= most
    rows = math.ceil(n / 4) if shown else 0  # ~4 entries per line at 1280 px
    top = 50 + 24 * rows
    fig.update_layout(
        height=height + top,
        margin={"t": top + 10},
        title={"yref": "container", "y": 1 - 12 / (height + top), "yanchor": "top"},
        showlegend=shown,
        legend={
            "orientation": "h",
            "yref": "container",
            "y": 1 - 44 / (height + top),
            "yanchor": "top",
            "x": 0,
            "xanchor": "left",
            "title": title,
        },
    )
    return fig


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
    c["flag_mark"] = ["⚑" if f else "" for f in c["flags"]]  # which flags: in the hover and the Overview
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
        text="flag_mark",
        facet_col="panel",
        facet_col_wrap=2,
        facet_row_spacing=0.5 / rows if rows > 1 else 0.0,
        facet_col_spacing=0.06,
        barmode="group",
        category_orders={"panel": models, "source_label": groups},
        color_discrete_map={
            g: "#b0b0b0"
            if g.startswith("the study")
            else stable_color(g.split(" ")[2] if len(groups) > LEGEND_MAX else g)
            for g in groups
        },
        hover_name="bar",
        hover_data={
            "speedup_text": True,
            "conditions": True,
            "devices": True,
            "runs": True,
            "speedup": False,
            "err_plus": False,
            "err_minus": False,
            "flags": True,
            "flag_mark": False,
            "source_label": False,
            "cell": True,
            "model": False,
            "bar": False,
            "panel": False,
        },
        labels={"speedup_text": "speedup [95% CI]", "cell": "setup", "bar": "", "source_label": ""},
        title="Speedup over 1 device by strategy, with 95% intervals (break-even = 1; the study apart)",
    )
    fig.add_hline(y=1.0, line_dash="dash", line_color="black")
    fig.add_trace(  # the break-even line named in the legend, not written over the first bar
        go.Scatter(
            x=[None], y=[None], mode="lines", name="break-even (1.0)", line={"dash": "dash", "color": "black"}
        )
    )
    fig.update_traces(textposition="outside", textfont_size=14, cliponaxis=False, selector={"type": "bar"})
    fig.update_yaxes(matches=None, showticklabels=True, rangemode="tozero")
    fig.update_xaxes(matches=None, showticklabels=True, tickangle=-30)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_layout(uniformtext={"minsize": 12, "mode": "show"})
    return top_legend(fig, 150 + 330 * rows)


def fig_epoch_time(df: pd.DataFrame, log_y: bool = False) -> go.Figure:
    """Median steady-state step time per setup and hardware with its 95% interval (runs pooled); ours only:
    the study's files hold seconds per epoch, not per step."""
    c = cells_frame(df[df["kind"] == "ours"])
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
        labels={"step_s": "s / step", "cell": ""},
        title="Steady-state step time by setup (median, 95% interval)",
    )
    fig.update_traces(hovertemplate=None)
    fig.update_yaxes(matches=None, showticklabels=True, type="log" if log_y else None, tickformat=".3~g")
    fig.update_xaxes(matches=None, showticklabels=True)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    return top_legend(fig, 120 + 300 * rows, "hardware")


SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon", "hexagon"]


def fig_scaling(df: pd.DataFrame, y: str) -> go.Figure:
    """Speedup or efficiency vs devices per cell of ours: colour = strategy, symbol = model (one legend entry
    each, not one per pair), points of one N spread sideways by strategy, 95% intervals, the ideal and the
    break-even lines. The study's points are in the Speedup view's own panel (two machines)."""
    c = cells_frame(df[df["kind"] == "ours"])
    c = c.dropna(subset=[y]) if len(c) else c
    title = (
        "Speedup vs devices (ideal = devices, break-even = 1)"
        if y == "speedup"
        else "Scaling efficiency vs devices (ideal = 1)"
    )
    if c.empty:
        return go.Figure(layout={"title": {"text": title}})
    div = 1 if y == "speedup" else c["devices"]
    c = c.assign(plus=(c["speedup_hi"] - c["speedup"]) / div, minus=(c["speedup"] - c["speedup_lo"]) / div)
    strategies, models = sorted(c["strategy"].unique()), sorted(c["model"].unique())
    fig = go.Figure()
    for (strategy, model), g in c.groupby(["strategy", "model"], sort=True):
        shift = 0.08 * (strategies.index(strategy) - (len(strategies) - 1) / 2)
        fig.add_trace(
            go.Scatter(
                x=g["devices"] + shift,
                y=g[y],
                mode="markers",
                marker={
                    "color": stable_color(strategy),
                    "symbol": SYMBOLS[models.index(model) % len(SYMBOLS)],
                    "size": 11,
                },
                error_y={
                    "type": "data",
                    "array": g["plus"],
                    "arrayminus": g["minus"],
                    "color": stable_color(strategy),
                },
                name=f"{strategy_name(strategy)} · {model}",
                showlegend=False,
                customdata=list(
                    zip(g["cell"], [stats.sig(v) for v in g[y]], g["conditions"], g["flags"], strict=True)
                ),
                hovertemplate=f"<b>{model} · %{{customdata[0]}}</b><br>{y} %{{customdata[1]}}<br>%{{customdata[2]}}"
                "<br>%{customdata[3]}<extra></extra>",
            )
        )
    for strategy in strategies:  # the legend: colours, then symbols
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=strategy_name(strategy),
                                 marker={"color": stable_color(strategy), "size": 11}))  # fmt: skip
    for i, model in enumerate(models):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=model,
                                 marker={"color": "#555", "symbol": SYMBOLS[i % len(SYMBOLS)], "size": 11}))  # fmt: skip
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
    fig.update_xaxes(dtick=1, title="devices (GPUs, or CPU processes of one core each)")
    fig.update_yaxes(title=BUILTIN[y]["label"], rangemode="tozero")
    fig.update_layout(title=title)
    return top_legend(fig, 420, most=24)  # strategies and models: a bounded list, the only key to the marks


def run_label(r) -> str:
    """A run as a bar label: model · setup · seed · the id's last 6 characters (unique, short)."""
    seed = f" · seed {int(r.seed)}" if pd.notna(r.seed) else ""
    return f"{r.model} · {r.setup}{seed} · {str(r.run_id)[-6:]}" + (" [SYNTHETIC]" if r.synthetic else "")


def fig_per_run(
    df: pd.DataFrame, cols: dict[str, str], title: str, unit: str, log_x: bool = True
) -> go.Figure:
    """One horizontal bar per run and value column ({column: name}), coloured by strategy; a log axis, since
    models differ by orders of magnitude."""
    d = df.dropna(subset=[next(iter(cols))]).sort_values(
        ["model", "workers", "setup", "run_id"], ascending=False
    )
    d = d.assign(bar=[run_label(r) for r in d.itertuples()])
    fig = go.Figure()
    for i, (col, name) in enumerate(cols.items()):
        if col not in d or d[col].isna().all():
            continue
        for strategy, g in d.groupby("strategy", sort=True):
            fig.add_trace(
                go.Bar(
                    y=g["bar"],
                    x=g[col],
                    orientation="h",
                    name=f"{strategy_name(strategy)}" + (f" · {name}" if len(cols) > 1 else ""),
                    marker={"color": stable_color(strategy), "pattern": {"shape": "" if i == 0 else "/"}},
                    opacity=1.0 if i == 0 else 0.55,
                    customdata=list(
                        zip(
                            g["run_id"],
                            g["hardware"],
                            g["global_batch"],
                            [stats.sig(v) for v in g[col]],
                            strict=True,
                        )
                    ),
                    hovertemplate=f"%{{customdata[0]}}<br>%{{customdata[1]}} · batch %{{customdata[2]}}<br>{name}: "
                    f"%{{customdata[3]}} {unit}<extra></extra>",
                )
            )
    values = pd.concat([d[c] for c in cols if c in d]).dropna()
    log_x = log_x and len(values) > 0 and values.min() > 0 and values.max() / values.min() >= 10
    # a log axis only across orders of magnitude, labelled per decade (Plotly's in-between digits are tiny)
    fig.update_xaxes(
        type="log" if log_x else None,
        dtick=1 if log_x else None,
        tickformat="~s" if log_x else ".3~g",
        title=unit + (" (log scale)" if log_x else ""),
    )
    fig.update_yaxes(categoryorder="array", categoryarray=list(d["bar"]), title=None)
    fig.update_layout(title=title, barmode="group")
    return top_legend(
        fig, 120 + 26 * max(len(d), 4) * max(1, sum(c in d and d[c].notna().any() for c in cols))
    )

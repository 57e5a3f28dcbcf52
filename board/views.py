"""The dashboard's widgets bound to the page address, its figure display, and the views that read on their own
(Projection: `make project`'s records; Compare runs: one run against a baseline). Streamlit calls, drawn where
dashboard.py calls them."""

import streamlit as st

from board import figures, projection, tables


def url_state(key: str, options: list, default, multi: bool = False):
    """Seed widget `key` from the URL the first time the session sees it; drop values that are no longer options."""
    if key not in st.session_state:
        given = st.query_params.get_all(key)
        st.session_state[key] = (
            [v for v in given if v in options] if multi else next((v for v in given if v in options), default)
        )
    elif multi:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]
    elif st.session_state[key] not in options:
        st.session_state[key] = default


def to_url(key: str, value, default=None):
    values = [str(v) for v in value] if isinstance(value, list) else [] if value == default else [str(value)]
    if st.query_params.get_all(key) != values:
        if values:
            st.query_params[key] = values
        else:
            del st.query_params[key]


def select(container, label: str, key: str, options: list, default, **kw):
    url_state(key, options, default)
    value = container.selectbox(label, options, key=key, **kw)
    to_url(key, value, default)
    return value


def show(fig, name: str):
    """A figure with its PNG (Plotly's camera button) and a self-contained HTML download."""
    st.plotly_chart(
        fig,
        key=f"fig_{name}",
        config={
            **figures.PNG,
            "toImageButtonOptions": {**figures.PNG["toImageButtonOptions"], "filename": name},
        },
    )
    st.download_button(
        "HTML",
        data=lambda: fig.to_html(include_plotlyjs=True),
        file_name=f"{name}.html",
        mime="text/html",
        on_click="ignore",
        key=f"dl_{name}",
        icon=":material/download:",
    )


def projection_view(runs_dir: str):
    """`make project`'s records: projected speedup / efficiency against N per strategy, measured points over."""
    recs, bad = projection.load_projections(runs_dir)
    for name, reason in bad:
        st.warning(f"`{name}` could not be read: {reason}")
    if not recs:
        st.info(
            f"No projection record in `{runs_dir}` yet: run `make project` (docs/projection.md), then reload."
        )
        return
    labels = {r["file"]: projection.label(r) for r in recs}
    c1, c2, c3 = st.columns(3)
    rec = {r["file"]: r for r in recs}[
        select(c1, "Projection record", "proj", list(labels), recs[0]["file"], format_func=labels.get)
    ]
    model = select(c2, "Model", "proj_model", projection.models(rec), projection.models(rec)[0])
    scaling = select(c3, "Scaling", "proj_scaling", ["strong", "weak"], "strong")
    lines = projection.verdicts(rec, model)
    if lines:
        st.markdown(
            "**Verdicts**\n" + "\n".join(f"- {line}" for line in lines if f"({scaling} scaling)" in line)
        )
    else:
        st.markdown(f"**{(rec.get('sentences') or {}).get(model, '')}**")
    left, right = st.columns(2)
    with left:
        show(projection.fig_projection(rec, model, scaling, "speedup"), "projection_speedup")
    with right:
        show(projection.fig_projection(rec, model, scaling, "efficiency"), "projection_efficiency")
    hw, prof = rec["hardware"], rec["profile"]
    st.caption(
        f"Dotted lines: projected by shared/projection.py on **{hw['name']}** ({hw['kind']}: "
        f"{hw.get('description', '')}) from the profile measured on {prof['machine']} ({prof['hostname']}, "
        f"{prof['measured_at']}, commit {prof['git_commit']}, one thread per process). Marker = bottleneck "
        "(circle compute, x communication, triangle bubble, square memory, star input). Legend: whether each curve's "
        "compute was measured on that device or modelled from the hardware file's figures; shaded band: the "
        "range such predictions showed in validation (shared/residuals.yaml); verdict `cannot tell` where the "
        "band crosses 1. "
        + (
            "Strong scaling: the global batch stays the model's batch, each device takes batch/N. "
            if scaling == "strong"
            else "Weak scaling: each device keeps the model's batch, the global batch grows N-fold. "
        )
        + "Diamonds: real runs measured in the same session as the profile (bench-strategies), speedup over "
        "the measured 1-process step, bars = range over launches. On this CPU each process has one core "
        "(one 'device'); N above the cores is oversubscribed. Formulas and sources: docs/projection.md."
    )
    table = projection.validation_table(rec)
    if table:
        s = rec.get("validation_summary") or {}
        st.markdown(
            f"Validation: mean |error| {s.get('mean_abs_error', 0):.1%}, worst {s.get('max_abs_error', 0):.1%} "
            f"over {s.get('cells', len(table))} cells"
        )
        st.dataframe(table, hide_index=True, width="stretch")
    if projection.study_table(rec):
        st.markdown("**The study revisited**: its 2 x T4 DDP runs projected on `t4-pcie` (assumed figures)")
        st.dataframe(projection.study_table(rec), hide_index=True, width="stretch")
        st.caption(
            "Published: the ratio of the study's median epoch training times, 1 GPU (Colab T4) over 2 GPUs "
            "(Kaggle T4 x2, rank 0): two machines, and the global batch doubled on 2 GPUs. Projected: DDP on "
            "t4-pcie at the study's batch per GPU (weak scaling, as it ran) and at the same global batch (strong)."
        )


def compare_view(df, df_all, by_id: dict, info: dict):
    """Compare runs: the runs that did the same work as a baseline, number by number, and the configuration
    differences of the runs picked."""
    ids = list(
        df.assign(study=df["kind"] != "ours").sort_values(["study", "workers", "model", "run_id"])["run_id"]
    )
    labels = dict(zip(df["run_id"], [figures.run_label(r) for r in df.itertuples()], strict=True))
    base_id = select(st, "Baseline run", "baseline", ids, tables.default_baseline(df), format_func=labels.get)
    same, why = tables.comparable(df_all, base_id)
    table = tables.baseline_table(by_id, df_all, base_id, [r for r in same if r in labels], info)
    st.markdown("**Against the baseline**: the runs that did the same work")
    if table.empty:
        st.info(
            "No other run shown did the same work as this one (see below why the others are not compared)."
        )
    else:
        st.dataframe(
            table,
            hide_index=True,
            width="stretch",
            height=tables.table_height(len(table), 25),
            column_config={
                "run": st.column_config.TextColumn(width="medium"),
                "metric": st.column_config.TextColumn(width="medium"),
                **{
                    c: st.column_config.NumberColumn(format="%.4g")
                    for c in ("value", "baseline", "delta", "ratio")
                },
            },
        )
    st.caption(
        "Runs of the baseline's model with the same hardware, global batch, data and step budget: delta = "
        "run - baseline, ratio = run / baseline, for every number both carry; better/worse follows each "
        "metric's declared goal, `same` within 1% of the baseline."
        + (
            f" Not compared ({len(why)}): "
            + "; ".join(f"{labels.get(r, r)}: {w}" for r, w in list(why.items())[:12])
            + (" ..." if len(why) > 12 else "")
            if why
            else ""
        )
    )
    st.markdown("**Configuration differences**")
    kept = [r for r in st.session_state.get("diff_runs", []) if r in ids]
    # until the user picks
    st.session_state["diff_runs"] = kept or [base_id, *[r for r in same if r in labels]][:4]
    picked = st.multiselect("Runs to compare", ids, key="diff_runs", format_func=labels.get)
    diff = tables.config_diff([by_id[r] for r in picked])
    if len(picked) < 2:
        st.info("Pick two or more runs.")
    elif diff.empty:
        st.success("These runs have identical configurations.")
    else:
        diff.columns = [labels.get(c, c) for c in diff.columns]
        st.dataframe(diff, width="stretch", height=tables.table_height(len(diff)))
        st.caption(f"Only the {len(diff)} keys whose values differ (— = absent or empty); columns = runs.")

"""Training-run dashboard: our run records beside the study's published results, filtered and compared.

    make dashboard                                   # http://127.0.0.1:8501, reads runs/
    make dashboard RUNS_DIR=/path/to/runs PORT=8600

Environment: RUNS_DIR (default runs/), REFERENCE_DIR (the study's files; default reference/seed_results next
to this file, empty for none), DASHBOARD_STALE_S (heartbeat age in seconds after which a `running` record
shows as crashed, default 600), DASHBOARD_REFRESH_S (live refresh period while a run is running, default 10).
Filters and view settings live in the URL's query parameters, so a link reproduces the view.
"""

import datetime as dt
import os
from pathlib import Path

import streamlit as st

from board import comparisons, curves, figures, frames, tables
from board.load import folder_signature, load_folder, unmeasured_cells
from board.views import compare_view, projection_view, select, show, to_url, url_state
from shared import stats

RUNS_DIR = os.environ.get("RUNS_DIR", "runs")
REFERENCE_DIR = os.environ.get("REFERENCE_DIR", str(Path(__file__).with_name("reference") / "seed_results"))
STALE_S = float(os.environ.get("DASHBOARD_STALE_S", frames.STALE_S))
REFRESH_S = float(os.environ.get("DASHBOARD_REFRESH_S", 10))
FILTERS = {
    "model": "Model",
    "setup": "Setup",
    "strategy": "Strategy",
    "hardware": "Hardware",
    "status": "Status",
    "source": "Data source",
}

st.set_page_config(page_title="distbench runs", layout="wide")


@st.cache_data(show_spinner=False, max_entries=4)
def load(runs_dir: str, reference_dir: str, signature: tuple):
    """Keyed on every file's name, mtime and size: a new epoch in any record reloads, nothing else does."""
    runs, problems = load_folder(runs_dir, reference_dir)
    unmeasured, bad = unmeasured_cells(runs_dir)
    return runs, problems + bad, frames.history_frame(runs), unmeasured


@st.cache_resource(show_spinner=False, max_entries=4)  # read only: shared, not copied per rerun
def cell_comparisons(runs_dir: str, reference_dir: str, signature: tuple) -> dict:
    """Every cell's speedup, intervals and flags (the bootstraps: the page's costliest step), cached on the
    folder's signature like the records themselves; statuses are recomputed on every rerun."""
    runs = load(runs_dir, reference_dir, signature)[0]
    return comparisons.run_comparisons(runs)


@st.cache_resource(show_spinner=False, max_entries=64)  # figures are read, never changed: shared
def figure(name: str, key: str, _make):
    """A figure built once per (name, key): `key` holds everything it depends on (the folder's signature, the
    filters, the view's settings), so a rerun with nothing changed (a widget elsewhere, a live refresh with no
    new epoch) reuses it instead of drawing all the views again."""
    return _make()


# ----------------------------------------------------------------------------- data
signature = folder_signature(RUNS_DIR, REFERENCE_DIR)
runs, problems, hist_all, unmeasured = load(RUNS_DIR, REFERENCE_DIR, signature)
by_id = {r["run_id"]: r for r in runs}

st.title("distbench: when does distributed training pay off?")
st.caption(
    f"Run records from `{RUNS_DIR}`; the study's published results from `{REFERENCE_DIR or '(none)'}`."
)
answer_slot = st.container()  # the answer first; filled once the filters are known
notices = st.container()  # fixed slots, so the tabs below keep their place (and the open tab) across reruns
with notices:
    if problems:
        shown = problems[:50]
        with st.expander(
            f":warning: {len(problems)} file(s) in the folder could not be read and are not shown"
        ):
            st.warning(
                f"{len(problems)} file(s) could not be read and are not shown:\n"
                + "\n".join(f"- `{name}`: {reason}" for name, reason in shown)
                + (f"\n- ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else "")
            )
    if not runs:
        st.info(
            f"No run records in `{RUNS_DIR}` yet. Run `make bench-all` or one script (README), then reload."
        )
        st.subheader("Projection")
        projection_view(RUNS_DIR)
        st.stop()
    if not any(r["kind"] == "ours" for r in runs):
        st.info(f"No run records of ours in `{RUNS_DIR}` yet: only the study's published results are shown.")

# ----------------------------------------------------------------------------- filters
with st.sidebar:
    st.header("Filters")
    stale_s = st.number_input(
        "Heartbeat timeout (s)",
        min_value=1.0,
        value=STALE_S,
        step=60.0,
        key="stale_s",
        help="A `running` record not updated for this long is shown as crashed.",
    )
    comp = cell_comparisons(RUNS_DIR, REFERENCE_DIR, signature)
    df_all = frames.runs_frame(runs, dt.datetime.now(dt.timezone.utc), stale_s, comp)
    chosen = {}
    for col, label in FILTERS.items():
        options = sorted(df_all[col].fillna("?").astype(str).unique())
        url_state(col, options, [], multi=True)
        chosen[col] = st.multiselect(label, options, key=col, placeholder="all")
        to_url(col, chosen[col])
    every_batch = select(
        st, "Bench batches", "batches", ["newest", "all"], "newest",
        format_func={"newest": "newest per model", "all": "every batch"}.get,
        help="Speedup, Overview, Step time, Scaling and Throughput show each model's newest bench batch "
        "(per hardware and profile) unless every batch is asked for; curves, seeds and runs show all.",
    ) == "all"  # fmt: skip
    st.caption("Filters and view settings are kept in the page address: copy it to share this view.")
df = frames.apply_filters(df_all, chosen)
if df.empty:
    st.info("No run matches the filters.")
    st.stop()
hist = hist_all[hist_all["run_id"].isin(df["run_id"])]
summary_df = df if every_batch else frames.newest_batches(df)
hidden = len(df) - len(summary_df)
batches_note = (
    f" Each model's newest bench batch is shown ({hidden} runs of older batches are not: sidebar, Bench batches)."
    if hidden
    else ""
)
# what every figure depends on besides its own settings; statuses only matter while something runs
VIEW = repr(
    (
        signature,
        sorted(chosen.items()),
        every_batch,
        stale_s,
        len(df_all[df_all["status"] == "running"]) and dt.datetime.now().minute,
    )
)
info = frames.metric_info([by_id[r] for r in df["run_id"]])

# ----------------------------------------------------------------------------- headline numbers
ours = df[df["kind"] == "ours"]
cols = st.columns(5)
cols[0].metric("runs shown", len(df), help=f"{len(ours)} ours, {len(df) - len(ours)} from the study")
cols[1].metric("models", df["model"].nunique())
cols[2].metric("running", int((df["status"] == "running").sum()))
cols[3].metric("crashed / failed", int(df["status"].isin(["crashed", "failed"]).sum()))
# the headline speedup: of our comparisons with more than one device and no flag (a flagged one is not a result)
clean = ours[(ours["workers"] > 1) & ours["speedup"].notna() & (ours["flags"] == "")]
if len(clean):
    top = clean.loc[clean["speedup"].idxmax()]
    cols[4].metric(
        "best unflagged speedup (ours)",
        f"{stats.sig(top['speedup'])}x",
        help=f"{top['model']} {top['setup']} on {top['hardware']}, batch {top['global_batch']}: 95% interval "
        f"{stats.sig(top['speedup_lo'])}-{stats.sig(top['speedup_hi'])}x over {top['cell_runs']} run(s)",
    )
else:
    cols[4].metric(
        "best unflagged speedup (ours)", "—", help="No comparison of ours without a flag is shown."
    )
badges = st.container()
if note := frames.synthetic_note(df):
    badges.badge("SYNTHETIC data", icon=":material/warning:", color="orange")
    badges.caption(note)
if (df["kind"] == "study").any():
    badges.badge("reference: the study's published results", icon=":material/menu_book:", color="violet")
    badges.caption(
        "Hardware: Colab T4 for 1 GPU, Kaggle T4 x2 for 2 GPUs, so its speedups mix two machines; the "
        "global batch doubled on 2 GPUs; per-rank metrics were never reduced (rank 0 shown); no "
        "set_epoch. See reference/README.md."
    )
running = df_all[df_all["status"] == "running"]
if len(running):
    deadline = min(
        frames.parse_time(t) or dt.datetime.max.replace(tzinfo=dt.timezone.utc) for t in running["updated_at"]
    ) + dt.timedelta(seconds=stale_s)
    badges.badge(f"live: {len(running)} run(s) running", icon=":material/sync:", color="green")

    @st.fragment(run_every=REFRESH_S)
    def watch():
        """Cheap check every few seconds; the whole page reruns only when a file changed or a heartbeat went stale."""
        if (
            folder_signature(RUNS_DIR, REFERENCE_DIR) != signature
            or dt.datetime.now(dt.timezone.utc) > deadline
        ):
            st.rerun()
        st.caption(f"Refreshing every {REFRESH_S:g} s; last checked {dt.datetime.now():%H:%M:%S}.")

    with badges:
        watch()

# ----------------------------------------------------------------------------- the answer
answer = tables.verdicts(df)
with answer_slot:  # always this one slot, at the top, so the tabs below keep their place (and the open tab)
    st.subheader("The answer per model")
    if len(answer):
        st.markdown("\n".join(f"- {line}" for line in tables.verdict_lines(answer)))
        with st.expander("as a table"):
            st.dataframe(answer, hide_index=True, width="stretch", height=tables.table_height(len(answer)))
    else:
        st.caption("No comparison of ours on more than one device among the runs shown.")
    st.caption(
        "Per model and hardware, from its newest bench batch: the best strategy on more than one device "
        "(oversubscribed cells aside) and its speedup over one device [interval]. `pays off`: the whole "
        "interval is above 1; `does not pay off`: below 1; `cannot tell`: it spans 1. A 95% interval "
        "resamples launches, then timed windows within each; with one launch per side it is the noise inside "
        "that launch only. On a CPU each process has one core (one 'device')."
    )

# ----------------------------------------------------------------------------- charts
# Tabs are built only when opened (st.tabs with state: `.open`), and the open one is in the page address.
FLAG_HELP = " ".join(f"**{k}**: {v}." for k, v in stats.FLAGS.items())
VIEWS = ["Speedup", "Overview", "Step time", "Scaling", "Curves", "Throughput & memory", "Compare runs",
         "Seeds", "Projection"]  # fmt: skip
tabs = dict(zip(VIEWS, st.tabs(VIEWS, key="view", bind="query-params"), strict=True))
with tabs["Speedup"]:
    if tabs["Speedup"].open:
        show(figure("speedup", VIEW, lambda: figures.fig_speedup(summary_df)), "speedup_bars")
        st.caption(
            "Speedup = median steady-state step time of the 1-device run / this setup's, at the same global "
            "batch, data, step budget, profile and hardware (warm-up excluded); bars = intervals by a "
            "bootstrap over launches, then timed windows (95%; within one launch where flagged single-launch); "
            "dashed line = break-even; ⚑ = flagged (which flags: in the hover and the Overview). The study's "
            "published speedups are in a panel of their own: its 2-GPU runs were on another machine with a "
            "doubled global batch, so they are not comparable with ours. On a CPU each process has one core "
            "(one 'device'); a model split in one CPU process is one device." + batches_note
        )
        missing = tables.unmeasured(unmeasured, summary_df)
        if len(missing):
            st.markdown("**Cells not measured** in the bench batches shown: skipped, refused or failed")
            st.dataframe(
                missing, hide_index=True, width="stretch", height=tables.table_height(len(missing), 12)
            )
with tabs["Overview"]:
    if tabs["Overview"].open:
        summary = tables.overview(summary_df)
        st.dataframe(
            summary,
            hide_index=True,
            width="stretch",
            height=tables.table_height(len(summary), 25),
            column_order=[c for c in summary.columns if not c.startswith("_")],
            column_config={
                "model": st.column_config.TextColumn(width="medium", pinned=True),
                "strategy": st.column_config.TextColumn(width="medium", pinned=True),
                "flags": st.column_config.TextColumn(width="large"),
                "value (mean ± std)": st.column_config.TextColumn(width="medium"),
                "status": st.column_config.TextColumn(width="medium"),
                **{
                    c: st.column_config.TextColumn(width="medium")
                    for c in ("speedup [95% CI]", "step ms [95% CI]")
                },
            },
        )
        st.caption(
            "One row per model, setup, hardware, global batch, data source and profile (runs pooled); per model "
            "and profile the baseline first, then the best speedup first; the study's rows last. Step = median steady-state "
            "step time in milliseconds (the study recorded epochs, not steps: its step column is empty); speedup "
            "and efficiency (speedup / devices) as in Speedup, 95% intervals. Best epoch s = the lowest median "
            "training seconds per epoch. Value: the primary test metric, mean ± std over runs; `near chance` "
            "when it is within a tenth of the way from guessing to perfect (quick-profile runs are too short "
            "to learn: docs/quality.md has the full-length numbers). " + FLAG_HELP + batches_note
        )
with tabs["Step time"]:
    if tabs["Step time"].open:
        log_y = st.toggle(
            "log scale",
            key="log_time",
            help="Step times differ by orders of magnitude between models and hardware.",
        )
        show(
            figure("epoch_time", VIEW + repr(log_y), lambda: figures.fig_epoch_time(summary_df, log_y)),
            "epoch_time",
        )
        st.caption(
            "Median steady-state seconds per training step (shared/meter.py: warm-up, each epoch's first and "
            "last step and checkpoint writes left out); error bars = 95% bootstrap interval over timed windows "
            "of all the setup's runs. Ours only: the study's files record seconds per epoch, not per step "
            "(Overview, best epoch s)." + batches_note
        )
with tabs["Scaling"]:
    if tabs["Scaling"].open:
        left, right = st.columns(2)
        with left:
            show(figure("scaling_s", VIEW, lambda: figures.fig_scaling(summary_df, "speedup")), "speedup")
        with right:
            show(
                figure("scaling_e", VIEW, lambda: figures.fig_scaling(summary_df, "efficiency")), "efficiency"
            )
        st.caption(
            "One point per setup of ours (its runs pooled), colour = strategy, symbol = model, points of one N "
            "set apart by strategy, error bars = 95% intervals; efficiency = speedup / devices. Setups without "
            "a comparable 1-device run are not drawn; the study's are in Speedup's own panel." + batches_note
        )
keys = frames.curve_keys(hist, info)  # the history metrics the runs shown carry (none before a first epoch)
y = "train/loss" if "train/loss" in keys else next(iter(keys), None)
with tabs["Curves"]:
    if tabs["Curves"].open and not keys:
        st.info("No run shown has finished an epoch yet.")
    elif tabs["Curves"].open:
        c1, c2, c3 = st.columns(3)
        y = select(c1, "Metric", "metric", keys, y, format_func=lambda k: frames.metric_choice(k, info))
        x = select(c2, "x axis", "x", list(curves.X_AXES), "epoch")
        steps = [f"{v / 100:g}" for v in range(0, 100, 5)]
        url_state("ema", steps, "0.6")
        weight = float(c3.select_slider("EMA smoothing", steps, key="ema"))
        to_url("ema", f"{weight:g}", "0.6")
        if stuck := frames.not_learning(hist, df, y, info):
            st.warning(
                f"Not learning ({y} within 2% of its first epoch after 3+ epochs): " + "; ".join(stuck)
            )
        show(
            figure(
                "curves",
                VIEW + repr((y, x, weight)),
                lambda: curves.fig_curves(hist, df, y, x, weight, info),
            ),
            "curves",
        )
        drawn = set(hist.dropna(subset=[curves.X_AXES[x]])["run_id"]) if curves.X_AXES[x] in hist else set()
        missing = sorted(set(df["run_id"]) - drawn)
        single = sorted(set(hist.groupby("run_id").size().loc[lambda n: n == 1].index) & set(df["run_id"]))
        st.caption(
            "Faint points: raw values; lines: debiased EMA; one colour and legend entry per setup, its seeds "
            "and launches together (the hover names the run). Non-finite losses (diverged) are not drawn."
            + (f" {len(single)} run(s) have one epoch: a single point each." if single else "")
            + (
                f" Not on this axis ({len(missing)} runs without `{curves.X_AXES[x]}`): {', '.join(missing)}."
                if missing
                else ""
            )
        )
with tabs["Throughput & memory"]:
    if tabs["Throughput & memory"].open:
        throughput = lambda: figures.fig_per_run(  # noqa: E731
            summary_df, {"throughput": "throughput"}, "Throughput per run (median over epochs)", "samples/s"
        )
        show(figure("throughput", VIEW, throughput), "throughput")
        memory = lambda: figures.fig_per_run(  # noqa: E731
            summary_df,
            {"peak_gib": "one process (max over processes)", "all_ranks_gib": "all processes (sum)"},
            "Peak memory per run",
            "GiB",
            log_x=False,
        )
        show(figure("memory", VIEW, memory), "memory")
        st.caption(
            "Bars named model · setup · seed · the run id's last characters, coloured by strategy. Memory: "
            "peak CUDA allocation on GPUs, peak process RSS on the CPU; solid = the largest one process (what "
            "one device must hold), hatched = all processes together (records since 2026-12-07). The study's "
            "files record neither throughput nor memory." + batches_note
        )
with tabs["Compare runs"]:
    if tabs["Compare runs"].open:
        compare_view(df, df_all, by_id, info)
with tabs["Seeds"]:
    if tabs["Seeds"].open:
        groups = frames.seed_groups(df) if keys else {}
        if not groups:
            st.info(
                "No experiment shown has runs with two or more different seeds (launches of one seed are "
                "repeats, in Speedup's intervals). `make bench-all PROFILE=full` runs three seeds of each."
            )
        else:
            band = select(st, "Metric", "band", keys, y, format_func=lambda k: frames.metric_choice(k, info))
            show(
                figure("seeds", VIEW + repr(band), lambda: curves.fig_seed_bands(hist, groups, band, info)),
                "seeds",
            )
            st.caption(
                "A group = runs whose configuration differs only in the seed (same setup, hardware and data), "
                "with at least two different seeds; line = mean per epoch, band = ± one standard deviation over "
                "the group's runs."
            )
with tabs["Projection"]:
    if tabs["Projection"].open:
        projection_view(RUNS_DIR)

# ----------------------------------------------------------------------------- raw table
st.subheader("Runs")
raw = df.drop(columns=["baseline_group", "label", "comparison"]).sort_values(
    ["model", "kind", "workers", "run_id"]
)
st.dataframe(raw, hide_index=True, width="stretch")
st.download_button(
    "Filtered table (CSV)",
    raw.to_csv(index=False),
    file_name="runs.csv",
    mime="text/csv",
    on_click="ignore",
    key="dl_csv",
    icon=":material/download:",
)

"""dashboard.py through streamlit.testing's AppTest, on a folder of real short runs plus the study's files.

The runs folder is built once per session by launching the real scripts (1 process, 2 seeds; 2 processes
through `accelerate launch`; synthetic data; the autoencoder), then adding what real short runs cannot
produce on demand, each derived from a real record and named as such: a `running` record with a stale
heartbeat, a live one, a diverged one ("nan" losses), and broken files (truncated JSON, foreign JSON, wrong
schema_version, schema violation, a broken study file). Every view is checked on the figure JSON and table
contents the page sends, and filters are changed through the widgets and the URL.
"""

from __future__ import annotations

import ast
import base64
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from board import curves, figures, frames
from shared import stats
from tests.conftest import DATA_DIR, REPO, child_env, explain, launch, require_dataset

STUDY = REPO / "reference" / "seed_results"
COMMON = ("--limit_train", 640, "--limit_eval", 200, "--epochs", 3)
LAUNCHES = {  # name -> (accelerate config or None for plain python, script, extra flags)
    "seed0": (None, "mlp", ("--seed", 0, "--tag", "bench:fixture:quick:mlp:cpu_1proc:seed0")),
    "seed1": (None, "mlp", ("--seed", 1, "--tag", "bench:fixture:quick:mlp:cpu_1proc:seed1")),
    "ddp": ("cpu_2proc", "mlp", ("--seed", 0, "--tag", "bench:fixture:quick:mlp:cpu_2proc:seed0")),
    "synthetic": (None, "mlp", ("--data", "synthetic", "--tag", "fixture:synthetic")),
    "ae": (
        None,
        "conv_autoencoder",
        ("--tag", "fixture:ae", "--limit_train", 320, "--limit_eval", 100, "--epochs", 2),
    ),
}
BROKEN = {
    "truncated.json": "not valid JSON",
    "foreign.json": "unsupported schema_version None",
    "wrong_version.json": "unsupported schema_version 2",
    "bad_schema.json": "does not match the run schema",
    "Broken_2GPU.json": "different lengths",
    "deep/nested.json": "nested too deeply",  # a JSON document that exhausts the parser
    "huge.json": "too large for a run record",
    "latin1.json": "unreadable",
    "list.json": "not a run record",
    "bench/b2/summary.json": "not a bench summary",
    "pipe.json": "not a regular file",  # a named pipe: reading it would block the loader for good
    "zero.json": "not a regular file",  # a link to /dev/zero: reading it would never end
}
_BUILT: dict = {}


def _now(**delta) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(**delta)).isoformat(timespec="milliseconds")


def _derive(src: dict, run_id: str, runs: Path, **changes) -> dict:
    rec = json.loads(json.dumps(src))
    rec.update(run_id=run_id, **changes)
    (runs / f"{run_id}.json").write_text(json.dumps(rec))
    return rec


def build_fixture(root: Path) -> dict:
    """Launch the real runs and add the derived and broken files. Built once per session. The 2-process run
    has the 2 cores to itself, then the 1-process ones go two at a time; one thread per process throughout,
    as `accelerate launch` sets for the 2-process run, so the timings stay comparable."""
    if _BUILT:
        return _BUILT
    require_dataset("mnist")
    runs, ref = root / "runs", root / "reference"
    runs.mkdir()

    def one(item):
        name, (setup, script, extra) = item
        proc = launch(
            setup,
            script,
            "--data_dir",
            DATA_DIR,
            "--runs_dir",
            runs,
            *COMMON,
            *extra,
            env=child_env(OMP_NUM_THREADS="1"),
        )
        assert proc.returncode == 0, f"{name}: {explain(proc)}"

    one(("ddp", LAUNCHES["ddp"]))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, [(k, v) for k, v in LAUNCHES.items() if k != "ddp"]))
    by_tag = {r["tag"]: r for r in (json.loads(p.read_text()) for p in runs.glob("*.json"))}
    ids = {
        name: by_tag[extra[extra.index("--tag") + 1]]["run_id"] for name, (_, _, extra) in LAUNCHES.items()
    }
    seed0 = by_tag[LAUNCHES["seed0"][2][-1]]
    first = {
        "history": seed0["history"][:1],
        "test": {},
        "ended_at": None,
        "tag": "fixture:derived",
        "config": {**seed0["config"], "seed": 7},
    }
    _derive(seed0, "mlp-fixture-stale", runs, status="running", updated_at=_now(hours=-2), **first)
    _derive(
        seed0,
        "mlp-fixture-live",
        runs,
        status="running",
        updated_at=_now(),
        **{**first, "config": {**seed0["config"], "epochs": 5}},
    )
    diverged = json.loads(json.dumps(seed0["history"]))
    diverged[1].update({"train/loss": "nan", "val/loss": "inf"})
    _derive(
        seed0,
        "mlp-fixture-diverged",
        runs,
        status="failed",
        error="loss became nan",
        history=diverged,
        test={},
        tag="fixture:diverged",
        config={**seed0["config"], "lr": 10.0},
    )
    text = json.dumps(seed0)
    (runs / "truncated.json").write_text(text[: len(text) // 2])
    (runs / "foreign.json").write_text(json.dumps({"name": "not a run record", "values": [1, 2, 3]}))
    (runs / "wrong_version.json").write_text(
        json.dumps({**seed0, "schema_version": 2, "run_id": "wrong_version"})
    )
    (runs / "bad_schema.json").write_text(json.dumps({**seed0, "run_id": "bad_schema", "setup": "ddp"}))
    (runs / "deep").mkdir()
    (runs / "deep" / "nested.json").write_text("[" * 200_000 + "]" * 200_000)
    with open(runs / "huge.json", "wb") as f:  # sparse: 17 MiB without writing them
        f.truncate(17 * 2**20)
    (runs / "latin1.json").write_bytes('{"caf\xe9": 1}'.encode("latin-1"))
    (runs / "list.json").write_text("[1, 2, 3]")
    os.mkfifo(runs / "pipe.json")
    (runs / "zero.json").symlink_to("/dev/zero")
    # records in subfolders are read (a results folder per date and profile); bench summaries are not records
    sub = runs / "2026-11-29" / "quick"
    sub.mkdir(parents=True)
    _derive(
        seed0, "mlp-fixture-subfolder", sub, tag="fixture:subfolder", config={**seed0["config"], "seed": 9}
    )
    (runs / "bench" / "b1").mkdir(parents=True)
    skipped = {"model": "mlp", "setup": "cpu_2proc_pipeline", "strategy": "pipeline", "devices": 2,
               "skipped": "a pipeline of this model: the script refuses it"}  # fmt: skip
    failed = {"model": "mlp", "setup": "cpu_2proc_fsdp", "strategy": "fsdp", "devices": 2, "finished": 0,
              "statuses": ["failed"]}  # fmt: skip
    summary = {"batch": "fixture", "profile": "quick", "cells": [skipped, failed]}
    (runs / "bench" / "b1" / "summary.json").write_text(json.dumps(summary))
    (runs / "bench" / "b2").mkdir()
    (runs / "bench" / "b2" / "summary.json").write_text(json.dumps({"batch": "x", "cells": [1, 2]}))
    shutil.copy(STUDY / "MLP_10epochs_1GPU.json", runs)  # a study file in the runs folder is read as one
    shutil.copytree(STUDY, ref)
    broken = json.loads((STUDY / "CNN_20epochs_2GPU.json").read_text())
    next(iter(broken.values()))["train_losses"].pop()
    (ref / "Broken_2GPU.json").write_text(json.dumps(broken))
    _BUILT.update(runs=runs, reference=ref, ids=ids)
    return _BUILT


@pytest.fixture(scope="session")
def fixture_dirs(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("dashboard"))


def render(dirs: dict, monkeypatch, query: dict | None = None, runs: Path | None = None, **env) -> AppTest:
    monkeypatch.setenv("RUNS_DIR", str(runs or dirs["runs"]))
    monkeypatch.setenv("REFERENCE_DIR", str(dirs["reference"]))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    at = AppTest.from_file(str(REPO / "dashboard.py"), default_timeout=60)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture(scope="module")
def views(fixture_dirs):
    """views(name): the page with that tab open (tabs are built only when opened), rendered once each."""
    built = {}

    def get(name: str = "Speedup") -> AppTest:
        if name not in built:
            with pytest.MonkeyPatch.context() as mp:
                built[name] = render(fixture_dirs, mp, query={"view": name})
        return built[name]

    return get


@pytest.fixture(scope="module")
def page(views):
    return views("Speedup")


def decode(obj):
    """Plotly sends numpy arrays as typed arrays ({"dtype", "bdata"}): turn them back into lists."""
    if isinstance(obj, dict):
        if set(obj) >= {"dtype", "bdata"}:
            return np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"]).tolist()
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def figure(at: AppTest, title: str) -> dict:
    specs = [decode(json.loads(c.proto.spec)) for c in at.get("plotly_chart")]
    found = [s for s in specs if s["layout"]["title"]["text"].startswith(title)]
    assert found, f"no figure titled {title!r} in {[s['layout']['title']['text'] for s in specs]}"
    return found[0]


def table(at: AppTest, column: str):
    found = [d.value for d in at.dataframe if column in d.value.columns]
    assert found, f"no table with column {column!r}"
    return found[0]


def records(dirs: dict) -> dict[str, dict]:
    out = {}
    for p in dirs["runs"].rglob("*.json"):
        if "bench" in p.relative_to(dirs["runs"]).parts or not p.is_file():  # not the pipe, not /dev/zero
            continue
        try:
            rec = json.loads(p.read_text())
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and rec.get("schema_version") == 1 and isinstance(rec.get("setup"), dict):
            out[rec["run_id"]] = rec
    return out


def median_train_s(rec: dict) -> float:
    return statistics.median(h["time/train_s"] for h in rec["history"])


def widget(at: AppTest, kind: str, key: str):
    return next(w for w in at.get(kind) if w.key == key)


# ----------------------------------------------------------------------------- the default page


@pytest.mark.slow
def test_page_loads_and_lists_every_broken_file_with_its_reason(page):
    assert page.title[0].value.startswith("distbench")
    notice = page.warning[0].value
    for name, reason in BROKEN.items():
        line = next((x for x in notice.splitlines() if name in x), None)
        assert line and reason in line, (name, notice)
    assert "MLP_10epochs_1GPU" not in notice  # a study file in the runs folder is read, not rejected
    assert len(notice.splitlines()) == 1 + len(BROKEN)


@pytest.mark.slow
def test_overview_table_per_model(views, fixture_dirs):
    t = table(views("Overview"), "best epoch s")
    recs = records(fixture_dirs)
    ours = t[t["source"] != "published"].set_index(["model", "setup", "source"])
    assert ours.loc[("mlp", "cpu_1proc", "local"), "runs"] == 2
    best = min(median_train_s(recs[fixture_dirs["ids"][k]]) for k in ("seed0", "seed1"))
    assert ours.loc[("mlp", "cpu_1proc", "local"), "best epoch s"] == stats.sig(best)
    assert ours.loc[("mlp", "cpu_1proc", "local"), "speedup [95% CI]"] == "baseline (1 device)"
    ddp = ours.loc[("mlp", "cpu_2proc", "local")]
    assert ddp["_speedup"] > 0 and ddp["strategy"] == "DDP x2"  # the strategy by name, the setup beside it
    lo, hi = (float(x) for x in ddp["speedup [95% CI]"].split("[")[1].rstrip("]").split("-"))
    assert lo <= ddp["_speedup"] * 1.01 and ddp["_speedup"] <= hi * 1.01  # 3 significant figures
    assert ddp["efficiency"] == stats.sig(ddp["_speedup"] / 2)
    assert set(ddp["flags"].split(", ")) - {""} <= set(stats.FLAGS)
    assert ours.loc[("conv_autoencoder", "single x1 cpu", "local"), "metric"] == "test/loss"
    assert "None" not in t.astype(str).to_numpy().ravel()  # an empty cell reads "—"
    assert (
        ours.loc[("mlp", "single x1 cpu", "local"), "status"] == "1 crashed, 1 failed, 1 finished, 1 running"
    )
    assert ours.loc[("mlp", "single x1 cpu", "synthetic"), "status"] == "1 finished"
    study = t[t["source"] == "published"]
    assert (study["step ms [95% CI]"] == "—").all()  # the study recorded epochs, not steps
    assert list(t["model"]) == sorted(t["model"])  # per model; in it ours first, the study's last
    assert set(study["model"]) == {"mlp", "conv_autoencoder", "cnn", "vgg11", "nbow", "seq2seq"}
    assert set(study["hardware"]) == {"Colab T4", "Kaggle T4 x2"}


@pytest.mark.slow
def test_the_answer_per_model_comes_first_with_a_verdict(page, fixture_dirs):
    """Above the tabs: per model and hardware the best multi-device strategy by its name (DDP, not the setup
    file), its speedup [interval] and a verdict that follows from the interval; one launch per side says so."""
    t = table(page, "verdict")
    (row,) = t[t["model"] == "mlp"].to_dict("records")  # the only model with a multi-device run of ours
    assert row["best strategy"] == "DDP on 2"
    v, rest = row["speedup [interval]"].split(" [")
    lo, hi = (float(x) for x in rest.rstrip("]").split("-"))
    expect = stats.verdict([lo, hi])
    assert row["verdict"].startswith(expect) and row["interval"] == "within one launch"
    assert "single-launch" in row["doubtful because"]
    assert page.subheader[0].value == "The answer per model"
    (line,) = [m.value for m in page.markdown if m.value.startswith("- **mlp**")]  # one line per model
    assert f"**{row['verdict']}**" in line and "DDP on 2" in line and row["speedup [interval]"] in line


def steady_windows(rec: dict) -> list[float]:
    return rec["timing"]["steady"]["windows_step_s"]


@pytest.mark.slow
def test_step_time_bars_with_intervals(views, fixture_dirs):
    fig = figure(views("Step time"), "Steady-state step time by setup")
    recs = records(fixture_dirs)
    ddp = recs[fixture_dirs["ids"]["ddp"]]
    hw = ddp["setup"]["device_names"][0]
    bars = {(tr["name"], x): (y, tr) for tr in fig["data"] for x, y in zip(tr["x"], tr["y"], strict=True)}
    y, tr = bars[(hw, "cpu_2proc")]
    assert y == pytest.approx(stats.median(steady_windows(ddp)))
    assert tr["error_y"]["array"] and tr["error_y"]["arrayminus"]  # the 95% interval
    pooled = steady_windows(recs[fixture_dirs["ids"]["seed0"]]) + steady_windows(
        recs[fixture_dirs["ids"]["seed1"]]
    )
    assert bars[(hw, "cpu_1proc")][0] == pytest.approx(stats.median(pooled))  # seeds pooled
    assert not any(hw in ("Colab T4", "Kaggle T4 x2") for hw, _ in bars)  # the study's epochs are not steps


@pytest.mark.slow
def test_speedup_bars_with_intervals_and_break_even(page, fixture_dirs):
    recs = records(fixture_dirs)
    ids = fixture_dirs["ids"]
    ddp = recs[ids["ddp"]]
    base = [steady_windows(recs[ids["seed0"]]), steady_windows(recs[ids["seed1"]])]  # two launches
    expected, ci = stats.launches_ratio_ci(base, [steady_windows(ddp)])  # resampling launches, then windows
    fig = figure(page, "Speedup over 1 device by strategy")
    bars = {
        (tr["name"].split(" · ")[0], x): (y, tr)
        for tr in fig["data"]
        for x, y in zip(tr["x"], tr["y"], strict=True)
    }
    y, tr = bars[("ours", "DDP x2")]  # named by strategy, not by the setup file (cpu_2proc)
    assert tr["name"] == "ours · quick fixture"  # the bench profile and batch it was measured in
    assert ("ours", "one device x1") not in bars  # the baseline is the break-even line
    assert y == pytest.approx(expected)
    i = list(tr["x"]).index("DDP x2")
    assert tr["error_y"]["array"][i] == pytest.approx(ci[1] - expected)
    assert tr["error_y"]["arrayminus"][i] == pytest.approx(expected - ci[0])
    study = bars[("the study (published)", "mlp: DDP x2")]
    assert study[0] > 1 and study[1]["xaxis"] != tr["xaxis"]  # the study's in a panel of its own
    assert any(sh["y0"] == 1 and sh["y1"] == 1 for sh in fig["layout"]["shapes"])  # break-even
    assert any(tr["name"] == "break-even (1.0)" for tr in fig["data"])  # named in the legend, not on a bar


@pytest.mark.slow
def test_cells_not_measured_are_shown_as_such(page):
    """The bench summary's skipped, refused and failed cells: a table under the Speedup chart."""
    t = table(page, "why").set_index("setup")
    assert t.loc["cpu_2proc_pipeline", ""] == "refused" and "refuses" in t.loc["cpu_2proc_pipeline", "why"]
    assert t.loc["cpu_2proc_fsdp", ""] == "failed" and t.loc["cpu_2proc_fsdp", "strategy"] == "FSDP x2"


@pytest.mark.slow
def test_speedup_and_efficiency_against_the_ideal_line(views, fixture_dirs):
    page = views("Scaling")
    recs = records(fixture_dirs)
    ids = fixture_dirs["ids"]
    base = steady_windows(recs[ids["seed0"]]) + steady_windows(recs[ids["seed1"]])
    expected, _ = stats.ratio_ci(base, steady_windows(recs[ids["ddp"]]))
    for title, value in (("Speedup vs devices", expected), ("Scaling efficiency", expected / 2)):
        fig = figure(page, title)
        ideal = next(tr for tr in fig["data"] if tr["name"] == "ideal")
        assert ideal["x"] == [1, 2] and ideal["y"] == ([1, 2] if title.startswith("Speedup") else [1, 1])
        points = {
            (tr["name"], cd[0]): (x, y)
            for tr in fig["data"]
            if tr.get("customdata")
            for x, y, cd in zip(tr["x"], tr["y"], tr["customdata"], strict=True)
        }
        x, y = points[("DDP · mlp", "cpu_2proc")]
        assert y == pytest.approx(value) and abs(x - 2) < 0.5  # set apart from the other strategies at N=2
        assert not any("Kaggle" in cell for _, cell in points)  # the study's: in Speedup's own panel
        legend = [tr["name"] for tr in fig["data"] if tr.get("showlegend") is not False]
        assert {"DDP", "mlp", "ideal"} <= set(legend) and "DDP · mlp" not in legend  # colours, symbols apart


@pytest.mark.slow
def test_curves_faceted_per_model_raw_points_faint_and_diverged_values_not_drawn(views, fixture_dirs):
    fig = figure(views("Curves"), "train/loss vs epoch")  # models differ in what train/loss is: the key
    lines = {tr["hovertext"]: tr for tr in fig["data"] if tr["mode"] == "lines+markers"}
    raw = {tr["hovertext"]: tr for tr in fig["data"] if tr["mode"] == "markers"}
    seed0 = records(fixture_dirs)[fixture_dirs["ids"]["seed0"]]
    assert raw[seed0["run_id"]]["y"] == [h["train/loss"] for h in seed0["history"]]
    assert raw[seed0["run_id"]]["opacity"] < 0.5
    assert lines[seed0["run_id"]]["name"] == "cpu_1proc"  # one legend entry per setup, not per run
    legend = [tr["name"] for tr in fig["data"] if tr.get("showlegend") is not False]
    assert len(legend) == len(set(legend)) and "cpu_1proc" in legend
    assert raw["mlp-fixture-diverged"]["x"] == [1, 3]  # epoch 2 is "nan": not drawn
    assert "study-CNN_20epochs_2GPU" in lines and "study-Broken_2GPU" not in lines
    assert any(tr["name"].endswith("[SYNTHETIC]") for tr in lines.values())
    panels = [a["text"] for a in fig["layout"]["annotations"]]
    assert {"mlp", "conv_autoencoder", "cnn"} <= set(panels)  # one panel per model
    axes = {lines[seed0["run_id"]]["yaxis"], lines["study-CNN_20epochs_2GPU"]["yaxis"]}
    assert len(axes) == 2


@pytest.mark.slow
def test_throughput_and_peak_memory(views, fixture_dirs):
    recs = records(fixture_dirs)
    ddp = recs[fixture_dirs["ids"]["ddp"]]
    page = views("Throughput & memory")
    thr = figure(page, "Throughput")
    values = {cd[0]: x for tr in thr["data"] for x, cd in zip(tr["x"], tr["customdata"], strict=True)}
    assert values[ddp["run_id"]] == pytest.approx(
        statistics.median(h["throughput/samples_per_s"] for h in ddp["history"])
    )
    assert not any(k.startswith("study-") for k in values)  # the study recorded no throughput
    assert any(y.startswith("mlp · cpu_2proc · seed 0 · ") for tr in thr["data"] for y in tr["y"])  # not ids
    mem = figure(page, "Peak memory")
    one, every = (
        {
            cd[0]: x
            for tr in mem["data"]
            if tr["name"].endswith(kind)
            for x, cd in zip(tr["x"], tr["customdata"], strict=True)
        }
        for kind in ("(max over processes)", "all processes (sum)")
    )
    assert one[ddp["run_id"]] == pytest.approx(max(h["memory/peak_gib"] for h in ddp["history"]))
    assert every[ddp["run_id"]] == pytest.approx(max(h["memory/all_ranks_gib"] for h in ddp["history"]))
    assert every[ddp["run_id"]] > one[ddp["run_id"]]  # two processes hold more than one


@pytest.mark.slow
def test_baseline_deltas_and_ratios_for_every_metric(views, fixture_dirs):
    page = views("Compare runs")
    t = table(page, "vs baseline")
    base_id = widget(page, "selectbox", "baseline").value
    recs = records(fixture_dirs)
    # the default baseline: a finished 1-process run of ours, of the model with the most runs
    assert recs[base_id]["setup"]["num_processes"] == 1 and recs[base_id]["status"] == "finished"
    assert recs[base_id]["model"] == "mlp"
    ddp = recs[fixture_dirs["ids"]["ddp"]]
    rows = t[t["run"] == ddp["run_id"]].set_index("metric")
    assert {
        "time/train_s (median)",
        "speedup",
        "test/acc",
        "last epoch val/loss",
        "memory/peak_gib (max)",
    } <= set(rows.index)
    batch = recs[base_id]["setup"]["global_batch_size"]
    for r in set(t["run"]):  # like with like: the baseline's model, hardware, global batch and data only
        assert recs[r]["model"] == "mlp" and recs[r]["setup"]["global_batch_size"] == batch
        assert recs[r]["data"]["used"] == recs[base_id]["data"]["used"]
    notes = " ".join(c.value for c in page.caption)
    assert "Not compared" in notes and "synthetic True vs False" in notes  # ... and why the others are not
    acc = rows.loc["test/acc"]
    assert acc["value"] == ddp["test"]["test/acc"] and acc["baseline"] == recs[base_id]["test"]["test/acc"]
    assert acc["delta"] == pytest.approx(acc["value"] - acc["baseline"])
    assert acc["ratio"] == pytest.approx(acc["value"] / acc["baseline"])
    t_row = rows.loc["time/train_s (median)"]
    close = abs(t_row["delta"]) <= 0.01 * t_row["baseline"]
    assert t_row["vs baseline"] == (
        "same (within 1%)" if close else "better" if t_row["delta"] < 0 else "worse"
    )


@pytest.mark.slow
def test_seed_bands_mean_and_std(views, fixture_dirs):
    fig = figure(views("Seeds"), "Mean ± std across seeds")
    name = next(tr["name"] for tr in fig["data"] if "cpu_1proc" in tr["name"] and tr.get("mode"))
    assert name.endswith("(2 runs, 2 seeds)")
    mean = next(tr for tr in fig["data"] if tr["name"] == name)
    band = next(tr for tr in fig["data"] if tr["name"] == f"{name} ± std")
    recs = records(fixture_dirs)
    losses = [[h["train/loss"] for h in recs[fixture_dirs["ids"][k]]["history"]] for k in ("seed0", "seed1")]
    assert mean["y"] == pytest.approx([statistics.mean(v) for v in zip(*losses, strict=True)])
    upper = band["y"][: len(mean["y"])]
    assert upper == pytest.approx(
        [statistics.mean(v) + statistics.stdev(v) for v in zip(*losses, strict=True)]
    )
    assert band["fill"] == "toself"


@pytest.mark.slow
def test_crashed_live_and_synthetic_badges(page):
    raw = table(page, "heartbeat_age_s").set_index("run_id")
    assert raw.loc["mlp-fixture-stale", "status"] == "crashed"
    assert raw.loc["mlp-fixture-live", "status"] == "running"
    badges = " ".join(m.value for m in page.markdown)
    assert "live: 1 run(s) running" in badges and "SYNTHETIC" in badges and "published results" in badges
    assert any(c.value.startswith("Refreshing every") for c in page.caption)
    assert raw["synthetic"].sum() == 1
    metrics = {m.label: m.value for m in page.metric}
    assert metrics["running"] == "1" and metrics["crashed / failed"] == "2"  # stale + diverged


@pytest.mark.slow
def test_raw_table_and_downloads(page, views, fixture_dirs):
    raw = table(page, "heartbeat_age_s")
    assert len(raw) == len(records(fixture_dirs)) + 14  # the subfolder's record too; 13 study files, 14 runs
    views_built = ("Speedup", "Step time", "Scaling", "Curves", "Throughput & memory", "Seeds")
    keys = {b.key for v in views_built for b in views(v).get("download_button")}
    assert {b.key for b in page.get("download_button")} == {"dl_speedup_bars", "dl_csv"}  # only the open tab
    assert keys == {
        "dl_speedup_bars",
        "dl_csv",
        "dl_epoch_time",
        "dl_speedup",
        "dl_efficiency",
        "dl_curves",
        "dl_throughput",
        "dl_memory",
        "dl_seeds",
    }


# ----------------------------------------------------------------------------- interaction


@pytest.mark.slow
def test_filter_change_updates_charts_and_the_url(fixture_dirs, monkeypatch):
    at = render(fixture_dirs, monkeypatch, query={"view": "Curves"})
    before = {tr["hovertext"] for tr in figure(at, "train/loss vs epoch")["data"]}
    widget(at, "multiselect", "model").set_value(["conv_autoencoder"]).run()
    assert not at.exception
    after = {
        tr["hovertext"]
        for tr in figure(at, "train loss (per-pixel MSE) vs epoch")["data"]
        if tr["mode"] == "lines+markers"
    }
    assert (
        after
        == {
            fixture_dirs["ids"]["ae"],
            "study-ConvAutoencoder_10epochs_1GPU",
            "study-ConvAutoencoder_10epochs_2GPU",
        }
        and after < before
    )
    assert at.query_params["model"] == "conv_autoencoder"
    widget(at, "multiselect", "model").set_value([]).run()
    widget(at, "multiselect", "status").set_value(["crashed"]).run()
    raw = table(at, "heartbeat_age_s")
    assert set(raw["run_id"]) == {"mlp-fixture-stale"} and "model" not in at.query_params
    widget(at, "number_input", "stale_s").set_value(1e7).run()  # a long enough timeout: no longer crashed
    raw = table(at, "heartbeat_age_s").set_index("run_id")
    assert (
        raw.loc["mlp-fixture-stale", "status"] == "running"
        and widget(at, "multiselect", "status").value == []
    )


@pytest.mark.slow
def test_filters_and_view_settings_from_a_shared_link(fixture_dirs, monkeypatch):
    at = render(
        fixture_dirs,
        monkeypatch,
        query={
            "model": "mlp",
            "source": "synthetic",
            "metric": "val/acc",
            "x": "samples seen",
            "ema": "0",
            "view": "Curves",
        },  # fmt: skip
    )
    assert widget(at, "multiselect", "model").value == ["mlp"]
    fig = figure(at, "validation accuracy vs samples seen")
    syn = records(fixture_dirs)[fixture_dirs["ids"]["synthetic"]]
    line = next(tr for tr in fig["data"] if tr["mode"] == "lines+markers")
    assert line["hovertext"] == syn["run_id"] and line["name"].endswith("[SYNTHETIC]")
    assert line["x"] == [h["samples_seen"] for h in syn["history"]]
    assert line["y"] == [h["val/acc"] for h in syn["history"]]  # EMA 0 = raw


@pytest.mark.slow
def test_curve_axes_and_smoothing(fixture_dirs, monkeypatch):
    at = render(fixture_dirs, monkeypatch, query={"model": "mlp", "view": "Step time"})
    widget(at, "toggle", "log_time").set_value(True).run()
    assert figure(at, "Steady-state step time")["layout"]["yaxis"]["type"] == "log"
    at = render(fixture_dirs, monkeypatch, query={"model": "mlp", "view": "Curves"})
    widget(at, "selectbox", "x").select("samples seen").run()
    names = {tr["hovertext"] for tr in figure(at, "train loss")["data"]}
    assert not any(n.startswith("study-") for n in names)  # the study logged no samples count
    assert any("study-MLP" in c.value for c in at.caption)  # ... and the page says which runs are missing
    widget(at, "selectbox", "x").select("wall-clock seconds").run()
    widget(at, "select_slider", "ema").set_value("0.9").run()
    fig = figure(at, "train loss (cross-entropy) vs wall-clock seconds (EMA 0.9)")
    seed1 = records(fixture_dirs)[fixture_dirs["ids"]["seed1"]]
    line = next(
        tr for tr in fig["data"] if tr["hovertext"] == seed1["run_id"] and tr["mode"] == "lines+markers"
    )
    assert line["x"] == [h["time/elapsed_s"] for h in seed1["history"]]
    assert line["y"] == pytest.approx(curves.ema([h["train/loss"] for h in seed1["history"]], 0.9))
    assert at.query_params["ema"] == "0.9" and at.query_params["x"] == "wall-clock seconds"


@pytest.mark.slow
def test_choose_baseline_and_diff_configs(fixture_dirs, monkeypatch):
    ids = fixture_dirs["ids"]
    at = render(fixture_dirs, monkeypatch, query={"model": "mlp", "view": "Compare runs"})
    widget(at, "selectbox", "baseline").select(ids["ddp"]).run()
    t = table(at, "vs baseline")
    row = t[(t["run"] == ids["seed0"]) & (t["metric"] == "speedup")].iloc[0]
    assert row["baseline"] > 0 and row["ratio"] == pytest.approx(row["value"] / row["baseline"])
    assert at.query_params["baseline"] == ids["ddp"]
    widget(at, "multiselect", "diff_runs").set_value([ids["seed0"], ids["seed1"]]).run()
    diff = next(d.value for d in at.dataframe if "config.tag" in d.value.index)
    assert list(diff.columns) == [f"mlp · cpu_1proc · seed {k} · {ids[f'seed{k}'][-6:]}" for k in (0, 1)]
    assert set(diff.index) == {"config.seed", "config.tag"}
    assert list(diff.loc["config.seed"]) == ["0", "1"]
    widget(at, "multiselect", "diff_runs").set_value([ids["seed0"], ids["ddp"]]).run()
    diff = next(d.value for d in at.dataframe if "setup.strategy" in d.value.index)
    assert {"setup.strategy", "setup.num_processes", "setup.per_device_batch_size"} <= set(diff.index)
    assert "config.lr" not in diff.index


@pytest.mark.slow
def test_no_runs_is_a_friendly_stop(fixture_dirs, monkeypatch, tmp_path):
    at = render(fixture_dirs, monkeypatch, runs=tmp_path, REFERENCE_DIR="")
    assert "No run records" in at.info[0].value and not at.get("plotly_chart")
    at = render({**fixture_dirs, "reference": STUDY}, monkeypatch, runs=tmp_path)
    assert "only the study's published results" in at.info[0].value
    assert len(table(at, "heartbeat_age_s")) == 14 and not at.warning


# ----------------------------------------------------------------------------- helpers of the views


def test_numbers_ema_and_setup_names():
    assert (
        frames.number("nan") != frames.number("nan")
        and frames.number("inf") == float("inf")
        and frames.number("x") is None
    )
    assert frames.number(True) is None and frames.number(3) == 3.0
    assert curves.ema([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull towards 0
    smoothed = curves.ema([0.0, float("nan"), 10.0], 0.5)
    assert smoothed[1] != smoothed[1] and 0 < smoothed[2] < 10
    rec = {
        "tag": "bench:b:quick:mlp:cpu_2proc:seed3",
        "config": {},
        "setup": {"strategy": "ddp", "num_processes": 2, "devices": ["cpu:0", "cpu:0"]},
    }
    assert frames.setup_name(rec) == "cpu_2proc" and frames.seed_of(rec) == 3
    assert frames.setup_name({**rec, "tag": None}) == "ddp x2 cpu"
    split = {"setup": {"strategy": "model_split", "num_processes": 1, "devices": ["cuda:0", "cuda:1"]}}
    assert frames.workers(split) == 2
    split = {
        "setup": {"strategy": "model_split", "num_processes": 1, "devices": ["cpu"], "mesh_shape": {"mp": 2}}
    }
    assert frames.workers(split) == 1  # one CPU process holding both stages is one device
    assert frames.setup_name(split) == "model_split x1 cpu"
    hybrid = {
        "setup": {
            "strategy": "hybrid",
            "num_processes": 4,
            "devices": ["cpu"] * 4,
            "mesh_shape": {"dp": 2, "pp": 2},
        }
    }
    assert frames.workers(hybrid) == 4


def test_stale_heartbeat_is_crashed():
    now = dt.datetime.now(dt.timezone.utc)
    rec = {"status": "running", "updated_at": (now - dt.timedelta(seconds=700)).isoformat()}
    assert frames.effective_status(rec, now, 600) == "crashed"
    assert frames.effective_status(rec, now, 800) == "running"
    assert frames.effective_status({**rec, "status": "finished"}, now, 1) == "finished"


@pytest.mark.slow
def test_the_page_imports_no_torch():
    """STYLE.md: the dashboard starts in a second on a laptop without a GPU stack."""
    code = (
        "import sys, board.load, board.frames, board.tables, board.figures, board.curves, board.reference; "
        "print(sorted(m for m in ('torch', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
    tree = ast.parse((REPO / "dashboard.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert not {m for m in imported if m and m.split(".")[0] in ("torch", "accelerate")}


def test_projection_records_are_found_in_subfolders_and_bad_shapes_are_one_line_each(tmp_path):
    """A runs folder like docs/results: projection records one or two folders down are found; every file of
    the wrong shape (a list, predictions that are not records, no hardware, bad encoding, not JSON) is one
    (file, reason) line, never an exception."""
    from board import projection

    good = next((REPO / "docs/results/2026-12-07/projection").glob("projection-*.json"))
    (tmp_path / "2026-12-07" / "p").mkdir(parents=True)
    (tmp_path / "2026-12-07" / "p" / good.name).write_bytes(good.read_bytes())
    bad = {
        "projection-list.json": b"[1, 2]",
        "projection-ints.json": json.dumps({"kind": "distbench-projection", "predictions": [1, 2]}).encode(),
        "projection-nohw.json": json.dumps(
            {"kind": "distbench-projection", "predictions": [{"model": "m"}]}
        ).encode(),
        "projection-latin1.json": '{"kind": "caf\xe9"}'.encode("latin-1"),
        "projection-text.json": b"not json",
    }
    for name, data in bad.items():
        (tmp_path / "2026-12-07" / name).write_bytes(data)
    recs, problems = projection.load_projections(tmp_path)
    assert [r["file"] for r in recs] == [f"2026-12-07/p/{good.name}"]
    assert sorted(n for n, _ in problems) == sorted(f"2026-12-07/{n}" for n in bad)
    assert all(reason and "\n" not in reason for _, reason in problems)


def test_chance_level_and_near_chance():
    """Accuracy within a tenth of the way from guessing to perfect is flagged: the script's declared chance,
    else 1 / classes of a per-class accuracy (records before the declaration)."""
    rec = {"metrics": {"test/acc": {"goal": "max", "chance": 0.5}}, "test": {}}
    assert frames.chance_level(rec, "test/acc") == 0.5
    old = {
        "metrics": {"test/acc": {"goal": "max"}},
        "test": {"test/acc_per_class": {str(k): 0 for k in range(10)}},
    }
    assert frames.chance_level(old, "test/acc") == pytest.approx(0.1)
    assert frames.chance_level(old, "val/acc (epoch 3)") == pytest.approx(0.1)
    assert frames.chance_level({"metrics": {}, "test": {}}, "test/loss") is None
    assert frames.near_chance(0.09, 0.1, "max") and frames.near_chance(0.18, 0.1, "max")
    assert not frames.near_chance(0.28, 0.1, "max") and not frames.near_chance(0.7, 0.5, "max")
    assert not frames.near_chance(0.01, None, "max") and not frames.near_chance(0.01, 0.1, "min")


def test_newest_batch_per_model_hardware_and_profile():
    import pandas as pd

    df = pd.DataFrame(
        {
            "kind": ["ours"] * 5 + ["study"],
            "model": ["mlp", "mlp", "mlp", "cnn", "mlp", "mlp"],
            "hardware": ["cpu"] * 6,
            "profile": ["quick", "quick", "full", "quick", "adhoc", "study"],
            "bench_batch": ["20261201", "20261207", "20261101", None and "x" or "20261101", None, None],
        }
    )
    kept = frames.newest_batches(df)
    assert list(kept.index) == [1, 2, 3, 4, 5]  # the older quick mlp batch goes; ad-hoc and study stay


def test_bench_summaries_give_skipped_refused_and_failed_cells(tmp_path):
    from board.load import folder_signature, unmeasured_cells

    b = tmp_path / "bench" / "20261207-000000"
    b.mkdir(parents=True)
    cells = [
        {"model": "mlp", "setup": "gpu_2_ddp", "strategy": "ddp", "devices": 2, "skipped": "needs 2 CUDA devices"},
        {"model": "nbow", "setup": "cpu_2proc_pipeline", "strategy": "pipeline", "devices": 2,
         "skipped": "a pipeline does not fit this model; the script refuses it"},
        {"model": "mlp", "setup": "cpu_2proc", "strategy": "ddp", "devices": 2, "finished": 0, "statuses": ["crashed"]},
        {"model": "mlp", "setup": "cpu_1proc", "strategy": "single", "devices": 1, "finished": 2},
    ]  # fmt: skip
    (b / "summary.json").write_text(json.dumps({"batch": b.name, "profile": "quick", "cells": cells}))
    for name, text in {
        "x1": "[1, 2",
        "x2": '{"cells": 3}',
        "x3": '{"cells": [{"setup": 1, "skipped": "x"}]}',
        "x4": "[]",
    }.items():
        (tmp_path / "bench" / name).mkdir()
        (tmp_path / "bench" / name / "summary.json").write_text(text)
    got, bad = unmeasured_cells(tmp_path)
    assert [(c["model"], c["what"]) for c in got] == [
        ("mlp", "skipped"),
        ("nbow", "refused"),
        ("mlp", "failed"),
    ]
    assert "crashed" in got[2]["reason"] and got[0]["bench_batch"] == b.name
    assert sorted(n for n, _ in bad) == [f"bench/x{k}/summary.json" for k in (1, 2, 3, 4)]
    assert all(r.startswith("not a bench summary") for _, r in bad)
    assert any(p.endswith("summary.json") for p, _, _ in folder_signature(tmp_path))  # a new summary reloads


def test_a_legend_past_eight_entries_goes_and_never_overlaps_the_title():
    import plotly.graph_objects as go

    few = figures.top_legend(go.Figure([go.Bar(x=[1], y=[1], name=f"s{k}") for k in range(3)]), 400)
    lay = few.layout
    assert lay.showlegend and lay.legend.yref == "container" and lay.title.yref == "container"
    assert lay.legend.y < lay.title.y and lay.margin.t >= 50  # under the title, above the plot
    many = figures.top_legend(go.Figure([go.Bar(x=[1], y=[1], name=f"s{k}") for k in range(12)]), 400)
    assert many.layout.showlegend is False

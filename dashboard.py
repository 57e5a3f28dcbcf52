"""Training-run dashboard (placeholder until the dashboard issue): lists the run records in $RUNS_DIR.

    make dashboard            # serves http://127.0.0.1:8501
    RUNS_DIR=/path/to/runs make dashboard
"""

import os

import pandas as pd
import streamlit as st

from shared.record import load_runs

st.set_page_config(page_title="distbench runs", layout="wide")
st.title("Training runs")
runs_dir = os.environ.get("RUNS_DIR", "runs")
runs, problems = load_runs(runs_dir)
for name, reason in problems:
    st.warning(f"{name}: {reason}")
if not runs:
    st.info(f"No run records in {runs_dir!r} yet. Run `make bench-all` or a script, then reload.")
    st.stop()
rows = []
for r in runs:
    key = r.get("primary_metric", "")
    rows.append({
        "run": r["run_id"], "model": r["model"], "strategy": r["setup"]["strategy"],
        "processes": r["setup"]["num_processes"], "device": r["setup"]["device_names"][0] if r["setup"].get("device_names") else "",
        "data": r["data"]["source"] + (" (SYNTHETIC)" if r["data"]["synthetic"] else ""), "status": r["status"],
        "epochs": len(r["history"]), "median epoch s": pd.Series([h["time/train_s"] for h in r["history"]]).median(),
        key: r["test"].get(key),
    })
st.dataframe(pd.DataFrame(rows), width="stretch")

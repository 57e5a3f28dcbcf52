"""Missing data is found before anything launches: `make bench-all` with an empty DATA_DIR on a machine
without the hub ends in seconds with one line per missing dataset, not one failed launch per cell."""

import subprocess
import time

from shared.datasets import DATASETS, MODEL_DATA, missing_files
from tests.conftest import DATA_DIR, REPO, child_env, explain


def test_bench_all_with_no_data_offline_stops_in_seconds_with_one_line_per_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["make", "-s", "bench-all", f"DATA_DIR={tmp_path / 'empty'}", f"RUNS_DIR={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=REPO, env=child_env(HF_HUB_OFFLINE="1"), timeout=120,
    )  # fmt: skip
    took = time.perf_counter() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("bench: ")]
    assert proc.returncode != 0 and took < 60, explain(proc)
    assert sorted(ln.split(":")[1].strip() for ln in lines) == sorted(DATASETS), explain(proc)
    assert all("HF_HUB_OFFLINE is set" in ln for ln in lines)
    assert not list((tmp_path / "runs").glob("bench/*")), "an empty batch was left behind"


def test_the_registry_matches_the_real_copies():
    """Every model's dataset is known, and the files the loaders read are those of ../shared/data."""
    assert set(MODEL_DATA.values()) == set(DATASETS)
    if (DATA_DIR / "mnist").is_dir():
        assert all(missing_files(DATA_DIR, name) == [] for name in DATASETS)

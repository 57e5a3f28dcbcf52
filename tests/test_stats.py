"""The interval maths and the flags on known samples (shared/stats.py)."""

import random

import pytest

from shared import stats


def test_quantile_matches_numpy_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert stats.median(xs) == 3.0
    assert stats.quantile(xs, 0.25) == 2.0
    assert stats.quantile([1.0, 2.0], 0.5) == 1.5
    assert stats.quantile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)
    with pytest.raises(ValueError):
        stats.quantile([], 0.5)


def test_windows_are_means_of_contiguous_blocks():
    assert stats.windows([1.0] * 30) == [1.0] * 10
    assert stats.windows([1, 1, 1, 3, 3, 3], most=2, least_per_window=3) == [1.0, 3.0]
    assert len(stats.windows(list(range(100)))) == 10
    assert len(stats.windows(list(range(7)))) == 2  # at least 3 steps per window
    assert stats.windows([2.0]) == [2.0]


def test_constant_samples_give_a_point_interval():
    m, ci = stats.median_ci([0.5] * 10)
    assert m == 0.5 and ci == [0.5, 0.5]
    r, ci = stats.ratio_ci([2.0] * 10, [1.0] * 10)
    assert r == 2.0 and ci == [2.0, 2.0]


def test_median_interval_covers_the_true_median_about_95_percent():
    """Coverage on known samples: normal(10, 1), n = 15, true median 10."""
    rng = random.Random(1)
    hits = 0
    for trial in range(200):
        xs = [rng.gauss(10, 1) for _ in range(15)]
        _, (lo, hi) = stats.median_ci(xs, n_boot=400, seed=trial)
        hits += lo <= 10 <= hi
    assert 0.88 <= hits / 200 <= 0.995


def test_ratio_interval_contains_the_true_ratio_and_is_deterministic():
    rng = random.Random(2)
    base = [rng.gauss(2.0, 0.05) for _ in range(10)]
    fast = [rng.gauss(1.0, 0.025) for _ in range(10)]
    r, ci = stats.ratio_ci(base, fast)
    assert ci[0] < 2.0 < ci[1] and ci[0] <= r <= ci[1]
    assert stats.ratio_ci(base, fast) == (r, ci)  # seeded


def test_pairing_cancels_shared_batch_costs():
    """Both runs see the same batches; batch k costs the same factor on both sides. Unpaired, that spread
    widens the interval; paired, the true ratio 2 is pinned."""
    cost = [1.0, 3.0, 0.5, 2.0, 1.5, 4.0, 0.8, 2.5, 1.2, 3.5]
    base = [2.0 * c for c in cost]
    fast = list(cost)
    _, loose = stats.ratio_ci(base, fast)
    r, tight = stats.ratio_ci(base, fast, paired=True)
    assert r == 2.0 and tight == [2.0, 2.0]
    assert loose[1] - loose[0] > 1.0


def test_flags():
    same = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.0]
    c = stats.comparison(same, [x / 1.9 for x in same], devices=2)
    assert (
        c["flags"] == ["single-launch"]
        and c["speedup"] == pytest.approx(1.9)
        and c["efficiency"] == pytest.approx(0.95)
    )
    assert c["speedup_ci95"][0] <= c["speedup"] <= c["speedup_ci95"][1]
    assert "superlinear" in stats.comparison(same, [x / 2.2 for x in same], devices=2)["flags"]
    # a one-process model split is one device: 1.2x over its baseline is superlinear
    assert "superlinear" in stats.comparison(same, [x / 1.2 for x in same], devices=1)["flags"]
    wild = [1.0, 2.0, 0.5, 1.5, 0.7, 1.9, 0.6, 1.2]
    assert "noisy" in stats.comparison(same, wild, devices=2)["flags"]
    assert "noisy" in stats.comparison([1.0], [0.5], devices=2)["flags"]  # one sample: no spread known
    flags = stats.comparison(same, same, 1, contended=True, warmup_dominated=True, oversubscribed=True)[
        "flags"
    ]
    assert flags == ["contended", "warmup-dominated", "oversubscribed", "single-launch"]
    assert set(flags) <= set(stats.FLAGS)
    two = stats.comparison([same, same], [[x / 1.9 for x in same]] * 2, devices=2)
    assert two["flags"] == [] and two["verdict"] == "pays off" and two["launches_compared"] == [2, 2]


def test_the_interval_covers_what_another_launch_reads():
    """Three launches of the baseline, one in another machine state (1.0, 1.0 and 1.45 s per step, each
    tight inside): pooling their windows as one launch gives an interval that excludes what the odd launch
    reads; the hierarchical bootstrap (launches, then windows) reaches it and flags the disagreement."""
    fast = [1.0 + 0.005 * (i % 3) for i in range(10)]
    slow = [1.45 + 0.005 * (i % 3) for i in range(10)]
    run = [[0.6 + 0.003 * (i % 3) for i in range(10)] for _ in range(3)]
    flat, flat_ci = stats.ratio_ci(fast + fast + slow, [w for ws in run for w in ws])
    hier, ci = stats.launches_ratio_ci([fast, fast, slow], run)
    assert hier == pytest.approx(flat)
    odd = stats.median(slow) / stats.median(run[0])
    assert flat_ci[1] < odd * 0.9 and ci[1] >= odd * 0.98  # only the hierarchical interval reaches it
    assert ci[0] <= flat <= ci[1]
    c = stats.comparison([fast, fast, slow], run, devices=2)
    assert "launches-disagree" in c["flags"] and "single-launch" not in c["flags"]
    assert c["launch_medians"][0] == pytest.approx([stats.median(fast)] * 2 + [stats.median(slow)])
    m, mci = stats.launches_median_ci([fast, fast, slow])
    assert mci[0] <= 1.01 and mci[1] >= 1.44
    # paired launches (same shapes): one set of indices for both sides
    p, pci = stats.launches_ratio_ci([fast, slow], [fast, slow], paired=True)
    assert p == pytest.approx(1.0) and pci == pytest.approx([1.0, 1.0])


def test_verdicts():
    assert stats.verdict([1.05, 1.3]) == "pays off"
    assert stats.verdict([0.6, 0.95]) == "does not pay off"
    assert stats.verdict([0.9, 1.1]) == "cannot tell"
    assert stats.verdict([1.0, 1.2]) == "cannot tell"  # touching 1: not above it


def test_summarize_steps_flags_short_runs_as_warmup_dominated():
    long = stats.summarize_steps([0.01] * 50, 64, warmup_s=0.05, warmup_steps=5)
    assert not long["warmup_dominated"] and long["samples_per_s"] == pytest.approx(6400)
    assert long["steps"] == 50 and len(long["windows_step_s"]) == 10
    assert not stats.summarize_steps([0.01] * 50, 64, 0.1, 5)["warmup_dominated"]
    assert stats.summarize_steps([0.01] * 5, 64, 0.01, 5)["warmup_dominated"]  # too few steady steps
    assert stats.summarize_steps([0.01] * 50, 64, 1.0, 5)["warmup_dominated"]  # warm-up > steady time
    assert stats.summarize_steps([], 64, 1.0, 5)["warmup_dominated"]


def test_sig_figures():
    assert stats.sig(1.1179926914999783) == "1.12"
    assert stats.sig(0.0031778) == "0.00318"
    assert stats.sig(19520.4) == "19,520"
    assert stats.sig(None) == "—" and stats.sig(float("nan")) == "—" and stats.sig(0) == "0"


def test_bench_coverage_counts_overlaps_differences_and_verdict_flips(tmp_path):
    """bench/coverage.py on three summaries: per cell the overlapping pairs and the largest difference, per
    model whether its verdict flips; oversubscribed cells and baselines are left out; bad input is one line."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    def cell(setup, sp, ci, verdict, flags=()):
        return {"model": "m", "setup": setup, "baseline": "one", "speedup": sp, "speedup_ci95": ci,
                "verdict": verdict, "flags": list(flags)}  # fmt: skip

    batches = {
        "20260101-000001": ([cell("ddp", 1.5, [1.3, 1.7], "pays off"), cell("one", 1.0, [1.0, 1.0], "cannot tell")],
                            {"m": {"verdict": "pays off", "strategy": "ddp", "speedup": 1.5}}),
        "20260101-000002": ([cell("ddp", 1.6, [1.5, 1.8], "pays off"), cell("hyb", 0.5, [0.4, 0.6], "does not pay off",
                                                                           ["oversubscribed"])],
                            {"m": {"verdict": "pays off", "strategy": "ddp", "speedup": 1.6}}),
        "20260101-000003": ([cell("ddp", 0.8, [0.7, 0.9], "does not pay off")],
                            {"m": {"verdict": "does not pay off", "strategy": "ddp", "speedup": 0.8}}),
    }  # fmt: skip
    for b, (cells, verdicts) in batches.items():
        (tmp_path / "bench" / b).mkdir(parents=True)
        (tmp_path / "bench" / b / "summary.json").write_text(
            json.dumps({"cells": cells, "verdicts": verdicts})
        )
    cmd = [
        sys.executable,
        str(REPO / "bench/coverage.py"),
        "--runs_dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
    ]
    out = subprocess.run([*cmd, "--batches", ",".join(batches)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rec = json.loads((tmp_path / "o" / "coverage.json").read_text())
    (row,) = rec["cells"]  # the baseline and the oversubscribed cell are not compared
    assert row["cell"] == "m/ddp" and row["pairs"] == 3 and row["overlap"] == 1 and row["verdict_agree"] == 1
    assert row["max_difference"] == pytest.approx(0.8 / 0.8)
    assert rec["verdict_flips"] == ["m"] and rec["pairs_overlapping"] == 1
    assert "| m/ddp |" in (tmp_path / "o" / "table.md").read_text()
    bad = subprocess.run(
        [*cmd, "--batches", "20260101-000001,nope"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
    one = subprocess.run([*cmd, "--k", "1"], capture_output=True, text=True, cwd=REPO)
    assert one.returncode == 1 and "at least 2" in one.stderr


def test_long_sample_lists_are_bootstrapped_in_chunks_with_the_same_interval():
    rng = random.Random(3)
    xs = [rng.gauss(10, 1) for _ in range(5000)]  # 2000 x 5000 draws: drawn 400 resamples at a time
    m, (lo, hi) = stats.median_ci(xs)
    assert lo < m < hi and hi - lo < 0.2  # the median of 5000 N(10, 1) draws: +-0.04 or so
    assert stats.median_ci(xs) == (m, [lo, hi])  # deterministic

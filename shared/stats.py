"""Statistics of noisy timings: medians with intervals, speedups with intervals, and the flags that say
when a comparison should not be trusted. numpy only (no torch or pandas), shared by the scripts' step timer,
the bench runner and the dashboard, so every figure is computed one way; the bootstraps draw all their
resamples at once (a folder of 800 records' intervals in under a second, not 12).

A speedup is a ratio of two medians of step times measured at the same global batch. Its 95% interval is a
hierarchical percentile bootstrap over the two levels a timing varies on: each side's launches are resampled
(what changes between launches: placement, allocator state, clock, neighbours), then the timed windows inside
each drawn launch (what changes within one), and the ratio of the pooled medians taken 2,000 times. A window
is a block of consecutive steps, so resampling windows rather than single steps keeps the slow drifts of a
shared machine inside the interval instead of averaging them away. With one launch per side only the second
level exists: the interval is then the noise inside that launch, flagged `single-launch`, not a 95% interval
of what a second launch would show.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP = 2000
# A comparison whose 95% interval is wider than ±15% of its value cannot tell a 15% effect from noise: the
# smallest difference between strategies a user would act on, and the agreement bar between runs.
NOISY_HALF_WIDTH = 0.15
# Efficiency above 1 means N devices did more than N times the work of one. Caches can do that for real, but
# almost always it is a slow baseline (warm-up, contention) or a different amount of work: flag it.
SUPERLINEAR_EFFICIENCY = 1.05
# Another job using more than this share of the machine's cores while a cell ran: its times are not the
# machine's. On an idle 2-core machine the background (this runner, the kernel) stays under 3%.
CONTENDED_SHARE = 0.10
# A run is warm-up-dominated when it has too few steady steps to time (below 8 samples a bootstrap interval
# of the median says little), or when its warm-up took longer than all its steady steps together.
MIN_STEADY_STEPS = 8
# Launches of one cell whose median steps differ by more than this (this machine's launches spread about
# +-10%): the runner launches the cell again (bench/batch.py) and the cell is flagged.
LAUNCH_SPREAD = 0.15
WINDOW_S = 0.25  # steps at least this long are timed one per window
FLAGS = {
    "noisy": f"95% interval wider than ±{NOISY_HALF_WIDTH:.0%} of the value",
    "contended": f"other load above {CONTENDED_SHARE:.0%} of the cores during the run",
    "superlinear": f"efficiency above {SUPERLINEAR_EFFICIENCY}: almost always a measurement problem "
    "(slow baseline, warm-up, contention), rarely real",
    "warmup-dominated": f"fewer than {MIN_STEADY_STEPS} steady steps, or the warm-up took longer than them",
    "oversubscribed": "more processes than CPU cores: processes share cores, so this is not N devices",
    "single-launch": "one launch per side: the interval is the noise inside that launch, not a 95% interval "
    "of what another launch would read",
    "launches-disagree": f"this cell's or its baseline's launches differ by more than {LAUNCH_SPREAD:.0%} in "
    "median step (a machine state that changes between launches); the interval spans them",
}
VERDICTS = ("pays off", "does not pay off", "cannot tell")


def quantile(values, q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values) -> float:
    return quantile(values, 0.5)


def windows(values: list[float], most: int = 10, least_per_window: int = 3) -> list[float]:
    """Means of up to `most` contiguous, near-equal blocks of `values` (each at least `least_per_window`
    long; fewer values give fewer blocks, one value or none gives the values themselves)."""
    n = len(values)
    k = max(1, min(most, n // least_per_window))
    if n < 2:
        return list(values)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _table(launches: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Launches as a (launches x most windows) array padded with NaN, and each launch's window count."""
    n = np.array([len(ws) for ws in launches])
    table = np.full((len(launches), n.max()), np.nan)
    for i, ws in enumerate(launches):
        table[i, : len(ws)] = ws
    return table, n


def _draws(n: np.ndarray, rng: np.random.Generator, n_boot: int):
    """n_boot hierarchical resamples' indices at once: launches with replacement, then as many windows with
    replacement within each drawn launch as it has (reused for a paired other side of the same shape)."""
    picked = rng.integers(0, len(n), size=(n_boot, len(n)))
    counts = n[picked]
    j = (rng.random((n_boot, len(n), n.max())) * counts[..., None]).astype(int)
    return picked, j, np.arange(n.max()) < counts[..., None]


def _medians(table: np.ndarray, draws) -> np.ndarray:
    """The median of each resample's pooled windows."""
    picked, j, valid = draws
    vals = np.sort(np.where(valid, table[picked[..., None], j], np.inf).reshape(len(picked), -1), axis=1)
    m = valid.reshape(len(picked), -1).sum(axis=1)[:, None]  # the padding (inf) sorts last
    return ((np.take_along_axis(vals, (m - 1) // 2, 1) + np.take_along_axis(vals, m // 2, 1)) / 2)[:, 0]


def _boot(sides: list[list[list[float]]], n_boot: int, seed: int, paired: bool = False) -> list[np.ndarray]:
    """Each side's n_boot resampled medians (paired: one set of indices for both sides, of the same shape),
    drawn in chunks of at most ~2M values, so long sample lists stay small in memory."""
    rng = np.random.default_rng(seed)
    tables = [_table(side) for side in sides]
    size = max(t.size for t, _ in tables)
    chunk = max(1, min(n_boot, 2_000_000 // size))
    out: list[list[np.ndarray]] = [[] for _ in sides]
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = None
        for k, (table, n) in enumerate(tables):
            draws = draws if paired and draws is not None else _draws(n, rng, b)
            out[k].append(_medians(table, draws))
    return [np.concatenate(o) for o in out]


def _interval(boots: np.ndarray, level: float) -> list[float]:
    a = (1 - level) / 2
    return [float(q) for q in np.quantile(boots, [a, 1 - a])]


def median_ci(samples: list[float], level: float = 0.95, n_boot: int = BOOTSTRAP, seed: int = 0):
    """(median, [low, high]): percentile-bootstrap interval of the median. One sample: the interval is
    the point itself (nothing is known about the spread; `noisy` cannot be judged from it)."""
    xs = [float(x) for x in samples]
    m = median(xs)
    if len(xs) < 2:
        return m, [m, m]
    return m, _interval(_boot([[xs]], n_boot, seed)[0], level)


def ratio_ci(
    numerator: list[float],
    denominator: list[float],
    level: float = 0.95,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
    paired: bool = False,
):
    """(median(numerator) / median(denominator), [low, high]).

    For a speedup pass the baseline's step times as the numerator and the compared run's as the denominator:
    at the same global batch, the ratio of step times is the ratio of throughputs. Unpaired, both sides are
    resampled independently. Paired (same length, sample k of both sides timed on the same batches: same
    seed, data and global batch, so the same steps in the same order), one set of indices is drawn for both:
    what the batches themselves cost (sentence lengths, say) then cancels instead of widening the interval."""
    num, den = [float(x) for x in numerator], [float(x) for x in denominator]
    point = median(num) / median(den)
    if len(num) < 2 and len(den) < 2:
        return point, [point, point]
    return point, _ratio_interval([num], [den], level, n_boot, seed, paired and len(num) == len(den))


def _ratio_interval(num, den, level, n_boot, seed, paired) -> list[float]:
    """The interval of median(num pooled) / median(den pooled), each side a list of launches."""
    b_num, b_den = _boot([num, den], n_boot, seed, paired)
    return _interval(b_num / b_den, level)


def _launches(launches) -> list[list[float]]:
    out = [[float(x) for x in ws] for ws in launches if len(ws)]
    if not out:
        raise ValueError("no timed windows in any launch")
    return out


def launch_medians(launches) -> list[float]:
    return [median(ws) for ws in _launches(launches)]


def spread(medians: list[float]) -> float:
    """max / min of some medians, less 1 (0 with one)."""
    return max(medians) / min(medians) - 1 if min(medians) > 0 else math.inf


def launch_spread(launches) -> float:
    """spread of the launches' median steps (0 with one launch)."""
    return spread(launch_medians(launches))


def launches_median_ci(launches, level: float = 0.95, n_boot: int = BOOTSTRAP, seed: int = 0):
    """(median of the pooled windows, [low, high]) by the hierarchical bootstrap (launches, then windows).
    One launch: the windows-only bootstrap of median_ci."""
    ls = _launches(launches)
    pooled = [w for ws in ls for w in ws]
    if len(ls) == 1:
        return median_ci(pooled, level, n_boot, seed)
    return median(pooled), _interval(_boot([ls], n_boot, seed)[0], level)


def launches_ratio_ci(
    numerator,
    denominator,
    level: float = 0.95,
    n_boot: int = BOOTSTRAP,
    seed: int = 0,
    paired: bool = False,
):
    """ratio_ci over launches: each side a list of launches, each launch its list of timed windows. The
    speedup is median(pooled baseline windows) / median(pooled windows); the interval resamples launches,
    then windows within each drawn launch, independently per side, or with one set of indices for both when
    paired (launch r and window k timed the same steps on both sides)."""
    num, den = _launches(numerator), _launches(denominator)
    if len(num) == 1 and len(den) == 1:
        return ratio_ci(num[0], den[0], level, n_boot, seed, paired)
    point = median([w for ws in num for w in ws]) / median([w for ws in den for w in ws])
    same_shape = [len(ws) for ws in num] == [len(ws) for ws in den]
    return point, _ratio_interval(num, den, level, n_boot, seed, paired and same_shape)


def verdict(ci) -> str:
    """`pays off` when the whole speedup interval is above 1, `does not pay off` when below, else
    `cannot tell`."""
    if ci[0] > 1:
        return VERDICTS[0]
    if ci[1] < 1:
        return VERDICTS[1]
    return VERDICTS[2]


def half_width(value: float, ci: list[float]) -> float:
    """The larger distance from the value to an end of its interval, relative to the value."""
    return max(value - ci[0], ci[1] - value) / value if value else math.inf


def summarize_steps(step_s: list[float], samples_per_step: float, warmup_s: float, warmup_steps: int) -> dict:
    """The headline of one run's steady state, as the record keeps it (`timing.steady`)."""
    n = len(step_s)
    # a window is 3 steps, or 1 where a step alone lasts WINDOW_S: a 2-s step is a timing on its own
    per = 1 if n and median(step_s) >= WINDOW_S else 3
    out = {
        "steps": n,
        "warmup_steps": warmup_steps,
        "warmup_s": warmup_s,
        "samples_per_step": samples_per_step,
        "windows_step_s": windows(step_s, least_per_window=per),
    }
    if n:
        m, ci = median_ci(out["windows_step_s"])
        out.update(
            step_s=m,  # median over windows, the figure the interval belongs to
            step_s_iqr=[quantile(step_s, 0.25), quantile(step_s, 0.75)],
            step_s_ci95=ci,  # of the median over windows
            samples_per_s=samples_per_step / m,
            samples_per_s_ci95=[samples_per_step / ci[1], samples_per_step / ci[0]],
            steady_s=sum(step_s),
        )
    out["warmup_dominated"] = n < MIN_STEADY_STEPS or warmup_s > out.get("steady_s", 0.0)
    return out


def comparison(
    base_windows,
    windows_,
    devices: int,
    *,
    contended: bool = False,
    warmup_dominated: bool = False,
    oversubscribed: bool = False,
    paired: bool = False,
) -> dict:
    """Speedup of a run over its baseline, efficiency, intervals, verdict and flags. Each side is either a
    list of step-time samples (one launch) or a list of launches, each its list of samples."""
    base_l = base_windows if base_windows and isinstance(base_windows[0], list) else [base_windows]
    runs_l = windows_ if windows_ and isinstance(windows_[0], list) else [windows_]
    speedup, ci = launches_ratio_ci(base_l, runs_l, paired=paired)
    n_base, n_runs = sum(map(len, base_l)), sum(map(len, runs_l))
    flags = []
    if n_base < 2 or n_runs < 2 or half_width(speedup, ci) > NOISY_HALF_WIDTH:
        flags.append("noisy")
    if contended:
        flags.append("contended")
    if speedup / devices > SUPERLINEAR_EFFICIENCY:
        flags.append("superlinear")
    if warmup_dominated:
        flags.append("warmup-dominated")
    if oversubscribed:
        flags.append("oversubscribed")
    if len(base_l) < 2 or len(runs_l) < 2:
        flags.append("single-launch")
    spreads = [launch_spread(x) for x in (base_l, runs_l) if len(x) > 1]
    if spreads and max(spreads) > LAUNCH_SPREAD:
        flags.append("launches-disagree")
    return {
        "speedup": speedup,
        "speedup_ci95": ci,
        "efficiency": speedup / devices,
        "efficiency_ci95": [ci[0] / devices, ci[1] / devices],
        "verdict": verdict(ci),
        "flags": flags,
        "launches_compared": [len(base_l), len(runs_l)],
        "launch_medians": [launch_medians(base_l), launch_medians(runs_l)],
        "paired": paired and [len(x) for x in base_l] == [len(x) for x in runs_l],
    }


def sig(x, digits: int = 3) -> str:
    """A number with `digits` significant figures, for tables and hovers (no 0.30749999 or 1.95e+04)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= digits - 1:
        return f"{round(x):,}" if mag < 6 else f"{x:.{digits - 1}e}"
    return f"{x:.{max(0, digits - 1 - mag)}f}"

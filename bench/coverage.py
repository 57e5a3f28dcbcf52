"""Do the bench's intervals cover what another run of it reads? `make bench-coverage K=3` runs the quick
profile K times back to back (or reads batches already run) and reports, per compared cell, how often the
speedup intervals of two batches overlap, how far apart their speedups are, and how often the verdicts agree;
per model, whether its verdict ever flips between `pays off` and `does not pay off`.

    python -m bench.coverage --k 3 --data_dir data --runs_dir runs --out runs/bench-coverage
    python -m bench.coverage --batches 20261207-071000,20261207-072300 --runs_dir runs --out /tmp/cov

Writes coverage.json (every figure, the batches' ids and timestamps) and table.md into --out, whole.
Honest 95% intervals of the same quantity fail to overlap far less than once in 20 pairs: a cell that does is
listed by name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import subprocess
import sys
from pathlib import Path

from bench.report import write_replace
from shared import stats

REPO = Path(__file__).resolve().parent.parent

FLIPS = {("pays off", "does not pay off"), ("does not pay off", "pays off")}


def load_batch(runs_dir: Path, batch: str) -> dict:
    path = runs_dir / "bench" / batch / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: batch {batch}: no readable summary at {path} ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("cells"), list):
        raise SystemExit(f"error: batch {batch}: {path} is not a bench summary (no cells)")
    return summary


def overlap(a: list[float], b: list[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def compare(summaries: list[dict]) -> dict:
    """Pairwise agreement of every compared cell and every model's verdict over the batches given."""
    cells: dict[str, list[dict | None]] = {}
    for i, s in enumerate(summaries):
        for c in s["cells"]:
            if (
                "speedup" in c
                and "oversubscribed" not in c.get("flags", [])
                and c.get("setup") != c.get("baseline")
            ):
                cells.setdefault(f"{c['model']}/{c['setup']}", [None] * len(summaries))[i] = c
    rows, diffs, pairs_all, overlaps_all = [], [], 0, 0
    for key, per in cells.items():
        present = [(i, c) for i, c in enumerate(per) if c is not None]
        pairs = list(itertools.combinations(present, 2))
        over = [overlap(a["speedup_ci95"], b["speedup_ci95"]) for (_, a), (_, b) in pairs]
        agree = [a.get("verdict") == b.get("verdict") for (_, a), (_, b) in pairs]
        rel = [abs(a["speedup"] - b["speedup"]) / min(a["speedup"], b["speedup"]) for (_, a), (_, b) in pairs]
        diffs += rel
        pairs_all += len(pairs)
        overlaps_all += sum(over)
        rows.append(
            {
                "cell": key,
                "speedups": [None if c is None else [c["speedup"], c["speedup_ci95"]] for c in per],
                "verdicts": [None if c is None else c.get("verdict") for c in per],
                "flags": sorted({f for c in per if c for f in c.get("flags", [])}),
                "pairs": len(pairs),
                "overlap": sum(over),
                "verdict_agree": sum(agree),
                "max_difference": max(rel, default=None),
            }
        )
    models = {}
    for i, s in enumerate(summaries):
        for model, v in (s.get("verdicts") or {}).items():
            models.setdefault(model, [None] * len(summaries))[i] = v
    model_rows = []
    for model, per in models.items():
        vs = [v.get("verdict") for v in per if v]
        flips = any((a, b) in FLIPS for a, b in itertools.combinations(vs, 2))
        model_rows.append({"model": model, "verdicts": per, "flips": flips})
    return {
        "cells": rows,
        "models": model_rows,
        "pairs": pairs_all,
        "pairs_overlapping": overlaps_all,
        "median_difference": stats.median(diffs) if diffs else None,
        "max_difference": max(diffs, default=None),
        "verdict_flips": [m["model"] for m in model_rows if m["flips"]],
    }


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def table(result: dict, batches: list[str]) -> str:
    head = " | ".join(f"batch {b}" for b in batches)
    lines = [
        f"| cell | {head} | intervals overlap | verdicts agree | largest difference | flags |",
        "|---|" + "---|" * len(batches) + "---|---|---|---|",
    ]
    for r in result["cells"]:
        shown = [
            "—" if s is None else f"{stats.sig(s[0])} [{stats.sig(s[1][0])}-{stats.sig(s[1][1])}] {v}"
            for s, v in zip(r["speedups"], r["verdicts"], strict=True)
        ]
        lines.append(
            f"| {r['cell']} | {' | '.join(shown)} | {r['overlap']}/{r['pairs']} | {r['verdict_agree']}/{r['pairs']} "
            f"| {pct(r['max_difference'])} | {', '.join(r['flags']) or '-'} |"
        )
    lines += [
        "",
        "| model | " + head + " | flips between pays off and does not? |",
        "|---|" + "---|" * len(batches) + "---|",
    ]
    for m in result["models"]:
        shown = [
            "—"
            if v is None
            else f"{v.get('verdict')}"
            + (f" ({v['strategy']} x{stats.sig(v['speedup'])})" if "speedup" in v else "")
            for v in m["verdicts"]
        ]
        lines.append(f"| {m['model']} | {' | '.join(shown)} | {'YES' if m['flips'] else 'no'} |")
    lines += [
        "",
        f"Cell pairs whose intervals overlap: {result['pairs_overlapping']} of {result['pairs']}; speedup difference "
        f"between batches: median {pct(result['median_difference'])}, largest {pct(result['max_difference'])}; "
        f"verdict flips: {', '.join(result['verdict_flips']) or 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def run_batches(k: int, args) -> list[str]:
    """K quick benches back to back; the new batch ids, in order."""
    bench_dir = Path(args.runs_dir) / "bench"
    out = []
    for i in range(k):
        before = set(p.name for p in bench_dir.iterdir()) if bench_dir.is_dir() else set()
        print(f"coverage: bench {i + 1} of {k} ...", flush=True)
        cmd = [sys.executable, "-m", "bench.run", "--matrix", args.matrix, "--profile", args.profile,
               "--data_dir", args.data_dir, "--runs_dir", args.runs_dir]  # fmt: skip
        rc = subprocess.run(cmd, cwd=REPO).returncode
        new = sorted(set(p.name for p in bench_dir.iterdir()) - before) if bench_dir.is_dir() else []
        if not new:
            raise SystemExit(f"error: bench {i + 1} of {k} wrote no batch (exit {rc})")
        if rc not in (0, 1):  # 1: a cell failed or missed a target; the others still count
            raise SystemExit(f"error: bench {i + 1} of {k} stopped (exit {rc}); batch {new[-1]}")
        out.append(new[-1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=3, help="quick benches to run back to back (at least 2)")
    ap.add_argument("--batches", default="", help="comma-separated batch ids already run: compare only")
    ap.add_argument("--matrix", default=str(REPO / "bench/matrix.yaml"))
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument(
        "--out", default="", help="folder for coverage.json and table.md (default runs/bench-coverage)"
    )
    args = ap.parse_args()
    given = [b for b in args.batches.split(",") if b]
    if not given and args.k < 2:
        raise SystemExit(f"error: --k {args.k}: coverage compares at least 2 benches")
    if given and len(given) < 2:
        raise SystemExit("error: --batches: give at least 2 batch ids")
    batches = given or run_batches(args.k, args)
    summaries = [load_batch(Path(args.runs_dir), b) for b in batches]
    result = compare(summaries)
    out = Path(args.out or Path(args.runs_dir) / "bench-coverage")
    out.mkdir(parents=True, exist_ok=True)
    md = table(result, batches)
    record = {
        "kind": "bench-coverage",
        "written_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "batches": [
            {"batch": b, "started_at": s.get("plan", {}).get("started_at"), "profile": s.get("profile")}
            for b, s in zip(batches, summaries, strict=True)
        ],  # fmt: skip
        "runs_dir": args.runs_dir,
        **result,
    }
    write_replace(out / "coverage.json", json.dumps(record, indent=1) + "\n")
    write_replace(out / "table.md", md)
    print(md)
    print(f"coverage: {out}/coverage.json, {out}/table.md")


if __name__ == "__main__":
    main()

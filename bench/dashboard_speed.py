"""How fast the dashboard answers: the page's script run cold (a new server process: empty caches) and a warm
rerun (the same session again: what a filter change or a live refresh costs), per runs folder.

    python -m bench.dashboard_speed docs/results/2026-12-07/quick-with-splits docs/results
    python -m bench.dashboard_speed docs/results --sizes 56,561   # the first N records of the folder too

Measured with Streamlit's AppTest, which runs dashboard.py exactly as the server does but draws nothing: a
browser adds its own rendering on top. Each folder is timed in a fresh process (cold caches), `--repeats`
times; the figures printed are the median and range: the cold run (the answer and the first tab's chart), a
warm rerun, and opening each other tab once the page is up (the slowest one is printed). Budget (issue 28):
first chart within 5 s for 561 runs, a warm rerun within 2 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ONE = """
import json, os, sys, time
from streamlit.testing.v1 import AppTest
os.environ["RUNS_DIR"] = sys.argv[1]
at = AppTest.from_file(sys.argv[2], default_timeout=600)
t0 = time.perf_counter(); at.run(); cold = time.perf_counter() - t0
charts = len(at.get("plotly_chart"))
t0 = time.perf_counter(); at.run(); warm = time.perf_counter() - t0
runs = at.metric[0].value if at.metric else None
errors = len(at.exception)
tabs = {}
for view in sys.argv[3].split(","):  # each other tab opened in the running server (its caches warm)
    other = AppTest.from_file(sys.argv[2], default_timeout=600)
    other.query_params["view"] = view
    t0 = time.perf_counter(); other.run(); tabs[view] = time.perf_counter() - t0
    errors += len(other.exception)
print(json.dumps({"cold_s": cold, "warm_s": warm, "runs": runs, "charts": charts, "tabs": tabs, "exceptions": errors}))
"""
VIEWS = "Overview,Step time,Scaling,Curves,Throughput & memory,Compare runs,Seeds,Projection"


def subset(folder: Path, n: int, into: Path) -> Path:
    """The first n run records below `folder` (sorted paths, bench summaries of their batches kept), copied."""
    from board.load import json_files, summary_files

    for path in json_files(folder)[:n] + summary_files(folder):
        dest = into / path.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return into


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="", help="also the first N records of each folder, e.g. 56,561")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dashboard-speed-"))
    folders = []
    for folder in args.folders:
        if not Path(folder).is_dir():
            sys.exit(f"error: {folder}: not a folder")
        try:
            sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        except ValueError:
            sys.exit(f"error: --sizes {args.sizes}: expected record counts, comma-separated (e.g. 56,561)")
        if any(n < 1 for n in sizes):
            sys.exit(f"error: --sizes {args.sizes}: every count must be 1 or more")
        for n in sizes:
            folders.append(str(subset(Path(folder), n, scratch / f"{Path(folder).name}-first-{n}")))
        folders.append(folder)
    for folder in folders:
        rows = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", ONE, folder, str(REPO / "dashboard.py"), VIEWS],
                                 capture_output=True, text=True, cwd=REPO)  # fmt: skip
            if out.returncode:
                sys.exit(f"error: {folder}: the page did not run ({out.stderr.strip().splitlines()[-1:]})")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cold, warm = [r["cold_s"] for r in rows], [r["warm_s"] for r in rows]
        slowest = [max(r["tabs"].items(), key=lambda kv: kv[1]) for r in rows]
        tab = [s for _, s in slowest]
        name = Path(folder).name if str(folder).startswith(str(scratch)) else folder
        print(
            f"{name}: {rows[0]['runs']} runs shown; first chart (cold run) {statistics.median(cold):.2f} s "
            f"[{min(cold):.2f}-{max(cold):.2f}], warm rerun {statistics.median(warm):.2f} s "
            f"[{min(warm):.2f}-{max(warm):.2f}], slowest other tab {statistics.median(tab):.2f} s "
            f"[{min(tab):.2f}-{max(tab):.2f}] ({slowest[0][0]}) (n = {len(rows)}; charts on the first screen "
            f"{rows[0]['charts']}; exceptions {max(r['exceptions'] for r in rows)})",
            flush=True,
        )
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""How fast the dashboard answers: the page's script run cold (a new server process: empty caches) and a warm
rerun (the same session again: what a filter change or a live refresh costs), per runs folder.

    python bench/dashboard_speed.py docs/results/2026-12-07/quick-with-splits docs/results

Measured with Streamlit's AppTest, which runs dashboard.py exactly as the server does but draws nothing: a
browser adds its own rendering on top. Each folder is timed in a fresh process (cold caches), `--repeats`
times; the figures printed are the median and range. Budget (issue 28): first answer within 5 s for 561 runs,
a warm rerun within 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

ONE = """
import json, os, sys, time
from streamlit.testing.v1 import AppTest
os.environ["RUNS_DIR"] = sys.argv[1]
at = AppTest.from_file(sys.argv[2], default_timeout=600)
t0 = time.perf_counter(); at.run(); cold = time.perf_counter() - t0
t0 = time.perf_counter(); at.run(); warm = time.perf_counter() - t0
runs = at.metric[0].value if at.metric else None
print(json.dumps({"cold_s": cold, "warm_s": warm, "runs": runs, "exceptions": len(at.exception)}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for folder in args.folders:
        if not Path(folder).is_dir():
            sys.exit(f"error: {folder}: not a folder")
        rows = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", ONE, folder, str(REPO / "dashboard.py")],
                                 capture_output=True, text=True, cwd=REPO)  # fmt: skip
            if out.returncode:
                sys.exit(f"error: {folder}: the page did not run ({out.stderr.strip().splitlines()[-1:]})")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cold, warm = [r["cold_s"] for r in rows], [r["warm_s"] for r in rows]
        print(
            f"{folder}: {rows[0]['runs']} runs shown; cold run {statistics.median(cold):.2f} s "
            f"[{min(cold):.2f}-{max(cold):.2f}], warm rerun {statistics.median(warm):.2f} s "
            f"[{min(warm):.2f}-{max(warm):.2f}] (n = {len(rows)}; exceptions {max(r['exceptions'] for r in rows)})",
            flush=True,
        )


if __name__ == "__main__":
    main()

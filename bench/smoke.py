"""`make smoke`: every script, a few steps (presets/debug/<model>.yaml), on 1 and on 2 processes, launched the
way a user launches them. Says in one table whether each ran end to end; says nothing about speed or quality.

Data is synthetic by default (shapes only, labelled SYNTHETIC in every record; no dataset needed);
`--data_dir DIR --data local` runs on the real copies instead (slower: the text datasets are tokenised).
Exit status 1 if any launch failed (its log tail is printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import launcher
from shared.record import record_files

REPO = launcher.REPO
MODELS = launcher.builtin_scripts()
SETUPS = {"1 process": None, "2 processes (DDP)": "cpu_2proc"}


def launch(model: str, setup: str | None, args, runs: Path) -> dict:
    flags = ["--config", REPO / "presets" / "debug" / f"{model}.yaml", "--runs_dir", runs,
             "--data", args.data, "--data_dir", args.data_dir, "--tag", "smoke"]  # fmt: skip
    cmd = launcher.command(model, flags, config=setup)  # a free port each: launches may overlap
    env = launcher.child_env()
    t0 = time.perf_counter()
    try:
        proc = launcher.run(cmd, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(
            cmd, 124, e.stdout or "", f"{e.stderr or ''}\ntimed out ({args.timeout:g} s)"
        )
    records = [json.loads(p.read_text()) for p in record_files(runs)]
    ok = proc.returncode == 0 and len(records) == 1 and records[0]["status"] == "finished"
    return {
        "ok": ok,
        "s": time.perf_counter() - t0,
        "steps": records[0]["history"][-1]["step"] if ok and records[0]["history"] else None,
        "log": "" if ok else (proc.stdout[-1500:] + proc.stderr[-2500:]),
    }


def cell(r: dict) -> str:
    return f"{'ok' if r['ok'] else 'FAILED'} ({r['s']:.0f} s)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "local", "auto"])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--jobs", type=int, default=2, help="launches at a time (a 2-process launch counts as 2)")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    cells = [(m, name, setup) for name, setup in SETUPS.items() for m in args.models]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # the 1-process launches run side by side (one core each), the 2-process ones one at a time
        singles = [c for c in cells if c[2] is None]
        pairs = [c for c in cells if c[2] is not None]
        results = {}
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            futures = {c: pool.submit(launch, c[0], c[2], args, Path(tmp) / f"{c[0]}-1") for c in singles}
            results |= {c: f.result() for c, f in futures.items()}
        for c in pairs:
            results[c] = launch(c[0], c[2], args, Path(tmp) / f"{c[0]}-2")
    print(f"smoke ({args.data} data, presets/debug): every script for a few steps, launched as a user would")
    print(f"{'model':<18}" + "".join(f"{name:>22}" for name in SETUPS))
    for m in args.models:
        row = [results[(m, name, setup)] for name, setup in SETUPS.items()]
        print(f"{m:<18}" + "".join(f"{cell(r):>22}" for r in row))
    failed = [(c, r) for c, r in results.items() if not r["ok"]]
    for (m, name, _), r in failed:
        print(f"\n--- {m}, {name}: FAILED\n{r['log']}")
    print(
        f"{len(results) - len(failed)} of {len(results)} launches finished in {time.perf_counter() - t0:.0f} s"
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Your cluster's collectives from nccl-tests' own output (`make project PROJECT_ARGS="--collectives FILE"`).

nccl-tests (github.com/NVIDIA/nccl-tests) prints, per message size, the out-of-place and in-place time and bus
bandwidth of one collective over every rank it ran on. This reads that console text as the table the
projection prices collectives from at that rank count (shared/collective_time.py `collective_s`: the measured
sizes interpolated, the smallest sizes' latency pooled), instead of the hardware file's link figures.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.collective_time import FACTOR, fit_alpha_beta

OPS = ("all_reduce", "all_gather", "reduce_scatter")
REDOPS = {"sum", "prod", "max", "min", "avg", "none", "mulsum"}


class NcclTestsError(ValueError):
    pass


def parse(text: str, name: str = "") -> dict:
    """{"op", "ranks", "devices", "rows": [(bytes, seconds out-of-place, busbw GB/s)]} from nccl-tests output.
    The op from its "Collective test starting" line or else the file name; the ranks from its "Rank" lines."""
    ranks = re.findall(r"^#\s+Rank\s+\d+.*?device\s+\d+\s+\[[^\]]*\]\s+(.*)$", text, re.M)
    op = next(iter(re.findall(r"Collective test starting:\s+(\w+?)_perf", text)), None)
    op = op or next((o for o in OPS if o in name or o.replace("_", "") in name), None)
    if op not in OPS:
        raise NcclTestsError(f"{name or 'nccl-tests output'}: which collective? name it all_reduce, all_gather or "
                             "reduce_scatter in the file name (no 'Collective test starting' line)")  # fmt: skip
    rows = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 8 or line.lstrip().startswith("#") or not (f[0].isdigit() and f[1].isdigit()):
            continue
        at = 5 if len(f) > 4 and f[3] in REDOPS else 3  # size count type [redop root] time algbw busbw ...
        try:
            rows.append((int(f[0]), float(f[at]) * 1e-6, float(f[at + 2])))
        except (ValueError, IndexError):
            continue
    if not rows or not ranks:
        raise NcclTestsError(f"{name or 'nccl-tests output'}: no nccl-tests table (size ... time algbw busbw rows "
                             "and '#  Rank' lines) in it")  # fmt: skip
    return {"op": op, "ranks": len(ranks), "devices": sorted(set(ranks)), "rows": rows}


def table(parsed: dict) -> dict:
    """The projection's measured-collective table (as bench/collectives.py writes this machine's) for one
    parsed output: per size its time (one figure: nccl-tests' mean over its iterations), the alpha-beta fit."""
    n, op = parsed["ranks"], parsed["op"]
    rows = [r for r in parsed["rows"] if r[0] > 0]
    sizes = [{"bytes": b, "median_s": t, "mean_s": t, "calls": 1} for b, t, _ in rows]
    fit = fit_alpha_beta([b for b, _, _ in rows], [t for _, t, _ in rows], FACTOR[op](n))
    return {"sizes": sizes, "fit": fit, "factor": FACTOR[op](n), "source": "nccl-tests"}


def load(paths: list[str]) -> dict:
    """{str(ranks): {op: table}} from nccl-tests output files."""
    out: dict = {}
    for path in paths:
        p = Path(path)
        try:
            text = p.read_text(errors="replace")
        except OSError as e:
            raise NcclTestsError(f"--collectives {path}: cannot read ({e.strerror or e})") from None
        parsed = parse(text, p.name)
        out.setdefault(str(parsed["ranks"]), {})[parsed["op"]] = {**table(parsed), "file": p.name}
    return out

"""Markdown tables of bench summaries (`<runs_dir>/bench/<batch>/summary.json`), for the README.

One summary: model, setup, devices, steady step time and speedup with their 95% intervals, efficiency, flags.
Two or more: the speedups side by side, and whether each later run agrees with the first (intervals
overlap, or within 15%).

    python bench/table.py runs/bench/20261129-090000/summary.json [runs/bench/20261129-091500/summary.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shared.stats import sig  # noqa: E402

AGREE_WITHIN = 0.15


def ci(v, lo_hi) -> str:
    return f"{sig(v)} [{sig(lo_hi[0])}–{sig(lo_hi[1])}]" if v is not None else "—"


def agree(a: dict, b: dict) -> str:
    if a.get("speedup") is None or b.get("speedup") is None:
        return "—"
    (alo, ahi), (blo, bhi) = a["speedup_ci95"], b["speedup_ci95"]
    overlap = alo <= bhi and blo <= ahi
    close = abs(b["speedup"] / a["speedup"] - 1) <= AGREE_WITHIN
    return "yes" if overlap or close else f"**no** ({b['speedup'] / a['speedup'] - 1:+.0%})"


def main(paths: list[str]) -> str:
    sums = [json.loads(Path(p).read_text()) for p in paths]
    # the 1-device baseline itself (speedup 1 by definition) is left out
    cells = [
        {
            (c["model"], c["setup"]): c
            for c in s["cells"]
            if "skipped" not in c and c["setup"] != c.get("baseline")
        }
        for s in sums
    ]
    first = cells[0]
    lines = []
    if len(sums) == 1:
        lines.append("| model | setup | devices | step s [95% CI] | speedup [95% CI] | efficiency | flags |")
        lines.append("|---|---|---|---|---|---|---|")
        for (m, st), c in first.items():
            eff = sig(c["efficiency"], 2) if c.get("efficiency") is not None else "—"
            lines.append(
                f"| {m} | {st} | {c['devices']} | {ci(c.get('step_s'), c.get('step_s_ci95') or [0, 0])} | "
                f"{ci(c.get('speedup'), c.get('speedup_ci95') or [0, 0])} | {eff} | {', '.join(c.get('flags', [])) or '—'} |"
            )
        return "\n".join(lines)
    head = " | ".join(f"speedup run {i + 1} [95% CI] | flags {i + 1}" for i in range(len(sums)))
    lines.append(f"| model | setup | devices | {head} | agree |")
    lines.append("|---|---|---|" + "---|---|" * len(sums) + "---|")
    for key, c in first.items():
        row = [
            f"{ci(cs.get(key, {}).get('speedup'), cs.get(key, {}).get('speedup_ci95') or [0, 0])} | "
            f"{', '.join(cs.get(key, {}).get('flags', [])) or '—'}"
            for cs in cells
        ]
        verdict = ", ".join(agree(c, cs.get(key, {})) for cs in cells[1:])
        lines.append(f"| {key[0]} | {key[1]} | {c['devices']} | {' | '.join(row)} | {verdict} |")
    pairs = [
        (c, cells[1][k])
        for k, c in first.items()
        if c.get("speedup") is not None and cells[1].get(k, {}).get("speedup") is not None
    ]
    if pairs:
        diffs = sorted(abs(b["speedup"] / a["speedup"] - 1) for a, b in pairs)
        ok = sum(agree(a, b) == "yes" for a, b in pairs)
        narrow = sum(
            max(x["speedup"] - x["speedup_ci95"][0], x["speedup_ci95"][1] - x["speedup"]) / x["speedup"]
            <= AGREE_WITHIN
            for a, b in pairs
            for x in (a, b)
        )
        lines.append("")
        lines.append(
            f"Runs 1 and 2: {ok} of {len(pairs)} compared cells agree (intervals overlap or within 15%); "
            f"relative difference median {diffs[len(diffs) // 2]:.0%}, largest {diffs[-1]:.0%}; "
            f"{narrow} of {2 * len(pairs)} intervals within ±15% of their speedup."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/table.py SUMMARY.json [SUMMARY.json ...]")
    print(main(sys.argv[1:]))

"""The result tables of README.md and docs/, generated from the run records in docs/results/ (`make report`).

A manifest (docs/results/report.yaml) lists each table: the file it lives in, between
`<!-- report:NAME -->` and `<!-- /report:NAME -->`, its kind and the bench summaries it is made from
(`summary.json` written by bench/run.py; the run records sit next to it, or in the runs folder above
`bench/<batch>/`). Every record a table uses must come from a clean tree: one whose
`environment.git_commit` ends in `-dirty`, or has none, stops the report with one line naming the file
(exit 2) and no file is written. Each row links its records and shows the first 8 hex digits of the
script's `environment.script_sha256` ("—" in records older than that field).

    python -m bench.report                      # rewrite the tables between their markers
    python -m bench.report --check              # exit 1, with a one-line summary, if a file is out of date
    python -m bench.report --print SUMMARY.json [SUMMARY.json ...]   # one table to stdout, nothing checked

Kinds: `answer` (the front page: per model the best strategy on more than one device, its speedup and
verdict, and whether the other summaries' verdicts agree, with a generated sentence), `headline` (per model:
the 1-device step time and the speedup of `setup` over it) and `cells` (every cell of one bench; with several
summaries, the speedups side by side and whether they agree).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

from bench.cells import model_verdicts
from bench.report_records import (
    Batch,
    Records,
    Refused,
    ci,
    conditions,
    hardware,
    link,
    script_sha,
    short_commit,
)
from shared.stats import sig, verdict

AGREE_WITHIN = 0.15  # two speedups agree when their intervals overlap or they are within 15%


# ---- tables


def headline(batches: list[Batch], spec: dict, base: Path | None) -> str:
    b = batches[0]
    setup = spec["setup"]
    cores = b.summary["cpu_cores"]
    some = next((c for (_, s), c in b.cells.items() if s == setup), {})
    what = f"`{setup}` ({some.get('strategy')}, {some.get('procs')} processes)"
    rows = [
        f"| model | work (profile `{b.summary['profile']}`) | metric, 1 device → {setup} | step s, 1 device [95% CI] | "
        f"speedup of {what} [95% CI] | flags | hardware, processes | date | launches | commit · script | records |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in b.summary["plan"]["models"]:
        cell = b.cells.get((model, setup))
        base_cell = b.cells.get((model, cell["baseline"])) if cell and cell.get("baseline") else None
        if not cell or not base_cell:
            continue
        recs = [r for _, r in b.recs(cell)]
        brecs = [r for _, r in b.recs(base_cell)]
        r0 = recs[0]
        key = cell["metric"]
        label = re.sub(r" \(.*\)$", "", r0["metrics"].get(key, {}).get("label", key))
        work = (
            f"{r0['config']['epochs']} epoch{'s' * (r0['config']['epochs'] > 1)} · "
            f"{r0['data']['used']['train']:,} {r0['data']['name']} samples · batch {cell['global_batch']}"
        )
        launches = f"{base_cell['launches']} + {cell['launches']} ({base_cell.get('windows')} + {cell.get('windows')} windows)"
        records = f"{b.links(base_cell, '1 device', base)} · {b.links(cell, setup, base)}"
        rows.append(
            f"| {model} | {work} | {label} {sig(base_cell['value'])} → {sig(cell['value'])} | "
            f"{ci(base_cell.get('step_s'), base_cell.get('step_s_ci95'))} | "
            f"**{ci(cell.get('speedup'), cell.get('speedup_ci95'))}** | {', '.join(cell.get('flags', [])) or '—'} | "
            f"{conditions(r0, cell['procs'], cores)} | {r0['started_at'][:10]} | {launches} | "
            f"{short_commit(r0)} · {script_sha(brecs + recs)} | {records} |"
        )
    return "\n".join(rows) + "\n\n" + b.caption(base)


NAMES = {
    "ddp": "DDP",
    "fsdp": "FSDP",
    "model_split": "model split",
    "pipeline": "pipeline",
    "hybrid": "hybrid",
}


def verdicts_of(b: Batch) -> dict[str, dict]:
    """The summary's per-model verdicts (bench/run.py writes them), or the same computed from its cells."""
    if "verdicts" in b.summary:
        return b.summary["verdicts"]
    cells = {f"{m}/{s}": c for (m, s), c in b.cells.items()}
    for c in cells.values():
        if "speedup" in c and "verdict" not in c:
            c["verdict"] = verdict(c["speedup_ci95"])
    return model_verdicts(b.summary["plan"], cells)


def answer(batches: list[Batch], spec: dict, base: Path | None) -> str:
    """The front page's table: per model, from the first summary, the 1-device step, the best strategy on
    more than one device, its speedup [interval] and verdict, the other summaries' verdicts, the records;
    above it one generated sentence of which models gain."""
    b, others = batches[0], batches[1:]
    mine, theirs = verdicts_of(b), [verdicts_of(o) for o in others]
    head = "verdict" + (f" (the other {len(others)} run{'s' * (len(others) > 1)})" if others else "")
    rows = [
        f"| model | step, 1 device [95% CI] | best strategy | its speedup [95% CI] | {head} | records |",
        "|---|---|---|---|---|---|",
    ]
    gain, lose, unsure, once = [], [], [], []
    for model in b.summary["plan"]["models"]:
        v = mine.get(model) or {}
        if "speedup" not in v:
            continue
        cell = b.cells[(model, v["setup"])]
        base_cell = b.cells.get((model, cell.get("baseline")), {})
        name = f"{NAMES.get(v['strategy'], v['strategy'])} on {v['devices']}"
        interval = ci(v["speedup"], v["speedup_ci95"]) + (
            " (one launch)" if v.get("interval") != "95%" else ""
        )
        agree_ = ", ".join((t.get(model) or {}).get("verdict", "—") for t in theirs)
        shown = f"**{v['verdict']}**" + (f" ({agree_})" if others else "")
        flags = f"; {', '.join(v['flags'])}" if v.get("flags") else ""
        records = f"{b.links(base_cell, '1 device', base)} · {b.links(cell, name, base)}"
        rows.append(
            f"| {model} | {ci(base_cell.get('step_s'), base_cell.get('step_s_ci95'))} | {name} | {interval}{flags} "
            f"| {shown} | {records} |"
        )
        seen = [t[model] for t in theirs if t.get(model)]  # the other runs that ran this model
        same = all(s.get("verdict") == v["verdict"] for s in seen)
        item = f"{model} ({name}, x{sig(v['speedup'])})"
        if others and not seen:
            once.append(f"{item}: {v['verdict']}")
            continue
        (gain if v["verdict"] == "pays off" and same else lose if v["verdict"] == "does not pay off" and same
         else unsure).append(item)  # fmt: skip
    recs = [r for c in b.cells.values() for _, r in b.recs(c)]
    cores = b.summary["cpu_cores"]
    where = f"{hardware(recs[0])}, {cores} cores, one process per core" if recs else "this machine"
    runs = f"in all {len(batches)} runs" if others else "in this run"
    sentence = (
        f"On {where}, a second device pays off {runs} for "
        f"{', '.join(gain) or 'no model'}; it does not for {', '.join(lose) or 'no model'}"
        + (f"; the runs cannot tell for {', '.join(unsure)}" if unsure else "")
        + (f"; in the first run only (the others did not run it): {', '.join(once)}" if once else "")
        + "."
    )
    env = recs[0]["environment"] if recs else {}
    commits = ", ".join(
        sorted({short_commit(r) for x in batches for c in x.cells.values() for _, r in x.recs(c)})
    )
    started = [x.summary["plan"].get("started_at", "")[:16].replace("T", " ") for x in batches]
    caption = (
        f"Profile `{b.summary['profile']}`: {b.summary.get('repetition', '')}. {b.summary['cuda_devices']} CUDA "
        f"devices, {env.get('torch_threads')} torch thread per process, torch {env.get('torch')}, commit {commits}. "
        "Verdict: `pays off` when the whole interval is above 1, `does not pay off` below, `cannot tell` when it "
        "spans 1. Runs: "
        + ", ".join(
            f"{link(x.summary['batch'], x.path, base)} ({t} UTC)"
            for x, t in zip(batches, started, strict=True)
        )
        + "."
    )
    wrap = lambda t: "\n".join(textwrap.wrap(t, 112, break_long_words=False, break_on_hyphens=False))  # noqa: E731
    return wrap(sentence) + "\n\n" + "\n".join(rows) + "\n\n" + wrap(caption)


def agree(a: dict, b: dict) -> str:
    if a.get("speedup") is None or b.get("speedup") is None:
        return "—"
    (alo, ahi), (blo, bhi) = a["speedup_ci95"], b["speedup_ci95"]
    overlap = alo <= bhi and blo <= ahi
    close = abs(b["speedup"] / a["speedup"] - 1) <= AGREE_WITHIN
    return "yes" if overlap or close else f"**no** ({b['speedup'] / a['speedup'] - 1:+.0%})"


def cells_one(b: Batch, base: Path | None) -> str:
    cores = b.summary["cpu_cores"]
    rows = [
        "| model | setup | strategy | devices | processes on the cores | step s [95% CI] | speedup [95% CI] | "
        "efficiency [95% CI] | flags | launches (windows) | script | records |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, setup), c in b.cells.items():
        recs = b.recs(c)
        if not recs:
            continue
        r0 = recs[0][1]
        is_base = setup == c.get("baseline")
        speedup = "baseline" if is_base else ci(c.get("speedup"), c.get("speedup_ci95"))
        eff = "—" if is_base else ci(c.get("efficiency"), c.get("efficiency_ci95"))
        procs = conditions(r0, c["procs"], cores).split(": ", 1)[-1]
        rows.append(
            f"| {model} | {setup} | {c.get('strategy')} | {c['devices']} | {procs} | "
            f"{ci(c.get('step_s'), c.get('step_s_ci95'))} | {speedup} | {eff} | {', '.join(c.get('flags', [])) or '—'} | "
            f"{c['launches']} ({c.get('windows')}) | {script_sha([r for _, r in recs])} | {b.links(c, 'record', base)} |"
        )
    return "\n".join(rows) + "\n\n" + b.caption(base)


def cells_many(batches: list[Batch], base: Path | None) -> str:
    first = batches[0]
    n = len(batches)
    head = " | ".join(f"speedup {i + 1} [95% CI] | flags {i + 1}" for i in range(n))
    rows = [
        f"| model | setup | devices | {head} | agree with 1 | records |",
        "|---|---|---|" + "---|---|" * n + "---|---|",
    ]
    pairs = []
    for key, c in first.cells.items():
        if key[1] == c.get("baseline"):
            continue
        others = [b.cells.get(key, {}) for b in batches]
        cols = " | ".join(
            f"{ci(o.get('speedup'), o.get('speedup_ci95'))} | {', '.join(o.get('flags', [])) or '—'}"
            for o in others
        )
        verdict = ", ".join(agree(c, o) for o in others[1:])
        recs = " · ".join(
            b.links(o, str(i + 1), base) if o else "—"
            for i, (b, o) in enumerate(zip(batches, others, strict=True))
        )
        rows.append(f"| {key[0]} | {key[1]} | {c['devices']} | {cols} | {verdict} | {recs} |")
        if c.get("speedup") is not None and others[1].get("speedup") is not None:
            pairs.append((c, others[1]))
    out = "\n".join(rows)
    if pairs:
        diffs = sorted(abs(b["speedup"] / a["speedup"] - 1) for a, b in pairs)
        ok = sum(agree(a, b) == "yes" for a, b in pairs)
        narrow = sum(
            max(x["speedup"] - x["speedup_ci95"][0], x["speedup_ci95"][1] - x["speedup"]) / x["speedup"]
            <= AGREE_WITHIN
            for a, b in pairs
            for x in (a, b)
        )
        out += "\n\n" + "\n".join(
            textwrap.wrap(
                f"Runs 1 and 2: {ok} of {len(pairs)} compared cells agree (intervals overlap or within 15%); "
                f"relative difference median {diffs[len(diffs) // 2]:.0%}, largest {diffs[-1]:.0%}; "
                f"{narrow} of {2 * len(pairs)} intervals within ±15% of their speedup.",
                112,
                break_on_hyphens=False,
            )
        )
    captions = "\n".join(f"{i + 1}. {b.caption(base)}" for i, b in enumerate(batches))
    return out + "\n\n" + captions


def table(spec: dict, batches: list[Batch], base: Path | None) -> str:
    if spec.get("kind", "cells") == "headline":
        return headline(batches, spec, base)
    if spec.get("kind") == "answer":
        return answer(batches, spec, base)
    return cells_one(batches[0], base) if len(batches) == 1 else cells_many(batches, base)


# ---- files


def generate(root: Path, manifest: Path) -> dict[Path, str]:
    """The new text of every file the manifest names; raises Refused before anything is written."""
    spec = yaml.safe_load(manifest.read_text()) or {}
    records = Records(root)
    texts: dict[Path, str] = {}
    for t in spec.get("tables") or []:
        if t.get("kind") == "gpu-check":  # the committed `make gpu-check` tables, as they came back
            target = root / t["file"]
            texts.setdefault(target, target.read_text())
            texts[target] = replace_block(
                texts[target], t, gpu_rows(root, t.get("checks") or [], target.parent)
            )
            continue
        if not {"name", "file", "summaries"} <= set(t):
            raise Refused(f"{records.rel(manifest)}: a table needs name, file and summaries: {t}")
        target = root / t["file"]
        if target not in texts:
            texts[target] = target.read_text()
        batches = [Batch(root / s, records) for s in t["summaries"]]
        texts[target] = replace_block(texts[target], t, table(t, batches, target.parent))
    records.check_clean()
    return texts


def replace_block(text: str, t: dict, body: str) -> str:
    start, end = f"<!-- report:{t['name']} -->", f"<!-- /report:{t['name']} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not (m := pattern.search(text)):
        raise Refused(f"{t['file']}: no {start} … {end} markers for table {t['name']}")
    return f"{text[: m.start()]}{start}\n\n{body}\n\n{end}{text[m.end() :]}"


def gpu_rows(root: Path, checks: list[str], base: Path) -> str:
    """The GPU rows: each committed gpu-check table.md (its first line names the device and the date), or what
    to do while there is none."""
    if not checks:
        return ("No GPU check has run yet: every GPU figure in this project is modelled. `make gpu-check` on a GPU "
                "machine ([docs/gpu.md](docs/gpu.md)), its `table.md` committed under `docs/results/<date>/gpu-check/` "
                "and named in docs/results/report.yaml, and `make report` puts its rows here.")  # fmt: skip
    parts = []
    for c in checks:
        path = root / c
        if not path.is_file():
            raise Refused(f"{c}: no such gpu-check table")
        head, _, rows = path.read_text().partition("\n\n")
        parts.append(f"{head.strip()} ([table]({os.path.relpath(path, base)}))\n\n{rows.strip()}")
    return "\n\n".join(parts)


def write_replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # a new file: as open() makes it
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root"
    )
    ap.add_argument("--manifest", type=Path, default=None, help="default: <root>/docs/results/report.yaml")
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if a file differs from what would be generated"
    )
    ap.add_argument(
        "--print", nargs="+", metavar="SUMMARY", help="print one table of these summaries and exit"
    )
    args = ap.parse_args(argv)
    root = args.root.resolve()
    try:
        if args.print:
            records = Records(root)
            batches = [Batch(Path(p).resolve(), records) for p in args.print]
            print(table({"kind": "cells"}, batches, Path.cwd()))
            return 0
        texts = generate(root, args.manifest or root / "docs" / "results" / "report.yaml")
    except Refused as e:
        print(f"report: {e}", file=sys.stderr)
        return 2
    stale = {p: t for p, t in texts.items() if p.read_text() != t}
    if args.check:
        if stale:
            parts = []
            for p, t in stale.items():
                diff = difflib.unified_diff(p.read_text().splitlines(), t.splitlines(), lineterm="", n=0)
                changed = sum(1 for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---"))
                parts.append(f"{p.relative_to(root)} ({changed} lines)")
            print(f"report --check: out of date: {', '.join(parts)}; run make report", file=sys.stderr)
            return 1
        print(f"report --check: {len(texts)} files up to date")
        return 0
    for p, t in stale.items():
        write_replace(p, t)
    print(
        f"report: {len(stale)} of {len(texts)} files rewritten ({', '.join(str(p.relative_to(root)) for p in texts)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

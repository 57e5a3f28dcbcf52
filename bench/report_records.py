"""What bench/report.py's tables are made from: a bench summary with the run records behind it (every record
remembered, for the clean-tree check), and the cell formatting the tables share."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

from shared.stats import sig


class Refused(Exception):
    """A table cannot be generated (dirty or missing record, bad manifest, missing marker): exit 2."""


# ---- records


class Records:
    """Loads the run records a table uses and remembers every path, for the clean-tree check."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict[Path, dict] = {}

    def path(self, summary: Path, run_id: str) -> Path:
        for folder in (summary.parent, summary.parent.parent.parent):  # docs/results/<batch>/, runs/
            if (p := folder / f"{run_id}.json").is_file():
                return p
        raise Refused(
            f"{self.rel(summary.parent / f'{run_id}.json')}: record not found (named in {self.rel(summary)})"
        )

    def get(self, summary: Path, run_id: str) -> tuple[Path, dict]:
        p = self.path(summary, run_id)
        if p not in self.cache:
            self.cache[p] = json.loads(p.read_text())
        return p, self.cache[p]

    def rel(self, p: Path) -> str:
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)

    def check_clean(self) -> None:
        dirty = []
        for p, rec in sorted(self.cache.items()):
            commit = (rec.get("environment") or {}).get("git_commit")
            if not commit or str(commit).endswith("-dirty"):
                dirty.append((p, commit))
        if dirty:
            p, commit = dirty[0]
            more = f" (and {len(dirty) - 1} more records)" if len(dirty) > 1 else ""
            why = f"environment.git_commit {commit}" if commit else "no environment.git_commit"
            raise Refused(
                f"{self.rel(p)}: written from a dirty tree ({why}); the report uses clean records only{more}"
            )


# ---- formatting


def ci(v, lo_hi) -> str:
    return f"{sig(v)} [{sig(lo_hi[0])}–{sig(lo_hi[1])}]" if v is not None and lo_hi else "—"


def link(label: str, target: Path, base: Path | None) -> str:
    return f"[{label}]({os.path.relpath(target, base)})" if base else label


def hardware(rec: dict) -> str:
    name = (rec["setup"].get("device_names") or ["?"])[0]
    name = re.sub(r"\((R|TM)\)|\s*\(\d+ cores\)", "", name)  # the cores are said apart
    return re.sub(r"\s+", " ", name).strip()


def conditions(rec: dict, procs: int, cores: int) -> str:
    """Where a speedup was measured: the device, and how the processes share the cores."""
    if rec["environment"].get("cuda"):
        return f"{hardware(rec)}, {procs} process{'es' * (procs > 1)}"
    threads = rec["environment"].get("torch_threads", 1)
    if procs * threads <= cores:
        each = "one core each" if threads == 1 else f"{threads} threads each"
        return f"{hardware(rec)}: {procs} process{'es' * (procs > 1)} on {cores} cores, {each}"
    return f"{hardware(rec)}: {procs} processes × {threads} thread on {cores} cores (oversubscribed)"


def short_commit(rec: dict) -> str:
    c = rec["environment"].get("git_commit") or "?"
    return c[:7] + ("-dirty" if c.endswith("-dirty") else "")


def script_sha(recs: list[dict]) -> str:
    shas = sorted({(r["environment"].get("script_sha256") or "")[:8] or "—" for r in recs})
    return ", ".join(f"`{s}`" if s != "—" else s for s in shas)


class Batch:
    """One bench summary with its cells keyed by (model, setup) and the records behind them."""

    def __init__(self, path: Path, records: Records):
        self.path, self.records = path, records
        self.summary = json.loads(path.read_text())
        self.cells = {(c["model"], c["setup"]): c for c in self.summary["cells"] if "skipped" not in c}

    def recs(self, cell: dict) -> list[tuple[Path, dict]]:
        return [self.records.get(self.path, rid) for rid in cell.get("run_ids", [])]

    def links(self, cell: dict, label: str, base: Path | None) -> str:
        recs = self.recs(cell)
        if not recs:
            return "—"
        first = link(label, recs[0][0], base)
        return first if len(recs) == 1 else f"{first} (first of n={len(recs)})"

    def caption(self, base: Path | None) -> str:
        s, plan = self.summary, self.summary["plan"]
        recs = [r for c in self.cells.values() for _, r in self.recs(c)]
        rec, env = recs[0], recs[0]["environment"]
        started = plan.get("started_at", rec["started_at"])
        commits = ", ".join(sorted({short_commit(r) for r in recs}))
        text = (
            f"Bench batch `{s['batch']}` (profile `{s['profile']}`, {len(recs)} records), started {started[:10]} "
            f"{started[11:16]} UTC, commit {commits}; {hardware(rec)}, {s['cpu_cores']} CPU cores, "
            f"{s['cuda_devices']} CUDA devices, {env.get('torch_threads')} torch thread per process; torch "
            f"{env.get('torch')}, accelerate {env.get('accelerate')}. Repetition: {s['repetition']}. "
            f"Step time: median over the pooled windows; "
            f"speedup: the baseline's median step time / the setup's, at the same global batch, with a 95% "
            f"{'interval' if 'hierarchical' in s['repetition'] else 'percentile-bootstrap interval'}. "
            f"{link('summary.json', self.path, base)}."
        )
        return "\n".join(textwrap.wrap(text, 112, break_long_words=False, break_on_hyphens=False))

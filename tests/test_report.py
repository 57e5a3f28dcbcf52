"""bench/report.py and the front page: the committed tables are what the records give, a dirty record stops
the report without touching the file, every relative link in README.md and docs/ resolves inside the
repository, and README.md stays a front page (≤ 250 lines). No torch, no launches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import launcher

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "bench" / "report.py"
BATCH = REPO / "docs" / "results" / "2026-11-29" / "quick-run1"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPORT), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A repository-shaped folder: one copied bench batch, a manifest and a page with a table's markers."""
    shutil.copytree(BATCH, tmp_path / "results" / "batch")
    (tmp_path / "report.yaml").write_text(
        "tables:\n"
        "  - {name: headline, file: PAGE.md, kind: headline, setup: cpu_2proc,"
        " summaries: [results/batch/summary.json]}\n"
        "  - {name: cells, file: PAGE.md, kind: cells, summaries: [results/batch/summary.json]}\n"
        "  - {name: pair, file: PAGE.md, summaries: [results/batch/summary.json, results/batch/summary.json]}\n"
    )
    (tmp_path / "PAGE.md").write_text(
        "# page\n\n<!-- report:headline -->\nold\n<!-- /report:headline -->\n\ntext between\n\n"
        "<!-- report:cells -->\n<!-- /report:cells -->\n\n<!-- report:pair -->\n<!-- /report:pair -->\nend\n"
    )
    return tmp_path


def run_site(site: Path, *args: str) -> subprocess.CompletedProcess:
    return report("--root", str(site), "--manifest", str(site / "report.yaml"), *args)


def test_committed_tables_are_regenerated_exactly():
    r = report("--check")
    assert r.returncode == 0, r.stderr


def test_report_writes_tables_that_link_their_records(site: Path):
    r = run_site(site)
    assert r.returncode == 0, r.stderr
    page = (site / "PAGE.md").read_text()
    assert "old" not in page and "text between" in page and page.endswith("end\n")
    summary = json.loads((site / "results" / "batch" / "summary.json").read_text())
    ddp = next(c for c in summary["cells"] if c["model"] == "mlp" and c["setup"] == "cpu_2proc")
    lo, hi = ddp["speedup_ci95"]
    assert f"**{ddp['speedup']:.3f} [{lo:.3f}–{hi:.3f}]**" in page  # the headline's mlp row, 3 digits
    assert f"(results/batch/{ddp['run_ids'][0]}.json)" in page
    assert "2 processes on 2 cores, one core each" in page
    assert "agree with 1" in page and "24 of 24 compared cells agree" in page
    assert run_site(site, "--check").returncode == 0
    assert run_site(site).stdout.startswith("report: 0 of 1 files rewritten")

    (site / "PAGE.md").write_text(page.replace(" | 0.631 ", " | 0.632 ", 1))
    r = run_site(site, "--check")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "PAGE.md (2 lines)" in r.stderr


def test_the_answer_table_names_the_best_strategy_and_its_verdict(site: Path):
    """kind: answer (the README's front table): per model the best multi-device strategy by name, its speedup
    and a verdict that follows from the interval, the other runs' verdicts, and one generated sentence."""
    s = (site / "results" / "batch" / "summary.json").as_posix()
    (site / "report.yaml").write_text(
        f"tables:\n  - {{name: headline, file: PAGE.md, kind: answer, summaries: [{s}, {s}]}}\n"
    )
    assert run_site(site).returncode == 0
    page = (site / "PAGE.md").read_text()
    summary = json.loads((site / "results" / "batch" / "summary.json").read_text())
    multi = [
        c
        for c in summary["cells"]
        if "speedup" in c and c["devices"] > 1 and "oversubscribed" not in c["flags"]
    ]
    best = max((c for c in multi if c["model"] == "cnn"), key=lambda c: c["speedup"])
    lo, hi = best["speedup_ci95"]
    expect = "pays off" if lo > 1 else "does not pay off" if hi < 1 else "cannot tell"
    row = next(line for line in page.splitlines() if line.startswith("| cnn |"))
    assert f"{best['speedup']:.3g}"[:4] in row and f"**{expect}** ({expect})" in row, row
    assert page.count("|---|---|---|---|---|---|\n") == 1  # six columns
    assert "a second device pays off in all 2 runs for" in " ".join(page.split())


def test_script_sha_is_shown_when_the_record_has_it(site: Path):
    rec_path = site / "results" / "batch" / "mlp-20261129-085406-dca596.json"
    rec = json.loads(rec_path.read_text())
    rec["environment"]["script_sha256"] = "ab12cd34" + "0" * 56
    rec_path.write_text(json.dumps(rec))
    assert run_site(site).returncode == 0
    page = (site / "PAGE.md").read_text()
    assert "343030a · `ab12cd34`, —" in page  # the mlp headline row: baseline record without it, ddp with it
    assert page.count("`ab12cd34`") == 2  # and its row in the cells table


@pytest.mark.parametrize("commit", ["343030a24092f7a972c1ca0cd4812f5c97b0e492-dirty", None])
def test_dirty_record_stops_the_report_and_leaves_the_file(site: Path, commit):
    before = (site / "PAGE.md").read_bytes()
    rec_path = site / "results" / "batch" / "cnn-20261129-085614-4dd48c.json"
    rec = json.loads(rec_path.read_text())
    if commit:
        rec["environment"]["git_commit"] = commit
    else:
        del rec["environment"]["git_commit"]
    rec_path.write_text(json.dumps(rec))
    for args in ((), ("--check",)):
        r = run_site(site, *args)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "results/batch/cnn-20261129-085614-4dd48c.json" in lines[0], lines
        assert "dirty tree" in lines[0]
        assert (site / "PAGE.md").read_bytes() == before
    assert not [p for p in site.iterdir() if p.name.endswith(".tmp")]


def test_missing_record_or_marker_stops_the_report(site: Path):
    before = (site / "PAGE.md").read_bytes()
    (site / "results" / "batch" / "nbow-20261129-090022-7aa9ca.json").unlink()
    r = run_site(site)
    assert r.returncode == 2 and "nbow-20261129-090022-7aa9ca.json: record not found" in r.stderr
    shutil.copy(BATCH / "nbow-20261129-090022-7aa9ca.json", site / "results" / "batch")
    (site / "PAGE.md").write_text(before.decode().replace("<!-- /report:cells -->", ""))
    r = run_site(site)
    assert r.returncode == 2 and "no <!-- report:cells -->" in r.stderr


def markdown_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_relative_links_resolve_inside_the_repository():
    bad = []
    for page in markdown_pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor on the same page
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.is_relative_to(REPO) or not path.exists():
                bad.append(f"{page.relative_to(REPO)}: {target}")
    assert not bad, bad
    assert LINK.findall("see [speed](docs/speed.md#flags) and ![x](a.png)") == [
        "docs/speed.md#flags",
        "a.png",
    ]


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    text = "\n".join(lines)
    for must in (
        "make bench-all",
        "make test",
        "<!-- report:headline -->",
        "docs/screenshots/",
        "make report",
    ):
        assert must in text, must
    for script in launcher.builtin_scripts():
        assert f"scripts/{script}.py" in text, script


def test_gpu_check_tables_become_the_readmes_gpu_rows(tmp_path):
    """`make report` puts each committed gpu-check table.md between the README's gpu markers, or says there is
    none; a named table that is not there stops the report."""
    from bench.report import Refused, generate

    (tmp_path / "README.md").write_text("x\n<!-- report:gpu -->\nold\n<!-- /report:gpu -->\ny\n")
    manifest = tmp_path / "report.yaml"
    manifest.write_text("tables:\n  - {name: gpu, file: README.md, kind: gpu-check, checks: []}\n")
    (text,) = generate(tmp_path, manifest).values()
    assert "No GPU check has run yet" in text and "old" not in text and text.startswith("x\n")
    table = tmp_path / "docs/results/2026-12-08/gpu-check/table.md"
    table.parent.mkdir(parents=True)
    table.write_text(
        "gpu-check on NVIDIA H100 80GB HBM3, 2026-12-08 10:00 UTC\n\n| check | result |\n|---|---|\n| a | PASS |\n"
    )
    manifest.write_text("tables:\n  - {name: gpu, file: README.md, kind: gpu-check, "
                        "checks: [docs/results/2026-12-08/gpu-check/table.md]}\n")  # fmt: skip
    (text,) = generate(tmp_path, manifest).values()
    assert "gpu-check on NVIDIA H100 80GB HBM3" in text and "| a | PASS |" in text
    assert "(docs/results/2026-12-08/gpu-check/table.md)" in text
    manifest.write_text(
        "tables:\n  - {name: gpu, file: README.md, kind: gpu-check, checks: [nope/table.md]}\n"
    )
    with pytest.raises(Refused, match="no such gpu-check table"):
        generate(tmp_path, manifest)

"""Finding and reading the dashboard's run files: our records and the study's files, one bad file never
hiding the good ones.

Every *.json below the runs folder (subfolders too, capped in depth and size) is read as one of our run
records (`shared.record`), else as one of the study's files (converted by `board.reference`); a file that is
neither is one line in the notice. No Streamlit, torch or accelerate here.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from board.reference import convert, is_study_format, load_reference
from shared.record import read_record

MAX_FILE_BYTES = 16 * 2**20  # a run record is ~0.1-1 MB; anything far larger is not one
MAX_DEPTH = 8  # folders below the runs folder that are searched
# checkpoints, bench logs/summaries, tracker output and `make project`'s profiling runs (mixed batch sizes)
SKIP_DIRS = {"checkpoints", "bench", ".git", "profiles", "trackers"}
PROJECTION_PREFIX = "projection-"  # `make project`'s records: the Projection tab (board/projection.py)
SKIP_NAMES = {"progress.json", "summary.json", "state.json"}


def walk(folder: str | Path | None, keep, skip: set[str] = SKIP_DIRS) -> list[Path]:
    """Every file below `folder` (subfolders too, MAX_DEPTH deep, without the folders named in `skip`:
    checkpoints, bench logs, ...) whose name `keep(name)` accepts."""
    d = Path(folder) if folder else None
    if not d or not d.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(d):
        depth = len(Path(root).relative_to(d).parts)
        dirs[:] = sorted(x for x in dirs if x not in skip and not x.startswith(".") and depth < MAX_DEPTH)
        out += [Path(root) / f for f in sorted(files) if keep(f)]
    return out


def json_files(folder: str | Path | None) -> list[Path]:
    """Every run-record candidate below `folder`: *.json, without projection records and bench files."""
    return walk(
        folder,
        lambda f: (
            f.endswith(".json") and not f.startswith((".tmp-", PROJECTION_PREFIX)) and f not in SKIP_NAMES
        ),
    )


def file_size(path: Path) -> int:
    """The size of a regular file (a link is followed); ValueError for anything a read could hang on or
    never finish (a named pipe, a device such as /dev/zero, a socket) or cannot stat."""
    try:
        st = path.stat()
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file (a pipe, device or socket): not read")
    return st.st_size


def _read_one(path: Path) -> list[dict]:
    """One file as runs (ours, or the study's format); ValueError with a one-line reason, never a path."""
    size = file_size(path)
    if size > MAX_FILE_BYTES:
        raise ValueError(
            f"too large for a run record ({size / 2**20:.0f} MiB > {MAX_FILE_BYTES // 2**20} MiB)"
        )
    try:
        return [{**read_record(path), "kind": "ours"}]
    except ValueError as err:
        reason = str(err)
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
    except RecursionError:
        raise ValueError("nested too deeply to be a run record") from None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        obj = None
    if is_study_format(obj):
        return [{**r, "kind": "study"} for r in convert(obj, path.name)]
    raise ValueError(reason)


def load_folder(
    runs_dir: str | Path, reference_dir: str | Path | None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Our records below `runs_dir` (subfolders too; study-format files found there are read as such) and
    the study's files in `reference_dir`. Returns (runs, [(file, reason)]): each file that cannot be read,
    for whatever reason, is one line in the notice and nothing else is affected."""
    runs, problems = [], []
    d = Path(runs_dir)
    for path in json_files(d):
        name = path.relative_to(d).as_posix()
        try:
            runs.extend(_read_one(path))
        except ValueError as err:
            problems.append((name, str(err)[:300]))
        except Exception as err:  # anything else a hostile file provokes stays with that file
            problems.append((name, f"could not be read ({type(err).__name__})"))
    if reference_dir:
        try:
            ref, ref_problems = load_reference(reference_dir)
        except Exception as err:
            ref, ref_problems = [], [("(folder)", f"could not be read ({type(err).__name__})")]
        seen = {r["run_id"] for r in runs}
        runs += [{**r, "kind": "study"} for r in ref if r["run_id"] not in seen]
        problems += [(f"{Path(reference_dir).name}/{name}", reason) for name, reason in ref_problems]
    ids: dict[str, int] = {}
    unique = []
    for r in runs:  # the same record copied into two folders is one run
        if r["run_id"] in ids:
            continue
        ids[r["run_id"]] = 1
        unique.append(r)
    return unique, problems


def summary_files(folder: str | Path | None) -> list[Path]:
    """`make bench-*`'s batch summaries below `folder`: <runs>/bench/<batch>/summary.json."""
    found = walk(folder, lambda f: f == "summary.json", skip=SKIP_DIRS - {"bench"})
    return [p for p in found if p.parent.parent.name == "bench"]


def unmeasured_cells(folder: str | Path | None) -> tuple[list[dict], list[tuple[str, str]]]:
    """The cells each bench batch planned but did not measure, from its summary.json: `skipped` (the plan
    left it out, with the bench's reason; `refused` where the script refuses that strategy for the model) or
    `failed` (launched, no finished run). Returns (cells, [(file, reason)]) like load_folder."""
    cells, problems = [], []
    d = Path(folder) if folder else None
    for path in summary_files(d):
        name = path.relative_to(d).as_posix()
        try:
            if file_size(path) > MAX_FILE_BYTES:
                raise ValueError("too large for a bench summary")
            summary = json.loads(path.read_text(encoding="utf-8"))
            batch, profile = summary.get("batch"), summary.get("profile")
            for c in summary.get("cells") or []:
                finished = c.get("finished")
                if "skipped" in c:
                    reason = str(c["skipped"])
                    what = "refused" if "refuse" in reason else "skipped"
                elif finished == 0:
                    what, reason = (
                        "failed",
                        "no finished launch (" + ", ".join(map(str, c.get("statuses") or [])) + ")",
                    )
                else:
                    continue
                cells.append(
                    {
                        "bench_batch": str(batch),
                        "profile": str(profile),
                        "model": str(c["model"]),
                        "setup": str(c["setup"]),
                        "strategy": str(c.get("strategy")),
                        "devices": int(c.get("devices") or c.get("procs") or 1),
                        "global_batch": c.get("global_batch"),
                        "what": what,
                        "reason": reason[:300],
                    }
                )
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
            why = (
                str(err)
                if str(err).startswith(("not a regular", "unreadable", "too large"))
                else type(err).__name__
            )
            problems.append((name, f"not a bench summary ({why})"))
    return cells, problems


def folder_signature(*folders) -> tuple:
    """(name, mtime, size) of every JSON file: the cache key of the loader and the live-refresh trigger."""
    sig = []
    for folder in folders:
        for e in json_files(folder) + summary_files(folder):
            try:
                st = e.stat()
            except OSError:  # removed between listing and stat (a temp file being renamed)
                continue
            sig.append((str(e), st.st_mtime_ns, st.st_size))
    return tuple(sig)

"""Finding and reading the dashboard's run files: our records and the study's files, one bad file never
hiding the good ones.

Every *.json below the runs folder (subfolders too, capped in depth and size) is read as one of our run
records (`shared.record`), else as one of the study's files (converted by `board.reference`); a file that is
neither is one line in the notice. No Streamlit, torch or accelerate here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from board.reference import convert, is_study_format, load_reference
from shared.record import read_record

MAX_FILE_BYTES = 16 * 2**20  # a run record is ~0.1-1 MB; anything far larger is not one
MAX_DEPTH = 8  # folders below the runs folder that are searched
# checkpoints, bench logs/summaries, tracker output and `make project`'s profiling runs (mixed batch sizes)
SKIP_DIRS = {"checkpoints", "bench", ".git", "profiles", "trackers"}
PROJECTION_PREFIX = "projection-"  # `make project`'s records: the Projection tab (board/projection.py)
SKIP_NAMES = {"progress.json", "summary.json", "state.json"}


def walk(folder: str | Path | None, keep) -> list[Path]:
    """Every file below `folder` (subfolders too, MAX_DEPTH deep, without checkpoint and bench folders) whose
    name `keep(name)` accepts."""
    d = Path(folder) if folder else None
    if not d or not d.is_dir():
        return []
    out = []
    for root, dirs, files in os.walk(d):
        depth = len(Path(root).relative_to(d).parts)
        dirs[:] = sorted(
            x for x in dirs if x not in SKIP_DIRS and not x.startswith(".") and depth < MAX_DEPTH
        )
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


def _read_one(path: Path) -> list[dict]:
    """One file as runs (ours, or the study's format); ValueError with a one-line reason, never a path."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ValueError(f"unreadable ({e.strerror})") from None
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


def folder_signature(*folders) -> tuple:
    """(name, mtime, size) of every JSON file: the cache key of the loader and the live-refresh trigger."""
    sig = []
    for folder in folders:
        for e in json_files(folder):
            try:
                st = e.stat()
            except OSError:  # removed between listing and stat (a temp file being renamed)
                continue
            sig.append((str(e), st.st_mtime_ns, st.st_size))
    return tuple(sig)

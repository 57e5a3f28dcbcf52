"""Run records: one JSON file per run, written atomically by the main process, validated by a schema.

This module imports neither torch nor accelerate, so the dashboard can read records on any laptop.

Writing: the first write links a fully written temp file to `<run_id>.json` (`os.link` fails if the name
exists, so no run ever overwrites another); later writes go temp file -> fsync -> `os.replace`. A writer
killed at any instant leaves either the previous complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("run_schema.json")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
STATUSES = ("running", "finished", "failed", "interrupted")
HEARTBEAT_S = (
    30  # a running record is rewritten at least this often; the dashboard calls it crashed when stale
)


REPO = Path(__file__).resolve().parent.parent


class RecordWriteError(OSError):
    """The record could not be written (disk full, permissions): reported as one line by the scripts."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_run_id(model: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{model}-{stamp}-{secrets.token_hex(3)}"


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(directory: Path, payload: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return tmp


def write_new(path: Path, obj: dict):
    """Create `path` atomically; FileExistsError if it already exists."""
    payload = json.dumps(obj, indent=1, allow_nan=False).encode()
    try:
        tmp = _write_temp(path.parent, payload)
    except OSError as e:
        raise RecordWriteError(e.errno, f"cannot write run record {path}: {e.strerror or e}") from None
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)


def write_replace(path: Path, obj: dict):
    payload = json.dumps(obj, indent=1, allow_nan=False).encode()
    try:
        tmp = _write_temp(path.parent, payload)
    except OSError as e:
        raise RecordWriteError(e.errno, f"cannot write run record {path}: {e.strerror or e}") from None
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def finite(obj):
    """JSON has no NaN/inf: store them as strings so a diverged run still has a valid record."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class RunRecord:
    """The record of one run. Only the main process creates one; every method rewrites the file atomically."""

    def __init__(self, runs_dir: str | os.PathLike, body: dict):
        self.lock = threading.RLock()  # the heartbeat thread saves too
        self._beat = None
        self.dir = Path(runs_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordWriteError(e.errno, f"cannot create runs_dir {self.dir}: {e.strerror or e}") from None
        t = now_iso()
        self.data = {
            "schema_version": SCHEMA_VERSION,
            "run_id": None,
            "status": "running",
            "started_at": t,
            "updated_at": t,
            "ended_at": None,
            "error": None,
            **body,
            "history": [],
            "test": {},
            "timing": {**body.get("timing", {}), "total_s": None},
            "events": [],
        }
        for _ in range(5):
            run_id = new_run_id(body["model"])
            self.path = self.dir / f"{run_id}.json"
            self.data["run_id"] = run_id
            try:
                write_new(self.path, self.data)
                return
            except FileExistsError:
                continue
        raise RuntimeError(f"could not find a free run id in {self.dir}")

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @classmethod
    def reopen(cls, path: str | os.PathLike, *, epoch: int, **event) -> RunRecord:
        """Continue an unfinished record: status back to `running`, history rows of epochs >= `epoch` (which
        will be trained again) dropped, and a `resumed` event."""
        self = cls.__new__(cls)
        self.lock, self._beat = threading.RLock(), None
        self.path = Path(path)
        self.dir = self.path.parent
        self.data = read_record(self.path)
        previous = self.data["status"]
        self.data["history"] = [r for r in self.data["history"] if r.get("epoch", 0) < epoch]
        self.data.update(status="running", ended_at=None, error=None)
        self.event("resumed", previous_status=previous, epoch=epoch, **event)
        return self

    def save(self):
        with self.lock:
            self.data["updated_at"] = now_iso()
            write_replace(self.path, finite(self.data))

    def log_epoch(self, row: dict):
        with self.lock:
            self.data["history"].append(row)
            self.save()

    def event(self, kind: str, **fields):
        with self.lock:
            self.data["events"].append({"at": now_iso(), "kind": kind, **fields})
            self.save()

    def end(self, status: str, total_s: float | None = None, error: str | None = None, **extra):
        assert status in STATUSES[1:]
        self.stop_heartbeat()
        with self.lock:
            self.data.update(status=status, ended_at=now_iso(), error=error, **extra)
            if total_s is not None:
                self.data["timing"]["total_s"] = total_s
            self.save()

    def start_heartbeat(self, interval: float = HEARTBEAT_S):
        """Rewrite the record (updated_at) every `interval` s from a daemon thread while the run is alive, so a
        killed run is recognisable by its stale heartbeat even in a long epoch."""
        self.data["heartbeat_interval_s"] = interval
        stop = threading.Event()

        def beat():
            while not stop.wait(interval):
                try:
                    self.save()
                except OSError:
                    pass  # the main thread's next write reports it

        self._beat = stop
        threading.Thread(target=beat, daemon=True, name="record-heartbeat").start()

    def stop_heartbeat(self):
        if self._beat is not None:
            self._beat.set()
            self._beat = None


# ----------------------------------------------------------------------------- reading


_TYPES = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int,
          "boolean": bool, "null": type(None)}  # fmt: skip
_warned = []


def _validate_plain(record: dict, schema: dict) -> list[str]:
    """Without jsonschema (a GPU machine's bare image): the schema's required top-level fields and their
    types only, said once on stderr."""
    if not _warned:
        _warned.append(1)
        print("note: jsonschema is not installed: run records are checked for their required fields and types "
              "only", file=sys.stderr)  # fmt: skip
    errors = [
        f"(top level): '{k}' is a required property" for k in schema.get("required", []) if k not in record
    ]
    for key, spec in schema.get("properties", {}).items():
        kinds = spec.get("type")
        if key not in record or kinds is None:
            continue
        kinds = kinds if isinstance(kinds, list) else [kinds]
        value = record[key]
        ok = any(isinstance(value, _TYPES[k]) and not (k in ("number", "integer") and isinstance(value, bool))
                 for k in kinds if k in _TYPES)  # fmt: skip
        if not ok:
            errors.append(f"{key}: {value!r:.40} is not of type {', '.join(kinds)}")
    return errors


def validate(record: dict) -> list[str]:
    """Return schema violations as short strings (empty list = valid)."""
    schema = json.loads(SCHEMA_PATH.read_text())
    try:
        import jsonschema
    except ImportError:
        return _validate_plain(record, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = []
    for e in sorted(validator.iter_errors(record), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        errors.append(f"{where}: {e.message}")
    return errors


def read_record(path: str | os.PathLike) -> dict:
    """Read and validate one record; raises ValueError with a one-line reason."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable: {e}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(record, dict):
        raise ValueError("not a run record (top level is not an object)")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"unsupported schema_version {record.get('schema_version')!r} (expected {SCHEMA_VERSION})"
        )
    problems = validate(record)
    if problems:
        raise ValueError(f"does not match the run schema: {problems[0]}")
    if not RUN_ID_RE.match(record["run_id"]) or f"{record['run_id']}.json" != path.name:
        raise ValueError(f"run_id {record['run_id']!r} does not match the file name")
    return record


def record_files(runs_dir: str | os.PathLike) -> list[Path]:
    """The run records in `runs_dir` (not recursive), sorted: its *.json files but the hidden ones, which are
    records being written (write_replace's .tmp-*.json; pathlib's glob matches hidden names)."""
    return [p for p in sorted(Path(runs_dir).glob("*.json")) if not p.name.startswith(".")]


def load_runs(runs_dir: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
    """All valid records in `runs_dir` (not recursive) and a list of (file name, reason) for the rest."""
    runs, problems = [], []
    d = Path(runs_dir)
    if not d.is_dir():
        return runs, problems
    for path in record_files(d):
        try:
            runs.append(read_record(path))
        except ValueError as e:
            problems.append((path.name, str(e)))
    return runs, problems


# ----------------------------------------------------------------------------- what a record says about its run


def git_commit() -> str | None:
    """HEAD of the repository, with "-dirty" when tracked files differ from it (such records are not reported)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        if sha.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def file_sha256(path: str | os.PathLike) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def environment(script: str | os.PathLike | None = None) -> dict:
    """Versions, host and code of this run. torch and accelerate are imported here, not at module level:
    the dashboard reads records without them."""
    import torch
    from accelerate import __version__ as accelerate_version

    from shared.host import STATE as HOST

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate_version,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
        "script_sha256": file_sha256(script) if script else None,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "malloc": HOST["allocator"],
        # PyTorch's defaults, kept: fp32 matmuls stay fp32, cuDNN convolutions may use TF32 (on Ampere+)
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }


def device_name(device) -> str:
    """The GPU's name, or the CPU model and its core count."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def num_machines() -> int:
    """Hosts in this launch: torchrun exports GROUP_WORLD_SIZE (the number of node groups) to every worker."""
    env = os.environ
    if "GROUP_WORLD_SIZE" in env:
        return int(env["GROUP_WORLD_SIZE"])
    world = int(env.get("WORLD_SIZE", "1"))
    return max(1, world // max(1, int(env.get("LOCAL_WORLD_SIZE", world))))

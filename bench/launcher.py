"""How bench/ and tests/ start a training script, in one place: Accelerate's own `accelerate launch` command
line (we write no launcher of our own), a free rendezvous port, the child's environment, a process group of its
own with a timeout, and a script loaded as a module.

    from bench import launcher
    cmd = launcher.command("mlp", ["--epochs", 1], config="cpu_2proc")
    rc = launcher.run_group(cmd, timeout=600)

The command is the `accelerate` console script beside this Python (what a user types), or, where there is
none (a GPU machine's own python3 has the module, not always the script), `python -m
accelerate.commands.launch`, the same entry point.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("accelerate")
ACCELERATE_LAUNCH = (
    [str(_SCRIPT), "launch"] if _SCRIPT.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
)
# set by a launcher for its workers: a child launched from inside a worker must not inherit them
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port free on this host now, for one launch's rendezvous (`--main_process_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def builtin_scripts() -> list[str]:
    """The models of scripts/, by name (a script dropped there is one of them)."""
    return sorted(p.stem for p in (REPO / "scripts").glob("*.py"))


def script_path(script: str | Path) -> Path:
    """A name of scripts/ ("mlp") or a path to any script."""
    p = Path(script)
    return p if p.suffix == ".py" else REPO / "scripts" / f"{script}.py"


def config_path(config: str | Path) -> Path:
    """A name of accelerate_configs/ ("cpu_2proc") or a path to any Accelerate config file."""
    p = Path(config)
    return p if p.suffix in (".yaml", ".yml") else REPO / "accelerate_configs" / f"{config}.yaml"


def command(
    script: str | Path,
    args=(),
    *,
    config: str | Path | None = None,
    num_processes: int | None = None,
    port: int | None = None,
    threads: int | None = None,
    wrapper=(),
) -> list[str]:
    """`accelerate launch --config_file <config> [--num_processes N] --main_process_port P
    [--num_cpu_threads_per_process T] [wrapper...] <script> args`, or `python [wrapper...] <script> args` with no
    config. A port is chosen when none is given, so launches may overlap; `wrapper`: a script run in front of
    the training script (tests/inject_nan.py)."""
    tail = [*map(str, wrapper), str(script_path(script)), *map(str, args)]
    if config is None:
        return [sys.executable, *tail]
    return [
        *ACCELERATE_LAUNCH,
        "--config_file",
        str(config_path(config)),
        *(["--num_processes", str(num_processes)] if num_processes else []),
        "--main_process_port",
        str(port or free_port()),
        *(["--num_cpu_threads_per_process", str(threads)] if threads else []),
        *tail,
    ]


def child_env(threads: int | None = 1, **extra) -> dict:
    """This environment without a launcher's rendezvous variables, offline for the hub, unbuffered, and one
    thread per process (`threads`; None leaves it): predictable on a shared machine, and one process is one core
    like one device."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(cmd: list[str], **popen) -> subprocess.Popen:
    """`cmd` from the repository root in a process group of its own (see stop)."""
    return subprocess.Popen(cmd, cwd=popen.pop("cwd", REPO), start_new_session=True, **popen)


def stop(child: subprocess.Popen, grace_s: float = 0.0, sig: int = signal.SIGINT) -> None:
    """End a child started by `start` and everything it started (`accelerate launch` and its workers): `sig`
    first with `grace_s` to finish (a run records itself as interrupted), then SIGKILL to the whole group (the
    leader may be gone and its workers not)."""
    try:
        if grace_s:
            os.killpg(child.pid, sig)
            child.wait(timeout=grace_s)
    except (KeyboardInterrupt, subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def run_group(cmd: list[str], timeout: float | None = None, grace_s: float = 20, **popen) -> int:
    """Run `cmd` to its end as a process group of its own, so that a timeout or a Ctrl-C reaches every process it
    started, never the parent alone, which would leave the rest running. Ctrl-C is passed on once, with
    `grace_s` to end, then the group is killed; the exception is raised again."""
    child = start(cmd, **popen)
    try:
        return child.wait(timeout=timeout)
    except BaseException as e:
        stop(child, grace_s if isinstance(e, KeyboardInterrupt) else 0.0)
        raise


def run(cmd: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` capturing its text output, like subprocess.run, but in a process group of its own: a timeout
    kills the launcher's workers too, and raises subprocess.TimeoutExpired with the output so far."""
    child = start(cmd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(child)
        out, err = child.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    except BaseException:
        stop(child)
        raise
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)


def load_script(script: str | Path, name: str | None = None) -> ModuleType:
    """A script (a name of scripts/ or any path) imported as a module, without running its main: its Config,
    METRICS, build_model and the rest, for tests and for bench/speed.py."""
    path = script_path(script)
    spec = importlib.util.spec_from_file_location(name or f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""`make new-model NAME=x [DEST=path/x.py]`: a new training script from templates/model.py, then its smoke test.

The template is mlp.py's skeleton (an MLP on MNIST) with its config, data, model and metric marked as the parts
to replace; it runs as it is. The new script goes to scripts/<NAME>.py (or DEST, anywhere), never over an
existing file; the smoke test trains it for 3 steps on 1 and on 2 processes, launched as a user would.

    python -m bench.new_model --name my_model [--dest ~/work/my_model.py] [--data_dir data] [--no_smoke]
"""

from __future__ import annotations

import argparse
import keyword
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import launcher

REPO = launcher.REPO
SMOKE = ["--max_steps", 3, "--limit_train", 96, "--limit_eval", 32, "--batch_size", 16, "--eval_batch_size", 16,
         "--epochs", 1, "--warmup_steps", 1, "--progress", "false"]  # fmt: skip
SETUPS = {"1 process": None, "2 processes (DDP)": "cpu_2proc"}


def create(name: str, dest: Path) -> None:
    """The template with its name filled in, written whole or not at all; an existing file is left alone."""
    text = (REPO / "templates" / "model.py").read_text().replace("NAME", name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.write_text(text)
    try:
        os.link(tmp, dest)  # fails if dest exists: never overwritten, even by a race
    finally:
        tmp.unlink()


def smoke(script: Path, data_dir: str) -> int:
    """3 steps on 1 and on 2 processes; the first failure's last lines and exit 1."""
    with tempfile.TemporaryDirectory(prefix="new-model-") as runs:
        for label, config in SETUPS.items():
            cmd = launcher.command(
                script, ["--data_dir", data_dir, "--runs_dir", runs, *SMOKE], config=config, threads=1
            )
            try:
                proc = launcher.run(cmd, timeout=600)
            except subprocess.TimeoutExpired:
                print(f"smoke {label}: timed out after 600 s", file=sys.stderr)
                return 1
            if proc.returncode:
                tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
                print(f"smoke {label}: failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
                return 1
            print(f"smoke {label}: ok", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="the model's name: a Python identifier, e.g. my_model")
    ap.add_argument("--dest", default="", help="where to write it (default scripts/<name>.py)")
    ap.add_argument("--data_dir", default=os.environ.get("DISTBENCH_DATA_DIR", "data"))
    ap.add_argument("--no_smoke", action="store_true", help="write the script only")
    args = ap.parse_args(argv)
    if not args.name.isidentifier() or keyword.iskeyword(args.name):
        print(
            f"error: NAME={args.name!r}: give a Python identifier (letters, digits, _), e.g. my_model",
            file=sys.stderr,
        )
        return 2
    dest = Path(args.dest).expanduser() if args.dest else REPO / "scripts" / f"{args.name}.py"
    if dest.suffix != ".py":
        print(f"error: DEST={dest}: a script's path ends in .py", file=sys.stderr)
        return 2
    try:
        create(args.name, dest)
    except FileExistsError:
        print(f"error: {dest} exists: not overwritten (pick another NAME or DEST)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {dest}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {dest}: replace the parts marked '# YOUR' (config, data, model, metric)")
    return 0 if args.no_smoke else smoke(dest, args.data_dir)


if __name__ == "__main__":
    sys.exit(main())

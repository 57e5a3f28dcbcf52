"""`make new-model NAME=x [DEST=path/x.py]`: a new training script from scripts/mlp.py, then its smoke test.

The template is scripts/mlp.py itself (an MLP on MNIST), its docstring replaced and its config, data, model and
metric marked as the parts to replace; it runs as it is. The new script goes to scripts/<NAME>.py (or DEST, anywhere), never over an
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


DOC = '''"""__NAME__: your model, from the project's template (an MLP on MNIST until you replace the marked parts).

Made by `make new-model NAME=__NAME__` from scripts/mlp.py. It runs as it is, so the smoke test passes before you
change anything; then replace the four parts marked `# YOUR ...` (config, data, model, metric) and keep the
rest: the skeleton (Config, METRICS, SPLIT_POINTS, UNSUPPORTED, build_model, train_one_epoch, evaluate, main)
is what lets `make bench-all MODELS=path/to/__NAME__.py`, `make project PROJECT_ARGS="--script path/to/__NAME__.py"`,
`make report` and the dashboard take it like the built-in models (docs/scripts.md, "Your own model").

Launch (same script everywhere; hardware lives in accelerate_configs/):
    python __NAME__.py --data_dir data
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml __NAME__.py --data_dir data
"""

'''
# the parts to replace, each marked above the line of scripts/mlp.py it starts at
MARKS = {
    "@dataclass\nclass Config(RunConfig):": "# YOUR CONFIG: the hyper-parameters of your recipe; the shared knobs (strategy, precision, limits,\n"
    "# ...) come from RunConfig. `batch_size` is the global batch; make project profiles at its default.\n",
    "METRICS = {": "# YOUR METRIC: what the run records; one entry is the primary metric (goal \"max\" or \"min\")\n",
    "def preprocess(": "# YOUR DATA: load_mnist returns a shared.data.Data of tensors (train / val / test dicts); build yours\n"
    "# with shared.data.Data.from_splits (scripts/transformer_lm.py's load_english is a worked example), and\n"
    "# say in inputs() how a batch becomes (input, target)\n",
    "def build_model(": "# YOUR MODEL: an nn.Module; an nn.Sequential (SPLIT_POINTS naming its pieces) also runs model_split\n"
    "# and the pipelines. Any loss: change F.cross_entropy below and in main() together.\n",
}  # fmt: skip


def template(name: str) -> str:
    """scripts/mlp.py as a new script named `name`: its docstring replaced, the parts to replace marked."""
    mlp = (REPO / "scripts" / "mlp.py").read_text()
    body = mlp[mlp.index('"""', 3) + 4 :].lstrip("\n")
    for anchor, mark in MARKS.items():
        if body.count(anchor) != 1:
            raise RuntimeError(
                f"scripts/mlp.py changed: no single {anchor!r} to mark (bench/new_model.py MARKS)"
            )
        body = body.replace(anchor, mark + anchor)
    body = body.replace('Session(Config, "mlp", METRICS', 'Session(Config, "__NAME__", METRICS')
    return (DOC + body).replace("__NAME__", name)


def create(name: str, dest: Path) -> None:
    """The template with its name filled in, written whole or not at all; an existing file is left alone."""
    text = template(name)
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

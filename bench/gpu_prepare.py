"""`make gpu-check-prepare`: what must travel to a borrowed GPU machine for `make gpu-check`, built here.

Only the checkout travels, plus up to 64 MiB of ignored paths named in the device tool's `carry`. This fills
`data/` in the checkout (ignored by git) with MNIST, IMDB and Multi30k from --data_dir (CIFAR-10's 170 MB does not
fit: the check uses CIFAR-shaped synthetic data for CNN and VGG11, labelled so), checks that every module the
check imports is either on the GPU image (torch, accelerate, torchvision, numpy, pyyaml, safetensors, sacrebleu,
tqdm, pandas) or not needed there (jsonschema, datasets, streamlit, plotly: the check never imports them), and
prints the carry list and the one command to run.

    python -m bench.gpu_prepare --data_dir DATA_DIR
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRIED = ["mnist", "imdb", "multi30k"]
LIMIT = 64 * 2**20
COMMAND = "python3 -m bench.gpu_check --data_dir data --out $OUT"


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--dest", default=str(REPO / "data"))
    args = ap.parse_args(argv)
    src, dest = Path(args.data_dir).resolve(), Path(args.dest).resolve()
    missing = [d for d in CARRIED if not (src / d).is_dir()]
    if missing:
        print(f"error: no {', '.join(missing)} under --data_dir {args.data_dir} (make data)", file=sys.stderr)
        return 2
    if src != dest:
        dest.mkdir(parents=True, exist_ok=True)
        for d in CARRIED:
            shutil.copytree(src / d, dest / d, dirs_exist_ok=True)
    total = sum(size(dest / d) for d in CARRIED)
    extra = [p.name for p in dest.iterdir() if p.name not in CARRIED] if dest.is_dir() else []
    if total > LIMIT:
        print(f"error: data/ holds {total / 2**20:.1f} MiB of {', '.join(CARRIED)}, over the 64 MiB that travels",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"data/: {', '.join(CARRIED)}, {total / 2**20:.1f} MiB (CIFAR-10 stays here: the check uses synthetic "
          "CIFAR-shaped data, labelled so)")  # fmt: skip
    if extra:
        print(f"note: data/ also holds {', '.join(extra)}: carry only the three folders above")
    print("wheels: none needed (the check imports nothing the GPU image lacks)")
    print(f"carry: {['data/' + d for d in CARRIED]}")
    print(f"command (timeout_s 480): {COMMAND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

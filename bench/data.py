"""`make data`: the four datasets in DATA_DIR, each verified with the loaders' own readers; a missing one is
downloaded from the Hugging Face hub first (the loaders' fetch functions, written in the same local layout).

    python -m bench.data --data_dir data                      # all four
    python -m bench.data --data_dir data --only mnist imdb

One line per dataset: `mnist: present in DIR/mnist (4 files, 60,000 train / 10,000 test) OK`. A file that
does not read back or holds the wrong number of rows is one line naming it; a dataset that is missing while
the hub cannot be used (HF_HUB_OFFLINE, or no answer within seconds: checked once) is one line saying how to
provide it. Either way the exit status is 2, as for the bench's own data check. Files already there are never
replaced or deleted: a partial copy is reported, not downloaded over.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shared.data import DataError, fetch_cifar10_from_hub, fetch_mnist_from_hub, read_cifar10, read_idx
from shared.datasets import DATASETS, hub_unreachable, missing_files
from shared.text import fetch_imdb_from_hub, fetch_multi30k_from_hub, read_jsonl_gz, read_lines_gz

# rows per file of the complete datasets (docs/data.md; ../shared/data/README.md), as (split, rows)
ROWS = {
    "mnist": {f"{p}-{k}-ubyte.gz": (s, n) for p, s, n in (("train", "train", 60000), ("t10k", "test", 10000))
              for k in ("images-idx3", "labels-idx1")},
    "cifar10": {f"train_{k}.npz": ("train", 10000) for k in range(5)} | {"test.npz": ("test", 10000)},
    "imdb": {"train.jsonl.gz": ("train", 25000), "test.jsonl.gz": ("test", 25000)},
    "multi30k": {f"{stem}.{lang}.gz": (split, n) for stem, split, n in
                 (("train", "train", 29000), ("val", "val", 1014), ("test_2016_flickr", "test", 1000))
                 for lang in ("de", "en")},
}  # fmt: skip
FETCH = {
    "mnist": fetch_mnist_from_hub,
    "cifar10": fetch_cifar10_from_hub,
    "imdb": fetch_imdb_from_hub,
    "multi30k": fetch_multi30k_from_hub,
}
PAIRED = {"mnist": 2, "multi30k": 2}  # images + labels, de + en: each file of a split holds all its rows
UNIT = {"multi30k": " sentence pairs", "imdb": " reviews", "mnist": " images", "cifar10": " images"}


def rows(name: str, path: Path) -> int:
    """Rows of one file, read with the loader's reader (which raises a DataError naming a damaged file)."""
    if name == "mnist":
        return len(read_idx(path))
    if name == "cifar10":
        return len(read_cifar10(path.parent, [path.name])[1])
    if name == "imdb":
        return len(read_jsonl_gz(path)[1])
    return len(read_lines_gz(path))


def verify(name: str, directory: Path) -> str:
    """'4 files, 60,000 train / 10,000 test images', or a DataError naming the first file that is wrong."""
    total = {}
    for file, (split, expected) in ROWS[name].items():
        n = rows(name, directory / file)
        if n != expected:
            raise DataError(
                f"{directory / file}: {n:,} rows, expected {expected:,}; the file is truncated or not the full set"
            )
        total[split] = total.get(split, 0) + n
    counts = " / ".join(f"{n // PAIRED.get(name, 1):,} {split}" for split, n in total.items())
    return f"{len(ROWS[name])} files, {counts}{UNIT[name]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", default=os.environ.get("DISTBENCH_DATA_DIR", "data"))
    ap.add_argument("--only", nargs="+", choices=list(DATASETS), default=list(DATASETS), metavar="NAME",
                    help=f"some of: {', '.join(DATASETS)}")  # fmt: skip
    args = ap.parse_args(argv)
    root = Path(args.data_dir)
    missing = {name: files for name in args.only if (files := missing_files(root, name))}
    why = hub_unreachable(timeout=3.0) if any(len(f) == len(ROWS[n]) for n, f in missing.items()) else None
    ok = True
    for name in args.only:
        directory, hub = root / name, DATASETS[name][1]
        files = missing.get(name, [])
        try:
            if files and len(files) < len(ROWS[name]):
                raise DataError(
                    f"partial copy in {directory}/ (missing {', '.join(files)}); not downloading over the files "
                    f"that are there: complete it, or move them away and run again"
                )
            if files and why:
                raise DataError(
                    f"missing in {directory}/ and cannot be downloaded: the Hugging Face hub ({hub}) cannot be "
                    f"used ({why}); copy the files there (docs/data.md) or point DATA_DIR / --data_dir at a "
                    f"folder that holds {name}/"
                )
            if files:
                print(f"{name}: downloading {hub} into {directory}/ ...", flush=True)
                FETCH[name](directory)
            print(
                f"{name}: {'downloaded' if files else 'present'} in {directory} ({verify(name, directory)}) OK"
            )
        except DataError as e:
            print(f"{name}: {e}", file=sys.stderr)
            ok = False
        except Exception as e:  # noqa: BLE001 - a failed download is one line, the other datasets go on
            print(f"{name}: download from {hub} failed ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)
            ok = False
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())

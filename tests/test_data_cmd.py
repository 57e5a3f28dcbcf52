"""`make data` (bench/data.py): the real copies verify OK; with no data and no hub it ends in seconds with one
line per dataset; a damaged file is one line naming it and is left as it was; a hub download is written in the
layout the same verification accepts (the hub itself is replaced by in-memory datasets with its schema)."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from bench import launcher
from shared.data import read_idx, write_idx
from shared.datasets import DATASETS
from tests.conftest import REPO, child_env, explain, require_dataset

SCRIPT = REPO / "bench" / "data.py"


def load_cmd():
    """bench/data.py as a module (it is a script, not in a package)."""
    return launcher.load_script(SCRIPT, "bench_data")


def data_cmd(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=child_env(**env), timeout=120,
    )  # fmt: skip


def writable_copy(name: str, dest):
    shutil.copytree(require_dataset(name) / name, dest / name)
    for p in (dest / name).iterdir():
        os.chmod(p, 0o644)
    os.chmod(dest / name, 0o755)
    return dest / name


def test_the_real_copies_verify_ok():
    root = [require_dataset(name) for name in DATASETS][0]
    proc = data_cmd("--data_dir", root)
    assert proc.returncode == 0 and not proc.stderr.strip(), explain(proc)
    assert proc.stdout.splitlines() == [
        f"mnist: present in {root}/mnist (4 files, 60,000 train / 10,000 test images) OK",
        f"cifar10: present in {root}/cifar10 (6 files, 50,000 train / 10,000 test images) OK",
        f"imdb: present in {root}/imdb (2 files, 25,000 train / 25,000 test reviews) OK",
        f"multi30k: present in {root}/multi30k (6 files, 29,000 train / 1,014 val / 1,000 test sentence pairs) OK",
    ]


def test_no_data_and_no_hub_is_one_line_per_dataset_within_seconds(tmp_path):
    t0 = time.perf_counter()
    proc = data_cmd("--data_dir", tmp_path, HF_HUB_OFFLINE="1")
    took = time.perf_counter() - t0
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and took < 10, explain(proc)
    assert [ln.split(":")[0] for ln in lines] == list(DATASETS), explain(proc)
    assert all("cannot be downloaded" in ln and "HF_HUB_OFFLINE is set" in ln for ln in lines)
    assert not list(tmp_path.iterdir()), "folders were created"


@pytest.mark.parametrize("damage", ["truncated", "short"])
def test_a_damaged_file_is_named_and_left_alone(damage, tmp_path):
    """truncated: the gzip stream ends early; short: a valid file holding 59,999 of the 60,000 labels."""
    path = writable_copy("mnist", tmp_path) / "train-labels-idx1-ubyte.gz"
    if damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        write_idx(path, read_idx(path)[:-1])
    before = path.read_bytes()
    proc = data_cmd("--data_dir", tmp_path, "--only", "mnist")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"mnist: {path}: "), explain(proc)
    assert path.read_bytes() == before and len(list(path.parent.iterdir())) == 4


def test_a_partial_copy_is_not_downloaded_over(tmp_path):
    folder = writable_copy("mnist", tmp_path)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    proc = data_cmd("--data_dir", tmp_path, "--only", "mnist", HF_HUB_OFFLINE="1")
    assert proc.returncode == 2 and "partial copy" in proc.stderr and "t10k-labels" in proc.stderr, explain(
        proc
    )
    assert len(list(folder.iterdir())) == 3


def fake_hub() -> dict:
    """Tiny DatasetDicts with the hub's schema for mnist (image, label) and imdb (text, label; plus its
    unlabelled split), as datasets.load_dataset returns them."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    rng = np.random.default_rng(0)
    digits = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    mnist = DatasetDict({
        split: Dataset.from_dict(
            {"image": list(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), "label": list(range(n))}, digits
        )
        for split, n in (("train", 6), ("test", 3))
    })  # fmt: skip
    reviews = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    imdb = DatasetDict({
        split: Dataset.from_dict({"text": [f"{split} review {i} <br /> \u2028ok" for i in range(n)],
                                  "label": [i % 2 if split != "unsupervised" else -1 for i in range(n)]}, reviews)
        for split, n in (("train", 4), ("test", 5), ("unsupervised", 2))
    })  # fmt: skip
    return {"ylecun/mnist": mnist, "stanfordnlp/imdb": imdb}


@pytest.mark.parametrize("name", ["mnist", "imdb"])
def test_a_download_is_written_in_the_layout_verify_accepts(name, tmp_path, monkeypatch, capsys):
    import datasets

    cmd = load_cmd()
    hub = fake_hub()
    sizes = {split: len(ds) for split, ds in hub[DATASETS[name][1]].items()}
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, *a, **k: hub[hub_id])
    monkeypatch.setattr(cmd, "hub_unreachable", lambda timeout=None: None)
    monkeypatch.setitem(cmd.ROWS, name, {f: (s, sizes[s]) for f, (s, _) in cmd.ROWS[name].items()})

    assert cmd.main(["--data_dir", str(tmp_path), "--only", name]) == 0
    out = capsys.readouterr()
    counts = f"{sizes['train']} train / {sizes['test']} test"
    assert out.out.splitlines()[-1].startswith(f"{name}: downloaded in {tmp_path / name} ("), out
    assert counts in out.out and not out.err, out
    if name == "mnist":  # the pixels read back as they were
        images = read_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz")
        assert (images == np.stack([np.asarray(im) for im in hub["ylecun/mnist"]["test"]["image"]])).all()


def test_the_counts_cover_the_files_the_loaders_read():
    cmd = load_cmd()
    assert {name: set(rows) for name, rows in cmd.ROWS.items()} == {
        n: set(f) for n, (f, _) in DATASETS.items()
    }

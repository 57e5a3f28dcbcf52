"""CIFAR-10, IMDB and Multi30k loaders: real splits, limits, synthetic shapes, damaged files, hub conversion,
the tokenizers, the vocabulary and the padding collates."""

import gzip
import re

import numpy as np
import pytest
import torch

from shared.config import RunConfig
from shared.data import CIFAR10_CLASSES, DataError, load_cifar10, make_loader, random_split
from shared.text import (
    Vocab,
    basic_english,
    load_imdb,
    load_multi30k,
    pad_collate,
    pad_pair_collate,
    read_jsonl_gz,
    word_punct,
)
from tests.conftest import DATA_DIR as DATA  # noqa: E402
from tests.conftest import require_dataset  # noqa: E402

LOADERS = {"cifar10": load_cifar10, "imdb": load_imdb, "multi30k": load_multi30k}


def cfg(**kw) -> RunConfig:
    return RunConfig(**{"data_dir": str(DATA), "data": "local", **kw})


def need(name):
    require_dataset(name)


def load_real(name, **kw):
    need(name)
    return LOADERS[name](cfg(**kw))


@pytest.fixture(scope="module")
def cifar10():
    return load_real("cifar10")


@pytest.fixture(scope="module")
def imdb():
    return load_real("imdb")


@pytest.fixture(scope="module")
def multi30k():
    return load_real("multi30k")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(
        same(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True)
    )


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "name, sizes",
    [("cifar10", (45000, 5000, 10000)), ("imdb", (18750, 6250, 25000)), ("multi30k", (29000, 1014, 1000))],
)
def test_real_split_sizes(name, sizes, request):
    data = request.getfixturevalue(name)
    assert data.source == "local" and data.location == str(DATA / name)
    expected = dict(zip(("train", "val", "test"), sizes, strict=True))
    assert data.splits == expected
    assert data.provenance()["used"] == expected


@pytest.mark.parametrize("name", ["cifar10", "imdb", "multi30k"])
def test_second_load_is_identical_and_limits_take_a_prefix(name, request, tmp_path):
    if name == "imdb":  # a second full IMDB load (tokenising 50k reviews) costs ~5 s: use every 10th review
        need(name)
        (tmp_path / "imdb").mkdir()
        for f in ("train.jsonl.gz", "test.jsonl.gz"):
            with gzip.open(DATA / "imdb" / f, "rb") as src, gzip.open(tmp_path / "imdb" / f, "wb") as dst:
                dst.writelines(src.readlines()[::10])
        full = load_imdb(cfg(data_dir=str(tmp_path)))
        small = load_imdb(cfg(data_dir=str(tmp_path), limit_train=100, limit_eval=30))
        assert full.splits == {"train": 1875, "val": 625, "test": 2500}
    else:
        full = request.getfixturevalue(name)
        small = load_real(name, limit_train=100, limit_eval=30)
    assert small.splits == full.splits
    assert small.provenance()["used"] == {"train": 100, "val": 30, "test": 30}
    for split, n in (("train", 100), ("val", 30), ("test", 30)):
        for key, value in getattr(small, split).items():
            assert same(value, getattr(full, split)[key][:n]), (split, key)


def test_cifar10_content(cifar10):
    assert cifar10.train["x"].shape == (45000, 3, 32, 32) and cifar10.train["x"].dtype == torch.uint8
    assert cifar10.train["y"].dtype == torch.int64 and cifar10.info["classes"] == CIFAR10_CLASSES
    train_val = torch.cat([cifar10.train["y"], cifar10.val["y"]])
    assert train_val.bincount().tolist() == [5000] * 10
    assert cifar10.test["y"].bincount().tolist() == [1000] * 10
    test_mean = cifar10.test["x"].sum((0, 2, 3), dtype=torch.int64).double() / (10000 * 32 * 32)
    assert torch.allclose(
        test_mean, torch.tensor([126.0246, 123.7085, 114.8543], dtype=torch.float64), atol=1e-3
    )


def test_imdb_content(imdb):
    vocab = imdb.info["vocab"]
    # The tutorial reports 21,635: its 75/25 split (HF train_test_split) differs from ours (SPLIT_SEED).
    assert len(vocab) == imdb.info["vocab_size"] == 21550
    assert vocab.itos[:4] == ["<unk>", "<pad>", "the", "."]
    assert (imdb.info["unk_index"], imdb.info["pad_index"]) == (0, 1)
    assert max(len(x) for x in imdb.train["ids"]) == 256 and min(len(x) for x in imdb.test["ids"]) > 0
    assert imdb.test["y"].bincount().tolist() == [12500, 12500]
    assert imdb.train["ids"][0].dtype == torch.int64 and imdb.train["y"].dtype == torch.int64
    # The first test review: "Once again Mr. Costner has dragged out a movie ..."
    assert vocab.decode(imdb.test["ids"][0][:6]) == ["once", "again", "mr", ".", "costner", "has"]


def test_imdb_full_train_vocabulary_matches_the_study():
    """The study built its vocabulary from all 25k train reviews and got 24,897 tokens: same tokenizer,
    truncation and ordering rules give the same count."""
    need("imdb")
    texts, _ = read_jsonl_gz(DATA / "imdb" / "train.jsonl.gz")
    vocab = Vocab.build((basic_english(t)[:256] for t in texts), min_freq=5, specials=["<unk>", "<pad>"])
    assert len(vocab) == 24897


def test_multi30k_content(multi30k):
    src_vocab, trg_vocab = multi30k.info["src_vocab"], multi30k.info["trg_vocab"]
    # The tutorial (spaCy tokenizers) reports de 7,853 and en 5,893.
    assert (len(src_vocab), len(trg_vocab)) == (7882, 5898)
    assert multi30k.info["src_vocab_size"] == 7882 and multi30k.info["trg_vocab_size"] == 5898
    assert src_vocab.itos[:4] == trg_vocab.itos[:4] == ["<unk>", "<pad>", "<sos>", "<eos>"]
    assert multi30k.info["src_pad_index"] == multi30k.info["trg_pad_index"] == 1
    src, trg = multi30k.train["src"][0], multi30k.train["trg"][0]
    assert src_vocab.decode(src[:5]) == ["<sos>", "zwei", "junge", "weiße", "männer"]
    assert trg_vocab.decode(trg) == [
        "<sos>",
        *word_punct("Two young, White males are outside near many bushes."),
        "<eos>",
    ]
    assert multi30k.train["trg_text"][0] == "two young, white males are outside near many bushes."
    for split in (multi30k.train, multi30k.val, multi30k.test):
        assert all(s[0] == 2 and s[-1] == 3 for s in split["src"] + split["trg"])


# ----------------------------------------------------------------------------- synthetic and missing data


@pytest.mark.parametrize("name", ["cifar10", "imdb", "multi30k"])
def test_synthetic_has_the_real_shapes(name, tmp_path):
    data = LOADERS[name](cfg(data="synthetic", data_dir=str(tmp_path), limit_train=64, limit_eval=16))
    assert data.source == "synthetic" and data.provenance()["synthetic"]
    assert data.provenance()["used"] == {"train": 64, "val": 16, "test": 16}
    assert not any(tmp_path.iterdir())
    if (
        name != "cifar10"
    ):  # same seeded generator as CIFAR-10, whose 180 MB of random bytes are slow to redraw
        again = LOADERS[name](cfg(data="synthetic", data_dir=str(tmp_path), limit_train=64, limit_eval=16))
        for split in ("train", "val", "test"):
            for key, value in getattr(data, split).items():
                assert same(value, getattr(again, split)[key]), (split, key)
    if name == "cifar10":
        assert data.splits == {"train": 45000, "val": 5000, "test": 10000}
        assert data.train["x"].shape == (64, 3, 32, 32) and data.train["x"].dtype == torch.uint8
        assert data.train["y"].max() < 10
    elif name == "imdb":
        assert data.splits == {"train": 18750, "val": 6250, "test": 25000}
        assert data.info["vocab_size"] == 21635
        ids = data.train["ids"]
        assert all(10 <= len(x) <= 256 and x.dtype == torch.int64 for x in ids)
        assert min(x.min() for x in ids) >= 2 and max(x.max() for x in ids) < 21635
    else:
        assert data.splits == {"train": 29000, "val": 1014, "test": 1000}
        assert (data.info["src_vocab_size"], data.info["trg_vocab_size"]) == (7853, 5893)
        assert all(s[0] == 2 and s[-1] == 3 for s in data.train["src"] + data.train["trg"])
        assert isinstance(data.train["trg_text"][0], str)


@pytest.mark.parametrize("name", ["cifar10", "imdb", "multi30k"])
def test_local_with_empty_dir_names_data_dir(name, tmp_path):
    with pytest.raises(DataError, match="--data_dir"):
        LOADERS[name](cfg(data_dir=str(tmp_path)))


@pytest.mark.parametrize("name", ["cifar10", "imdb", "multi30k"])
def test_auto_offline_with_empty_dir_says_why(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE.*--data synthetic"):
        LOADERS[name](cfg(data="auto", data_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "name, bad, damage",
    [
        ("cifar10", "train_0.npz", "truncate"),
        ("cifar10", "train_0.npz", "corrupt"),
        ("imdb", "train.jsonl.gz", "truncate"),
        ("imdb", "train.jsonl.gz", "corrupt"),
        ("multi30k", "val.en.gz", "truncate"),
    ],
)
def test_damaged_file_is_named(name, bad, damage, tmp_path):
    need(name)
    dst = tmp_path / name
    dst.mkdir()
    for f in (DATA / name).iterdir():
        if f.name != bad:
            (dst / f.name).symlink_to(f.resolve())
    raw = (DATA / name / bad).read_bytes()
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:  # overwrite bytes in the middle of the compressed stream
        raw = raw[:5000] + bytes(2000) + raw[7000:]
    (dst / bad).write_bytes(raw)
    with pytest.raises(DataError, match=re.escape(str(dst / bad)) + ": cannot read .*truncated or corrupt"):
        LOADERS[name](cfg(data_dir=str(tmp_path)))


def test_jsonl_bad_line_and_npz_missing_array_are_named(tmp_path):
    (tmp_path / "imdb").mkdir()
    with gzip.open(tmp_path / "imdb" / "train.jsonl.gz", "wt") as f:
        f.write('{"text": "fine", "label": 1}\n{"text": "no label"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl\.gz: line 2 "):
        read_jsonl_gz(tmp_path / "imdb" / "train.jsonl.gz")
    (tmp_path / "cifar10").mkdir()
    for name in [f"train_{k}.npz" for k in range(5)] + ["test.npz"]:
        np.savez_compressed(tmp_path / "cifar10" / name, x=np.zeros(3))
    with pytest.raises(DataError, match=r"train_0\.npz: missing array\(s\) images, labels, classes"):
        load_cifar10(cfg(data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- hub -> local layout


def fake_hub(monkeypatch, hub_id, splits):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    fake = datasets.DatasetDict(splits(datasets))

    def load_dataset(name, *args, **kwargs):
        assert name == hub_id
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_cifar10_hub_is_written_in_the_local_layout(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {
        "train": rng.integers(0, 256, (10, 32, 32, 3), np.uint8),
        "test": rng.integers(0, 256, (4, 32, 32, 3), np.uint8),
    }
    labels = {"train": list(range(10)), "test": [3, 1, 4, 1]}

    def splits(ds):
        features = ds.Features({"img": ds.Image(), "label": ds.ClassLabel(names=CIFAR10_CLASSES)})
        return {
            s: ds.Dataset.from_dict(
                {"img": [Image.fromarray(a) for a in images[s]], "label": labels[s]}, features=features
            )
            for s in images
        }

    fake_hub(monkeypatch, "uoft-cs/cifar10", splits)
    hub = load_cifar10(cfg(data="hub", data_dir=str(tmp_path)))
    assert hub.source == "hub" and hub.location == "uoft-cs/cifar10"
    written = sorted(p.name for p in (tmp_path / "cifar10").iterdir())
    assert written == sorted([f"train_{k}.npz" for k in range(5)] + ["test.npz"])
    local = load_cifar10(cfg(data="auto", data_dir=str(tmp_path)))
    assert local.source == "local" and local.splits == {"train": 9, "val": 1, "test": 4}
    train_idx, val_idx = random_split(10, 9)
    assert torch.equal(local.train["x"], torch.from_numpy(images["train"]).permute(0, 3, 1, 2)[train_idx])
    assert torch.equal(local.val["y"], torch.tensor(labels["train"])[val_idx])
    assert torch.equal(local.test["x"], torch.from_numpy(images["test"]).permute(0, 3, 1, 2))
    assert local.info["classes"] == CIFAR10_CLASSES
    assert all(same(hub.test[k], local.test[k]) for k in hub.test)


def test_imdb_hub_is_written_in_the_local_layout(tmp_path, monkeypatch):
    rows = {
        "train": (
            [
                "A great film!",
                "Bad.<br />Very bad.",
                "Great, great acting.",
                "It's bad",
                "fine (great)",
                'Really "bad"',
                "great\u2028fun",
                "bad; boring: bad",
            ],
            [1, 0, 1, 0, 1, 0, 1, 0],
        ),
        "test": (["great", "bad bad", "unseen words", "so great"], [1, 0, 0, 1]),
    }

    def splits(ds):
        return {s: ds.Dataset.from_dict({"text": t, "label": y}) for s, (t, y) in rows.items()}

    fake_hub(monkeypatch, "stanfordnlp/imdb", splits)
    hub = load_imdb(cfg(data="hub", data_dir=str(tmp_path)), min_freq=1)
    assert hub.source == "hub" and hub.splits == {"train": 6, "val": 2, "test": 4}
    assert sorted(p.name for p in (tmp_path / "imdb").iterdir()) == ["test.jsonl.gz", "train.jsonl.gz"]
    assert read_jsonl_gz(tmp_path / "imdb" / "train.jsonl.gz") == rows["train"]
    local = load_imdb(cfg(data_dir=str(tmp_path)), min_freq=1)
    assert local.source == "local" and local.info["vocab"].itos == hub.info["vocab"].itos
    for split in ("train", "val", "test"):
        assert all(same(getattr(hub, split)[k], getattr(local, split)[k]) for k in ("ids", "y"))
    assert local.info["vocab"].decode(local.test["ids"][2]) == ["<unk>", "<unk>"]


def test_multi30k_hub_is_written_in_the_local_layout(tmp_path, monkeypatch):
    pairs = {
        "train": {
            "en": ["A dog runs.", "A cat sits.", "Two dogs run."],
            "de": ["Ein Hund rennt.", "Eine Katze sitzt.", "Zwei Hunde rennen."],
        },
        "validation": {"en": ["A dog sits.", "A Cat."], "de": ["Ein Hund sitzt.", "Eine Katze."]},
        "test": {"en": ["Two cats.", "A bird!"], "de": ["Zwei Katzen.", "Ein Vogel!"]},
    }

    def splits(ds):
        return {s: ds.Dataset.from_dict(p) for s, p in pairs.items()}

    fake_hub(monkeypatch, "bentrevett/multi30k", splits)
    hub = load_multi30k(cfg(data="hub", data_dir=str(tmp_path)))
    assert hub.source == "hub" and hub.splits == {"train": 3, "val": 2, "test": 2}
    written = sorted(p.name for p in (tmp_path / "multi30k").iterdir())
    assert written == sorted(
        f"{s}.{lang}.gz" for s in ("train", "val", "test_2016_flickr") for lang in ("de", "en")
    )
    with gzip.open(tmp_path / "multi30k" / "val.de.gz", "rt", encoding="utf-8") as f:
        assert f.read() == "Ein Hund sitzt.\nEine Katze.\n"
    local = load_multi30k(cfg(data_dir=str(tmp_path)))
    assert local.source == "local" and local.val["trg_text"] == ["a dog sits.", "a cat."]
    trg_vocab = local.info["trg_vocab"]
    assert trg_vocab.itos == ["<unk>", "<pad>", "<sos>", "<eos>", ".", "a"]  # min_freq 2: "." x3, "a" x2
    assert trg_vocab.decode(local.test["trg"][1]) == ["<sos>", "a", "<unk>", "<unk>", "<eos>"]
    for split in ("train", "val", "test"):
        assert all(same(getattr(hub, split)[k], getattr(local, split)[k]) for k in ("src", "trg", "trg_text"))


# ----------------------------------------------------------------------------- tokenizers, vocabulary, collates

TORCHTEXT_PATTERNS = [  # torchtext/data/utils.py, as regexes applied in order
    (r"\'", " '  "),
    (r"\"", ""),
    (r"\.", " . "),
    (r"<br \/>", " "),
    (r",", " , "),
    (r"\(", " ( "),
    (r"\)", " ) "),
    (r"\!", " ! "),
    (r"\?", " ? "),
    (r"\;", " "),
    (r"\:", " "),
    (r"\s+", " "),
]


def torchtext_basic_english(line):
    line = line.lower()
    for pattern, replacement in TORCHTEXT_PATTERNS:
        line = re.sub(pattern, replacement, line)
    return line.split()


@pytest.mark.parametrize(
    "text, tokens",
    [
        (
            "You can now install TorchText using pip!",
            ["you", "can", "now", "install", "torchtext", "using", "pip", "!"],
        ),
        ("It's GREAT.<br /><br />Really", ["it", "'", "s", "great", ".", "really"]),
        ('He said "no" (twice); then: left?', ["he", "said", "no", "(", "twice", ")", "then", "left", "?"]),
        ("a,b...c\t\nd", ["a", ",", "b", ".", ".", ".", "c", "d"]),
        ("  ", []),
    ],
)
def test_basic_english(text, tokens):
    assert basic_english(text) == tokens == torchtext_basic_english(text)


def test_basic_english_matches_torchtext_regexes_on_real_reviews():
    need("imdb")
    texts, _ = read_jsonl_gz(DATA / "imdb" / "test.jsonl.gz")
    for text in texts[::50]:
        assert basic_english(text) == torchtext_basic_english(text)


def test_word_punct():
    assert word_punct("Ein Mann, der 2 Äpfel isst.") == ["ein", "mann", ",", "der", "2", "äpfel", "isst", "."]
    assert word_punct("don't stop-now!") == ["don", "'", "t", "stop", "-", "now", "!"]


def test_vocab_min_freq_order_and_unknowns():
    lists = [["b", "a", "c", "<pad>"], ["a", "b", "d"], ["c", "e", "a"]]
    vocab = Vocab.build(lists, min_freq=2, specials=["<unk>", "<pad>"])
    # specials first; then by count (a 3, b 2, c 2), ties lexicographic; d, e below min_freq; "<pad>" not counted
    assert vocab.itos == ["<unk>", "<pad>", "a", "b", "c"] and len(vocab) == 5
    assert vocab.stoi == {"<unk>": 0, "<pad>": 1, "a": 2, "b": 3, "c": 4}
    assert vocab.unk == 0 and vocab.encode(["c", "d", "a"]) == [4, 0, 2]
    assert vocab["zzz"] == 0 and "a" in vocab and "d" not in vocab
    assert len(Vocab.build(lists, min_freq=1, specials=["<unk>"])) == 1 + 6
    strict = Vocab.build(lists, min_freq=3)
    assert strict.itos == ["a"] and strict.unk is None
    with pytest.raises(KeyError):
        strict.encode(["b"])


def test_pad_collate_through_make_loader():
    split = {
        "ids": [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])],
        "y": torch.tensor([1, 0, 1]),
    }
    batch = next(iter(make_loader(split, 3, shuffle=False, seed=0, collate_fn=pad_collate(1))))
    assert torch.equal(batch["ids"], torch.tensor([[5, 6, 7], [8, 1, 1], [9, 10, 1]]))
    assert batch["lengths"].tolist() == [3, 1, 2] and batch["y"].tolist() == [1, 0, 1]
    assert batch["ids"].dtype == batch["lengths"].dtype == batch["y"].dtype == torch.int64


def test_pad_pair_collate():
    rows = [
        {"src": torch.tensor([2, 5, 3]), "trg": torch.tensor([2, 7, 8, 9, 3]), "trg_text": "one"},
        {"src": torch.tensor([2, 6, 6, 6, 3]), "trg": torch.tensor([2, 3]), "trg_text": "two"},
    ]
    batch = pad_pair_collate(1, 0)(rows)
    assert torch.equal(batch["src"], torch.tensor([[2, 5, 3, 1, 1], [2, 6, 6, 6, 3]]))
    assert torch.equal(batch["trg"], torch.tensor([[2, 7, 8, 9, 3], [2, 3, 0, 0, 0]]))
    assert batch["src_lengths"].tolist() == [3, 5] and batch["trg_lengths"].tolist() == [5, 2]
    assert batch["trg_text"] == ["one", "two"]

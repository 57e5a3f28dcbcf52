"""Text datasets (IMDB, Multi30k) with the tokenizers and vocabularies of the original tutorials, sans torchtext.

Same resolution as shared/data.py: `--data_dir` folder, else the Hugging Face hub (converted into the local
layout), else, only when asked, synthetic token ids of realistic lengths. Sequences are lists of 1-D int64
tensors of varying length; `pad_collate` / `pad_pair_collate` pad them per batch (batch first).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from shared.data import SPLIT_SEED, Data, DataError, random_split, resolve
from shared.datasets import DATASETS

__all__ = ["basic_english", "Vocab", "load_imdb", "load_multi30k", "pad_collate", "pad_pair_collate"]

# ----------------------------------------------------------------------------- tokenizers and vocabulary

# torchtext's `basic_english` (torchtext/data/utils.py, _basic_english_normalize): lowercase, then these
# replacements in order, then split on whitespace. Every pattern but the last is a literal string, so
# str.replace gives the same result as torchtext's re.sub, several times faster.
_BASIC_ENGLISH = [
    ("'", " '  "),
    ('"', ""),
    (".", " . "),
    ("<br />", " "),
    (",", " , "),
    ("(", " ( "),
    (")", " ) "),
    ("!", " ! "),
    ("?", " ? "),
    (";", " "),
    (":", " "),
]


def basic_english(text: str) -> list[str]:
    """torchtext.data.get_tokenizer("basic_english"), token for token."""
    text = text.lower()
    for old, new in _BASIC_ENGLISH:
        text = text.replace(old, new)
    return text.split()  # torchtext's final r"\s+" -> " " followed by split()


_WORD_OR_PUNCT = re.compile(r"\w+|[^\w\s]")


def word_punct(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: our stand-in for the tutorial's spaCy tokenizers.

    Differs from spaCy on contractions ("don't" -> don ' t, spaCy: do n't) and abbreviations ("st." -> st .).
    """
    return _WORD_OR_PUNCT.findall(text.lower())


class Vocab:
    """Token <-> index. Order as torchtext's build_vocab_from_iterator: the specials first (in the order
    given), then tokens by descending frequency, ties broken lexicographically (Python string order).
    Unknown tokens map to `unk` (the index of "<unk>"); without "<unk>", encoding one raises KeyError."""

    def __init__(self, itos: list[str], unk_token: str = "<unk>"):
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("Vocab: duplicate tokens in itos")
        self.unk = self.stoi.get(unk_token)

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_freq: int = 1, specials: list[str] = ()) -> Vocab:
        counts = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        for s in specials:
            counts.pop(s, None)
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(list(specials) + ranked)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        i = self.stoi.get(token, self.unk)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary and it has no <unk>")
        return i

    def encode(self, tokens: list[str]) -> list[int]:
        if self.unk is None:
            return [self[t] for t in tokens]
        get, unk = self.stoi.get, self.unk
        return [get(t, unk) for t in tokens]

    def decode(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in ids]


def _to_tensors(id_lists: list[list[int]]) -> list[torch.Tensor]:
    """One int64 tensor per sequence, as views of a single buffer (one allocation instead of one per row)."""
    lengths = [len(ids) for ids in id_lists]
    flat = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=sum(lengths))
    return list(torch.split(torch.from_numpy(flat), lengths))


def _synthetic_ids(g, n: int, lengths: tuple[int, int], vocab_size: int, first: int, wrap=None):
    """n random id tensors, lengths uniform in [low, high], ids in [first, vocab_size), each between
    wrap = (sos, eos) when given. Shapes for smoke tests only."""
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=g) + (2 if wrap else 0)
    flat = torch.randint(first, vocab_size, (int(sizes.sum()),), generator=g)
    if wrap:
        ends = sizes.cumsum(0)
        flat[ends - sizes], flat[ends - 1] = wrap
    return list(torch.split(flat, sizes.tolist()))


def _read_gz_text(path: Path) -> str:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise DataError(f"{path}: cannot read ({why}); the file is truncated or corrupt") from None


def read_lines_gz(path: Path) -> list[str]:
    """The lines of a gzipped UTF-8 file, split on "\\n" only (str.splitlines also splits on U+0085, U+2028,
    which occur inside IMDB reviews)."""
    text = _read_gz_text(path)
    return text.removesuffix("\n").split("\n") if text else []


def _write_gz_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".part")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- IMDB

IMDB_FILES, IMDB_HUB = DATASETS["imdb"]
IMDB_SPECIALS = ["<unk>", "<pad>"]
IMDB_TUTORIAL_VOCAB = 21635  # the size of the synthetic vocabulary


def read_jsonl_gz(path: Path) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels of a gzipped JSON Lines file with at least the fields `text` and `label`."""
    texts, labels = [], []
    for n, line in enumerate(read_lines_gz(path), 1):
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path}: line {n} is not a JSON object with text and label ({type(e).__name__})"
            ) from None
        if label not in (0, 1) or not isinstance(text, str):
            raise DataError(f"{path}: line {n} has label {label!r} (expected 0 or 1) or a non-string text")
        texts.append(text)
        labels.append(label)
    return texts, labels


def fetch_imdb_from_hub(directory: Path):
    """Write the hub copy in the local layout. The hub has no file ids or star ratings: id is the row index
    and rating is null."""
    from datasets import load_dataset  # heavy import, only on this path

    ds = load_dataset(IMDB_HUB)
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = (
            json.dumps({"id": i, "rating": None, "label": int(label), "text": text}, ensure_ascii=False)
            for i, (text, label) in enumerate(zip(ds[split]["text"], ds[split]["label"], strict=True))
        )
        _write_gz_text(directory / f"{split}.jsonl.gz", "".join(r + "\n" for r in rows))


def load_imdb(cfg, max_length: int = 256, min_freq: int = 5, valid_ratio: float = 0.25) -> Data:
    """IMDB reviews as token ids (basic_english, first `max_length` tokens) and int64 labels (0 neg, 1 pos).

    25k train split 18,750 / 6,250 (split seed), test 25,000; the vocabulary comes from the 18,750 only.
    Splits: {"ids": list of 1-D int64 tensors, "y": (N,) int64}.
    """
    source, directory = resolve(cfg, "imdb", IMDB_FILES, fetch_imdb_from_hub, IMDB_HUB)
    if source == "synthetic":
        g = torch.Generator().manual_seed(SPLIT_SEED)
        n_sp = len(IMDB_SPECIALS)
        vocab = Vocab(IMDB_SPECIALS + [f"w{i}" for i in range(IMDB_TUTORIAL_VOCAB - n_sp)])
        train_ids = _synthetic_ids(g, 25000, (10, max_length), len(vocab), n_sp)
        test_ids = _synthetic_ids(g, 25000, (10, max_length), len(vocab), n_sp)
        y_train = torch.randint(0, 2, (25000,), generator=g)
        y_test = torch.randint(0, 2, (25000,), generator=g)
        location = "synthetic:imdb-shapes"
    else:
        train_texts, train_labels = read_jsonl_gz(directory / "train.jsonl.gz")
        test_texts, test_labels = read_jsonl_gz(directory / "test.jsonl.gz")
        train_tokens = [basic_english(t)[:max_length] for t in train_texts]
        test_tokens = [basic_english(t)[:max_length] for t in test_texts]
        y_train, y_test = torch.tensor(train_labels), torch.tensor(test_labels)
        location = str(directory) if source == "local" else IMDB_HUB
    n_train = int(round(len(y_train) * (1 - valid_ratio)))
    train_idx, val_idx = random_split(len(y_train), n_train)
    train_idx, val_idx = train_idx.tolist(), val_idx.tolist()
    if source != "synthetic":
        vocab = Vocab.build((train_tokens[i] for i in train_idx), min_freq=min_freq, specials=IMDB_SPECIALS)
        train_ids = _to_tensors([vocab.encode(t) for t in train_tokens])
        test_ids = _to_tensors([vocab.encode(t) for t in test_tokens])
    train = {"ids": [train_ids[i] for i in train_idx], "y": y_train[train_idx]}
    val = {"ids": [train_ids[i] for i in val_idx], "y": y_train[val_idx]}
    test = {"ids": test_ids, "y": y_test}
    return Data.from_splits(
        cfg,
        "imdb",
        source,
        location,
        train,
        val,
        test,
        info={
            "vocab": vocab,
            "vocab_size": len(vocab),
            "pad_index": vocab.stoi["<pad>"],
            "unk_index": vocab.unk,
            "classes": ["neg", "pos"],
        },
    )


def pad_collate(pad_index: int):
    """collate_fn for rows {"ids": 1-D tensor, "y": scalar} -> {"ids": (B, T) padded batch first,
    "lengths": (B,), "y": (B,)}, all int64."""

    def collate(rows: list[dict]) -> dict:
        ids = [r["ids"] for r in rows]
        return {
            "ids": pad_sequence(ids, batch_first=True, padding_value=pad_index),
            "lengths": torch.tensor([len(x) for x in ids], dtype=torch.long),
            "y": torch.stack([torch.as_tensor(r["y"]) for r in rows]).long(),
        }

    return collate


# ----------------------------------------------------------------------------- Multi30k

MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}  # ours -> file stem
MULTI30K_FILES, MULTI30K_HUB = DATASETS["multi30k"]
MULTI30K_SPECIALS = ["<unk>", "<pad>", "<sos>", "<eos>"]
MULTI30K_TUTORIAL_VOCAB = {"de": 7853, "en": 5893}  # the sizes of the synthetic vocabularies


def fetch_multi30k_from_hub(directory: Path):
    from datasets import load_dataset  # heavy import, only on this path

    ds = load_dataset(MULTI30K_HUB)
    directory.mkdir(parents=True, exist_ok=True)
    for split, stem in (("train", "train"), ("validation", "val"), ("test", "test_2016_flickr")):
        for lang in ("de", "en"):
            lines = [" ".join(s.split("\n")) for s in ds[split][lang]]  # keep de/en line i aligned
            _write_gz_text(directory / f"{stem}.{lang}.gz", "".join(s + "\n" for s in lines))


def load_multi30k(cfg, min_freq: int = 2) -> Data:
    """Multi30k German -> English: 29,000 / 1,014 / 1,000 sentence pairs as <sos> ... <eos> token ids.

    Tokens: `word_punct` (lower-cased words and punctuation marks), not the tutorial's spaCy tokenizers.
    Vocabularies per language from train with `min_freq`. Splits: {"src": de ids, "trg": en ids (lists of
    1-D int64 tensors), "trg_text": the lower-cased English sentence, the reference for BLEU}.
    """
    source, directory = resolve(cfg, "multi30k", MULTI30K_FILES, fetch_multi30k_from_hub, MULTI30K_HUB)
    if source == "synthetic":
        g = torch.Generator().manual_seed(SPLIT_SEED)
        n_sp = len(MULTI30K_SPECIALS)
        src_vocab = Vocab(MULTI30K_SPECIALS + [f"de{i}" for i in range(MULTI30K_TUTORIAL_VOCAB["de"] - n_sp)])
        trg_vocab = Vocab(MULTI30K_SPECIALS + [f"en{i}" for i in range(MULTI30K_TUTORIAL_VOCAB["en"] - n_sp)])
        wrap = MULTI30K_SPECIALS.index("<sos>"), MULTI30K_SPECIALS.index("<eos>")
        splits_ = {}
        for split, n in (("train", 29000), ("val", 1014), ("test", 1000)):
            trg = _synthetic_ids(g, n, (4, 30), len(trg_vocab), n_sp, wrap)
            splits_[split] = {
                "src": _synthetic_ids(g, n, (4, 30), len(src_vocab), n_sp, wrap),
                "trg": trg,
                "trg_text": [" ".join(trg_vocab.decode(t[1:-1].tolist())) for t in trg],
            }
        location = "synthetic:multi30k-shapes"
    else:
        pairs = {}
        for split, stem in MULTI30K_SPLITS.items():
            de, en = read_lines_gz(directory / f"{stem}.de.gz"), read_lines_gz(directory / f"{stem}.en.gz")
            if len(de) != len(en):
                raise DataError(
                    f"{directory}/{stem}.de.gz has {len(de)} lines but {stem}.en.gz has {len(en)}"
                )
            pairs[split] = (
                [["<sos>", *word_punct(s), "<eos>"] for s in de],
                [["<sos>", *word_punct(s), "<eos>"] for s in en],
                [s.lower() for s in en],
            )
        src_vocab = Vocab.build(pairs["train"][0], min_freq=min_freq, specials=MULTI30K_SPECIALS)
        trg_vocab = Vocab.build(pairs["train"][1], min_freq=min_freq, specials=MULTI30K_SPECIALS)
        splits_ = {
            split: {
                "src": _to_tensors([src_vocab.encode(t) for t in de]),
                "trg": _to_tensors([trg_vocab.encode(t) for t in en]),
                "trg_text": text,
            }
            for split, (de, en, text) in pairs.items()
        }
        location = str(directory) if source == "local" else MULTI30K_HUB
    train, val, test = splits_["train"], splits_["val"], splits_["test"]
    return Data.from_splits(
        cfg,
        "multi30k",
        source,
        location,
        train,
        val,
        test,
        info={
            "src_lang": "de",
            "trg_lang": "en",
            "src_vocab": src_vocab,
            "trg_vocab": trg_vocab,
            "src_vocab_size": len(src_vocab),
            "trg_vocab_size": len(trg_vocab),
            "src_pad_index": src_vocab.stoi["<pad>"],
            "trg_pad_index": trg_vocab.stoi["<pad>"],
            "sos_index": trg_vocab.stoi["<sos>"],
            "eos_index": trg_vocab.stoi["<eos>"],
        },
    )


def pad_pair_collate(src_pad: int, trg_pad: int):
    """collate_fn for rows {"src", "trg", "trg_text"}: {"src": (B, S), "src_lengths": (B,), "trg": (B, T),
    "trg_lengths": (B,), "trg_text": list of B strings}, padded batch first."""

    def collate(rows: list[dict]) -> dict:
        src, trg = [r["src"] for r in rows], [r["trg"] for r in rows]
        batch = {
            "src": pad_sequence(src, batch_first=True, padding_value=src_pad),
            "src_lengths": torch.tensor([len(s) for s in src], dtype=torch.long),
            "trg": pad_sequence(trg, batch_first=True, padding_value=trg_pad),
            "trg_lengths": torch.tensor([len(t) for t in trg], dtype=torch.long),
        }
        if "trg_text" in rows[0]:
            batch["trg_text"] = [r["trg_text"] for r in rows]
        return batch

    return collate

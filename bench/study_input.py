"""The study's input pipelines, timed on this machine: seconds per training batch of each tutorial's own loader.

The study's one-GPU steps on a T4 were mostly its input pipeline: torchvision datasets decoding each image
into PIL and transforming it in the training process (num_workers 0, as the tutorials), and Hugging Face
datasets formatting each review or sentence pair as torch tensors, then padding. Our scripts keep their data
as tensors, so their own fetch time says nothing about the study's. This rebuilds each tutorial's training
loader (../shared/reference/TUTORIALS.md: transforms, batch per process) over the real data in --data_dir and
times its batches, one thread, on this host (the study's hosts, Colab's and Kaggle's, were 2-vCPU Xeon VMs:
bench/gpu_validation.py measures how much slower, per pipeline, from the study's evaluation loops). It feeds the study revisited (bench/gpu_validation.py) as the one-device step's input part.

    python -m bench.study_input --data_dir DATA_DIR [--batches 12] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from shared.config import UserError
from shared.data import read_cifar10, read_idx
from shared.text import basic_english, read_jsonl_gz, read_lines_gz

BATCH = {"mlp": 512, "conv_autoencoder": 64, "cnn": 64, "vgg11": 32, "nbow": 512, "seq2seq": 512}


class Images(Dataset):
    """torchvision's MNIST / CIFAR10 __getitem__: the uint8 array as a PIL image, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, mode: str | None):
        self.images, self.labels, self.transform, self.mode = images, labels, transform, mode

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i], mode=self.mode)), int(self.labels[i])


def image_loader(model: str, data: Path) -> DataLoader:
    if model in ("mlp", "conv_autoencoder"):
        images = read_idx(data / "mnist/train-images-idx3-ubyte.gz")
        labels = read_idx(data / "mnist/train-labels-idx1-ubyte.gz")
        if model == "mlp":  # bentrevett 1_mlp
            tf = T.Compose([T.RandomRotation(5, fill=(0,)), T.RandomCrop(28, padding=2), T.ToTensor(),
                            T.Normalize(mean=[0.1307], std=[0.3081])])  # fmt: skip
        else:  # udacity convolutional autoencoder: ToTensor only
            tf = T.ToTensor()
        return DataLoader(Images(images, labels, tf, "L"), batch_size=BATCH[model], shuffle=True)
    images, labels, _ = read_cifar10(data / "cifar10", [f"train_{k}.npz" for k in range(5)])
    if model == "cnn":  # udacity cifar10_cnn_solution
        tf = T.Compose([T.RandomHorizontalFlip(), T.RandomRotation(10), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])  # fmt: skip
    else:  # bentrevett 4_vgg: resized to 224 with ImageNet statistics
        tf = T.Compose([T.Resize(224), T.RandomRotation(5), T.RandomHorizontalFlip(0.5),
                        T.RandomCrop(224, padding=10), T.ToTensor(),
                        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])  # fmt: skip
    return DataLoader(Images(images, labels, tf, "RGB"), batch_size=BATCH[model], shuffle=True)


def ids(tokens: list[str], vocab: dict) -> list[int]:
    return [vocab.setdefault(t, len(vocab)) for t in tokens]


def text_loader(model: str, data: Path) -> DataLoader:
    """bentrevett's NBoW and seq2seq notebooks: a Hugging Face dataset of token ids with_format("torch"),
    batched by a DataLoader whose collate_fn pads (pad_sequence)."""
    import datasets

    vocab: dict = {}
    if model == "nbow":
        texts, labels = read_jsonl_gz(data / "imdb/train.jsonl.gz")
        rows = {"ids": [ids(basic_english(t)[:256], vocab) for t in texts], "label": labels}
        fields = ["ids"]
    else:
        de, en = read_lines_gz(data / "multi30k/train.de.gz"), read_lines_gz(data / "multi30k/train.en.gz")
        wrap = lambda s: [0, *ids(basic_english(s), vocab), 1]  # noqa: E731 - <sos> ... <eos>
        rows = {"de_ids": [wrap(s) for s in de], "en_ids": [wrap(s) for s in en]}
        fields = ["de_ids", "en_ids"]
    ds = datasets.Dataset.from_dict(rows).with_format(type="torch", columns=list(rows))

    def collate(batch):
        out = {
            f: pad_sequence([b[f] for b in batch], padding_value=1, batch_first=model == "nbow")
            for f in fields
        }
        if model == "nbow":
            out["label"] = torch.stack([b["label"] for b in batch])
        return out

    return DataLoader(ds, batch_size=BATCH[model], shuffle=True, collate_fn=collate)


def time_batches(loader: DataLoader, batches: int) -> dict:
    """Seconds per batch: every batch after the first (the first pays for the iterator's start)."""
    it, times = iter(loader), []
    next(it)
    for _ in range(batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "batches": len(times),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--models", default=",".join(BATCH))
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = Path(args.data_dir)
    out = {}
    unknown = [m for m in args.models.split(",") if m not in BATCH]
    if unknown:
        print(f"error: --models {','.join(unknown)}: unknown; known: {', '.join(BATCH)}", file=sys.stderr)
        return 2
    for model in args.models.split(","):
        try:
            loader = text_loader(model, data) if model in ("nbow", "seq2seq") else image_loader(model, data)
        except (OSError, UserError) as e:  # no such dataset under --data_dir, or a damaged file
            print(f"error: {model}: {e} (--data_dir {args.data_dir}; make data)", file=sys.stderr)
            return 2
        out[model] = {"batch": BATCH[model], **time_batches(loader, args.batches)}
        print(f"{model}: {out[model]['median_s'] * 1e3:.1f} ms per batch of {BATCH[model]} "
              f"({out[model]['min_s'] * 1e3:.1f}-{out[model]['max_s'] * 1e3:.1f})", flush=True)  # fmt: skip
    if args.out:  # whole or not at all
        tmp = Path(f"{args.out}.part")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The four datasets: their folder under --data_dir, the files the loaders read, and their Hugging Face hub id.
Torch-free, so the bench runner can check them before it launches anything."""

from __future__ import annotations

import os
from pathlib import Path

DATASETS = {
    "mnist": (
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"],
        "ylecun/mnist",
    ),
    "cifar10": ([f"train_{k}.npz" for k in range(5)] + ["test.npz"], "uoft-cs/cifar10"),
    "imdb": (["train.jsonl.gz", "test.jsonl.gz"], "stanfordnlp/imdb"),
    "multi30k": (
        [f"{stem}.{lang}.gz" for stem in ("train", "val", "test_2016_flickr") for lang in ("de", "en")],
        "bentrevett/multi30k",
    ),
}  # fmt: skip
MODEL_DATA = {
    "mlp": "mnist",
    "conv_autoencoder": "mnist",
    "cnn": "cifar10",
    "vgg11": "cifar10",
    "nbow": "imdb",
    "seq2seq": "multi30k",
    "transformer_lm": "multi30k",  # its English side
}


def hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def missing_files(data_dir: str | os.PathLike, name: str) -> list[str]:
    files, _ = DATASETS[name]
    return [f for f in files if not (Path(data_dir) / name / f).is_file()]


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub cannot be used from here (None if it answers within `timeout` seconds)."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host} unreachable ({type(e).__name__})"

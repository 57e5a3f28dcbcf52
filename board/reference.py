"""Reader for the study's published result files (`reference/seed_results/*.json`), stdlib only.

Each file maps a scenario key (`model_MLP_epochs_10_2_GPUs_rank_0`, `vgg11_1_GPUs`, ...) to one rank's
per-epoch lists (`training_times`, `train_losses`, `train_accurcy` [sic], `validation_*`, `epoch_times`)
and test scalars (format: reference/README.md). `read_study_file` turns every scenario into one dict shaped
like our run records (`model`, `status`, `setup`, `data`, `config`, `metrics`, `primary_metric`, `history`
rows with our metric keys, `test`), so the dashboard handles both with the same code, plus a `reference`
block saying where it came from. What cannot be known from the files stays absent: no `samples_seen`,
throughput or memory, no dates.

Rank 0 stands for the run. The study never reduced per-rank metrics, so the other ranks' numbers differ;
they are kept in `reference["per_rank_test"]` and said in `reference["notes"]`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from shared.datasets import MODEL_DATA

MODEL_NAMES = {
    "MLP": "mlp",
    "ConvAutoencoder": "conv_autoencoder",
    "ConvolutionalAutoencoder": "conv_autoencoder",
    "CNN": "cnn",
    "vgg11": "vgg11",
    "NBoW": "nbow",
    "seq2seq": "seq2seq",
}
DATASETS = MODEL_DATA  # model -> dataset, as the scripts load them
# Batch size per process, from the study's notebooks (reference/README.md); the files do not carry it.
BATCH_PER_PROCESS = {"mlp": 512, "conv_autoencoder": 64, "cnn": 64, "vgg11": 32, "nbow": 512, "seq2seq": 512}
HARDWARE_1GPU, HARDWARE_2GPU = "Colab T4", "Kaggle T4 x2"
SOURCE = "published"  # data.source of every reference run (ours are local / hub / synthetic)

EPOCH_LISTS = {  # study key -> our history key
    "training_times": "time/train_s",
    "train_losses": "train/loss",
    "train_accurcy": "train/acc",
    "validation_times": "time/eval_s",
    "validation_losses": "val/loss",
    "validation_accurcy": "val/acc",
    "epoch_times": "time/epoch_s",
}
SCALARS = {"test_loss": "test/loss", "test_acc": "test/acc", "test_time": "test/time_s"}
ACC_KEYS = ("train/acc", "val/acc", "test/acc")
CLOCKS = {
    "time/train_s": "study: one epoch of training on this rank (no device synchronize documented)",
    "time/eval_s": "study: validation pass on this rank's own shard",
    "time/epoch_s": "study: training + validation + checkpoint save",
    "time/elapsed_s": "sum of time/epoch_s up to this epoch (derived here)",
}
KEY_RE = re.compile(
    r"^(?:model_)?(?P<model>[A-Za-z0-9]+?)(?:_epochs_(?P<epochs>\d+))?_(?P<gpus>\d+)_GPUs"
    r"(?P<split>_dev0_0_dev1_1)?(?:_rank_(?P<rank>\d+))?$"
)
FILE_RE = re.compile(r"^(?P<model>[A-Za-z0-9]+)[_-](?P<epochs>\d+)epochs?[_-](?P<gpus>\d+)gpu", re.IGNORECASE)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_study_format(obj) -> bool:
    """True when `obj` (parsed JSON) looks like a study result file rather than one of our run records."""
    return (
        isinstance(obj, dict)
        and bool(obj)
        and "schema_version" not in obj
        and all(isinstance(v, dict) and "training_times" in v for v in obj.values())
    )


def _check_entry(key: str, e) -> int:
    """Raise ValueError naming what is wrong with one scenario entry; return its number of epochs."""
    if not isinstance(e, dict):
        raise ValueError(f"entry {key!r} is not an object")
    missing = [k for k in ("world_size", "rank", *EPOCH_LISTS, *SCALARS) if k not in e]
    if missing:
        raise ValueError(f"entry {key!r} lacks {', '.join(missing)}")
    if not (
        isinstance(e["world_size"], int)
        and e["world_size"] >= 1
        and isinstance(e["rank"], int)
        and 0 <= e["rank"] < e["world_size"]
    ):
        raise ValueError(f"entry {key!r}: bad world_size/rank {e['world_size']!r}/{e['rank']!r}")
    lengths = set()
    for k in EPOCH_LISTS:
        if not isinstance(e[k], list) or not all(_number(v) for v in e[k]):
            raise ValueError(f"entry {key!r}: {k} is not a list of numbers")
        lengths.add(len(e[k]))
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"entry {key!r}: per-epoch lists are empty or of different lengths {sorted(lengths)}"
        )
    for k in SCALARS:
        if not _number(e[k]):
            raise ValueError(f"entry {key!r}: {k} is not a number")
    return lengths.pop()


def _model_of(key: str, file_model: str | None) -> str:
    m = KEY_RE.match(key)
    name = m.group("model") if m else None
    for candidate in (name, file_model):
        if candidate in MODEL_NAMES:
            return MODEL_NAMES[candidate]
    raise ValueError(f"entry {key!r}: unknown model (expected one of {', '.join(sorted(set(MODEL_NAMES)))})")


def _notes(entry: dict, strategy: str, hardware: str, measured_acc: bool) -> list[str]:
    """What a reader of the study's entry must know: where it ran, what its rank shows, what is missing."""
    ws = entry["world_size"]
    notes = [
        f"published by the study; hardware {hardware} "
        f"({'1 GPU on Colab' if hardware == HARDWARE_1GPU else 'Kaggle, 2 x T4'})"
    ]
    if strategy == "single" and hardware == HARDWARE_2GPU:
        notes.append("a stray 1-GPU entry in a 2-GPU file; hardware assumed from the file")
    if strategy == "model_split":
        notes.append("one process with the layers split over 2 GPUs (pure model parallelism)")
    if ws > 1:
        notes.append(
            f"rank {entry['rank']} of {ws} shown: per-rank metrics were never reduced, each rank averaged "
            "its own shard per batch; the global batch doubled on 2 GPUs; no set_epoch"
        )
    if not measured_acc:
        notes.append("accuracies in the file are placeholder zeros (not shown)")
    return notes


def _history(entry: dict, measured_acc: bool) -> tuple[list[dict], dict]:
    """The entry's per-epoch lists as our history rows (with the elapsed clock), and its test scalars."""
    history, elapsed = [], 0.0
    n = len(entry["training_times"])
    for i in range(n):
        row = {"epoch": i + 1}
        for src, dst in EPOCH_LISTS.items():
            if dst in ACC_KEYS and not measured_acc:
                continue
            row[dst] = float(entry[src][i])
        elapsed += row["time/epoch_s"] if math.isfinite(row["time/epoch_s"]) else 0.0
        row["time/elapsed_s"] = elapsed
        history.append(row)
    test = {dst: float(entry[src]) for src, dst in SCALARS.items() if measured_acc or dst != "test/acc"}
    test["test/epoch"] = n
    return history, test


def _metrics(measured_acc: bool) -> dict:
    """The metrics the study's entries carry (accuracies only where the file measured them)."""
    metrics = {
        "train/loss": {"label": "train loss (rank's own shard)", "goal": "min"},
        "val/loss": {"label": "validation loss (rank's own shard)", "goal": "min"},
        "test/loss": {"label": "test loss", "goal": "min"},
    }
    if measured_acc:
        metrics.update(
            {
                "train/acc": {
                    "label": "train accuracy (rank's own shard)",
                    "unit": "fraction",
                    "goal": "max",
                },
                "val/acc": {
                    "label": "validation accuracy (rank's own shard)",
                    "unit": "fraction",
                    "goal": "max",
                },
                "test/acc": {"label": "test accuracy", "unit": "fraction", "goal": "max"},
            }
        )
    return metrics


def _to_record(
    name: str,
    run_id: str,
    key: str,
    entry: dict,
    others: list[dict],
    two_gpu_file: bool,
    file_model: str | None,
) -> dict:
    model = _model_of(key, file_model)
    ws = entry["world_size"]
    split = "_dev0_0_dev1_1" in key
    strategy = "model_split" if split else ("ddp" if ws > 1 else "single")
    hardware = HARDWARE_2GPU if (two_gpu_file or split or ws > 1) else HARDWARE_1GPU
    n_gpus = 2 if split else ws
    per_proc = BATCH_PER_PROCESS[model]
    measured_acc = (
        any(v != 0 for k in ("train_accurcy", "validation_accurcy") for v in entry[k])
        or entry["test_acc"] != 0
    )
    notes = _notes(entry, strategy, hardware, measured_acc)
    history, test = _history(entry, measured_acc)
    n = len(history)
    devices = [f"cuda:{i}" for i in range(n_gpus)]
    return {
        "run_id": run_id,
        "model": model,
        "script": None,
        "tag": "study",
        "status": "finished",
        "started_at": None,
        "updated_at": None,
        "ended_at": None,
        "error": None,
        "config": {
            "epochs": n,
            "batch_size_per_process": per_proc,
            "batch_size": per_proc * ws,
            **({"lr": 0.01} if model == "cnn" else {}),
            "source_file": name,
            "entry": key,
        },
        "setup": {
            "strategy": strategy,
            "distributed_type": "MULTI_GPU" if ws > 1 else "NO",
            "backend": "nccl" if ws > 1 else None,
            "num_processes": ws,
            "num_machines": 1,
            "devices": devices if ws > 1 or split else ["cuda:0"],
            "device_names": [hardware] * len(devices),
            "mixed_precision": "unknown",
            "global_batch_size": per_proc * ws,
            "per_device_batch_size": per_proc,
            "mesh_shape": None,
            "microbatches": None,
        },
        "environment": {},
        "data": {"name": DATASETS[model], "source": SOURCE, "location": name, "synthetic": False},
        "metrics": _metrics(measured_acc),
        "primary_metric": "test/acc" if measured_acc else "test/loss",
        "history": history,
        "test": test,
        "timing": {"total_s": None, "clocks": CLOCKS},
        "reference": {
            "file": name,
            "entry": key,
            "hardware": hardware,
            "rank": entry["rank"],
            "world_size": ws,
            "notes": notes,
            "per_rank_test": {
                o["rank"]: {"test/loss": o["test_loss"], "test/acc": o["test_acc"]} for o in [entry, *others]
            },
        },
    }


def convert(obj, name: str) -> list[dict]:
    """Parsed study file -> run-record-shaped dicts, one per scenario (rank 0 stands for the ranks)."""
    if not is_study_format(obj):
        raise ValueError(
            "not a study result file (expected an object of scenario entries with training_times)"
        )
    fm = FILE_RE.match(name)
    two_gpu_file = bool(fm and int(fm.group("gpus")) > 1)
    file_model = fm.group("model") if fm else None
    scenarios: dict[str, list[tuple[str, dict]]] = {}
    for key, entry in obj.items():
        _check_entry(key, entry)
        scenarios.setdefault(re.sub(r"_rank_\d+$", "", key), []).append((key, entry))
    stem = Path(name).stem
    out = []
    for scenario, entries in scenarios.items():
        entries.sort(key=lambda ke: ke[1]["rank"])
        key, entry = entries[0]
        run_id = f"study-{stem}"
        if len(scenarios) > 1:
            ws = entry["world_size"]
            kind = "split" if "_dev0_0_dev1_1" in scenario else ("ddp" if ws > 1 else "single")
            run_id += f"-{kind}{ws}"
        out.append(
            _to_record(name, run_id, key, entry, [e for _, e in entries[1:]], two_gpu_file, file_model)
        )
    return out


def read_study_file(path: str | os.PathLike) -> list[dict]:
    """Read one study file; raises ValueError with a one-line reason."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"unreadable: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    return convert(obj, path.name)


def load_reference(folder: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every study file in `folder`: (runs, [(file name, reason) for files that could not be read])."""
    runs, problems = [], []
    d = Path(folder)
    if not d.is_dir():
        return runs, problems
    for path in sorted(d.glob("*.json")):
        try:
            runs.extend(read_study_file(path))
        except ValueError as e:
            problems.append((path.name, str(e)))
    return runs, problems

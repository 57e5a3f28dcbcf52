"""board.reference: the study's 13 published files read in their own format, and broken variants of them."""

import json
import math
from pathlib import Path

import pytest

from board.reference import convert, is_study_format, load_reference, read_study_file
from tests.conftest import REPO

STUDY = REPO / "reference" / "seed_results"
SHARED_COPY = REPO.parent / "shared" / "reference" / "seed_results"
# file -> [(model, strategy, processes, hardware, global batch, epochs, rank-0 test_loss)] per scenario
EXPECTED = {
    "CNN_20epochs_1GPU.json": [("cnn", "single", 1, "Colab T4", 64, 20, 1.524348043332434)],
    "CNN_20epochs_2GPU.json": [("cnn", "ddp", 2, "Kaggle T4 x2", 128, 20, 2.303515122954253)],
    "ConvAutoencoder_10epochs_1GPU.json": [
        ("conv_autoencoder", "single", 1, "Colab T4", 64, 10, 0.019831504643011016)
    ],
    "ConvAutoencoder_10epochs_2GPU.json": [
        ("conv_autoencoder", "ddp", 2, "Kaggle T4 x2", 128, 10, 0.012975268890135014)
    ],
    "MLP_10epochs_1GPU.json": [("mlp", "single", 1, "Colab T4", 512, 10, 0.065787145588547)],
    "MLP_10epochs_2GPU.json": [("mlp", "model_split", 1, "Kaggle T4 x2", 512, 10, 0.065787145588547)],
    "MLP_10epochs_2GPU_DDP.json": [("mlp", "ddp", 2, "Kaggle T4 x2", 1024, 10, 0.07583497818559408)],
    "NBoW_5epochs_1GPU.json": [("nbow", "single", 1, "Colab T4", 512, 5, 0.4076293884096919)],
    "NBoW_5epochs_2GPU.json": [
        ("nbow", "single", 1, "Kaggle T4 x2", 512, 5, 0.4076293884096919),
        ("nbow", "ddp", 2, "Kaggle T4 x2", 1024, 5, 0.5220963068910547),
    ],
    "seq2seq_10epochs_1GPU.json": [("seq2seq", "single", 1, "Colab T4", 512, 10, 4.384670734405518)],
    "seq2seq_10epochs_2GPU.json": [("seq2seq", "ddp", 2, "Kaggle T4 x2", 1024, 10, 4.657866954803467)],
    "vgg11-3epoch-1gpu.json": [("vgg11", "single", 1, "Colab T4", 32, 3, 0.653367040018304)],
    "vgg11-3epoch-2gpu.json": [("vgg11", "ddp", 2, "Kaggle T4 x2", 64, 3, 0.6355439879642889)],
}


def test_the_shipped_files_are_the_published_ones_unchanged():
    assert sorted(p.name for p in STUDY.glob("*.json")) == sorted(EXPECTED)
    if not SHARED_COPY.is_dir():
        pytest.skip(f"no original copy at {SHARED_COPY} to compare with")
    for name in EXPECTED:
        assert (STUDY / name).read_bytes() == (SHARED_COPY / name).read_bytes(), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_study_file_converts(name):
    raw = json.loads((STUDY / name).read_text())
    runs = read_study_file(STUDY / name)
    got = [
        (
            r["model"],
            r["setup"]["strategy"],
            r["setup"]["num_processes"],
            r["reference"]["hardware"],
            r["setup"]["global_batch_size"],
            len(r["history"]),
            r["test"]["test/loss"],
        )
        for r in runs
    ]
    assert sorted(got) == sorted(EXPECTED[name])
    for run in runs:
        entry = raw[run["reference"]["entry"]]
        assert entry["rank"] == 0  # rank 0 stands for the run
        h = run["history"]
        assert [row["epoch"] for row in h] == list(range(1, len(h) + 1))
        assert [row["time/train_s"] for row in h] == entry["training_times"]
        assert [row["val/loss"] for row in h] == entry["validation_losses"]
        assert [row["time/epoch_s"] for row in h] == entry["epoch_times"]
        assert h[-1]["time/elapsed_s"] == pytest.approx(sum(entry["epoch_times"]))
        assert run["data"]["source"] == "published" and not run["data"]["synthetic"]
        assert run["setup"]["device_names"][0] == run["reference"]["hardware"]
        assert all(isinstance(k, str) and "/" in k for row in h for k in row if k != "epoch")
        if entry["world_size"] > 1:
            assert set(run["reference"]["per_rank_test"]) == {0, 1}
            assert any("never reduced" in n for n in run["reference"]["notes"])


def test_accuracy_spelling_and_placeholder_zeros():
    mlp = read_study_file(STUDY / "MLP_10epochs_1GPU.json")[0]
    raw = json.loads((STUDY / "MLP_10epochs_1GPU.json").read_text())["model_MLP_epochs_10_1_GPUs_rank_0"]
    assert [row["train/acc"] for row in mlp["history"]] == raw["train_accurcy"]
    assert mlp["test"]["test/acc"] == raw["test_acc"] and mlp["primary_metric"] == "test/acc"
    for name in ("ConvAutoencoder_10epochs_1GPU.json", "seq2seq_10epochs_2GPU.json"):
        run = read_study_file(STUDY / name)[0]
        assert "test/acc" not in run["test"] and "val/acc" not in run["history"][0]
        assert run["primary_metric"] == "test/loss" and "val/acc" not in run["metrics"]


def test_model_split_stray_entry_and_ids():
    split = read_study_file(STUDY / "MLP_10epochs_2GPU.json")[0]
    assert split["setup"]["devices"] == ["cuda:0", "cuda:1"] and split["setup"]["num_processes"] == 1
    assert any("model parallelism" in n for n in split["reference"]["notes"])
    nbow = read_study_file(STUDY / "NBoW_5epochs_2GPU.json")
    assert [r["run_id"] for r in nbow] == ["study-NBoW_5epochs_2GPU-single1", "study-NBoW_5epochs_2GPU-ddp2"]
    assert any("stray" in n for n in nbow[0]["reference"]["notes"])
    runs, problems = load_reference(STUDY)
    assert problems == [] and len(runs) == 14 and len({r["run_id"] for r in runs}) == 14


def _mlp() -> dict:
    return json.loads((STUDY / "MLP_10epochs_2GPU_DDP.json").read_text())


def _set(obj, path, value):
    entry = obj["model_MLP_epochs_10_2_GPUs_rank_0"]
    if value is KeyError:
        del entry[path]
    else:
        entry[path] = value
    return obj


BROKEN = {
    "truncated": (lambda: json.dumps(_mlp())[:500], "not valid JSON"),
    "a list": (lambda: json.dumps([1, 2]), "not a study result file"),
    "empty object": (lambda: "{}", "not a study result file"),
    "our run record": (
        lambda: json.dumps({"schema_version": 1, "training_times": []}),
        "not a study result file",
    ),
    "missing list": (
        lambda: json.dumps(_set(_mlp(), "validation_losses", KeyError)),
        "lacks validation_losses",
    ),
    "short list": (lambda: json.dumps(_set(_mlp(), "train_losses", [0.5])), "different lengths"),
    "empty lists": (
        lambda: json.dumps(
            {
                "m": {
                    k: ([] if isinstance(v, list) else v)
                    for k, v in _mlp()["model_MLP_epochs_10_2_GPUs_rank_0"].items()
                }
            }
        ),
        "empty",
    ),
    "text in a list": (
        lambda: json.dumps(_set(_mlp(), "epoch_times", ["1.0"] * 10)),
        "not a list of numbers",
    ),
    "bad rank": (lambda: json.dumps(_set(_mlp(), "rank", 5)), "bad world_size/rank"),
    "test not a number": (lambda: json.dumps(_set(_mlp(), "test_acc", None)), "test_acc is not a number"),
    "unknown model": (
        lambda: json.dumps({"model_GPT_epochs_1_1_GPUs_rank_0": _mlp()["model_MLP_epochs_10_2_GPUs_rank_0"]}),
        "unknown model",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_variants_fail_with_a_reason(case, tmp_path):
    text, reason = BROKEN[case]
    path = tmp_path / ("x.json" if case != "unknown model" else "Something_1epochs_1GPU.json")
    path.write_text(text())
    with pytest.raises(ValueError, match=reason):
        read_study_file(path)
    (tmp_path / "MLP_10epochs_1GPU.json").write_bytes((STUDY / "MLP_10epochs_1GPU.json").read_bytes())
    runs, problems = load_reference(tmp_path)  # one bad file never hides the good ones
    assert [r["model"] for r in runs] == ["mlp"] and len(problems) == 1 and reason in problems[0][1]


def test_non_finite_values_are_kept():
    obj = _mlp()
    obj["model_MLP_epochs_10_2_GPUs_rank_0"]["train_losses"][3] = float("nan")
    run = convert(json.loads(json.dumps(obj)), "MLP_10epochs_2GPU_DDP.json")[0]
    assert math.isnan(run["history"][3]["train/loss"])


def test_format_detection():
    assert is_study_format(_mlp())
    assert not is_study_format({"schema_version": 1, "run_id": "x"})
    assert not is_study_format([]) and not is_study_format({})
    assert load_reference(Path("/nonexistent")) == ([], [])

"""--log_with: the numbers a run records reach Accelerate's experiment trackers unchanged (read back with each
tracker's own reader), from the main process only; an unknown or uninstalled tracker is refused in the first
seconds with one line and exit status 2, before any record is written."""

import subprocess
import sys

import pytest
from accelerate.tracking import LOGGER_TYPE_TO_CLASS

from shared.config import ConfigError, RunConfig, parse_config
from shared.record import validate
from tests.conftest import REPO, child_env, explain, launch, records, require_dataset

ARGS = ["--limit_train", 640, "--limit_eval", 64, "--epochs", 2, "--batch_size", 32]
# every tracker Accelerate knows (its names are the packages' import names), and TensorBoard's stand-in
TRACKER_PACKAGES = [*LOGGER_TYPE_TO_CLASS, "tensorboardX"]


def numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_without(packages: list[str], *args) -> subprocess.CompletedProcess:
    """scripts/mlp.py with `packages` made absent. `sys.modules[name] = None` is Python's own way to mark a
    module as missing: `import name` raises ImportError and importlib.util.find_spec(name), which Accelerate's
    is_*_available checks use, returns None, whether or not the package is installed here."""
    shim = (
        "import runpy, sys\n"
        f"sys.modules.update(dict.fromkeys({packages!r}))\n"
        f"sys.argv = {['mlp.py', *map(str, args)]!r}\n"
        f"runpy.run_path({str(REPO / 'scripts' / 'mlp.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", shim], capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=120
    )


def one_error_line(proc, runs) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), explain(proc)
    assert not list(runs.glob("*.json")), "a record was written"
    return lines[0]


def test_an_unknown_tracker_names_the_choices():
    with pytest.raises(
        ConfigError, match="'log_with': expected one of none, tensorboard, wandb, mlflow, aim, all"
    ):
        parse_config(RunConfig, ["--log_with", "nosuchtracker"])


def test_an_unknown_tracker_exits_2_with_one_line_and_no_record(tmp_path):
    proc = launch(None, "mlp", "--runs_dir", tmp_path, "--log_with", "nosuchtracker", timeout=120)
    assert "nosuchtracker" in one_error_line(proc, tmp_path)


def test_an_uninstalled_tracker_is_refused_before_anything_is_built(tmp_path):
    proc = run_without(["wandb"], "--runs_dir", tmp_path, "--data", "synthetic", "--log_with", "wandb")
    assert one_error_line(proc, tmp_path) == (
        "error: --log_with wandb: the wandb package is not installed; "
        "pip install wandb (or pip install 'distbench[trackers]')"
    )


def test_all_with_no_tracker_installed_is_refused(tmp_path):
    proc = run_without(TRACKER_PACKAGES, "--runs_dir", tmp_path, "--data", "synthetic", "--log_with", "all")
    assert "--log_with all: no experiment tracker package is installed" in one_error_line(proc, tmp_path)


@pytest.mark.slow
def test_tensorboard_gets_the_records_numbers_from_the_main_process_only(tmp_path):
    """Two processes: one event file of scalars, equal to the record's epoch rows and test results."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = require_dataset("mnist")
    proc = launch(
        "cpu_2proc", "mlp", "--data_dir", root, "--runs_dir", tmp_path, *ARGS, "--log_with", "tensorboard"
    )
    assert proc.returncode == 0, explain(proc)
    (rec,) = records(tmp_path)
    assert validate(rec) == []
    where = tmp_path.resolve() / "trackers" / rec["run_id"] / "distbench"
    assert rec["setup"]["trackers"] == {"tensorboard": str(where)}
    assert len(list(where.glob("events.out.tfevents.*"))) == 1  # rank 1 wrote none
    acc = EventAccumulator(str(where))
    acc.Reload()
    logged = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    expected = {}
    for row in rec["history"]:
        for k, v in numbers(row).items():
            expected.setdefault(k, {})[row["epoch"]] = v
    for k, v in numbers(rec["test"]).items():
        expected[k] = {rec["history"][-1]["epoch"]: v}
    assert logged.keys() == expected.keys()
    for k in expected:  # tensorboard keeps scalars as float32
        assert logged[k] == pytest.approx(expected[k], rel=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("store", ["default", "MLFLOW_TRACKING_URI"])
def test_mlflow_gets_the_records_numbers_and_config(store, tmp_path):
    """By default a SQLite store under <runs_dir>/trackers/ (MLflow 3 refuses file stores and would write
    ./mlruns wherever the script starts); MLFLOW_TRACKING_URI, when set, wins."""
    from mlflow.tracking import MlflowClient

    root = require_dataset("mnist")
    runs = tmp_path / "runs"
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    env = child_env(MLFLOW_TRACKING_URI=uri) if store != "default" else child_env()
    if store == "default":
        env.pop("MLFLOW_TRACKING_URI", None)
        uri = f"sqlite:///{runs.resolve() / 'trackers' / 'mlflow.db'}"
    proc = launch(None, "mlp", "--data_dir", root, "--runs_dir", runs, *ARGS, "--log_with", "mlflow", env=env)
    assert proc.returncode == 0, explain(proc)
    (rec,) = records(runs)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distbench").experiment_id])
    assert rec["setup"]["trackers"] == {"mlflow": f"{uri} (experiment distbench, run {run.info.run_id})"}
    assert run.info.run_name == rec["run_id"] and run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in rec["config"].items()}
    last = rec["history"][-1]["epoch"]
    rows = [(row["epoch"], numbers(row)) for row in rec["history"]] + [(last, numbers(rec["test"]))]
    assert set(run.data.metrics) == {k for _, r in rows for k in r}
    for k in run.data.metrics:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        assert history == {step: r[k] for step, r in rows if k in r}, k

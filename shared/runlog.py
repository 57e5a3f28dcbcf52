"""The record of a run (main process) and its console lines: created or reopened on resume, one row per epoch,
the test results, and what ended it (finished, failed with a one-line reason, interrupted)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from shared.plan import launch_config_file
from shared.record import REPO, RecordWriteError, RunRecord, device_name, environment, num_machines
from shared.resume import negotiate_resume
from shared.runtime import describe_failure, params_sha256
from shared.signals import STOP, Interrupted
from shared.stats import sig

# What each clock in the record covers. Every clock is read after a device synchronize and a barrier,
# so all ranks agree on the interval.
CLOCKS = {
    "time/train_s": "one epoch of training steps on all ranks: batch fetch + host-to-device copy + augmentation + forward + backward + optimizer",
    "time/eval_s": "validation pass after the epoch (gather_for_metrics over the whole val split)",
    "time/epoch_s": "time/train_s + time/eval_s (no checkpointing)",
    "time/elapsed_s": "wall clock since the record was created, at the end of the epoch",
    "time/warmup_s": "the process's first warmup_steps optimizer steps (allocator, thread pools, optimizer state), not in the steady figures",
    "time/step_s": "median steady-state step time of the epoch (shared/meter.py: per-step clock on the main process; warm-up, each epoch's first and last step and checkpoint writes left out)",
    "throughput/steady_samples_per_s": "global batch / time/step_s",
    "steady": "the run's steady-state headline: median step time over up to 10 windows of consecutive steady steps with a bootstrap 95% interval, IQR over steps, samples/s, warm-up, and the other load on the machine (foreign_cpu_share)",
    "total_s": "wall clock from process set-up to the end of the test pass; excludes interpreter and launcher start-up",
    "test/time_s": "the final test pass",
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return str(v)


def setup_info(acc, cfg, par, **extra) -> dict:
    """Collective: every rank must call it (device names are gathered from all ranks)."""
    backend = getattr(acc.state, "backend", None)
    return {
        "strategy": par.strategy,
        "distributed_type": str(acc.distributed_type).split(".")[-1],
        "backend": str(backend) if backend else None,
        "num_processes": acc.num_processes,
        "num_machines": num_machines(),
        "devices": gather_object([str(acc.device)]),
        "device_names": gather_object([device_name(acc.device)]),
        "mixed_precision": str(acc.mixed_precision),
        "launch_config": config.name if (config := launch_config_file()) else None,
        "global_batch_size": cfg.batch_size,
        "per_device_batch_size": cfg.batch_size // par.plan.dp,  # per data-parallel replica (stages share it)
        **par.setup_info(),
        **extra,
    }


def _tracker_location(tracker) -> str:
    """Where an Accelerate tracker writes: a folder, a tracking URI and run, or a URL."""
    if tracker.name == "mlflow":
        import mlflow

        run = tracker.tracker.info
        return f"{mlflow.get_tracking_uri()} (experiment {tracker.experiment_name}, run {run.run_id})"
    if tracker.name == "wandb":
        return str(getattr(tracker.run, "url", None) or tracker.run.dir)
    return str(getattr(tracker, "logging_dir", None) or getattr(tracker, "aim_repo_path", ""))


class RunLog:
    """Created after `prepare` on every rank (collective); writes only on the main process."""

    def __init__(
        self, acc, cfg, par, *, model: str, script: str, data, metrics: dict, model_info: dict, **extra
    ):
        self.acc, self.cfg, self.par = acc, cfg, par
        self.meter = None  # Progress attaches its StepTimer
        self.t0 = time.perf_counter()
        setup = setup_info(acc, cfg, par, **extra)
        setup["pids"] = self.pids = gather_object([os.getpid()])
        self.record = None
        found = negotiate_resume(acc, cfg, model, setup)  # the record is reopened by resumed()
        self.resume_record, self.resume_from = found or (None, None)
        if found is None and acc.is_main_process:
            primary = next(k for k, v in metrics.items() if v.get("primary"))
            self.record = RunRecord(
                cfg.runs_dir,
                {
                    "model": model,
                    "script": os.path.relpath(script, REPO) if os.path.isabs(script) else script,
                    "tag": cfg.tag,
                    "config": dict(vars(cfg)),
                    "setup": setup,
                    "environment": environment(script),
                    "data": data.provenance(),
                    "model_info": model_info,
                    "metrics": metrics,
                    "primary_metric": primary,
                    "timing": {"clocks": CLOCKS},
                },
            )
            self._started()
        self.run_id = (
            self.resume_record.stem
            if found
            else gather_object([self.record.run_id if self.record else ""])[0]
        )
        prov = data.provenance()
        acc.print(
            f"run {self.run_id}: {model} | {setup['strategy']} x{acc.num_processes} on {setup['devices'][0]} "
            f"({setup['device_names'][0]}) | mixed precision {setup['mixed_precision']}"
        )
        acc.print(
            f"data {prov['name']} from {prov['source']} ({prov['location']}) | used {prov['used']} of {prov['splits']}"
        )
        if prov["synthetic"]:
            acc.print("WARNING: SYNTHETIC data: shapes and throughput only, the metrics mean nothing")
        acc.print("config " + " ".join(f"{k}={v}" for k, v in vars(cfg).items()))
        acc.print("model " + " ".join(f"{k}={_fmt(v)}" for k, v in model_info.items()))
        self.trackers, self.epoch = self._start_trackers(), None
        if self.record:
            self._note_trackers()

    def _start_trackers(self) -> dict:
        """--log_with: Accelerate's trackers get the config as hyper-parameters now, then the numbers of every
        epoch row and of the test results under the record's keys. {tracker: where its output is} (main process;
        Accelerate runs trackers there only). `end_training` in runtime.shutdown closes them."""
        acc, cfg = self.acc, self.cfg
        if cfg.log_with == "none":
            return {}
        run_dir = Path(cfg.runs_dir).resolve() / "trackers"
        acc.project_configuration.logging_dir = str(run_dir / self.run_id)  # read by init_trackers
        mlflow = {"run_name": self.run_id}
        if acc.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            if any(str(t) == "wandb" for t in acc.log_with):
                (run_dir / self.run_id).mkdir(exist_ok=True)  # wandb.init(dir=...) wants it to exist
            if any(str(t) == "mlflow" for t in acc.log_with) and "MLFLOW_TRACKING_URI" not in os.environ:
                # MLflow's own default is ./mlruns wherever the script starts (and it now refuses file stores)
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{run_dir / 'mlflow.db'}"
                mlflow["logging_dir"] = str(run_dir / "mlflow-artifacts")
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(cfg).items()}
        wandb = {"name": self.run_id, "dir": str(run_dir / self.run_id)}
        acc.init_trackers("distbench", config=hparams, init_kwargs={"mlflow": mlflow, "wandb": wandb})
        where = {t.name: _tracker_location(t) for t in acc.trackers} if acc.is_main_process else {}
        if where:
            acc.print("trackers " + " | ".join(f"{k}: {v}" for k, v in where.items()))
        return where

    def _note_trackers(self):
        if self.trackers:
            with self.record.lock:
                self.record.data["setup"]["trackers"] = self.trackers
            self.record.save()

    def _track(self, row: dict, step: int | None):
        """The row's numbers (the keys of the record) to the trackers: `accelerator.log` (main process)."""
        if self.trackers:
            nums = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.acc.log(nums, step=step)

    def _started(self):
        self.record.start_heartbeat()
        STOP.on_stuck = lambda why: self.record.end("interrupted", self.elapsed(), error=why)

    def resumed(self, epoch: int, step: int, checkpoint: Path):
        """Called once the checkpoint is loaded: continue the same record (main process)."""
        if self.acc.is_main_process:
            self.record = RunRecord.reopen(
                self.resume_record, epoch=epoch, step=step, checkpoint=checkpoint.name
            )
            self._started()
            self._note_trackers()

    def failed(self, exc: BaseException):
        """Mark a running record `interrupted` or `failed` with a one-line reason (the exception propagates)."""
        for tracker in self.acc.trackers:  # their files complete: the error path skips end_training
            tracker.finish()
        if self.record is None or self.record.data["status"] != "running":
            return
        try:
            with STOP.shielded():
                if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                    why = f"interrupted: {exc or 'KeyboardInterrupt'}"
                    self.record.end("interrupted", self.elapsed(), error=why)
                elif not isinstance(exc, RecordWriteError):
                    self.record.end(
                        "failed", self.elapsed(), error=describe_failure(exc, self.acc, self.pids)
                    )
        except OSError:
            pass  # the record cannot be written (disk full): the original error is what the user sees

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def timing(self, **clocks):
        """Extra clocks for the record's `timing` block (None values are left out)."""
        if self.record:
            with self.record.lock:
                self.record.data["timing"].update({k: v for k, v in clocks.items() if v is not None})
            self.record.save()

    def event(self, kind: str, **fields):
        if self.record:
            self.record.event(kind, **fields)

    def log_epoch(self, row: dict):
        """One fixed-column console line and one history row, from the same dict. Collective (the meter)."""
        self.meter.end_epoch()
        row = {**row, **self.meter.epoch_row(), "time/elapsed_s": self.elapsed()}
        steady = self.meter.summary(self.meter.foreign_share())
        self.acc.print(" | ".join(f"{k} {_fmt(v)}" for k, v in row.items()))
        self.epoch = row["epoch"]
        self._track(row, step=self.epoch)
        if self.record:
            with self.record.lock:
                self.record.data["timing"]["steady"] = steady
            self.record.log_epoch(row)

    def finish(self, test: dict, model: torch.nn.Module):
        """Collective: records the test results and proves the ranks hold the parameters they should."""
        par = self.par
        digests = gather_object([params_sha256(par.local_state_dict(model))])
        self.acc.print(" | ".join(f"{k} {_fmt(v)}" for k, v in test.items()))
        self._track(test, step=self.epoch)
        if any(len({digests[r] for r in g}) > 1 for g in par.same_params_groups()):
            self.acc.print(
                f"WARNING: parameters differ between ranks that should hold the same ones: {digests}"
            )
        if self.cfg.save_model:
            par.save_model(model, Path(self.cfg.runs_dir) / self.run_id)
        if self.record:
            with self.record.lock:  # the heartbeat thread serialises the record concurrently
                self.record.data["setup"]["params_sha256_per_rank"] = digests
                self.record.data["setup"]["params_sha256_scope"] = par.digest_scope()
                self.record.data["test"] = test
            self.record.end("finished", self.elapsed())
        st = self.meter.summary(None) if self.acc.is_main_process else None
        if st and st["steps"]:
            lo, hi = st["samples_per_s_ci95"]
            self.acc.print(
                f"steady state: {sig(st['samples_per_s'])} samples/s (95% CI {sig(lo)}-{sig(hi)}; median of "
                f"{len(st['windows_step_s'])} windows over {st['steps']} steps; warm-up {st['warmup_steps']} "
                f"steps {sig(st['warmup_s'])} s)" + (" WARM-UP-DOMINATED" if st["warmup_dominated"] else "")
            )
        self.acc.print(f"finished in {self.elapsed():.1f} s; record {self.cfg.runs_dir}/{self.run_id}.json")

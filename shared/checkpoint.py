"""Where training is, saved so that a killed run continues exactly; and stopping cleanly on a signal.

    progress = Progress(accelerator, cfg, run, par, model, best, gens=[gen])  # resumes when --resume is given
    for epoch in progress.epochs():
        train_loader.set_epoch(epoch)
        for batch in progress.batches(train_loader):   # skips what a resumed run already trained
            loss = ...forward and backward...
            if not progress.take_step(loss):          # non-finite loss: stop, or skip with --on_nan skip
                continue
            optimizer.step()
            progress.stats += ...                     # the epoch's running sums live here (they are saved)
            if progress.step_done():                  # checkpoint every N steps / after SIGTERM; True at max_steps
                break
        ...evaluate, log the epoch...
        if progress.epoch_done():                     # checkpoint at the epoch end; True at max_steps
            break

A checkpoint is a directory `<runs_dir>/<run_id>/checkpoints/step-NNNNNNNN/` holding Accelerate's
`save_state` (model, optimizer, RNG states of every rank) plus what Accelerate does not keep: the epoch, the
step and the position inside the epoch (`progress.json`, written last: a directory without it is incomplete
and ignored), and per rank the epoch's running sums, the augmentation generators and the best epoch's weights
(`progress_rank<r>.pt`, loaded with `weights_only=True`). It is written as `step-N.partial` and renamed when
every rank is done, so a kill at any point leaves the previous checkpoint usable. The data order after a
resume comes from the epoch number (the samplers are seeded by seed + epoch) and the number of batches
already trained, never from Accelerate's own dataloader state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from shared.config import UserError
from shared.meter import StepTimer
from shared.record import RUN_ID_RE, read_record

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-\d{8}$")  # complete checkpoints only (not .partial / .old)
BIG = float(
    2**24
)  # step numbers travel as BIG - step in float32 (exact below 16.7M steps), so MAX finds the first
GRACE_S = 20  # after SIGTERM, a process that has not reached a step boundary by then records itself and exits
# config keys that may change between a run and its resumption; every other key must match
RESUMABLE_CHANGES = {
    "resume",
    "runs_dir",
    "data_dir",
    "tag",
    "checkpoint_every",
    "keep_checkpoints",
    "on_nan",
    "collective_timeout_s",
    "warmup_steps",
}


class Interrupted(BaseException):
    """SIGTERM / SIGINT reached a step boundary (after a checkpoint when enabled): the run is `interrupted`."""


class NonFiniteLoss(RuntimeError):
    pass


class ResumeError(UserError):
    pass


# ----------------------------------------------------------------------------- signals


class _Stop:
    """A SIGTERM / SIGINT asks training to stop at the next step boundary; a second one stops at once."""

    def __init__(self):
        self.signal: str | None = None
        self.on_stuck = None  # called by the watchdog (record the run) before a forced exit

    def handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise Interrupted(f"second signal {name}")
        self.signal = name
        threading.Thread(target=self._watchdog, daemon=True).start()

    def _watchdog(self):
        time.sleep(GRACE_S)
        try:
            if self.on_stuck:
                self.on_stuck(
                    f"interrupted: {self.signal}, and no step boundary was reached within {GRACE_S} s "
                    "(blocked in a collective or a long evaluation; a peer rank may have died)"
                )
        finally:
            os._exit(143)


STOP = _Stop()


def install_signal_handlers():
    signal.signal(signal.SIGTERM, STOP.handler)
    signal.signal(signal.SIGINT, STOP.handler)


# ----------------------------------------------------------------------------- finding what to resume


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    d = run_dir / CHECKPOINTS
    if not d.is_dir():
        return []
    return sorted(
        p for p in d.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "progress.json").is_file()
    )


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def find_resume(cfg, model: str) -> tuple[Path, Path, dict] | None:
    """(record path, checkpoint dir, record) named by `--resume`, or None for `auto` with nothing to resume.

    Raises ResumeError with one line when the spec names nothing resumable. Paths are resolved and must lie
    inside runs_dir; run ids must be plain names, so nothing outside runs_dir is ever opened or written.
    """
    spec, runs = cfg.resume, Path(cfg.runs_dir)
    checkpoint = None
    if spec == "auto":
        best = None
        for path in sorted(runs.glob(f"{model}-*.json")):
            try:
                rec = read_record(path)
            except ValueError:
                continue
            if (
                rec["model"] == model
                and rec["status"] != "finished"
                and complete_checkpoints(runs / rec["run_id"])
            ):
                if best is None or rec["updated_at"] > best[1]:
                    best = (path, rec["updated_at"])
        if best is None:
            return None
        record_path = best[0]
    elif RUN_ID_RE.match(spec) and "/" not in spec and (runs / f"{spec}.json").is_file():
        record_path = runs / f"{spec}.json"
    else:
        p = Path(spec)
        if p.is_dir() and (p / "progress.json").is_file():
            checkpoint = p
            record_path = p.parent.parent.parent / f"{p.parent.parent.name}.json"
        elif p.suffix == ".json" and p.is_file():
            record_path = p
        else:
            raise ResumeError(
                f"--resume {spec}: not a run id in {runs}, a run record or a complete checkpoint directory"
            )
        if not _inside(record_path, runs) or (checkpoint and not _inside(checkpoint, runs)):
            raise ResumeError(f"--resume {spec}: not inside runs_dir {runs}")
    try:
        rec = read_record(record_path)
    except ValueError as e:
        raise ResumeError(f"--resume: {record_path}: {e}") from None
    if rec["model"] != model:
        raise ResumeError(f"--resume: run {rec['run_id']} is a {rec['model']} run, not {model}")
    if rec["status"] == "finished":
        raise ResumeError(f"--resume: run {rec['run_id']} already finished")
    found = complete_checkpoints(runs / rec["run_id"])
    if checkpoint is None:
        if not found:
            raise ResumeError(
                f"--resume: run {rec['run_id']} has no complete checkpoint (start runs with --checkpoint_every N)"
            )
        checkpoint = found[-1]
    elif checkpoint.resolve() not in [f.resolve() for f in found]:
        raise ResumeError(f"--resume: {checkpoint} is not a checkpoint of run {rec['run_id']}")
    return record_path, checkpoint, rec


def check_compatible(record: dict, cfg, setup: dict):
    """The resumed run must be the same experiment: same config (but RESUMABLE_CHANGES) and the same setup."""
    saved = record["config"]
    for key, value in vars(cfg).items():
        if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value:
            raise ResumeError(
                f"--resume: config key '{key}' is {value!r} but run {record['run_id']} used {saved[key]!r}"
            )
    for key in ("strategy", "num_processes", "mesh_shape", "microbatches"):
        if record["setup"].get(key) != setup.get(key):
            raise ResumeError(
                f"--resume: this launch has {key} {setup.get(key)!r} but run {record['run_id']} "
                f"used {record['setup'].get(key)!r}"
            )


# ----------------------------------------------------------------------------- the training position


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class Progress:
    """Epoch, step, position inside the epoch and the epoch's running sums; checkpoints and stop decisions."""

    def __init__(self, acc, cfg, run, par, model, best, *, gens=(), stats: int = 2):
        self.acc, self.cfg, self.run, self.par, self.model, self.best = acc, cfg, run, par, model, best
        self.gens = list(gens)
        self.epoch, self.step, self.batch, self.samples, self.skipped = 1, 0, 0, 0, 0
        self.stats = torch.zeros(stats, device=acc.device)
        self._stop = False
        self.dir = Path(cfg.runs_dir) / run.run_id / CHECKPOINTS
        self.world = acc.num_processes
        self._inject_nan = int(os.environ.get("DISTBENCH_INJECT_NAN_STEP", "0"))
        self._bad = torch.zeros((), device=acc.device)  # BIG - first non-finite step not yet reported, or 0
        self.meter = run.meter = StepTimer(acc, cfg)  # steady-state step times, read by run.log_epoch
        self._first = self._last = False
        if (cfg.checkpoint_every or cfg.resume) and par is not None and par.pipelined:
            raise UserError(
                f"--checkpoint_every / --resume are not supported with --strategy {par.strategy} yet "
                "(Accelerate's save_state does not know the pipeline stages)"
            )
        if run.resume_from is not None:
            self._load(run.resume_from)

    # -- the loop

    def epochs(self):
        while self.epoch <= self.cfg.epochs:
            yield self.epoch

    def batches(self, loader):
        """The epoch's batches, without the first `batch` ones a resumed run already trained on."""
        try:
            n = len(loader)
        except TypeError:
            n = -1
        self.meter.start_epoch()
        start = self.batch
        for i, batch in enumerate(loader):
            if i >= start:
                self._first, self._last = i == start, i == n - 1
                yield batch

    def take_step(self, loss: torch.Tensor) -> bool:
        """Whether to apply this step's optimizer update; every rank gets the same answer.

        Every `--check_every` steps (1 on CPU, 25 on CUDA; always 1 with --on_nan skip) the ranks agree on
        (first non-finite loss, stop requested) with one small all-reduce and one host sync. In between, the
        first non-finite step is remembered on the device, so the record still names the exact step."""
        if (
            self._inject_nan == self.step + self.skipped + 1
        ):  # fault injection for tests: the Nth batch gives NaN
            loss = loss * float("nan")
        bad = (~torch.isfinite(loss.detach())).any()
        per_step = self.cfg.on_nan == "skip" or self.cfg.check_every <= 1
        if per_step:
            self._bad = torch.where(bad, BIG - (self.step + 1), 0.0)
        else:
            self._bad = torch.where(bad & (self._bad == 0), BIG - (self.step + 1), self._bad)
            if (self.step + 1) % self.cfg.check_every:
                return True
        flags = torch.stack(
            [self._bad, torch.tensor(float(STOP.signal is not None), device=self._bad.device)]
        )
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_code, stop = flags.tolist()
        self._stop = stop > 0
        if bad_code:
            step = int(BIG - bad_code)
            where = f"step {step} (epoch {self.epoch})"
            if self.cfg.on_nan == "stop":
                self.run.event("nonfinite_loss", step=step, epoch=self.epoch, action="stop")
                raise NonFiniteLoss(f"non-finite training loss at {where}; --on_nan skip drops such steps")
            self.skipped += 1
            self.batch += 1
            self._bad.zero_()
            self.run.event("skipped_step", step=step, epoch=self.epoch, batch=self.batch)
            self.acc.print(f"non-finite training loss at {where}: optimizer step skipped (--on_nan skip)")
            if self._stop:
                self._interrupt()
            return False
        return True

    def step_done(self) -> bool:
        """After the optimizer step: count it, checkpoint when due or when asked to stop. True at max_steps."""
        self.step += 1
        self.batch += 1
        self.meter.step(self._first, self._last)
        if self._stop:
            self._interrupt()
        if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
            self.save()
            self.meter.restart_clock()
        return bool(self.cfg.max_steps and self.step >= self.cfg.max_steps)

    def epoch_done(self, samples: int) -> bool:
        """After the epoch's evaluation and record row: next epoch, checkpoint. True when training is over."""
        self.samples += samples
        self.epoch += 1
        self.batch = 0
        self.stats.zero_()
        done = bool(self.cfg.max_steps and self.step >= self.cfg.max_steps)
        if self.cfg.checkpoint_every and not done and self.epoch <= self.cfg.epochs:
            self.save()
        if STOP.signal is not None and not done and self.epoch <= self.cfg.epochs:
            self._interrupt(saved=bool(self.cfg.checkpoint_every))
        return done

    def _interrupt(self, saved: bool = False):
        if self.cfg.checkpoint_every and not saved:
            self.save()
        raise Interrupted(f"{STOP.signal or 'signal'} at step {self.step}")

    # -- saving and loading

    def save(self):
        acc, rank = self.acc, self.acc.process_index
        name = f"step-{self.step:08d}"
        final, tmp = self.dir / name, self.dir / f"{name}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # collective under FSDP
        best = self.best.state
        torch.save(
            {
                "stats": self.stats.detach().cpu(),
                "gens": [g.get_state() for g in self.gens],
                "best_state": {k: _local(v).cpu() for k, v in best.items()} if best else None,
            },
            tmp / f"progress_rank{rank}.pt",
        )
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._meta_write(tmp)
            # The epoch end right after a step checkpoint saves the same step again with the epoch's end state
            # (next epoch, sums zeroed, this epoch's best weights): the newer copy replaces the older one.
            stale = self.dir / f"{name}.old"
            if final.exists():
                os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
            for old in complete_checkpoints(self.dir.parent)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.run.event("checkpoint", step=self.step, epoch=self.epoch, batch=self.batch, path=str(final))
        acc.wait_for_everyone()

    def _meta_write(self, directory: Path):
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "batch": self.batch,
            "samples": self.samples,
            "skipped": self.skipped,
            "best_loss": self.best.loss if self.best.state is not None else None,
            "best_epoch": self.best.epoch,
            "world": self.world,
        }
        tmp = directory / ".progress.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, directory / "progress.json")

    def _load(self, directory: Path):
        meta = json.loads((directory / "progress.json").read_text())
        if meta["world"] != self.world:
            raise ResumeError(
                f"--resume: {directory} was written by {meta['world']} processes, not {self.world}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # torch's notes on pickle protocols: the error line says it all
                self.acc.load_state(str(directory))
                blob = torch.load(
                    directory / f"progress_rank{self.acc.process_index}.pt",
                    map_location="cpu",  # (torch cannot map to "cpu:0", the device name DDP ranks have on a CPU)
                    weights_only=True,  # tensors and plain containers only: a checkpoint cannot run code
                )
        except Exception as e:  # any damage or mismatch in a file we did not just write: one line
            raise ResumeError(
                f"--resume: cannot load {directory} into this model ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''})"
            ) from None
        self.epoch, self.step, self.batch = meta["epoch"], meta["step"], meta["batch"]
        self.samples, self.skipped = meta["samples"], meta["skipped"]
        self.stats.copy_(blob["stats"])
        for g, state in zip(self.gens, blob["gens"], strict=True):
            g.set_state(state.cpu())
        if blob["best_state"] is not None:
            from torch.distributed.tensor import DTensor

            current = self.model.state_dict()
            state = {}
            for k, v in blob["best_state"].items():
                ref = current[k]
                state[k] = (
                    DTensor.from_local(
                        v, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride()
                    )
                    if isinstance(ref, DTensor)
                    else v
                )
            self.best.loss, self.best.epoch = meta["best_loss"], meta["best_epoch"]
            self.best.state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.run.resumed(self.epoch, self.step, directory)
        self.acc.print(
            f"resumed from {directory}: epoch {self.epoch}, step {self.step}, {self.batch} batches into the epoch"
        )

"""Where training is, saved so that a killed run continues exactly: finding what `--resume` names, the best
epoch's weights, and `Progress` (epoch, step, position in the epoch, running sums, checkpoints, stop checks).
Scripts reach it through shared/session.py (`s.epochs`, `s.batches`, `s.step_ok`, `s.step_done`).

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
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from shared.config import UserError
from shared.meter import StepTimer
from shared.resume import CHECKPOINTS, ResumeError, complete_checkpoints
from shared.signals import STOP, Interrupted

# step numbers travel as BIG - step in float32 (exact below 16.7M steps), so MAX finds the first
BIG = float(2**24)


class NonFiniteLoss(RuntimeError):
    pass


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class BestCheckpoint:
    """Keep the weights of the epoch with the lowest validation loss in memory; the tutorials test those.

    Each rank copies what it holds and restores it: the full model (single, ddp, model_split), its FSDP
    shards (DTensors) or its pipeline stage. No communication; tests/test_parallel.py restores under each.
    """

    def __init__(self, enabled: bool = True):
        self.enabled, self.loss, self.epoch, self.state = enabled, float("inf"), None, None

    def update(self, val_loss: float, model: torch.nn.Module, epoch: int):
        if self.enabled and val_loss < self.loss:
            self.loss, self.epoch = val_loss, epoch
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self, model: torch.nn.Module):
        if self.state is not None:
            model.load_state_dict(self.state)

    def local_state(self) -> dict | None:
        """What this rank saves in a checkpoint: its own shards (plain tensors), not the DTensors."""
        return {k: _local(v).cpu() for k, v in self.state.items()} if self.state else None

    def load_local(self, local: dict, loss: float, epoch: int, model: torch.nn.Module):
        """The inverse of local_state: shards become DTensors again, laid out like the model's."""
        from torch.distributed.tensor import DTensor

        current = model.state_dict()
        state = {}
        for k, v in local.items():
            ref = current[k]
            if isinstance(ref, DTensor):
                v = DTensor.from_local(
                    v, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride()
                )
            state[k] = v.detach().to("cpu", copy=True)
        self.loss, self.epoch, self.state = loss, epoch, state


# ----------------------------------------------------------------------------- the training position


class Progress:
    """Epoch, step, position inside the epoch and the epoch's running sums; checkpoints and stop decisions."""

    def __init__(self, acc, cfg, run, par, model, best, *, gens=()):
        self.acc, self.cfg, self.run, self.par, self.model, self.best = acc, cfg, run, par, model, best
        self.gens = list(gens)
        self.epoch, self.step, self.batch, self.samples, self.skipped = 1, 0, 0, 0, 0
        self.stats = None  # the epoch's running sums, handed to the script by sums(n)
        self._loaded_stats = None
        self._stop = False
        self.dir = Path(cfg.runs_dir) / run.run_id / CHECKPOINTS
        self.world = acc.num_processes
        self._bad = torch.zeros((), device=acc.device)  # BIG - first non-finite step not yet reported, or 0
        self.meter = run.meter = StepTimer(acc, cfg)  # steady-state step times, read by run.log_epoch
        self._first = self._last = False
        if (cfg.checkpoint_every or cfg.resume) and par.pipelined:
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

    def sums(self, n: int) -> list[torch.Tensor]:
        """`n` running sums for the epoch (zeros, or what a resumed run had summed so far), saved with each
        checkpoint. Returned as separate 0-d tensors that are views of one buffer: add to them in place."""
        if self.stats is None or len(self.stats) != n:
            self.stats = torch.zeros(n, device=self.acc.device)
            if self._loaded_stats is not None and len(self._loaded_stats) == n:
                self.stats.copy_(self._loaded_stats)
            self._loaded_stats = None
        return list(self.stats.unbind())

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
        bad = (~torch.isfinite(loss.detach())).any()
        per_step = self.cfg.on_nan == "skip" or self.cfg.check_every <= 1
        if per_step:
            self._bad = torch.where(bad, BIG - (self.step + 1), 0.0)
        else:
            self._bad = torch.where(bad & (self._bad == 0), BIG - (self.step + 1), self._bad)
            if (self.step + 1) % self.cfg.check_every:
                return True
        bad_code = self._agree()
        if bad_code:
            step = int(BIG - bad_code)
            where = f"step {step} (epoch {self.epoch})"
            self._stop_on_nonfinite(bad_code)
            self.skipped += 1
            self.batch += 1
            self._bad.zero_()
            self.run.event("skipped_step", step=step, epoch=self.epoch, batch=self.batch)
            self.acc.print(f"non-finite training loss at {where}: optimizer step skipped (--on_nan skip)")
            if self._stop:
                self._interrupt()
            return False
        return True

    def _agree(self) -> float:
        """One small all-reduce: (first non-finite step not yet reported, stop requested) over the ranks."""
        flags = torch.stack(
            [self._bad, torch.tensor(float(STOP.signal is not None), device=self._bad.device)]
        )
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_code, stop = flags.tolist()
        self._stop = stop > 0
        return bad_code

    def _stop_on_nonfinite(self, bad_code: float):
        if bad_code and self.cfg.on_nan == "stop":
            step = int(BIG - bad_code)
            self.run.event("nonfinite_loss", step=step, epoch=self.epoch, action="stop")
            raise NonFiniteLoss(
                f"non-finite training loss at step {step} (epoch {self.epoch}); --on_nan skip drops such steps"
            )

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
        # checks amortised over --check_every steps may not have run this epoch: a run never ends an epoch
        # (nor writes its checkpoint, nor finishes) on weights a non-finite loss reached unnoticed
        self._stop_on_nonfinite(self._agree())
        self.samples += samples
        self.epoch += 1
        self.batch = 0
        if self.stats is not None:
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
        # With checks amortised over --check_every steps, a non-finite loss may not be agreed on yet: a
        # checkpoint must never hold the weights it poisoned (--resume would load them).
        self._stop_on_nonfinite(self._agree())
        acc, rank = self.acc, self.acc.process_index
        name = f"step-{self.step:08d}"
        final, tmp = self.dir / name, self.dir / f"{name}.partial"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # collective under FSDP
        torch.save(
            {
                "stats": self.stats.detach().cpu() if self.stats is not None else None,
                "gens": [g.get_state() for g in self.gens],
                "best_state": self.best.local_state(),
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
                # torch's notes on pickle protocols: the error line says it all
                warnings.simplefilter("ignore")
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
        self._loaded_stats = blob["stats"]
        for g, state in zip(self.gens, blob["gens"], strict=False):  # older checkpoints may hold none
            g.set_state(state.cpu())
        if blob["best_state"] is not None:
            self.best.load_local(blob["best_state"], meta["best_loss"], meta["best_epoch"], self.model)
        self.run.resumed(self.epoch, self.step, directory)
        self.acc.print(
            f"resumed from {directory}: epoch {self.epoch}, step {self.step}, {self.batch} batches into the epoch"
        )

"""The lifecycle every training script shares, owned by one object so its order is written down once.

    def main():
        with Session(Config, "mlp", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:  # config, accelerator, strategy, seed
            data = load_mnist(s.cfg)
            loaders = s.loaders(data)                       # train (on the device or a DataLoader), val, test
            model = build_model(s.cfg, data.info)
            optimizer = torch.optim.Adam(model.parameters(), lr=s.cfg.lr)
            model, optimizer, train_loader, val_loader, test_loader = s.prepare(model, optimizer, *loaders)
            for epoch in s.epochs():                        # record, resume, compile warm-up, set_epoch, clocks
                train_loss, n_train = train_one_epoch(s, model, train_loader, optimizer)
                with s.evaluating():                        # timed apart from training
                    val = evaluate(s, model, val_loader)
                s.log_epoch(n_train, {"train/loss": train_loss, "val/loss": val["loss"]})  # row, best, checkpoint
            s.restore_best(model)                           # the tutorials test the best validation epoch
            with s.evaluating():
                test = evaluate(s, model, test_loader)
            s.finish({"test/loss": test["loss"]})

    if __name__ == "__main__":
        run(main)                                           # one-line errors, exit codes, clean shutdown

Inside `train_one_epoch` the loop stays the script's own, with Accelerate's idioms:

    loss_sum, seen = s.epoch_sums(2)                        # zeros, or a resumed epoch's partial sums
    for batch in s.batches(loader):                         # skips what a resumed run already trained on
        optimizer.zero_grad(set_to_none=True)
        if s.micro_batched:                                 # a pipeline schedule, or --microbatches N
            loss = s.micro_batch_step(model, x, y, loss_fn)
        else:
            loss = loss_fn(model(x), y)
            s.accelerator.backward(loss)
        if not s.step_ok(loss):                             # non-finite loss: stop, or skip with --on_nan skip
            continue
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if s.step_done():                                   # checkpoint every N steps / on SIGTERM; True at max_steps
            break

`UNSUPPORTED` names the shared knobs a script does not use ({knob: why}; "pipeline" for the pipeline and
hybrid strategies): setting one is an error naming it, never a silently recorded no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from accelerate.utils import broadcast_object_list, set_seed

from shared.checkpoint import BestCheckpoint, Progress
from shared.config import script_config
from shared.data import make_loader
from shared.device_data import DeviceLoader, use_device_data
from shared.parallel import Parallel
from shared.plan import SetupError
from shared.runlog import RunLog
from shared.runtime import (
    compile_warmup,
    count_params,
    entry,
    make_accelerator,
    peak_memory_gib,
    reset_peak_memory,
    shutdown,
    synced_clock,
    training_memory_base,
    training_memory_gib,
    training_memory_now,
)

_OPEN: list[Session] = []  # closed by run() once main() has returned and dropped the model


class Session:
    def __init__(
        self, config_cls, name: str, metrics: dict, split_points=(), unsupported: dict | None = None
    ):
        self.name, self.metrics, self.unsupported = name, metrics, dict(unsupported or {})
        self.cfg = cfg = script_config(config_cls, name, self.unsupported, sys.argv[1:])
        self.accelerator = make_accelerator(cfg)  # refuses a launch that would not do what it says
        self.par = Parallel(self.accelerator, cfg, split_points, no_pipeline=self.unsupported.get("pipeline"))
        self.device, self.dp, self.data_rank = self.accelerator.device, self.par.plan.dp, self.par.data_rank
        self.micro_batched = self.par.pipelined or self.par.plan.microbatches > 1
        set_seed(cfg.seed)  # every rank builds the same full model; pipeline stages are cut out of it
        # Per-rank augmentation draws, seeded by the data shard (the stages of a pipeline replica agree).
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed * 1000 + self.data_rank)
        self.log = self.progress = self.model = self.train_loader = self.memory_base = None
        self.data, self.data_path, self.best = None, None, BestCheckpoint(getattr(cfg, "select_best", False))
        self._epoch_done = False
        self.profiler = None
        if getattr(cfg, "profile_steps_only", False) and not cfg.profile_out:
            raise SetupError("--profile_steps_only times a profile's steps: give it with --profile_out FILE")
        if cfg.profile_out:
            if self.accelerator.num_processes > 1 or self.par.plan.strategy != "single":
                raise SetupError(
                    "--profile_out profiles one process: launch it with a one-process, single setup"
                )
        self._t = {}
        self.bar = None
        self.show_progress = cfg.progress == "true" and self.accelerator.is_main_process
        _OPEN.append(self)

    # -- building

    def loaders(self, data, collate_fn=None) -> tuple:
        """(train, val, test): the train split resident on the device when --data_on_device resolves to it
        (shared/device_data.py), else a shuffled DataLoader; val and test in order, `eval_batch_size` each."""
        cfg, par = self.cfg, self.par
        self.data = data
        pin = self.device.type == "cuda"
        # decided on the main process (free memory differs between GPUs), so every rank takes the same path
        on_device = broadcast_object_list([use_device_data(cfg, self.device, data.train)])[0]
        if on_device:
            self.data_path = "device"
            train = DeviceLoader(
                data.train,
                cfg.batch_size,
                seed=cfg.seed,
                device=self.device,
                num_processes=par.plan.dp,
                process_index=par.data_rank,
                drop_last=par.pipelined,  # pipelines need equal micro-batches every step
            )
        else:
            self.data_path = "dataloader"
            train = make_loader(data.train, cfg.batch_size, True, cfg.seed, collate_fn, pin_memory=pin)
        evals = [
            make_loader(split, cfg.eval_batch_size, False, cfg.seed, collate_fn, pin)
            for split in (data.val, data.test)
        ]
        # what training adds from here on (the model, its state, activations) is what the projection predicts
        self.memory_base = training_memory_base(self.accelerator)
        return (train, *evals)

    def prepare(self, model, optimizer, *loaders, inputs=None, loss_fn=None):
        """`accelerator.prepare` per strategy, then open the run record. `inputs(batch, cfg)`: the function the
        training loop turns a batch into (x, y) with, and `loss_fn(output, y)`: for --compile's warm-up before
        epoch 1 (a script without them refuses --compile)."""
        if self.cfg.channels_last is True:
            model = model.to(memory_format=torch.channels_last)
        info = {"params": count_params(model), "steps_per_epoch": len(loaders[0])}
        info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info |= {k: v for k, v in self.data.info.items() if isinstance(v, (int, float, str))}
        model, optimizer, *loaders = self.par.prepare(model, optimizer, *loaders)
        self.model, self.optimizer, self.train_loader = model, optimizer, loaders[0]
        self.log = RunLog(
            self.accelerator,
            self.cfg,
            self.par,
            model=self.name,
            script=os.path.abspath(getattr(sys.modules["__main__"], "__file__", sys.argv[0])),
            data=self.data,
            metrics=self.metrics,
            model_info=info,
            data_path=self.data_path,
        )
        if self.cfg.compile:
            if inputs is None or loss_fn is None:
                raise SetupError(f"{self.name} does not support --compile")
            evals = loaders[1] if len(loaders) > 1 else None
            as_run = lambda batch: inputs(batch, self.cfg)  # noqa: E731 - no augmentation: a warm-up
            s = compile_warmup(
                self.accelerator, self.cfg, self.par, model, self.train_loader, as_run, loss_fn, evals
            )
            self.log.timing(compile_s=s)
            self.accelerator.print(
                f"compiled ({self.cfg.compile}) before epoch 1: train, last-batch and eval shapes, {s:.1f} s"
            )
        self.progress = Progress(
            self.accelerator, self.cfg, self.log, self.par, model, self.best, gens=[self.gen]
        )
        if self.cfg.profile_out:
            from shared.profiling import Profiler

            self.profiler = Profiler(
                self.accelerator, self.cfg, model, optimizer, self.par.split_points, self.unsupported
            )
        return (model, optimizer, *loaders)

    # -- the loop

    def epochs(self):
        """Epoch numbers from 1 (or where a resumed run stopped); ends at `epochs` or at max_steps."""
        for epoch in self.progress.epochs():
            self.train_loader.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
            reset_peak_memory(self.accelerator)
            self._t = {"start": synced_clock(self.accelerator)}
            yield epoch
            if self._epoch_done:
                return

    @property
    def step(self) -> int:
        """Optimizer steps taken so far in the run (a resumed run continues the count)."""
        return self.progress.step

    def epoch_sums(self, n: int) -> list[torch.Tensor]:
        """`n` running sums on the device (no host sync per step), saved with checkpoints."""
        return self.progress.sums(n)

    def batches(self, loader):
        """The epoch's batches (a resumed run skips those it already trained on), with a progress bar on the
        main process: steps, rate and ETA, and the loss wherever the loop syncs anyway (--check_every)."""
        if self.profiler is not None:  # --profile_out: the profiler times the loop's steps
            loader = self.profiler.batches(loader)
        batches = self.progress.batches(loader)
        if not self.show_progress:
            return batches
        from tqdm.auto import tqdm

        total = len(loader) - self.progress.batch
        self.bar = tqdm(batches, total=total, desc=f"epoch {self.progress.epoch}", unit="step", leave=False)
        return self.bar

    def micro_batch_step(self, model, x, y, loss_fn) -> torch.Tensor:
        """Forward and backward in micro-batches (a pipeline schedule, or accumulation under no_sync)."""
        return self.par.forward_backward(model, x, y, loss_fn)

    def step_ok(self, loss: torch.Tensor) -> bool:
        ok = self.progress.take_step(loss)
        if self.bar is not None and (self.progress.step + 1) % self.cfg.check_every == 0:
            # a sync the check just made anyway
            self.bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        return ok

    def step_done(self) -> bool:
        return self.progress.step_done()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold distinct samples (the last stage of each pipeline replica)."""
        return self.par.reduce_sum(t)

    def max_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of `t` over every process (one small gather)."""
        return (
            self.accelerator.gather(t.reshape(1, *t.shape)).amax(0)
            if self.accelerator.num_processes > 1
            else t
        )

    def real_rows(self, n: int) -> int:
        """Rows of this rank's batch of `n` that are real samples: all, but in the last batch of an evaluation
        split, which Accelerate fills up with samples from the start (gather_for_metrics drops those again)."""
        state = self.accelerator.gradient_state
        if not (state.end_of_dataloader and state.remainder > 0):
            return n
        return max(0, min(n, state.remainder - self.data_rank * n))

    def gather_for_metrics(self, data):
        """`accelerator.gather_for_metrics` over the data-parallel ranks: each sample once, padding dropped."""
        return self.par.gather_for_metrics(data)

    def all_ranks(self, flag: torch.Tensor) -> bool:
        """True only if `flag` (a 0-d bool tensor) is true on every rank: one small all-reduce, a host sync."""
        flag = flag.to(self.device, torch.float32).reshape(1)
        if self.accelerator.num_processes > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @contextlib.contextmanager
    def evaluating(self):
        """Time an evaluation pass apart from training (clocks read after a device sync and a barrier)."""
        t0 = synced_clock(self.accelerator)
        if "trained" not in self._t:  # the first evaluation of the epoch: training's memory peak so far
            self._t["trained"] = t0
            self._t["train_memory"] = training_memory_now(self.accelerator, self.memory_base)
        yield
        self._t["eval_s"] = self._t.get("eval_s", 0.0) + synced_clock(self.accelerator) - t0

    def log_epoch(self, n_train: int, metrics: dict):
        """The epoch's row (console and record), the best epoch's weights, the epoch-end checkpoint."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        t, p, epoch = self._t, self.progress, self.progress.epoch
        end = synced_clock(self.accelerator)
        train_s = t.get("trained", end) - t["start"]
        self.best.update(metrics.get("val/loss", float("inf")), self.model, epoch)
        row = {"epoch": epoch, "step": p.step, "samples_seen": p.samples + n_train, **metrics}
        row |= {
            "time/train_s": train_s,
            "time/eval_s": t.get("eval_s", 0.0),
            "time/epoch_s": end - t["start"],
        }
        row["throughput/samples_per_s"] = n_train / train_s
        row["memory/peak_gib"], row["memory/all_ranks_gib"] = peak_memory_gib(self.accelerator)
        local = (
            t["train_memory"]
            if "train_memory" in t
            else training_memory_now(self.accelerator, self.memory_base)
        )
        if (trained := training_memory_gib(self.accelerator, local)) is not None:
            row["memory/train_gib"], row["memory/train_in_use_gib"] = trained
        self.log.log_epoch(row)
        self._epoch_done = p.epoch_done(n_train)  # True once max_steps is reached

    def restore_best(self, model):
        """With select_best: the weights of the epoch with the lowest validation loss, as the tutorials test."""
        self.best.restore(model)
        self._t = {}

    def finish(self, test: dict):
        """Record the test results (plus which epoch was tested and how long the test took); collective."""
        test = {**test, "test/epoch": self.best.epoch or self.progress.epoch - 1}
        test["test/time_s"] = self._t.get("eval_s")
        self.log.finish(test, self.model)

    # -- the end

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and self.log is not None:
            self.log.failed(exc)  # the record says failed / interrupted, with one line; the error propagates
        self.model = self.optimizer = self.train_loader = self.progress = None
        self.best.state = None
        return False

    def close(self):
        """Release the wrapped model before the process group ends: gloo + DDP otherwise aborts at exit."""
        if self in _OPEN:
            _OPEN.remove(self)
            shutdown(self.accelerator, self.par)


def run(main):
    """Run `main()`: bad input -> one line and exit 2, interrupted -> 130/143, crash -> traceback and 1; on
    success the process group ends after main's locals (model, optimizer) are gone."""

    def main_then_close():
        main()
        for s in list(_OPEN):
            s.close()

    entry(main_then_close)

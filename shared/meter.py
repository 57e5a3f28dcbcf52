"""Steady-state step timing and machine contention, measured inside every run (driven by `Progress`).

Per step: on the main process, a clock mark after each optimizer step (a CUDA event on a GPU, recorded on the
stream: no host synchronisation inside the step; read once at the epoch end, after the epoch's synchronize;
`time.perf_counter` on a CPU). In data-parallel and pipelined runs every step ends in a collective, so the
main process's step period is the job's. The first `warmup_steps` steps of the process are the warm-up
(allocator, thread pools, optimizer state, autotuning), timed apart as `time/warmup_s`; of the rest, each
epoch's first step (iterator start-up after evaluation) and last step (possibly a partial batch) are left out
of the steady-state figures, and so is any step during which a checkpoint was written.

Contention: from the first steady step on, the CPU time the machine spent (/proc/stat, steal included) minus
the CPU time of this run's own processes on that host is the other load; as a share of the cores it flags
the run `contended` (shared.stats.CONTENDED_SHARE).
"""

from __future__ import annotations

import os
import socket
import time

import torch
from accelerate.utils import gather_object

from shared import stats


def machine_busy_s() -> float | None:
    """CPU-seconds the whole machine has been busy (user, nice, system, irq, softirq, steal), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class StepTimer:
    def __init__(self, acc, cfg):
        self.acc, self.warmup_steps, self.batch = acc, cfg.warmup_steps, cfg.batch_size
        self.main, self.cuda = acc.is_main_process, acc.device.type == "cuda"
        self.done = 0  # steps timed by this process
        self.warmup_s = 0.0
        self.steady: list[float] = []  # every steady step of this process, seconds
        self.epoch_steady: list[float] = []
        self.epoch_warmup_s = 0.0
        self._marks: list = []  # (clock mark, kind) for the current epoch
        self._load0 = None  # (wall, machine busy s, own cpu s) at the first steady step

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start_epoch(self):
        self._marks = [(self._now(), "start")] if self.main else []

    def step(self, first: bool, last: bool):
        """After an optimizer step: `first`/`last` of the epoch's batches."""
        if self._load0 is None and self.done == self.warmup_steps:
            self._load0 = (time.perf_counter(), machine_busy_s(), time.process_time())
        kind = "warmup" if self.done < self.warmup_steps else "edge" if first or last else "steady"
        self.done += 1
        if self.main:
            self._marks.append((self._now(), kind))

    def restart_clock(self):
        """After work that is not a training step (a checkpoint): the next step is timed from here."""
        if self.main and self._marks:
            self._marks.append((self._now(), "skip"))  # the interval ending here is the checkpoint

    def end_epoch(self):
        """Turn the epoch's marks into step times (after the caller's device synchronize)."""
        self.epoch_steady, self.epoch_warmup_s = [], 0.0
        for (a, _), (b, kind) in zip(self._marks, self._marks[1:], strict=False):
            if kind == "skip":
                continue
            dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
            if kind == "warmup":
                self.epoch_warmup_s += dt
            elif kind == "steady":
                self.epoch_steady.append(dt)
        self.warmup_s += self.epoch_warmup_s
        self.steady += self.epoch_steady
        self._marks = []

    def foreign_share(self) -> float | None:
        """Collective. The other load on the main process's host since the first steady step, as a share of
        its cores; None before any steady step or without /proc/stat."""
        now = (time.perf_counter(), machine_busy_s(), time.process_time())
        mine = None if self._load0 is None else now[2] - self._load0[2]
        own = gather_object([(socket.gethostname(), mine)])
        if not self.main or self._load0 is None or now[1] is None or self._load0[1] is None:
            return None
        host = socket.gethostname()
        if any(h == host and c is None for h, c in own):
            return None
        ours = sum(c for h, c in own if h == host)
        wall = now[0] - self._load0[0]
        return (
            max(0.0, (now[1] - self._load0[1]) - ours) / (wall * (os.cpu_count() or 1)) if wall > 0 else None
        )

    def epoch_row(self) -> dict:
        """The epoch's steady-state figures for the history row (main process; empty elsewhere)."""
        row = {}
        if self.epoch_warmup_s:
            row["time/warmup_s"] = self.epoch_warmup_s
        if self.epoch_steady:
            m = stats.median(self.epoch_steady)
            row["time/step_s"] = m
            row["throughput/steady_samples_per_s"] = self.batch / m
        return row

    def summary(self, share: float | None) -> dict:
        """The run's headline (record `timing.steady`), over every steady step this process timed."""
        out = stats.summarize_steps(
            self.steady, float(self.batch), self.warmup_s, min(self.done, self.warmup_steps)
        )
        out["foreign_cpu_share"] = share
        out["contended"] = share is not None and share > stats.CONTENDED_SHARE
        out["cpu_cores"] = os.cpu_count()
        out["clock"] = "CUDA events on the main process" if self.cuda else "perf_counter on the main process"
        return out

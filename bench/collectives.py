"""Collective timings over message sizes on this launch's backend, fitted as latency + size / bandwidth.

    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml bench/collectives.py --out FILE

Per operation (all_reduce, all_gather, reduce_scatter, send/recv) and size (1 KB to 256 MB by x4), two ways:
- `barrier`: each call right after a barrier (as nccl-tests times them);
- `after_compute`: each call after GAP_S of computing on every rank, no barrier, as a training step issues
  it. On a CPU this is what a step pays: the peer's gloo threads are asleep, the ranks arrive apart, and small
  messages cost several times their after-barrier time (measured on this machine: 8 B 1.0 ms vs 0.3 ms mean,
  1 MB 3.4 ms vs 2.1 ms), so the projection uses this regime's mean (the expected cost per call).
Median, mean and range per size go in FILE. Sizes follow nccl-tests
(doc/PERFORMANCE.md): all_reduce and send/recv move S bytes per rank, all_gather gathers into S, and
reduce_scatter reduces S. The fit is t = latency + c * S / busbw with c = 2(N-1)/N for all_reduce, (N-1)/N for
all_gather and reduce_scatter, 1 for send/recv (one way: half a round trip), weighted by 1/t^2 so every size
counts alike; its error (median and worst relative residual) is reported with it. Every call's time is kept:
the projection pools the calls of the latency-bound sizes into one latency (shared/collective_time.py
`latency`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

from shared.collective_time import FACTOR, fit_alpha_beta, latency

SIZES = [1024 * 4**k for k in range(10)]  # 1 KB ... 256 MB
OPS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


GAP_S = 0.005  # compute before each `after_compute` call


def spin(seconds: float, a: torch.Tensor, sync):
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ a
        sync()


def call(op: str, buf: torch.Tensor, out: torch.Tensor, rank: int, n: int, sync):
    if op == "all_reduce":
        dist.all_reduce(buf)
    elif op == "all_gather":
        dist.all_gather_into_tensor(out, buf[: len(out) // n])
    elif op == "reduce_scatter":
        dist.reduce_scatter_tensor(buf[: len(buf) // n], out)
    elif rank == 0:  # send_recv: a round trip between ranks 0 and 1, the others idle
        dist.send(buf, 1)
        dist.recv(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)
        dist.send(buf, 0)
    sync()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--max_mb", type=float, default=256, help="largest message (MB)")
    args = ap.parse_args()
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, n = acc.process_index, acc.num_processes
    if n < 2:
        raise SystemExit("error: the collective benchmark needs 2 or more processes (a multi-process setup)")
    sync = (lambda: torch.cuda.synchronize(acc.device)) if acc.device.type == "cuda" else (lambda: None)
    sizes = [s for s in SIZES if s <= args.max_mb * 2**20]
    big = torch.ones(max(sizes) // 4, device=acc.device)  # fp32
    work = torch.randn(128, 128, device=acc.device)
    result = {"kind": "distbench-collectives", "processes": n, "backend": dist.get_backend(), "gap_s": GAP_S,
              "ops": {}, "barrier": {}}  # fmt: skip
    for regime in ("after_compute", "barrier"):
        for op in OPS:
            rows = []
            for size in sizes:
                buf = big[: size // 4]
                out = torch.empty(size // 4, device=acc.device)
                reps = 30 if size <= 2**20 else 8 if size <= 2**24 else 3
                times = []
                for k in range(2 + reps):
                    if regime == "barrier":
                        dist.barrier()
                    else:
                        spin(GAP_S, work, sync)
                    t0 = time.perf_counter()
                    call(op, buf, out, rank, n, sync)
                    if k >= 2:
                        times.append(time.perf_counter() - t0)
                if op == "send_recv":
                    times = [t / 2 for t in times]  # one way
                rows.append({"bytes": size, "median_s": statistics.median(times), "mean_s": statistics.mean(times),
                             "min_s": min(times), "max_s": max(times), "calls": reps,
                             "times_s": [round(t, 7) for t in times]})  # fmt: skip
            c = FACTOR[op](n)
            table = {"sizes": rows, "fit": fit_alpha_beta(sizes, [r["mean_s"] for r in rows], c), "factor": c}
            result["ops" if regime == "after_compute" else "barrier"][op] = table
            lat = latency(table)
            acc.print(f"{regime} {op}: latency {lat['latency_s'] * 1e3:.2f} ms [{lat['low_s'] * 1e3:.2f}-"
                      f"{lat['high_s'] * 1e3:.2f}] over {lat['calls']} calls up to {lat['up_to_bytes']} B; "
                      + json.dumps(table["fit"]))  # fmt: skip
    if acc.is_main_process:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".part", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(args.out + ".part", args.out)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()

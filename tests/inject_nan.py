"""Fault injection from outside the product: run a training script with its Nth training batch giving a NaN
loss (counting skipped batches too), the way a diverging run would.

    python tests/inject_nan.py N scripts/mlp.py --flags ...        (or under accelerate launch)
"""

import runpy
import sys

import torch

from shared.session import Session

nth, script, *args = sys.argv[1:]
nth = int(nth)
calls = 0
step_ok = Session.step_ok


def poisoned(self, loss: torch.Tensor) -> bool:
    global calls
    calls += 1
    return step_ok(self, loss * float("nan") if calls == nth else loss)


Session.step_ok = poisoned
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")

"""shared/profiling.py on a tiny model, driven as a script's loop drives it: the batch's fetch is part of a
step, the ladder is timed in rounds, and the memory-bandwidth contention is a real measurement (CPU only)."""

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from shared import profiling
from shared.profiling import Profiler

FETCH_S = 0.02  # the slow loader's time per full batch


class SlowLoader:
    """A loader that takes FETCH_S per batch of 32 rows, like a Dataset decoding samples one by one."""

    def __iter__(self):
        for _ in range(1000):
            time.sleep(FETCH_S)
            yield torch.randn(32, 8), torch.randint(0, 4, (32,))


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    """One profile for the module's tests (at most 20 rounds: seconds, not the minute a full ladder takes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profiling, "MAX_STEPS", 20)
        return profile(tmp_path_factory.mktemp("profile"))


def profile(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    acc = SimpleNamespace(device=torch.device("cpu"), print=lambda *a: None)
    cfg = SimpleNamespace(profile_out=str(tmp_path / "p.json"))
    prof = Profiler(acc, cfg, model, opt, split_points=["2"])
    seen = []
    for x, y in prof.batches(SlowLoader()):  # the script's loop
        seen.append(len(x))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y[: len(x)]).backward()
        opt.step()
    return {**json.loads((tmp_path / "p.json").read_text()), "seen": seen}


def test_a_step_includes_its_batch_fetch_pro_rata(p):
    assert set(p["sizes"]) == {"32", "16", "8", "4", "2"}
    for rows, s in p["sizes"].items():
        share = FETCH_S * int(rows) / 32  # a run at this batch fetches only these rows
        assert s["data_s"] == pytest.approx(share, rel=0.5)
        assert s["step_s"] >= s["data_s"] + s["forward_s"] + s["backward_s"]
        assert s["other_s"] >= 0.8 * s["data_s"]  # the rest of the step holds the fetch
    # warm-up per size, then timed rounds of one step per size, as often for every size
    warm = profiling.WARMUP_STEPS * 5
    assert p["seen"][:warm] == [r for r in (32, 16, 8, 4, 2) for _ in range(profiling.WARMUP_STEPS)]
    assert p["seen"][warm:] == [32, 16, 8, 4, 2] * p["sizes"]["32"]["steps"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the neighbour needs a second core")
def test_memory_contention_is_measured_on_a_cpu(p):
    # the optimizer beside a neighbour on the other core: a measured ratio >= 1, and the neighbour is gone
    assert isinstance(p["optimizer_contention"], float) and 1.0 <= p["optimizer_contention"] < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)

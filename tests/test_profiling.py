"""shared/profiling.py and shared/overheads.py on a tiny model, driven as a script's loop drives it: the
batch's fetch is part of a step, a short last batch of an epoch is not timed, and the memory-bandwidth
contention is a real measurement (CPU only)."""

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from shared import profiling
from shared.overheads import wrapper_overheads
from shared.profiling import Profiler
from tests.conftest import REPO, child_env, explain, launch

FETCH_S = 0.02  # the slow loader's time per full batch


class SlowLoader:
    """A loader that takes FETCH_S per batch of 32 rows, like a Dataset decoding samples one by one; an epoch is
    6 batches, the last of 5 rows."""

    def __iter__(self):
        for rows in (32,) * 5 + (5,):
            time.sleep(FETCH_S * rows / 32)
            yield torch.randn(rows, 8), torch.randint(0, 4, (rows,))


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    """One profile for the module's tests (20 timed steps: under a second)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profiling, "MAX_STEPS", 20)
        return profile(tmp_path_factory.mktemp("profile"))


def profile(tmp_path, steps_only=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    acc = SimpleNamespace(device=torch.device("cpu"), print=lambda *a: None)
    cfg = SimpleNamespace(profile_out=str(tmp_path / "p.json"), profile_steps_only=steps_only)
    prof = Profiler(acc, cfg, model, opt, split_points=["2"])
    seen = []
    for x, y in prof.batches(SlowLoader()):  # the script's loop
        seen.append(len(x))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y[: len(x)]).backward()
        opt.step()
    return {**json.loads((tmp_path / "p.json").read_text()), "seen": seen}


def test_a_step_includes_its_batch_fetch_and_short_batches_are_not_timed(p):
    assert set(p["sizes"]) == {"32"}  # its own batch only: bench/project.py runs a process per size
    s = p["sizes"]["32"]
    assert s["data_s"] == pytest.approx(FETCH_S, rel=0.5)
    assert s["step_s"] >= s["data_s"] + s["forward_s"] + s["backward_s"]
    assert s["other_s"] >= 0.8 * s["data_s"]  # the rest of the step holds the fetch
    # warm-up, then timed steps; every short last batch of an epoch trains, untimed
    timed = len(p["seen"]) - profiling.WARMUP_STEPS
    assert s["steps"] == 20 == timed - p["seen"][profiling.WARMUP_STEPS :].count(5)
    assert p["seen"].count(5) >= 3 and p["flops_per_step"] > 0 and p["ddp_overhead_s"] is not None


def test_steps_only_skips_the_extras(tmp_path, monkeypatch):
    monkeypatch.setattr(profiling, "MAX_STEPS", 5)
    q = profile(tmp_path, steps_only=True)
    assert q["sizes"]["32"]["steps"] == 5 and q["ddp_buckets"]
    assert q["flops_per_step"] is None and q["optimizer_contention"] is None and q["ddp_overhead_s"] is None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the neighbour needs a second core")
def test_memory_contention_is_measured_on_a_cpu(p):
    # the optimizer beside a neighbour on the other core: a measured ratio >= 1, and the neighbour is gone
    assert isinstance(p["optimizer_contention"], float) and 1.0 <= p["optimizer_contention"] < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


@pytest.mark.parametrize(
    "setup, args, needle",
    [
        (None, ["--profile_steps_only"], "give it with --profile_out"),
        ("cpu_2proc", ["--profile_out", "p.json"], "profiles one process"),
    ],
)
def test_a_profile_that_would_not_measure_what_it_says_is_refused(tmp_path, setup, args, needle):
    proc = launch(setup, "mlp", "--data", "synthetic", "--runs_dir", tmp_path, *args, env=child_env())
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "error: " in ln]
    assert proc.returncode != 0 and lines and needle in lines[0], explain(proc)
    assert not list(tmp_path.glob("*.json")) and not (REPO / "p.json").exists()


def test_a_wrapper_that_cannot_take_the_model_loses_only_its_own_figure(monkeypatch):
    import torch.distributed.fsdp as fsdp

    def refuse(*a, **k):
        raise RuntimeError("no")

    monkeypatch.setattr(fsdp, "fully_shard", refuse)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    acc = SimpleNamespace(device=torch.device("cpu"), print=lambda *a: said.append(a[0]))
    said = []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = ((torch.randn(4, 8),), {})
    overheads = wrapper_overheads(model, opt, inputs, acc.device, say=acc.print, min_rounds=3, min_s=0.01)
    assert (
        set(overheads) == {"ddp"}
        and overheads["ddp"] >= 0
        and said == ["profile: fsdp overhead not measured (RuntimeError: no)"]
    )


class Lurching(torch.optim.SGD):
    """SGD whose step takes 40 ms longer over the parameters of a model in DistributedDataParallel (as a large
    Adam's step on a CPU reads 0.9 s or 1.4 s with the page faults of its temporaries, whatever wraps it)."""

    def step(self, closure=None):
        if any(getattr(p, "_in_ddp", False) for g in self.param_groups for p in g["params"]):
            time.sleep(0.04)
        return super().step(closure)


def test_the_wrappers_overheads_are_timed_where_their_work_is(monkeypatch):
    """DDP's figure is forward + backward only, where all its work runs: an optimizer step 40 ms slower leaves
    it at the bucket copies' few ms. FSDP2's optimizer step is its own figure (the projection divides it by
    N ranks)."""
    import torch.nn.parallel

    class MarkedDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, **kw):
            super().__init__(module, **kw)
            for q in module.parameters():
                q._in_ddp = True

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", MarkedDDP)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    acc = SimpleNamespace(device=torch.device("cpu"), print=lambda *a: None)
    inputs = ((torch.randn(4, 8),), {})
    overheads = wrapper_overheads(
        model,
        Lurching(model.parameters(), lr=0.1),
        inputs,
        acc.device,
        say=acc.print,
        min_rounds=5,
        min_s=0.01,
    )
    assert set(overheads) == {"ddp", "fsdp", "fsdp_optimizer"}
    assert 0 <= overheads["ddp"] < 0.01 and 0 <= overheads["fsdp"] < 0.03, overheads
    assert not any(getattr(q, "_in_ddp", False) for q in model.parameters())  # the copies were wrapped


def test_the_profile_says_its_version(p):
    from shared.projection import PROFILE_VERSION

    assert p["version"] == PROFILE_VERSION and p["fsdp_optimizer_overhead_s"] is not None


def test_fsdp_units_are_chosen_as_accelerates_size_based_wrap():
    """Every submodule whose parameters not already in a unit below it reach the threshold is a unit, children
    first: a layer its parent's forward does not call (seq2seq's output layer) gets its own unit."""
    from shared.overheads import size_based_units

    inner = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(400, 300))
    m = torch.nn.Sequential(torch.nn.Linear(500, 300), inner, torch.nn.Linear(5, 5))
    units = size_based_units(m, min_params=100_000)
    assert units == [m[0], inner[1]]  # not `inner` itself: what is left of it is 110 parameters
    assert size_based_units(m, min_params=10**9) == []

"""The projection's formulas on known cases (shared/projection.py), the hardware files, bench/project.py's
refusals, and one end-to-end projection on this CPU with a real profile (slow)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import bench.profile_record as pr
import bench.project as bp
import bench.validation as bv
from bench import launcher
from shared.collective_time import collective_s, fit_alpha_beta, latency, pool_collectives
from shared.pricing import _fsdp_units, bubble_fraction, pipeline_makespan
from shared.projection import PROFILE_VERSION, Model, balanced_cuts, project
from tests.conftest import child_env, require_dataset

REPO = Path(__file__).resolve().parent.parent
HW = {"name": "toy", "kind": "assumed", "links": {"intra": {"busbw_GBps": 1.0, "latency_s": 1e-3},
      "inter": {"busbw_GBps": 0.1, "latency_s": 1e-2}}, "peak_tflops": {"fp32": 1.0}, "matmul_efficiency": 0.5,
      "memory_bandwidth_GBps": 100, "launch_overhead_s": 1e-6, "comm_overlaps_compute": True}  # fmt: skip


def toy_profile(batch=8):
    """Two pieces with one parameter each, times linear in the batch: forward b ms, backward 2b ms."""
    sizes = {}
    for b in (batch, batch // 2, batch // 4):
        ms = b * 1e-3
        sizes[str(b)] = {
            "step_s": 3 * ms + 1e-3 + 1e-4, "forward_s": ms, "backward_s": 2 * ms, "optimizer_s": 1e-3,
            "other_s": 1e-4, "piece_s": [ms / 2, ms / 2], "piece_bytes": [b * 400, b * 40],
            "ready_s": [2 * ms, ms], "saved_activation_bytes": b * 1000,
        }  # fmt: skip
    return {
        "batch_size": batch, "pieces": ["a", "b"], "split_points": ["b"], "unsupported": [],
        "params": [{"name": "a.w", "bytes": 4_000_000, "piece": 0}, {"name": "b.w", "bytes": 400, "piece": 1}],
        "param_bytes": 4_000_400, "grad_bytes": 4_000_400, "optimizer_state_bytes": 8_000_800,
        "ddp_buckets": [[1, 0]], "flops_per_step": 10**9, "aten_calls_per_step": 100, "sizes": sizes,
        "dtype": "float32", "host_s_per_op": 1e-5,
        # one step's calls at this batch (shared/optrace.py): on HW, 0.8 ms forward and 1.6 ms backward
        "op_trace": [["forward", "mm", "float32", "mm", 4e8, 10**6, 4 * 10**5, 1],
                     ["backward", "mm", "float32", "mm", 8e8, 2 * 10**6, 4 * 10**5, 1],
                     ["optimizer", "add_", "float32", "vector", 0, 8 * 10**6, 8 * 10**6, 6],
                     ["other", "sum", "float32", "vector", 0, 1000, 0, 1]],
    }  # fmt: skip


def test_bubble_at_p2_m4_is_a_fifth():
    assert bubble_fraction(2, 4) == pytest.approx(0.2)
    assert bubble_fraction(1, 8) == 0


def test_collectives_alpha_beta():
    s = 1e9
    assert collective_s(HW, "all_reduce", s, 1) == 0  # one device: nothing to reduce
    assert collective_s(HW, "all_reduce", 0, 4) == 0
    assert collective_s(HW, "all_reduce", s, 2) == pytest.approx(1e-3 + 1.0)  # 2(N-1)/N = 1
    assert collective_s(HW, "all_gather", s, 2) == pytest.approx(0.5e-3 + 0.5)  # one hop
    # NCCL's fewer hops of ring and tree: latency grows as log2 N, not N - 1
    assert collective_s(HW, "reduce_scatter", s, 4) == pytest.approx(1e-3 + 0.75)  # 2 hops (tree) of 0.5 ms
    assert collective_s(HW, "all_reduce", s, 4) == pytest.approx(2e-3 + 1.5)  # 4 hops, not a ring's 6
    assert collective_s(HW, "all_reduce", 8, 8) < 4e-3  # 6 hops of 0.5 ms, where a ring has 14
    # two nodes of two: reduce-scatter and all-gather inside, all-reduce of S/2 between the nodes
    inner = collective_s(HW, "reduce_scatter", s, 2) + collective_s(HW, "all_gather", s, 2)
    assert collective_s(HW, "all_reduce", s, 4, nodes=2) == pytest.approx(inner + 1e-2 + 0.5e9 / 0.1e9)
    # all-gather across nodes is hierarchical too: inside on S, between nodes each GPU's rail on S/2
    ag = collective_s(HW, "all_gather", s, 4, nodes=2)
    assert ag == pytest.approx(collective_s(HW, "all_gather", s, 2) + 0.5e-2 + 0.5 * 0.5e9 / 0.1e9)


def test_bus_bandwidth_saturates_with_the_message_size():
    hw = {**HW, "links": {"intra": {"busbw_GBps": 100.0, "latency_s": 0.0, "half_bytes": 64e6}}}
    big, bucket = collective_s(hw, "all_reduce", 8e9, 8), collective_s(hw, "all_reduce", 25 * 2**20, 8)
    assert 8e9 * 1.75 / big / 1e9 == pytest.approx(100 * 8e9 / (8e9 + 64e6))  # near the peak
    assert 25 * 2**20 * 1.75 / bucket / 1e9 == pytest.approx(100 * 25 * 2**20 / (25 * 2**20 + 64e6))  # ~29%


def test_measured_collectives_interpolate_between_sizes():
    hw = {"kind": "measured", "measured_collectives": {"2": {"all_reduce": {"sizes": [
        {"bytes": 1000, "median_s": 1e-3}, {"bytes": 100_000, "median_s": 1e-1}], "fit": {}}}}}  # fmt: skip
    assert collective_s(hw, "all_reduce", 1000, 2) == pytest.approx(1e-3)
    assert collective_s(hw, "all_reduce", 10_000, 2) == pytest.approx(1e-2)  # log-log midpoint
    assert collective_s(hw, "all_reduce", 200_000, 2) == pytest.approx(0.2, rel=0.01)  # linear beyond


def measured_table(lat: float, slow: float, busbw: float = 1e9, b2b: float | None = None) -> dict:
    """An after-compute all-reduce table as bench/collectives.py writes it (2 processes, c = 1): sizes 1 KB to
    64 MB; below 1 MB each size's 30 calls are `lat` but for a few at `slow` (bimodal, a different share per
    size, so the sizes' means are not monotone); above, latency + S / busbw."""
    rows = []
    for k in range(9):
        size = 1024 * 4**k
        base = lat + size / busbw
        times = (
            [base] * 30
            if size > 2**20
            else [lat + size / busbw + (slow if i < 2 + 3 * (k % 3) else 0) for i in range(30)]
        )
        rows.append({"bytes": size, "mean_s": sum(times) / 30, "median_s": sorted(times)[15], "calls": 30,
                     "min_s": min(times), "max_s": max(times), "times_s": times})  # fmt: skip
    table = {"sizes": rows, "factor": 1.0}
    table["fit"] = fit_alpha_beta([r["bytes"] for r in rows], [r["mean_s"] for r in rows], 1.0)
    if b2b is not None:
        table["back_to_back"] = measured_table(b2b, 0.0, busbw)
    return table


def test_fit_alpha_beta_recovers_latency_and_bandwidth():
    sizes = [1e3, 1e5, 1e7, 1e9]
    f = fit_alpha_beta(sizes, [2e-3 + 1.5 * s / 4e9 for s in sizes], 1.5)
    assert f["latency_s"] == pytest.approx(2e-3) and f["busbw_GBps"] == pytest.approx(4.0)
    assert f["error_max"] < 1e-9


def test_small_messages_cost_one_latency_pooled_over_their_calls():
    """The latency-bound sizes' calls pooled into one latency (with a bootstrap interval), not each size's own
    noisy mean interpolated: 1 KB, 4 KB and 16 KB cost the same latency plus their bandwidth term."""
    t = measured_table(lat=1e-3, slow=20e-3)
    hw = {"kind": "measured", "measured_collectives": {"2": {"all_reduce": t}}}
    lat = latency(t)
    small = [r for r in t["sizes"] if r["bytes"] <= lat["up_to_bytes"]]
    assert len(small) >= 4 and lat["calls"] == 30 * len(small)
    pooled = sum(x - r["bytes"] * lat["per_byte_s"] for r in small for x in r["times_s"]) / lat["calls"]
    assert lat["latency_s"] == pytest.approx(pooled)
    assert lat["low_s"] < lat["latency_s"] < lat["high_s"]
    means = [r["mean_s"] for r in small[:3]]
    assert max(means) / min(means) > 2  # each size's own mean: 2x apart
    for size in (1024, 4096, 16384):  # one latency for all of them
        assert collective_s(hw, "all_reduce", size, 2) == pytest.approx(
            lat["latency_s"] + size * lat["per_byte_s"]
        )
    # above the latency-bound sizes the measured means, continuous at the boundary
    top = lat["up_to_bytes"]
    assert collective_s(hw, "all_reduce", top * 1.0001, 2) == pytest.approx(
        collective_s(hw, "all_reduce", top, 2), rel=1e-3
    )
    big = t["sizes"][-1]
    assert collective_s(hw, "all_reduce", big["bytes"], 2) == pytest.approx(big["mean_s"])


def test_a_record_without_per_call_times_pools_the_sizes_means():
    t = measured_table(lat=1e-3, slow=20e-3)
    bare = {**t, "sizes": [{k: v for k, v in r.items() if k != "times_s"} for r in t["sizes"]]}
    assert latency(bare)["latency_s"] == pytest.approx(latency(t)["latency_s"])
    assert latency(bare)["low_s"] is None
    assert latency({"sizes": []}) is None and latency({"sizes": t["sizes"]}) is None  # no fit: interpolate


def test_the_stop_check_right_after_the_gradients_is_priced_back_to_back():
    """The loop's per-step stop check follows DDP's (and FSDP's) last gradient collective at once: the ranks
    arrive together and gloo's threads are awake, so it costs the back-to-back latency. After a pipeline's
    last backward it follows compute, and costs the after-compute one."""
    t = measured_table(lat=2e-3, slow=0.0, b2b=0.2e-3)
    hw = {**HW, "kind": "measured", "measured_collectives": {"2": {"all_reduce": t}}}
    assert collective_s(hw, "all_reduce", 8, 2, follows=True) == pytest.approx(0.2e-3, rel=0.01)
    assert collective_s(hw, "all_reduce", 8, 2) == pytest.approx(2e-3, rel=0.01)
    prof = {**toy_profile(8), "ddp_overhead_s": 0.0}
    ddp = project(prof, hw, "ddp", 2, batch=8)
    grads = collective_s(hw, "all_reduce", prof["grad_bytes"], 2)
    assert ddp["parts_s"]["communication"] == pytest.approx(grads + 0.2e-3, rel=0.01)
    slow_b2b = {
        **hw,
        "measured_collectives": {"2": {"all_reduce": {**t, "back_to_back": measured_table(2e-3, 0.0)}}},
    }
    assert project(prof, slow_b2b, "ddp", 2, batch=8)["step_s"] == pytest.approx(
        ddp["step_s"] + 1.8e-3, rel=0.01
    )
    pipe, pipe_slow = (project(prof, h, "pipeline", 2, batch=8) for h in (hw, slow_b2b))
    assert pipe["step_s"] == pipe_slow["step_s"]  # a pipeline's check follows compute


def test_pooling_measurements_keeps_every_call_and_the_larger_sizes():
    """Validation measures the small collectives again around each model's runs: their calls pooled with each
    other, the record's larger sizes kept, the fit redone."""
    a, b = measured_table(1e-3, 20e-3, b2b=0.3e-3), measured_table(3e-3, 0.0, b2b=0.5e-3)
    small = lambda t: {**t, "sizes": [r for r in t["sizes"] if r["bytes"] <= 2**20]}  # noqa: E731
    now = [{"2": {"all_reduce": {**small(t), "back_to_back": small(t["back_to_back"])}}} for t in (a, b)]
    rest = {"2": {"all_reduce": measured_table(9e-3, 0.0, b2b=9e-3)}}
    pooled = pool_collectives(now, rest=rest)["2"]["all_reduce"]
    sizes = [r["bytes"] for r in pooled["sizes"]]
    assert sizes == [r["bytes"] for r in rest["2"]["all_reduce"]["sizes"]]
    first = pooled["sizes"][0]
    assert first["calls"] == 60 and first["mean_s"] == pytest.approx(
        (a["sizes"][0]["mean_s"] + b["sizes"][0]["mean_s"]) / 2
    )
    assert pooled["sizes"][-1]["mean_s"] == pytest.approx(
        rest["2"]["all_reduce"]["sizes"][-1]["mean_s"]
    )  # 64 MB
    assert pooled["measurements"] == 2 and pooled["back_to_back"]["sizes"][0]["calls"] == 60
    assert pooled["fit"] != a["fit"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_makespan_equal_stages(schedule):
    # p = 2 equal stages, m = 4: (m + p - 1) slots of f + b
    assert pipeline_makespan([1, 1], [2, 2], [0, 0], 4, schedule) == pytest.approx(5 * 3)
    # m = 1 (a model split): the stages run one after the other
    assert pipeline_makespan([1, 1], [2, 2], [0, 0], 1, schedule) == pytest.approx(6)


def test_pipeline_makespan_counts_imbalance_and_sends():
    # the slow stage sets the pace: (m - 1) * 6 + one pass through both stages (1+2 + 2+4) = 27
    assert pipeline_makespan([1, 2], [2, 4], [0, 0], 4, "gpipe") == pytest.approx(27)
    assert pipeline_makespan([1, 1], [2, 2], [0.5, 0], 1, "gpipe") > 6


def test_model_reads_the_ladder():
    m = Model(toy_profile(8), {"kind": "measured"})
    assert m.times(8)["forward"] == pytest.approx(8e-3)
    assert m.times(6)["forward"] == pytest.approx(6e-3)  # between two sizes
    assert m.times(16)["backward"] == pytest.approx(32e-3)  # beyond the largest
    stages = m.stages(2, 4)
    assert [s["forward"] for s in stages] == pytest.approx([2e-3, 2e-3])
    assert sum(s["backward"] for s in stages) == pytest.approx(8e-3)
    assert stages[0]["send_bytes"] == 4 * 400 and stages[1]["send_bytes"] == 0


def test_ddp_speedup_strong_and_weak():
    hw = {**HW, "comm_overlaps_compute": False, "kind": "measured",
          "measured_collectives": {"2": {"all_reduce": {"sizes": [{"bytes": 1, "median_s": 1e-9},
                                                                  {"bytes": 10**10, "median_s": 1e-9}]}}}}  # fmt: skip
    prof = toy_profile(8)
    one = project(prof, hw, "single", 1, batch=8)
    assert one["speedup"] == pytest.approx(1.0) and one["parts_s"]["communication"] == 0
    strong = project(
        prof, hw, "ddp", 2, batch=8
    )  # free communication: each half-batch costs half the compute
    assert strong["per_device_batch"] == 4 and strong["global_batch"] == 8
    assert strong["step_s"] == pytest.approx(3 * 4e-3 + 1e-3 + 1e-4, rel=1e-6)
    weak = project(prof, hw, "ddp", 2, batch=8, scaling="weak")
    assert weak["global_batch"] == 16 and weak["speedup"] == pytest.approx(2.0, rel=1e-6)
    assert weak["efficiency"] == pytest.approx(1.0, rel=1e-6)


def test_an_unmeasured_wrapper_overhead_is_named_not_silently_zero():
    hw = {**HW, "kind": "measured", "measured_collectives": {}}
    prof = toy_profile(8)  # its profile could not time DDP's or FSDP's own work
    ddp, fsdp = (project(prof, hw, s, 2, batch=8) for s in ("ddp", "fsdp"))
    assert ddp["assumed"] == ["ddp_overhead_s = 0 (not measured)"]
    assert fsdp["assumed"] == [
        "fsdp_overhead_s = 0 (not measured)",
        "fsdp_optimizer_overhead_s = 0 (not measured)",
    ]
    timed = {**prof, "ddp_overhead_s": 2e-3, "fsdp_overhead_s": 3e-3, "fsdp_optimizer_overhead_s": 4e-3}
    ddp2, fsdp2 = (project(timed, hw, s, 2, batch=8) for s in ("ddp", "fsdp"))
    assert ddp2["assumed"] == fsdp2["assumed"] == []
    assert ddp2["step_s"] == pytest.approx(ddp["step_s"] + 2e-3)  # contention 1 in the toy profile
    assert fsdp2["step_s"] == pytest.approx(fsdp["step_s"] + 3e-3 + 4e-3 / 2)  # each rank steps half
    contended = {**timed, "optimizer_contention": 1.5}  # both ranks' copies share the memory bandwidth
    fsdp3 = project(contended, hw, "fsdp", 2, batch=8)
    assert fsdp3["step_s"] - fsdp["step_s"] - 1.5 * (3e-3 + 4e-3 / 2) == pytest.approx(
        1e-3 / 2 * (1.5 - 1)  # and the optimizer's half, contended (the toy's optimizer step: 1 ms)
    )
    assert project(prof, hw, "single", 1, batch=8)["assumed"] == []  # one device: no wrapper
    assert (
        project(prof, HW, "ddp", 2, batch=8)["assumed"] == []
    )  # a GPU: modelled from its trace, no such input


def test_ddp_overlap_bounds_exposed_communication():
    prof = toy_profile(8)
    over = project(prof, HW, "ddp", 2, batch=8)
    serial = project(prof, {**HW, "comm_overlaps_compute": False}, "ddp", 2, batch=8)
    ar = collective_s(HW, "all_reduce", prof["grad_bytes"], 2)
    control = collective_s(HW, "all_reduce", 8, 2) / 25  # the loop's stop / NaN check, every 25 steps on GPUs
    assert serial["parts_s"]["communication"] == pytest.approx(ar + control)
    # overlapped: at least the last bucket, at most all of them
    assert control < over["parts_s"]["communication"] <= ar + control
    every = project(prof, {**HW, "comm_overlaps_compute": False}, "ddp", 2, batch=8, check_every=1)
    assert every["parts_s"]["communication"] == pytest.approx(ar + 25 * control)
    assert over["bottleneck"] == "communication"  # 4 MB at 1 GB/s (4 ms) beyond ~3 ms of compute


def test_fsdp_volume_and_memory():
    prof = toy_profile(8)
    assert _fsdp_units(prof, 100_000) == [4_000_000, 400]  # the big piece alone, the rest in the root unit
    f2, f4 = (project(prof, HW, "fsdp", n, batch=8) for n in (2, 4))
    d2 = project(prof, HW, "ddp", 2, batch=8)
    assert f2["memory_gib_per_device"] < d2["memory_gib_per_device"]
    assert f4["memory_gib_per_device"] < f2["memory_gib_per_device"]
    # 3 passes over the big unit (all-gather forward and backward, reduce-scatter) vs DDP's 2 (all-reduce)
    assert f2["parts_s"]["communication"] > 1.4 * collective_s(HW, "all_reduce", prof["grad_bytes"], 2)


def test_fsdp_overlap_hides_gathers_behind_compute():
    prof = toy_profile(8)
    serial = project(prof, {**HW, "comm_overlaps_compute": False}, "fsdp", 2, batch=8)
    over = project(prof, HW, "fsdp", 2, batch=8)
    ag_big = collective_s(HW, "all_gather", 4_000_000, 2)
    assert ag_big < over["parts_s"]["communication"] < serial["parts_s"]["communication"]
    fast = {
        **HW,
        "links": {"intra": {"busbw_GBps": 1e6, "latency_s": 0.0}},
    }  # collectives shorter than compute
    exposed = project(prof, fast, "fsdp", 2, batch=8)["parts_s"]["communication"]
    assert exposed < 1e-6 + collective_s(fast, "all_reduce", 8, 2) / 25


def test_pipeline_and_hybrid_and_model_split():
    prof = toy_profile(8)
    hw = {**HW, "kind": "measured", "links": {"intra": {"busbw_GBps": 1e9, "latency_s": 0.0}}}  # free sends
    pp = project(prof, hw, "pipeline", 2, batch=8, microbatches=4)
    # two equal stages of 1 ms forward + 2 ms backward per micro-batch of 2: 5 slots of 3 ms, a fifth idle
    assert pp["parts_s"]["bubble"] == pytest.approx(bubble_fraction(2, 4) * 15e-3, rel=1e-3)
    assert pp["memory_gib_per_device"] > 0
    ms = project(prof, hw, "model_split", 2, batch=8)
    assert ms["speedup"] <= 1.0 + 1e-9
    hy = project(prof, hw, "hybrid", 4, batch=8, microbatches=2, cores=2)
    assert hy["oversubscribed"] and hy["devices"] == 4
    assert balanced_cuts([1, 1, 1, 1], 2) == [2]


def test_hardware_files_name_their_sources():
    files = sorted((REPO / "hardware").glob("*.yaml"))
    assert {f.stem for f in files} >= {"this-machine", "t4-pcie", "v100-nvlink", "a100-nvlink", "h100-nvlink",
                                       "h100-2nodes-ib"}  # fmt: skip
    for f in files:
        hw = yaml.safe_load(f.read_text())
        assert hw["name"] == f.stem and hw["kind"] in ("measured", "assumed")
        keys = ("peak_tflops", "matmul_efficiency", "memory_efficiency", "memory_bandwidth_GBps",
                "launch_overhead_s", "kernel_min_s", "host_link_GBps")  # fmt: skip
        for key in keys:
            if hw["kind"] == "assumed":
                assert key in hw, f"{f.name}: no {key}"
            if key in hw:
                assert hw.get(f"{key}_source"), f"{f.name}: {key} without a source"
        if hw["kind"] == "assumed":
            assert hw["peak_tflops"]["fp32"] > 0 and hw["gpu_match"]
        for link in hw.get("links", {}).values():
            assert link["source"] and link["busbw_GBps"] > 0


def run_project(*args, tmp_path):
    return subprocess.run([sys.executable, str(REPO / "bench/project.py"), "--runs_dir", str(tmp_path), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=child_env())  # fmt: skip


def test_a_profile_of_another_version_or_settings_is_measured_again():
    args = SimpleNamespace(batch_size=0)
    flags = {"mlp": {"batch_size": 64}, "cnn": {"batch_size": 128}, "vgg11": {"batch_size": 16}, "nbow": {}}
    rec = {"models": {
        "mlp": {"flags": {"batch_size": 64}, "version": PROFILE_VERSION},
        "cnn": {"flags": {"batch_size": 128}, "version": PROFILE_VERSION - 1},  # an older profiler's fields
        "vgg11": {"flags": {"batch_size": 8}, "version": PROFILE_VERSION},  # other settings
    }}  # fmt: skip
    me = SimpleNamespace(rec=rec, flags=flags, args=args)
    assert pr.Profiles.stale(me, ["mlp", "cnn", "vgg11", "nbow"]) == ["cnn", "vgg11", "nbow"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--hardware", "nosuch"], "--hardware nosuch: no such hardware file"),
        (["--model", "resnet"], "--model resnet: unknown"),
        (["--devices", "2,x"], "not a comma-separated list"),
        (["--devices", "0"], "must be positive"),
        (["--validate", "--validate_rounds", "0"], "--validate_rounds must be positive"),
        (["--validate_from", "/nonexistent/dir"], "no run records there"),
        (["--profile", "/nonexistent/profile.json"], "no such file"),
        (["--set", "image_size"], "expected key=value pairs"),
        (["--set", "batch_size=8"], "the batch is --batch_size"),
        (["--collectives", "/nonexistent/all_reduce.txt", "--hardware", "t4-pcie"], "cannot read"),
        (["--collectives", str(REPO / "tests/fixtures/nccl/all_reduce_2xH100_lambda.txt")], "GPU --hardware"),
    ],
)
def test_bad_input_is_one_line(args, says, tmp_path):
    r = run_project(*args, tmp_path=tmp_path)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


@pytest.mark.slow
def test_end_to_end_on_this_cpu(tmp_path):
    """Profile the MLP for real (one process) and the collectives (two), project it on this machine and on a
    named GPU setup, then validate against a real 2-process DDP run of the same batch."""
    data_dir = str(require_dataset("mnist"))
    r = run_project("--model", "mlp", "--batch_size", "64", "--devices", "1,2,4", "--data_dir", data_dir,
                    "--collective_max_mb", "4", "--out", str(tmp_path / "p.json"), tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "p.json").read_text())
    strategies = {p["strategy"] for p in rec["predictions"] if p["devices"] == 2}
    assert strategies == {"ddp", "fsdp", "pipeline", "pipeline_1f1b", "model_split"}
    (hybrid,) = [p for p in rec["predictions"] if p["strategy"] == "hybrid" and p["scaling"] == "strong"]
    assert hybrid["devices"] == 4 and hybrid["oversubscribed"] == ((os.cpu_count() or 1) < 4)
    for p in rec["predictions"]:
        assert p["step_s"] > 0 and p["bottleneck"] in (
            "input",
            "compute",
            "communication",
            "bubble",
            "memory",
        )
        assert p["speedup"] == pytest.approx(p["single_step_s"] * p["global_batch"] / 64 / p["step_s"])
    prof = json.loads(next((tmp_path / "profiles").glob("profile-*.json")).read_text())
    assert prof["models"]["mlp"]["batch_size"] == 64 and "2" in prof["collectives"]
    assert set(prof["models"]["mlp"]["sizes"]) == {"64", "32", "16", "8"}
    assert all(s["data_s"] > 0 for s in prof["models"]["mlp"]["sizes"].values())  # the loader's fetch counts
    ar = prof["collectives"]["2"]["all_reduce"]  # every call kept, both regimes
    assert all(len(r["times_s"]) == r["calls"] for t in (ar, ar["back_to_back"]) for r in t["sizes"])
    lat = rec["hardware"]["collective_latency"]["2"]["all_reduce"]  # the pooled latency, with its interval
    for regime in ("after_compute", "back_to_back"):
        assert 0 < lat[regime]["low_s"] <= lat[regime]["latency_s"] <= lat[regime]["high_s"] < 0.1
        assert lat[regime]["calls"] >= 30
    # a second projection reuses the profile: instant, and on another hardware file
    r = run_project("--model", "mlp", "--batch_size", "64", "--hardware", "t4-pcie", "--devices", "2",
                    "--data_dir", data_dir, "--out", str(tmp_path / "t4.json"), tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "reuse" not in r.stderr and "profile record" in r.stdout
    t4 = json.loads((tmp_path / "t4.json").read_text())
    assert t4["hardware"]["name"] == "t4-pcie" and t4["predictions"]
    # validation against a real DDP run at the same batch
    runs = tmp_path / "real"
    launch = launcher.command("mlp", ["--data_dir", data_dir, "--runs_dir", runs, "--batch_size", 64, "--limit_train",
                              6400, "--epochs", 1, "--limit_eval", 64, "--augment", "false"],
                              config="cpu_2proc", threads=1)  # fmt: skip
    assert subprocess.run(launch, capture_output=True, cwd=REPO, timeout=300, env=child_env()).returncode == 0
    r = run_project("--model", "mlp", "--batch_size", "64", "--devices", "2", "--data_dir", data_dir,
                    "--validate_from", str(runs), "--out", str(tmp_path / "v.json"), tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads((tmp_path / "v.json").read_text())["validation"]
    assert row["strategy"] == "ddp" and row["devices"] == 2 and row["measured_step_s"] > 0
    assert row["error"] == pytest.approx(
        (row["predicted_step_s"] - row["measured_step_s"]) / row["measured_step_s"]
    )
    # a run already in the runs folder (the user's own) is compared with the projection without asking
    (good,) = runs.glob("*.json")
    shutil.copy(good, tmp_path / good.name)
    r = run_project("--model", "mlp", "--batch_size", "64", "--devices", "2", "--data_dir", data_dir,
                    "--out", str(tmp_path / "yours.json"), tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "your runs in" in r.stdout and "mean |error|" in r.stdout, r.stdout[-2000:]
    (mine,) = json.loads((tmp_path / "yours.json").read_text())["runs_folder_check"]
    assert mine["strategy"] == "ddp" and mine["measured_step_s"] == row["measured_step_s"]
    (tmp_path / good.name).unlink()
    # a run that did not finish is not a validated cell: said in one line, exit 1, the record still written
    (runs / "crashed.json").write_text(json.dumps({**json.loads(good.read_text()), "status": "failed"}))
    r = run_project("--model", "mlp", "--batch_size", "64", "--devices", "2", "--data_dir", data_dir,
                    "--validate_from", str(runs), "--out", str(tmp_path / "v2.json"), tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: validation incomplete, not finished: mlp ddp (crashed.json: failed) (see the bench's logs)"
    ]
    v2 = json.loads((tmp_path / "v2.json").read_text())
    assert len(v2["validation"]) == 1 and v2["validation_summary"]["missing"] == [
        "mlp ddp (crashed.json: failed)"
    ]


@pytest.mark.slow
def test_ctrl_c_stops_make_project_and_every_process_it_started(tmp_path):
    """SIGINT to bench/project.py alone (as `kill -INT`) while the collectives run on 2 processes: it exits 130
    in one line and leaves no launcher or worker behind (killing the launcher alone would orphan them)."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, str(REPO / "bench/project.py"), "--runs_dir", str(runs), "--model", "mlp",
                             "--data_dir", str(require_dataset("mnist")), "--out", str(tmp_path / "p.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=child_env(),
                            # as from a terminal: a runner started in the background (`cmd &`) hands its
                            # children SIGINT ignored, and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip

    def ours(pattern):
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        return [pid for pid in found if int(pid) != proc.pid]

    deadline = time.monotonic() + 120
    while len(ours(f"collectives.py --out {runs}")) < 2:  # both workers are up
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted:"), err[-2000:]
    assert ours(str(runs)) == [], "processes of the interrupted projection are still running"
    assert not (tmp_path / "p.json").exists()


def test_a_live_validation_names_every_cell_without_a_finished_run(tmp_path, monkeypatch):
    """bench/run.py that wrote nothing (crashed, killed): every cell of bench-strategies is listed as missing,
    not merely fewer cells averaged. The model is profiled before each round of launches and after the last,
    and the mean of those profiles is what predicts."""
    launched = []
    monkeypatch.setattr(bv, "run_group", lambda cmd, *a, **k: launched.append(cmd) or 1)
    args = SimpleNamespace(validate_from="", runs_dir=str(tmp_path), data_dir="unused", validate_rounds=3)
    calls = []

    class Profiles:
        def now(self, model):
            calls.append(("now", model))
            return len(calls), {}

        def pool(self, model, samples):
            calls.append(("pool", model, [k for k, _ in samples]))

    check, missing = bv.validate(args, {"models": {"mlp": toy_profile(8)}}, {"kind": "measured"}, ["mlp", "nbow"],
                                 Profiles())  # fmt: skip
    setups = [n for s in yaml.safe_load((REPO / "bench/strategies.yaml").read_text())["setups"] for n in s]
    assert check == [] and missing == [f"mlp {s}" for s in setups] and len(setups) == 7
    assert calls == [("now", "mlp")] * 4 + [("pool", "mlp", [1, 2, 3, 4])]  # nbow is not a strategies model
    assert len(launched) == 3 and all(c[-2:] == ["--repeats", "1"] for c in launched)


def test_two_profiles_of_a_model_average_its_numbers_only():
    a, b = toy_profile(8), toy_profile(8)
    for s in b["sizes"].values():
        s["step_s"] *= 3
        s["ready_s"] = [None, 0.5]
    b["optimizer_contention"], a["optimizer_contention"] = 1.5, None
    m = pr.mean_of(a, b)
    assert m["sizes"]["8"]["step_s"] == pytest.approx(2 * a["sizes"]["8"]["step_s"])
    assert pr.mean_of(a, b, b)["sizes"]["8"]["step_s"] == pytest.approx(7 / 3 * a["sizes"]["8"]["step_s"])
    assert m["optimizer_contention"] == 1.5 and m["ddp_buckets"] == a["ddp_buckets"]
    ready = a["sizes"]["8"]["ready_s"]
    assert m["sizes"]["8"]["ready_s"] == [ready[0], pytest.approx((0.5 + ready[1]) / 2)]


@pytest.mark.parametrize(
    "text", ["name: [unclosed", "- just\n- a list\n", "name: x\nkind: assumed\npeak_flops: 8.1e12\n"]
)
def test_a_bad_hardware_file_is_one_line(text, tmp_path):
    bad = tmp_path / "my.yaml"
    bad.write_text(text)
    r = run_project("--hardware", str(bad), tmp_path=tmp_path / "runs")
    assert r.returncode == 2 and str(bad) in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_the_profiled_ladder_covers_the_validated_batches():
    # B (single, model split), B/2 (DDP, FSDP), B/4 (GPipe / 1F1B micro-batch), B/8 (2 x 2 hybrid micro-batch)
    assert pr.ladder(256) == [256, 128, 64, 32] and pr.ladder(16) == [16, 8, 4, 2]
    assert pr.ladder(3) == [3, 2] and pr.ladder(1) == [1]  # never below 2 rows unless the batch is 1


def test_validating_from_a_folder_names_what_is_not_a_run_record(tmp_path):
    (tmp_path / "torn.json").write_text('{"model": "mlp", "sta')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "other.json").write_text(
        json.dumps({"model": "nbow", "setup": {}})
    )  # not this profile's model
    args = SimpleNamespace(validate_from=str(tmp_path))
    check, missing = bv.validate(
        args, {"models": {"mlp": toy_profile(8)}}, {"kind": "measured"}, ["mlp"], None
    )
    assert check == [] and missing == ["list.json: not a run record", "torn.json: not a run record"]


FIXTURES = REPO / "tests" / "fixtures" / "nccl"


def test_real_nccl_tests_output_is_read_as_the_clusters_collectives():
    from shared import nccl_tests

    dgx = nccl_tests.parse(
        (FIXTURES / "all_reduce_2x8xH100_dgx.txt").read_text(), "all_reduce_2x8xH100_dgx.txt"
    )
    assert dgx["op"] == "all_reduce" and dgx["ranks"] == 16 and dgx["devices"] == ["NVIDIA H100 80GB HBM3"]
    assert dgx["rows"][0] == (8, pytest.approx(172.7e-6), 0.0)
    assert dgx["rows"][-1] == (17179869184, pytest.approx(0.068195), 472.35)
    two = nccl_tests.parse((FIXTURES / "all_reduce_2xH100_lambda.txt").read_text(), "x_all_reduce.txt")
    assert two["ranks"] == 2 and len(two["rows"]) == 31
    tables = nccl_tests.load(
        [str(FIXTURES / f) for f in ("all_reduce_2x8xH100_dgx.txt", "all_reduce_2xH100_lambda.txt")]
    )
    hw = {**bp.load_hardware("h100-2nodes-ib"), "measured_collectives": tables}
    # at a measured size and rank count, the file's own time; between sizes, interpolated
    assert collective_s(hw, "all_reduce", 8589934592, 16, nodes=2) == pytest.approx(0.034409, rel=1e-3)
    assert 1373.1e-6 < collective_s(hw, "all_reduce", 25 * 2**20, 16, nodes=2) < 1568.7e-6
    assert collective_s(hw, "all_reduce", 2**30, 2) == pytest.approx(3105.0e-6, rel=1e-3)
    # other rank counts and ops: the hardware file's links
    assert collective_s(hw, "all_gather", 2**30, 16, nodes=2) == pytest.approx(
        collective_s(bp.load_hardware("h100-2nodes-ib"), "all_gather", 2**30, 16, nodes=2)
    )


@pytest.mark.parametrize(
    "text, says", [("no table here\n", "which collective"), ("#  Rank 0\n", "which collective")]
)
def test_a_file_that_is_not_nccl_tests_output_is_one_line(text, says, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text(text)
    proc = run_project("--hardware", "h100-nvlink", "--collectives", str(bad), tmp_path=tmp_path)
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )
    named = tmp_path / "all_reduce.txt"
    named.write_text(text)
    proc = run_project("--hardware", "h100-nvlink", "--collectives", str(named), tmp_path=tmp_path)
    assert proc.returncode == 2 and "no nccl-tests table" in proc.stderr, proc.stderr
    proc = run_project("--hardware", "h100-nvlink", "--collectives", str(tmp_path / "missing_all_gather.txt"),
                       tmp_path=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "cannot read" in proc.stderr, proc.stderr


def test_what_is_asked_is_what_is_profiled():
    args = SimpleNamespace(batch_size=512, set="image_size=224,freeze=true")
    fl = pr.settings("vgg11", {"vgg11": {"batch_size": 16, "limit_train": 192, "image_size": 32}}, args)
    # the batch asked for, enough rows for the profile's steps at it, and the script's own flags
    assert fl == {"batch_size": 512, "limit_train": 6144, "image_size": "224", "freeze": "true"}


def test_fsdp_gathers_a_unit_again_at_every_call():
    """A unit whose forward runs k times a step (seq2seq's decoder, once per teacher-forced segment) is
    all-gathered k times in forward and again in backward: FSDP2 reshards it after every call."""
    prof = toy_profile(8)
    hw = {**HW, "comm_overlaps_compute": False}
    once = project(prof, hw, "fsdp", 2, batch=8)["parts_s"]["communication"]
    thrice = {**prof, "sizes": {b: {**s, "piece_calls": [3, 1]} for b, s in prof["sizes"].items()}}
    more = project(thrice, hw, "fsdp", 2, batch=8)["parts_s"]["communication"]
    ag = collective_s(hw, "all_gather", 4_000_000, 2)
    assert more - once == pytest.approx(2 * 2 * ag)  # 2 more calls, gathered in forward and in backward

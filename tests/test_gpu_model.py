"""The modelled GPU step (shared/optrace.py, shared/roofline.py), measured vs modelled compute, ranges and
verdicts (shared/projection.py, shared/verdicts.py), and the published points' meta-device profiles
(bench/gpu_validation.py)."""

import json
from pathlib import Path

import pytest
import torch

from bench.gpu_validation import PUBLISHED, bucket_layout, meta_profile
from bench.project import load_hardware
from shared.optrace import OpTrace
from shared.projection import project
from shared.roofline import gpu_step, kernel_s, peak_flops
from shared.verdicts import load_residuals, recommendation_lines, verdict_lines, with_range
from tests.test_projection import HW, toy_profile

REPO = Path(__file__).resolve().parents[1]


def trace(model, x, loss=lambda y: y.float().sum()):
    phase = ["forward"]
    with OpTrace(lambda: phase[0], list(model.parameters())) as t:
        y = model(x)
        phase[0] = "backward"
        loss(y[0] if isinstance(y, tuple) else y).backward()
    return t.calls


def test_lstm_flops_are_counted_where_torch_counts_none():
    T, B, n_in, H = 7, 3, 16, 32
    calls = trace(torch.nn.LSTM(n_in, H, 2), torch.randn(T, B, n_in))
    fwd = sum(c[4] * c[7] for c in calls if c[0] == "forward")
    bwd = sum(c[4] * c[7] for c in calls if c[0] == "backward")
    # per layer 2·T·B·4H·(n_in + H): layer 1 reads n_in, layer 2 reads the first layer's H
    assert fwd == 2 * T * B * 4 * H * (n_in + H) + 2 * T * B * 4 * H * (H + H)
    assert bwd == 2 * fwd
    assert {c[3] for c in calls if "rnn" in c[1]} == {"rnn"}


@pytest.mark.parametrize("groups", [1, 8])
def test_a_convolutions_backward_costs_twice_its_forward_grouped_or_not(groups):
    conv = torch.nn.Conv2d(8, 16 if groups == 1 else 8, 3, padding=1, groups=groups)
    calls = trace(conv, torch.randn(2, 8, 10, 10, requires_grad=True))
    flops = {c[1]: c[4] for c in calls if c[4]}
    assert (
        flops["convolution_backward"] == 2 * flops["convolution"]
    )  # torch's formula: ~C times for depthwise


def test_parameter_bytes_do_not_grow_with_the_batch_and_views_launch_nothing():
    lin = torch.nn.Linear(64, 32)
    calls = trace(lin, torch.randn(4, 64))
    addmm = next(c for c in calls if c[1] == "addmm")
    assert addmm[6] == (64 * 32 + 32) * 4  # the weight and bias it reads are fixed; input and output are not
    assert addmm[5] == addmm[6] + (4 * 64 + 4 * 32) * 4
    assert all(c[5] == 0 for c in calls if c[3] == "view")
    # a weight's gradient (backward, the shape of a parameter) does not grow with the batch either
    mm_grad = [c for c in calls if c[0] == "backward" and c[1] == "mm"]
    assert any(c[6] >= 64 * 32 * 4 for c in mm_grad)


def test_the_right_peak_for_each_dtype_and_kind():
    a100, t4 = load_hardware("a100-nvlink"), load_hardware("t4-pcie")
    eff = a100["matmul_efficiency"]
    assert peak_flops(a100, "float32", "conv") == pytest.approx(156e12 * eff)  # cuDNN: TF32 by default
    assert peak_flops(a100, "float32", "mm") == pytest.approx(19.5e12 * eff)  # torch: fp32 matmul by default
    assert peak_flops(a100, "float32", "mm", tf32_matmul=True) == pytest.approx(156e12 * eff)
    assert peak_flops(a100, "bfloat16", "mm") == pytest.approx(312e12 * eff)
    assert peak_flops(t4, "bfloat16", "mm") == pytest.approx(65e12 * eff)  # no bf16 on Turing: fp16's
    assert peak_flops(t4, "float32", "conv") == pytest.approx(8.1e12 * eff)  # no TF32 on Turing
    assert peak_flops(t4, "float32", "vector") == pytest.approx(8.1e12)


def test_a_call_costs_its_math_its_bytes_or_the_shortest_kernel():
    hw = {"peak_tflops": {"fp32": 1.0}, "matmul_efficiency": 0.5, "memory_bandwidth_GBps": 100,
          "memory_efficiency": 0.5, "kernel_min_s": 1e-6}  # fmt: skip
    assert kernel_s(hw, ["forward", "mm", "float32", "mm", 1e9, 0, 0, 1], 1.0) == pytest.approx(2e-3)
    assert kernel_s(hw, ["forward", "add", "float32", "vector", 0, 5e8, 0, 1], 1.0) == pytest.approx(1e-2)
    assert kernel_s(hw, ["forward", "add", "float32", "vector", 0, 10, 0, 1], 1.0) == 1e-6
    # at twice the batch: twice the FLOPs, and the bytes beyond the fixed ones twice
    assert kernel_s(hw, ["forward", "add", "float32", "vector", 0, 5e8, 1e8, 1], 2.0) == pytest.approx(
        (1e8 + 2 * 4e8) / 50e9
    )


def step_of(calls, **hw_extra):
    hw = {"peak_tflops": {"fp32": 1.0}, "memory_bandwidth_GBps": 1000, "launch_overhead_s": 0.0,
          "kernel_min_s": 0.0, **hw_extra}  # fmt: skip
    prof = {"op_trace": calls, "host_s_per_op": 1e-5, "params": [], "grad_bytes": 0, "optimizer_state_bytes": 0,
            "batch_size": 4, "sizes": {"4": {"data_s": 2e-3, "other_s": 3e-3}}}  # fmt: skip
    return gpu_step(prof, hw, fused=True)


def test_the_host_runs_ahead_of_the_device_until_a_sync():
    big = ["forward", "mm", "float32", "mm", 1e10, 0, 0, 1]  # 10 ms on the device
    tiny = ["forward", "relu", "float32", "vector", 0, 0, 0, 100]  # 100 calls of 10 us host each
    parts = step_of([big, tiny])
    assert parts["forward"] == pytest.approx(1e-5 + 1e-2)  # the tiny calls queue behind the big one
    host_bound = step_of([tiny])
    assert host_bound["forward"] == pytest.approx(100 * 1e-5)
    sync = ["forward", "_local_scalar_dense", "float32", "sync", 0, 0, 0, 1]
    waited = step_of([big, sync, tiny])  # .item() after the big call: the tiny ones start after it
    assert waited["forward"] == pytest.approx(
        1e-5 + 1e-2 + 1e-3
    )  # the sync's own host cost hides in the wait
    # the input and the loop's own Python are the profiling host's, slower hosts slower
    assert parts["input"] == pytest.approx(2e-3)
    assert step_of([big], host_slowdown=2.0)["input"] == pytest.approx(4e-3)


def test_the_gpu_runs_its_own_optimizer_not_the_cpus():
    prof = toy_profile(8)
    cpu_calls = [c for c in prof["op_trace"] if c[0] == "optimizer"]
    fused = gpu_step(prof, HW, fused=True)
    foreach = gpu_step(prof, HW, fused=False)
    traffic = 2 * prof["grad_bytes"] + prof["grad_bytes"] + 2 * prof["optimizer_state_bytes"]
    # one multi-tensor kernel at memory bandwidth; its host cost (1e-5 + 1e-6) hides behind a busy device
    assert traffic / 100e9 * (1 - 1e-9) <= fused["optimizer"] <= traffic / 100e9 + 1.1e-5
    assert foreach["optimizer"] > fused["optimizer"]  # more kernels, more passes
    assert len(cpu_calls) == 1 and cpu_calls[0][7] == 6  # the CPU's 6 calls are not what a GPU runs


def test_compute_is_measured_on_its_own_gpu_and_modelled_elsewhere():
    prof = {**toy_profile(8), "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3"}
    h100, a100 = load_hardware("h100-nvlink"), load_hardware("a100-nvlink")
    same = project(prof, h100, "ddp", 2, batch=8)
    other = project(prof, a100, "ddp", 2, batch=8)
    assert same["compute_source"] == "measured on NVIDIA H100 80GB HBM3"
    assert other["compute_source"] == "modelled from a100-nvlink"
    assert same["parts_s"]["compute"] == pytest.approx(
        project(prof, h100, "single", 1, batch=4)["step_s"], rel=0.01
    )
    cpu = project(toy_profile(8), h100, "single", 1, batch=8)
    assert cpu["compute_source"] == "modelled from h100-nvlink"
    with pytest.raises(ValueError, match="no op trace"):
        project({**toy_profile(8), "op_trace": None}, h100, "single", 1, batch=8)


def test_ranges_and_verdicts_follow_the_residuals_of_their_kind():
    res = {"measured": {"step": {"low": -0.2, "high": 0.1}, "speedup": {"low": -0.1, "high": 0.25}, "source": "x"},
           "modelled": {"step": {"low": -0.5, "high": 1.0}, "speedup": {"low": 0.0, "high": 0.5}}}  # fmt: skip
    base = {"strategy": "ddp", "devices": 2, "step_s": 1.0, "compute_source": "modelled from t4-pcie",
            "scaling": "strong", "bottleneck": "compute"}  # fmt: skip
    r = with_range({**base, "speedup": 1.8}, res)
    assert r["speedup_range"] == pytest.approx([1.2, 1.8]) and r["verdict"] == "pays off"
    assert r["step_range_s"] == pytest.approx([0.5, 2.0])
    assert with_range({**base, "speedup": 1.2}, res)["verdict"] == "cannot tell"  # 0.8 .. 1.2
    assert with_range({**base, "speedup": 0.9}, res)["verdict"] == "does not pay off"  # 0.6 .. 0.9
    m = with_range({**base, "speedup": 1.2, "compute_source": "measured on cpu"}, res)
    assert m["speedup_range"] == pytest.approx([0.96, 1.333], rel=1e-3) and m["verdict"] == "cannot tell"
    assert with_range({**base, "speedup": 2.0}, {})["verdict"] == "cannot tell"  # no validation: no claim
    one = with_range({**base, "strategy": "single", "devices": 1, "speedup": 1.0}, res)
    assert one["verdict"] == "baseline"
    lines = verdict_lines("m", "t4-pcie", [with_range({**base, "speedup": 0.9}, res), one])
    assert lines == [
        "m on t4-pcie, N = 2 (strong scaling): does not pay off: stay on one device (best: ddp x0.90 [0.60-0.90], "
        "compute-bound), compute modelled from t4-pcie"
    ]


def test_the_committed_residuals_name_their_sources():
    res = load_residuals()
    for kind in ("measured", "modelled"):
        assert res[kind]["source"]
        for what in ("step", "speedup"):
            assert (
                res[kind][what]["low"] <= 0 <= res[kind][what]["high"]
                or res[kind][what]["low"] <= res[kind][what]["high"]
            )


def test_published_points_are_profiled_on_the_meta_device():
    prof = meta_profile("resnet18", 32, "fp32", 1e-5)
    flops = sum(c[4] * c[7] for c in prof["op_trace"])
    # resnet18: 1.8 G multiply-adds per image forward (torchvision's "GFLOPS"), 2 FLOPs each, x3 with backward
    assert 3 * 3.6e9 * 32 * 0.95 < flops < 3 * 3.6e9 * 32 * 1.05
    v100 = load_hardware("v100-nvlink")
    one = project(prof, v100, "single", 1, batch=32)
    assert one["compute_source"] == "modelled from v100-nvlink" and one["step_s"] > 0
    assert bucket_layout([2 << 20, 10, 30 << 20]) == [[2], [1, 0]]
    assert len(PUBLISHED) >= 6 and all(p[8] for p in PUBLISHED)  # every point names its source


def test_the_projection_chart_draws_bands_and_names_the_compute_kind():
    from board.projection import fig_projection, verdicts

    res = load_residuals()
    hw = load_hardware("t4-pcie")
    prof = toy_profile(8)
    preds = [
        {"model": "toy", "hardware": "t4-pcie", **with_range(project(prof, hw, s, n, batch=8), res)}
        for s, n in (("single", 1), ("ddp", 2), ("ddp", 4), ("fsdp", 2))
    ]
    rec = {"predictions": preds, "verdicts": {"toy": verdict_lines("toy", "t4-pcie", preds)}}
    fig = fig_projection(rec, "toy", "strong")
    bands = [t for t in fig.data if t.fill == "toself"]
    assert {t.name for t in bands} == {"ddp range", "fsdp range"}
    ddp_band = next(t for t in bands if t.name == "ddp range")
    ddp = [p for p in preds if p["strategy"] == "ddp"]
    # from N = 1 (exactly 1) through each N's range, upper edge out and lower edge back
    assert list(ddp_band.x) == [1, 2, 4, 4, 2, 1]
    assert list(ddp_band.y[1:3]) == pytest.approx([p["speedup_range"][1] for p in ddp])
    assert list(ddp_band.y[3:5]) == pytest.approx([p["speedup_range"][0] for p in reversed(ddp)])
    names = {t.name for t in fig.data if t.mode == "lines+markers"}
    assert names == {"single (modelled compute)", "ddp (modelled compute)", "fsdp (modelled compute)"}
    assert "modelled from t4-pcie" in fig.layout.annotations[0].text
    assert verdicts(rec, "toy")[0].startswith("toy on t4-pcie, N = 2 (strong scaling): ")
    assert verdicts({"predictions": []}, "toy") == []  # an older record: no verdicts, no error


def test_more_than_linear_only_with_a_named_cause():
    hw = load_hardware("h100-nvlink")
    prof = toy_profile(8)
    for strategy, n in (("ddp", 2), ("ddp", 4), ("fsdp", 2), ("fsdp", 4)):
        p = project(prof, hw, strategy, n, batch=8)
        if p["efficiency"] > 1:
            assert p["superlinear_cause"] not in (None, "unexplained"), p
        else:
            assert p["superlinear_cause"] is None
    # a ladder that costs less per sample at the smaller batch is a cause, and is named
    cheap = {
        **prof,
        "sizes": {**prof["sizes"], "4": {**prof["sizes"]["4"], "forward_s": 1e-3, "backward_s": 1e-3}},
    }
    free = {"intra": {"busbw_GBps": 1e9, "latency_s": 0.0}}
    p = project(
        cheap, {**HW, "kind": "measured", "measured_collectives": {}, "links": free}, "ddp", 2, batch=8
    )
    assert p["efficiency"] > 1 and "costs less per sample" in p["superlinear_cause"]


def test_the_verdict_names_the_simplest_strategy_within_five_percent():
    res = load_residuals()
    base = {"devices": 2, "step_s": 1.0, "compute_source": "modelled from x", "scaling": "strong",
            "bottleneck": "compute", "parts_s": {"compute": 0.9}}  # fmt: skip
    preds = [
        with_range({**base, "strategy": s, "speedup": v}, res) for s, v in (("fsdp", 1.9), ("ddp", 1.85))
    ]
    assert ": ddp x1.85" in verdict_lines("m", "x", preds)[0]
    preds = [with_range({**base, "strategy": s, "speedup": v}, res) for s, v in (("fsdp", 1.9), ("ddp", 1.5))]
    assert ": fsdp x1.90" in verdict_lines("m", "x", preds)[0]
    # a model split (one device at a time, x1.00) is never the verdict's choice while anything else fits:
    # the verdict and the recommendation name the same strategy
    preds = [
        with_range({**base, "strategy": s, "speedup": v}, res)
        for s, v in (("model_split", 1.0), ("ddp", 0.6))
    ]
    line = verdict_lines("m", "x", preds)[0]
    assert "does not pay off" in line and "best: ddp x0.60" in line, line
    assert "(best: ddp" in recommendation_lines("m", "x", preds)[1]
    only = [with_range({**base, "strategy": "model_split", "speedup": 1.0}, res)]
    assert "model_split x1.00" in verdict_lines("m", "x", only)[0]


def test_committed_gpu_projections_are_never_more_than_linear_without_a_cause():
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "docs" / "results" / "2026-12-07" / "projection"
    recs = [json.loads(f.read_text()) for f in sorted(folder.glob("projection-*.json"))]
    gpu = [p for r in recs if r["hardware"]["kind"] != "measured" for p in r["predictions"]]
    assert gpu, "no committed GPU projection"
    for p in gpu:
        if p["efficiency"] > 1 + 1e-9:
            assert p.get("superlinear_cause") not in (None, "unexplained"), p
        assert p["compute_source"].startswith("modelled from ") and p["speedup_range"] and p["verdict"]


def test_ddp_and_fsdp_cost_their_own_copies_and_kernels_on_a_modelled_gpu(monkeypatch):
    """A modelled GPU is charged DDP's bucket copies and kernels, and FSDP2's gather/scatter copies and kernels
    (shared/roofline.py), not the CPU's one-rank figures and not nothing."""
    from shared import pricing, roofline

    h100 = load_hardware("h100-nvlink")
    prof = toy_profile(8)
    single = project(prof, h100, "single", 1, batch=4)["parts_s"]["compute"]
    ddp = project(prof, h100, "ddp", 2, batch=8)
    own = roofline.ddp_wrapper_s(prof, h100, len(prof["ddp_buckets"]))
    bw = h100["memory_bandwidth_GBps"] * 1e9 * h100.get("memory_efficiency", 1.0)
    assert own >= 3 * 2 * prof["grad_bytes"] / bw and own > 0
    assert ddp["parts_s"]["compute"] == pytest.approx(single + own, rel=0.01)
    fsdp = project(prof, h100, "fsdp", 2, batch=8)["parts_s"]["compute"]
    units = pricing._fsdp_units(prof, 100_000)
    calls = pricing._fsdp_unit_calls(prof, 100_000)
    fsdp_own = roofline.fsdp_wrapper_s(prof, h100, units, calls, 2)
    monkeypatch.setattr(roofline, "fsdp_wrapper_s", lambda *a: 0.0)
    assert fsdp_own > 0 and fsdp == pytest.approx(
        project(prof, h100, "fsdp", 2, batch=8)["parts_s"]["compute"] + fsdp_own
    )
    frozen = {**prof, "grad_bytes": 0}  # frozen: no gradient to copy
    assert roofline.ddp_wrapper_s(frozen, h100, 1) < own


def test_the_study_host_is_measured_per_input_pipeline():
    """torchvision's PIL pipeline and Hugging Face datasets' formatting were not slowed alike on the study's
    host: each factor comes from that pipeline's own evaluation loop, and an override sets both."""
    from bench.gpu_validation import PIPELINE, study_host

    inputs = json.loads((REPO / "docs/results/2026-12-07/gpu-validation/study_input.json").read_text())
    host = study_host(inputs)
    assert set(host) == set(PIPELINE.values()) == {"torchvision", "datasets"}
    assert host["torchvision"] == pytest.approx(
        3.83, abs=0.01
    )  # ConvAE: ~8.5 ms per batch of 64 there, 2.4 here
    assert host["datasets"] == pytest.approx(0.86, abs=0.01)  # NBoW: ~19 ms per batch of 512 there, 22.4 here
    assert study_host(inputs, 2.0) == {"torchvision": 2.0, "datasets": 2.0}

"""One training step on a GPU you do not have: the profile's op trace (shared/optrace.py) priced call by call.

Each kernel runs for max(FLOPs / (peak[dtype] · matmul efficiency), bytes / (memory bandwidth · memory
efficiency), the shortest kernel); the host issues each call (its dispatch cost, measured on the machine that
profiled, plus a CUDA launch) and runs ahead of the device until a call needs a result (`.item()`), as eager
PyTorch does. The step's parts:
- input: the batch's fetch as measured on the profiling host (a faster GPU does not make the loader faster),
  plus its copy to the device over the host link;
- forward, backward: the traced calls, simulated on one host thread and one stream;
- optimizer: as it runs on a GPU, not as the CPU ran it (the trace's CPU optimizer calls are replaced): fused
  (one multi-tensor kernel per chunk of tensors) or foreach (~12 multi-tensor ops), reading parameters,
  gradients and state and writing parameters and state once (foreach: twice) at memory bandwidth;
- other: the loop's own Python beyond its aten calls: the profiling host's time before forward and after the
  optimizer step, less the calls traced there (not the gap between backward and the optimizer step, which on
  a CPU is mostly freeing the graph's memory and on a GPU the caching allocator's business).
Host times (input, calls, other) are the profiling host's times `host_slowdown` (the hardware file's; 1 when
the GPU's host is as fast).
Frozen parameters are absent from the trace's optimizer and gradient work: they have no gradient.
Torch-free arithmetic; docs/projection.md lists every figure and its source.
"""

from __future__ import annotations

import math

PHASES = ("input", "forward", "backward", "optimizer", "other")
# multi_tensor_apply's chunking for 4 tensor lists (Adam: params, grads, exp_avg, exp_avg_sq):
# aten/src/ATen/native/cuda/MultiTensorApply.cuh, depth_to_max_tensors = {110, 64, 48, 36, 30}
TENSORS_PER_LAUNCH = 36
FOREACH_OPS = 12  # torch/optim/adam.py _multi_tensor_adam: ~12 torch._foreach_* calls per step


def peak_flops(hw: dict, dtype: str, kind: str, tf32_matmul: bool = False) -> float:
    """FLOP/s a call of this dtype and kind can reach: tensor-core peak for matmul / convolution / recurrent
    layers (fp32 convolutions and RNNs run TF32 where the GPU has it, cuDNN's default; fp32 matmuls only with
    `tf32_matmul`, torch's default being off) times the hardware's matmul efficiency; else the FP32 peak."""
    peaks = hw["peak_tflops"]
    if kind in ("mm", "conv", "rnn"):
        if dtype in ("bfloat16", "float16"):
            key = "bf16" if dtype == "bfloat16" else "fp16"
            key = key if peaks.get(key) else "fp16" if peaks.get("fp16") else "fp32"
        else:
            use_tf32 = peaks.get("tf32") and (kind != "mm" or tf32_matmul)
            key = "tf32" if use_tf32 else "fp32"
        return peaks[key] * 1e12 * hw.get("matmul_efficiency", 1.0)
    return peaks["fp32"] * 1e12


def kernel_s(hw: dict, call: list, scale: float, tf32_matmul: bool = False) -> float:
    """Device seconds of one traced call at `scale` times the profiled batch (its FLOPs and batch-sized bytes
    scale; parameter and state bytes do not)."""
    dtype, kind, flops, nbytes, fixed = call[2:7]
    moved = fixed + (nbytes - fixed) * scale
    bw = hw["memory_bandwidth_GBps"] * 1e9 * hw.get("memory_efficiency", 1.0)
    math_s = flops * scale / peak_flops(hw, dtype, kind, tf32_matmul) if flops else 0.0
    return max(math_s, moved / bw, hw.get("kernel_min_s", 0.0))


def optimizer_calls(profile: dict, fused: bool) -> list[tuple[float, float]]:
    """The optimizer step as (host seconds, device seconds) calls on a GPU, from the trainable tensors and
    their bytes; filled in by gpu_step (it needs the hardware)."""
    n = len(profile["params"])
    launches = max(1, math.ceil(n / TENSORS_PER_LAUNCH))
    trainable = profile["grad_bytes"]  # the trainable parameters' bytes: one gradient each
    traffic = 2 * trainable + profile["grad_bytes"] + 2 * profile["optimizer_state_bytes"]
    if fused:
        return [(1, traffic / launches)] * launches
    return [(1, 2 * traffic / (FOREACH_OPS * launches))] * (FOREACH_OPS * launches)


def gpu_step(profile: dict, hw: dict, scale: float = 1.0, fused: bool = True) -> dict:
    """Seconds per part (PHASES) of one step at `scale` times the profile's batch on `hw`."""
    trace = profile["op_trace"]
    slow = hw.get("host_slowdown", 1.0)  # the GPU host's CPU against the profiling host's (1: as fast)
    host = (profile.get("host_s_per_op") or 1e-5) * slow
    launch = hw.get("launch_overhead_s", 0.0)
    bw = hw["memory_bandwidth_GBps"] * 1e9 * hw.get("memory_efficiency", 1.0)
    tf32 = bool(profile.get("tf32_matmul"))
    h = d = 0.0  # when the host and the device are next free
    parts = dict.fromkeys(PHASES, 0.0)
    mark, phase_now, opt_done = 0.0, None, False

    def close(next_phase):
        nonlocal mark, phase_now
        t = max(h, d)
        if phase_now is not None:
            parts[phase_now] += t - mark
        mark, phase_now = t, next_phase

    def issue(host_s, device_s):
        nonlocal h, d
        h += host_s
        if device_s is not None:
            d = max(h, d) + device_s

    def optimizer():
        """The GPU's optimizer step, once, where the CPU's ran (or after backward, or at the end)."""
        nonlocal opt_done
        if opt_done:
            return
        close("optimizer")
        for calls, dev_bytes in optimizer_calls(profile, fused):
            issue(calls * (host + launch), max(dev_bytes / bw, hw.get("kernel_min_s", 0.0)))
        opt_done = True

    others = 0.0  # the profiling host's seconds in the calls outside forward, backward and the optimizer
    for call in trace:
        phase, kind, count = call[0], call[3], call[7]
        if phase == "optimizer":  # the CPU's optimizer calls: replaced by the GPU's
            optimizer()
            continue
        if phase != phase_now:
            if phase == "other" and phase_now == "backward":
                optimizer()
            close(phase)
        if phase == "other":
            others += call[8] if len(call) > 8 else count * host / slow
        device = None if kind in ("view", "sync") else kernel_s(hw, call, scale, tf32)
        for _ in range(count):
            issue(host + (launch if device is not None else 0.0), device)
            if kind == "sync":
                h = max(h, d)
    optimizer()
    close(None)
    size = profile["sizes"][str(profile["batch_size"])]
    data = size.get("data_s") or 0.0
    # the loop's Python beyond its calls, as measured on the profiling host
    loop = size["host_gaps_s"] if "host_gaps_s" in size else (size.get("other_s") or 0.0) - data
    parts["other"] += max(0.0, loop - others) * slow
    if profile.get("input_s_at_batch"):  # another loader's fetch, timed apart at its own batch
        seconds, batch = profile["input_s_at_batch"]
        data, scale_data = seconds, profile["batch_size"] * scale / batch
    else:
        scale_data = scale
    parts["input"] = data * scale_data * slow
    parts["input"] += profile.get("input_bytes", 0) * scale / (hw.get("host_link_GBps", 12.0) * 1e9)
    return parts


# DDP's and FSDP2's own work on a GPU (not the CPU's figures, which are a one-rank group's Python and copies on
# this machine's cores): the copies they make of parameters and gradients at memory bandwidth, and the kernels
# they launch. torch/csrc/distributed/c10d/reducer.cpp (gradient_as_bucket_view=False, DDP's default): each
# gradient is copied into its bucket, the bucket averaged (divided by the world size) and copied back: three
# passes reading and writing the gradient bytes, three kernels per bucket. torch/distributed/fsdp/_fully_shard/
# _fsdp_collectives.py: an all-gather copies each rank's shard in (1/N of the unit) and the gathered unit out
# into its parameters; a reduce-scatter copies the unit's gradients in and divides them: about four kernels per
# all-gather and three per reduce-scatter.
DDP_PASSES, DDP_KERNELS_PER_BUCKET = 3, 3
FSDP_KERNELS_PER_GATHER, FSDP_KERNELS_PER_SCATTER = 4, 3


def _copy_s(nbytes: float, hw: dict) -> float:
    """Reading and writing `nbytes` once on the device."""
    return 2 * nbytes / (hw["memory_bandwidth_GBps"] * 1e9 * hw.get("memory_efficiency", 1.0))


def _launch_s(profile: dict, hw: dict) -> float:
    """One kernel issued from the host: the profiling host's dispatch cost (x the GPU host's slowdown) plus a
    CUDA launch, or the shortest kernel if that is longer."""
    host = (profile.get("host_s_per_op") or 1e-5) * hw.get("host_slowdown", 1.0)
    return max(host + hw.get("launch_overhead_s", 0.0), hw.get("kernel_min_s", 0.0))


def ddp_wrapper_s(profile: dict, hw: dict, buckets: int) -> float:
    """DDP's own work per step on a GPU: the trainable gradients copied into their buckets, averaged and copied
    back, and three kernels per bucket."""
    return DDP_PASSES * _copy_s(profile["grad_bytes"], hw) + buckets * DDP_KERNELS_PER_BUCKET * _launch_s(
        profile, hw
    )


def fsdp_wrapper_s(profile: dict, hw: dict, units: list[float], calls: list[int], n: int) -> float:
    """FSDP2's own work per step on a GPU over its units (bytes of parameters each, gathered `calls` times):
    per all-gather the shard copied in and the unit copied out, per reduce-scatter the unit's trainable
    gradients copied in and divided, and their kernels."""
    trainable = profile["grad_bytes"] / max(profile["param_bytes"], 1)
    gathers = sum(c * (_copy_s(u / n, hw) + _copy_s(u, hw)) for u, c in zip(units, calls, strict=True))
    scatters = sum(2 * _copy_s(u * trainable, hw) for u in units)
    kernels = sum(calls) * FSDP_KERNELS_PER_GATHER + len(units) * FSDP_KERNELS_PER_SCATTER
    return gathers + scatters + kernels * _launch_s(profile, hw)

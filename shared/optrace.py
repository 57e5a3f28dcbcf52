"""One training step's aten calls, in order, as a GPU would have to run them (shared/roofline.py prices them).

Per call: the phase of the step it ran in (forward, backward, optimizer, other), its name, the dtype it computes
in, whether tensor cores run it (`mm`: matmul, linear, attention; `conv`; `rnn`: LSTM/GRU layers), its FLOPs
(torch.utils.flop_counter's formulas, plus recurrent layers', which torch has none for), the bytes it reads
and writes, and of those the bytes that do not grow with the batch (parameters, optimizer state, and in
backward the gradients of parameters). View and metadata ops (`detach`, `view`, `expand`, ...) launch no
kernel; they are kept, marked, for their host cost. Consecutive identical calls are stored once with a count
and the seconds they took on the profiling host (the loop's own Python is what remains of a step beyond them).
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

TENSOR_CORE = {
    "mm": "mm", "addmm": "mm", "bmm": "mm", "baddbmm": "mm", "_scaled_mm": "mm",
    "convolution": "conv", "_convolution": "conv", "cudnn_convolution": "conv", "convolution_backward": "conv",
    "_slow_conv2d_forward": "conv", "mkldnn_rnn_layer": "rnn", "mkldnn_rnn_layer_backward": "rnn",
    "_cudnn_rnn": "rnn", "_cudnn_rnn_backward": "rnn",
}  # fmt: skip
# ops that make no kernel on a GPU: views, aliases, metadata (the host still pays their dispatch)
NO_KERNEL = {"detach", "view", "_unsafe_view", "alias", "t", "transpose", "expand", "select", "slice",
             "as_strided", "unsqueeze", "squeeze", "permute", "reshape", "unbind", "split", "split_with_sizes",
             "chunk", "narrow", "diagonal", "lift_fresh", "_reshape_alias", "empty", "empty_like",
             "empty_strided", "set_", "resize_", "_to_copy_meta"}  # fmt: skip
# calls that make the host wait for the device (a Python number out of a tensor)
SYNC = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}


def rnn_flops(name: str, args) -> int:
    """FLOPs of one recurrent layer's call: an LSTM layer over T steps of B rows computes 4 gates of H from
    (input I + hidden H): 2·T·B·4H·(I + H) multiply-adds (GRU: 3 gates); backward about twice that (the
    gradients of the inputs and of the weights). Elementwise gate work (~15·T·B·H) is small beside it."""
    x = args[0]
    rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]  # T·B (packed input: its rows)
    if name.startswith("_cudnn_rnn"):  # (input, [w_ih, w_hh, b_ih, b_hh] per layer, ...)
        mats = [w for w in args[1] if w.dim() == 2]
        flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in mats)
    else:  # mkldnn_rnn_layer(input, w_ih (gates·H, I), w_hh (gates·H, H), ...); its backward the same order
        w_ih, w_hh = args[1], args[2]
        flops = 2 * rows * w_ih.shape[0] * (w_ih.shape[1] + w_hh.shape[1])
    return flops * (2 if name.endswith("backward") else 1)


def conv_backward_flops(args) -> int:
    """convolution_backward(grad_output, input, weight, ..., transposed, output_padding, groups, output_mask):
    each gradient asked for (input's, weight's) costs what the forward convolution did, 2·(output elements)·
    (C_in / groups)·kernel. torch's own formula ignores `groups` for the weight's gradient and counts a
    depthwise convolution's backward ~C times over (EfficientNet-B0: 26x its forward)."""
    grad_out, x, w, transposed, mask = args[0], args[1], args[2], args[7], args[10]
    kernel = math.prod(w.shape[2:])
    fwd = 2 * x.numel() * w.shape[1] * kernel if transposed else 2 * grad_out.numel() * w.shape[1] * kernel
    return fwd * (int(bool(mask[0])) + int(bool(mask[1])))


def _dtype(tensors) -> str:
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return str(floats[0]).removeprefix("torch.") if floats else "other"


class OpTrace(TorchDispatchMode):
    """`phase()` names the part of the step a call belongs to; `params` are the model's parameters and
    `state` the optimizer's tensors (their bytes do not grow with the batch)."""

    def __init__(self, phase, params, state=()):
        super().__init__()
        self.phase = phase
        self.fixed = {_ptr(t) for t in [*params, *state]}
        self.param_shapes = {tuple(p.shape) for p in params}
        # [phase, op, dtype, kind, flops, bytes, fixed_bytes, count, seconds here]
        self.calls: list[list] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        took = time.perf_counter() - t0
        try:
            self._record(func, args, kwargs, out, took)
        except Exception:  # noqa: BLE001 - a call the trace cannot read costs only its host time
            self._add([self.phase(), func.overloadpacket.__name__, "other", "host", 0, 0, 0], took)
        return out

    def _record(self, func, args, kwargs, out, took):
        name = func.overloadpacket.__name__
        phase = self.phase()
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if name in NO_KERNEL or getattr(func, "is_view", False):
            kind = "view"
        elif name in SYNC:
            kind = "sync"
        else:
            kind = TENSOR_CORE.get(name, "mm" if func.overloadpacket in flop_registry else "vector")
        flops = 0
        if name == "convolution_backward":
            flops = conv_backward_flops(args)
        elif kind in ("mm", "conv") and func.overloadpacket in flop_registry:  # attention counts as "mm"
            flops = int(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        elif kind == "rnn":
            flops = int(rnn_flops(name, args))
        total = fixed = 0
        made = {id(t) for t in outs}
        if kind not in ("view", "sync"):
            for t in ins + outs:
                n = t.numel() * t.element_size()
                total += n
                if (
                    phase == "optimizer"
                    or _ptr(t) in self.fixed
                    or (phase == "backward" and id(t) in made and tuple(t.shape) in self.param_shapes)
                ):
                    fixed += n
        self._add([phase, name, _dtype(ins or outs), kind, flops, total, fixed], took)

    def _add(self, row, took):
        last = self.calls[-1] if self.calls else None
        if last is not None and last[:7] == row:
            last[7] += 1
            last[8] += took
        else:
            self.calls.append([*row, 1, took])


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta or fake tensors: no storage
        return id(t)

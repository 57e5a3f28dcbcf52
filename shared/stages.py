"""Cutting a model into stages at the script's SPLIT_POINTS, and model_split's placement of the stages.

A model is cut at names of its pieces: children of its nn.Sequential containers, recursively (a child of a
non-Sequential module is one piece). Every rank builds the full model from the same seed, so a stage's
parameters start equal to the one-process model's and keep its names (state dicts are slices of the full one).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from accelerate.utils import send_to_device

from shared.plan import SetupError


def pieces(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's pieces in forward order: children of every nn.Sequential (recursively), other modules whole.

    The root is always opened. For a non-Sequential root the order is registration order.
    """
    out = []

    def walk(module, prefix):
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential):
                walk(child, f"{prefix}{name}.")
            else:
                out.append((f"{prefix}{name}", child))

    walk(model, "")
    return out


def cut(model: nn.Module, split_points: list[str]) -> list[list[tuple[str, nn.Module]]]:
    """The model's pieces grouped into len(split_points) + 1 stages; each split point starts a stage."""
    named = pieces(model)
    names = [n for n, _ in named]
    unknown = [p for p in split_points if p not in names]
    if unknown:
        raise ValueError(
            f"split point(s) {unknown} are not pieces of {type(model).__name__}: {', '.join(names)}"
        )
    bounds = [0, *sorted(names.index(p) for p in split_points), len(named)]
    stages = [named[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    for i, stage in enumerate(stages):
        if not any(p.requires_grad for _, m in stage for p in m.parameters()):
            raise SetupError(
                f"stage {i} (from {stage[0][0] if stage else 'nothing'}) would have no trainable parameters "
                f"with split points {', '.join(split_points)}; train more layers or use fewer stages"
            )
    return stages


def stage_module(stage: list[tuple[str, nn.Module]]) -> nn.Sequential:
    """An nn.Sequential running `stage`'s pieces in order, with the full model's parameter names
    (nested containers are recreated), so its state_dict is a slice of the full model's."""
    root = nn.Sequential()
    for qualified, module in stage:
        *path, leaf = qualified.split(".")
        parent = root
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Sequential())
            parent = parent._modules[part]
        parent.add_module(leaf, module)
    return root


def stage_summary(stage, device, ranks=None) -> dict:
    return {
        "first": stage[0][0],
        "last": stage[-1][0],
        "params": sum(p.numel() for _, m in stage for p in m.parameters()),
        "device": str(device),
        **({"ranks": ranks} if ranks is not None else {}),
    }


def _to_stage(obj, device: torch.device, dtype: torch.dtype):
    """Move activations to the stage's device. A CPU stage gets its own float dtype: CUDA autocast's bf16
    activations would meet fp32 CPU weights (autocast does not reach the CPU's ops)."""
    obj = send_to_device(obj, device)
    if device.type != "cpu":
        return obj
    cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype else t  # noqa: E731
    if isinstance(obj, dict):
        return {k: cast(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(v) for v in obj)
    return cast(obj)


def split_over_devices(
    model: nn.Module, devices: list[str], split_points: list[str], out_device
) -> list[dict]:
    """model_split: move each stage to its device, move activations across with hooks (autograd carries the
    gradients back), and return the model's output on `out_device`, so loss and metrics code is unchanged.
    Returns the stages' summaries for the record."""
    devices = [torch.device(d) for d in devices]
    stages = cut(model, split_points[: len(devices) - 1])
    # anything outside the pieces (e.g. parameters of a non-Sequential root) stays with stage 0
    model.to(devices[0])
    for stage, device in zip(stages, devices, strict=True):
        for _, module in stage:
            module.to(device)
        dtype = next((p.dtype for _, m in stage for p in m.parameters()), torch.float32)
        stage[0][1].register_forward_pre_hook(
            lambda m, args, kwargs, device=device, dtype=dtype: (
                _to_stage(args, device, dtype),
                _to_stage(kwargs, device, dtype),
            ),
            with_kwargs=True,
        )
    model.register_forward_hook(lambda m, args, out: send_to_device(out, out_device))
    return [stage_summary(st, d) for st, d in zip(stages, devices, strict=True)]

"""Batch-wise image augmentation on whatever device the batch lives on.

Each function draws independent parameters per sample (as torchvision's per-sample transforms do) from an
explicit generator, so a run is reproducible and no worker processes are needed. Inputs are float images
(N, C, H, W) in [0, 1]; fills are 0 (black), as torchvision pads PIL images before ToTensor.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=gen.device).to(device) * (high - low) + low


def random_rotation(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    """RandomRotation(degrees): angle ~ U(-degrees, degrees) about the centre, nearest neighbour, fill 0."""
    n = x.shape[0]
    theta = _uniform(n, -degrees, degrees, gen, x.device) * (math.pi / 180)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def random_crop(x: torch.Tensor, size: int, padding: int, gen: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding): zero-pad every side, then cut a size x size window at a random offset."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, h + 2 * padding - size + 1, (n,), generator=gen, device=gen.device).to(x.device)
    ox = torch.randint(0, w + 2 * padding - size + 1, (n,), generator=gen, device=gen.device).to(x.device)
    ar = torch.arange(size, device=x.device)
    rows = (oy[:, None] + ar)[:, None, :, None]
    cols = (ox[:, None] + ar)[:, None, None, :]
    return xp[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]


def random_hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device).to(x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@functools.lru_cache(maxsize=64)
def _channel_stats(mean, std, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per (values, device, dtype): building them per batch is two blocking host-to-device copies
    per training step on a GPU."""
    shape = (1, -1, 1, 1)
    return (
        torch.tensor(mean, dtype=dtype, device=device).view(shape),
        torch.tensor(std, dtype=dtype, device=device).view(shape),
    )


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel (x - mean) / std; `mean` and `std` are numbers or tuples of numbers (one per channel)."""
    as_key = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    m, s = _channel_stats(as_key(mean), as_key(std), x.device, x.dtype)
    return (x - m) / s

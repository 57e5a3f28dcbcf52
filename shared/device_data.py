"""The GPU data path: a whole split resident on the device, batches cut with a device-side permutation.

No DataLoader, no worker processes, no host-to-device copy per batch, no host sync: the permutation is drawn
on the device from a generator seeded by (seed, epoch), identically on every rank, and each data-parallel
rank takes its slice of every global batch (rows [r*b/W, (r+1)*b/W)), which is what Accelerate's
`split_batches=True` gives the DataLoader path, so 1 and N processes train on the same global batches.
Augmentation stays batch-wise on the device (shared/augment.py) in the scripts.

`--data_on_device auto` (default) takes this path on CUDA when the train split fits comfortably in free
device memory, and the DataLoader path on the CPU; `true` forces it (it also runs on the CPU, which is how
the tests cover it), `false` forbids it.
"""

from __future__ import annotations

import math

import torch

from shared.config import ConfigError


class DeviceLoader:
    """Iterates {key: tensor} batches of one split that lives on `device`. Train splits only: evaluation
    keeps the DataLoader path (gather_for_metrics needs Accelerate's end-of-data bookkeeping)."""

    def __init__(
        self,
        split: dict,
        batch_size: int,
        *,
        seed: int,
        device,
        num_processes: int = 1,
        process_index: int = 0,
        drop_last: bool = False,
    ):
        self.data = {k: v.to(device, non_blocking=True) for k, v in split.items()}
        self.n = len(next(iter(self.data.values())))
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.num_processes, self.process_index, self.drop_last = num_processes, process_index, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self):
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen, device=self.device)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            # this rank's rows of the global batch (the last, partial batch splits as evenly as it can)
            mine = torch.tensor_split(idx, self.num_processes)[self.process_index]
            yield {k: v.index_select(0, mine) for k, v in self.data.items()}


def split_bytes(split: dict) -> int:
    return sum(t.numel() * t.element_size() for t in split.values())


def use_device_data(cfg, device: torch.device, split: dict) -> bool:
    """Resolve --data_on_device: auto = on CUDA when the split takes under a quarter of the free memory."""
    choice = cfg.data_on_device
    if choice == "false":
        return False
    if not all(isinstance(t, torch.Tensor) for t in split.values()):
        if choice == "true":
            raise ConfigError("config key 'data_on_device': this dataset is not stored as tensors")
        return False
    if choice == "true":
        return True
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return split_bytes(split) < free / 4

"""Convolutional autoencoder on MNIST: 1,077 parameters (udacity/deep-learning-v2-pytorch,
convolutional-autoencoder/Convolutional_Autoencoder_Solution).

Defaults reproduce the tutorial: ToTensor only (pixels in [0, 1], no normalisation, no augmentation),
MSE loss, Adam lr 1e-3, batch 20, 30 epochs. The tutorial trains on all 60k images without validation;
here 54,000 train / 6,000 val / 10,000 test (split seed 1234) so reconstruction error is reported on
held-out images. The tutorial prints sum(loss x batch) / n_batches, about 20x the per-pixel MSE: it ends
at 0.1652, i.e. about 0.0083 per-pixel MSE.

Launch (same script everywhere; hardware lives in accelerate_configs/, strategies in docs/strategies.md):
    python scripts/conv_autoencoder.py --data_dir ../shared/data
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/conv_autoencoder.py --data_dir ../shared/data
    python scripts/conv_autoencoder.py --strategy model_split --data_dir ../shared/data   # encoder | decoder
    accelerate launch --config_file accelerate_configs/gpu_2_ddp.yaml scripts/conv_autoencoder.py

`batch_size` is the global batch (split over processes). The study's settings: --batch_size 64 on 1 GPU,
--batch_size 128 on 2 GPUs (64 per process), --epochs 10.

Expect: per-pixel test MSE about 0.008-0.009 (PSNR about 20.5-21 dB) after 30 epochs.
Metrics: per-pixel MSE (mean over every pixel of the split) and PSNR = 10 log10(1 / MSE) of that mean.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import RunConfig
from shared.data import load_mnist
from shared.session import Session, run


@dataclass
class Config(RunConfig):
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 20  # global batch (all processes together)
    epochs: int = 30
    select_best: bool = False  # the tutorial has no validation and keeps the last epoch


METRICS = {
    "train/loss": {"label": "train loss (per-pixel MSE)", "goal": "min"},
    "val/loss": {"label": "validation per-pixel MSE", "goal": "min"},
    "val/psnr": {"label": "validation PSNR", "unit": "dB", "goal": "max"},
    "test/loss": {"label": "test per-pixel MSE", "goal": "min", "primary": True},
    "test/psnr": {"label": "test PSNR", "unit": "dB", "goal": "max"},
}


# model_split / pipeline stages start at these layers, best first: 2 stages = encoder | decoder
SPLIT_POINTS = ["6", "3", "8"]
UNSUPPORTED = {}  # every shared knob applies


def preprocess(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> float in [0, 1], as ToTensor; the target is the input itself."""
    memory_format = torch.channels_last if cfg.channels_last is True else torch.contiguous_format
    return (x.float() / 255).contiguous(memory_format=memory_format)


def inputs(batch: dict, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (input, target): the preprocessed images are both (an autoencoder reconstructs its input)."""
    x = preprocess(batch["x"], cfg)
    return x, x


def build_model(cfg: Config, info: dict) -> nn.Sequential:
    return nn.Sequential(
        # encoder: 1x28x28 -> 4x7x7
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        # decoder: 4x7x7 -> 1x28x28
        nn.ConvTranspose2d(4, 16, 2, stride=2),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 1, 2, stride=2),
        nn.Sigmoid(),
    )


def train_one_epoch(s: Session, model, loader, optimizer) -> tuple[float, int]:
    model.train()
    loss_sum, seen = s.epoch_sums(2)  # on the device, reduced once per epoch; kept in checkpoints
    for batch in s.batches(loader):  # a resumed run skips the batches it already trained on
        x, target = inputs(batch, s.cfg)
        optimizer.zero_grad(set_to_none=True)
        if s.micro_batched:  # a pipeline schedule, or --microbatches N accumulated under no_sync
            loss = s.micro_batch_step(model, x, target, F.mse_loss)
        else:
            loss = F.mse_loss(model(x), target)
            s.accelerator.backward(loss)
        if not s.step_ok(loss):  # non-finite loss: stop the run, or skip the step (--on_nan skip)
            continue
        optimizer.step()
        loss_sum += loss.detach() * len(x)
        seen += len(x)
        if s.step_done():  # checkpoint every N steps and on SIGTERM; True at max_steps
            break
    loss_sum, seen = s.reduce_sum(torch.stack([loss_sum, seen])).tolist()
    return loss_sum / seen, int(seen)


@torch.no_grad()
def evaluate(s: Session, model, loader) -> dict:
    """Per-pixel MSE over the whole split (every image has 784 pixels, so the mean of per-image MSEs)."""
    model.eval()
    se_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    n = 0
    for batch in loader:
        x = preprocess(batch["x"], s.cfg)
        per_image = F.mse_loss(model(x), x, reduction="none").flatten(1).mean(1)
        per_image = s.gather_for_metrics(per_image)  # drops the padding of the last batch
        se_sum += per_image.double().sum()
        n += len(per_image)
    mse = se_sum.item() / n
    return {"loss": mse, "psnr": 10 * math.log10(1 / mse), "n_samples": n}


def main():
    with Session(Config, "conv_autoencoder", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:
        cfg = s.cfg
        data = load_mnist(cfg)
        loaders = s.loaders(data)  # train (resident on the device with --data_on_device), val, test
        model = build_model(cfg, data.info)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cfg.fused_optimizer)
        # accelerator.prepare per strategy; opens the run record; --compile warms up on inputs(batch) and the loss
        model, optimizer, train_loader, val_loader, test_loader = s.prepare(
            model, optimizer, *loaders, inputs=inputs, loss_fn=F.mse_loss
        )
        for _ in s.epochs():  # resumes where --resume left off; ends early at max_steps
            train_loss, n_train = train_one_epoch(s, model, train_loader, optimizer)
            with s.evaluating():
                val = evaluate(s, model, val_loader)
            s.log_epoch(n_train, {"train/loss": train_loss, "val/loss": val["loss"], "val/psnr": val["psnr"],
                                  "val/n_samples": val["n_samples"]})  # fmt: skip
        s.restore_best(model)
        with s.evaluating():
            test = evaluate(s, model, test_loader)
        s.finish({"test/loss": test["loss"], "test/psnr": test["psnr"], "test/n_samples": test["n_samples"]})


if __name__ == "__main__":
    run(main)

"""Convolutional autoencoder on MNIST: 1,077 parameters (udacity/deep-learning-v2-pytorch,
convolutional-autoencoder/Convolutional_Autoencoder_Solution).

Defaults reproduce the tutorial: ToTensor only (pixels in [0, 1], no normalisation, no augmentation),
MSE loss, Adam lr 1e-3, batch 20, 30 epochs. The tutorial trains on all 60k images without validation;
here 54,000 train / 6,000 val / 10,000 test (split seed 1234) so reconstruction error is reported on
held-out images. The tutorial prints sum(loss x batch) / n_batches, about 20x the per-pixel MSE: it ends
at 0.1652, i.e. about 0.0083 per-pixel MSE.

Launch (same script everywhere; hardware lives in accelerate_configs/, strategies in README "Strategies"):
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
from accelerate.utils import set_seed

from shared.checkpoint import Progress
from shared.config import RunConfig
from shared.data import load_mnist, make_loader
from shared.device_data import make_train_loader
from shared.parallel import Parallel
from shared.runtime import (
    BestCheckpoint,
    Run,
    compile_warmup,
    count_params,
    entry,
    load_config,
    make_accelerator,
    memory_format,
    peak_memory_gib,
    reset_peak_memory,
    shutdown,
    synced_clock,
)


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
    "test/loss": {"label": "test per-pixel MSE", "goal": "min"},
    "test/psnr": {"label": "test PSNR", "unit": "dB", "goal": "max"},
}


# model_split / pipeline stages start at these layers, best first: 2 stages = encoder | decoder
SPLIT_POINTS = ["6", "3", "8"]


def preprocess(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> float in [0, 1], as ToTensor; the target is the input itself."""
    return (x.float() / 255).contiguous(memory_format=memory_format(cfg))


def build_model() -> nn.Sequential:
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


def train_one_epoch(model, loader, optimizer, par, cfg, progress):
    model.train()
    for batch in progress.batches(loader):  # a resumed run skips the batches it already trained on
        x = preprocess(batch["x"], cfg)
        optimizer.zero_grad(set_to_none=True)
        # loss_fn(model(x), x) + accelerator.backward, or a pipeline schedule's forward/backward over micro-batches
        loss = par.forward_backward(model, x, x, F.mse_loss)
        if not progress.take_step(loss):  # non-finite loss: stop the run, or skip the step (--on_nan skip)
            continue
        optimizer.step()
        # The epoch's sums stay on the device (saved with checkpoints), reduced once per epoch.
        progress.stats[0] += loss * len(x)
        progress.stats[1] += len(x)
        if progress.step_done():  # checkpoint every N steps and on SIGTERM; True at max_steps
            break
    loss_sum, seen = par.reduce_sum(progress.stats)
    return (loss_sum / seen).item(), int(seen.item())


@torch.no_grad()
def evaluate(model, loader, par, cfg):
    """Per-pixel MSE over the whole split (every image has 784 pixels, so the mean of per-image MSEs)."""
    model.eval()
    se_sum = torch.zeros((), device=par.device, dtype=torch.float64)
    n = 0
    for batch in loader:
        x = preprocess(batch["x"], cfg)
        per_image = F.mse_loss(model(x), x, reduction="none").flatten(1).mean(1)
        per_image = par.gather_for_metrics(per_image)  # drops the padding of the last batch
        se_sum += per_image.double().sum()
        n += len(per_image)
    mse = se_sum.item() / n
    return {"loss": mse, "psnr": 10 * math.log10(1 / mse), "n_samples": n}


def main():
    cfg = load_config(Config)
    accelerator = make_accelerator(cfg)
    par = Parallel(accelerator, cfg, SPLIT_POINTS)  # checks the strategy before anything is built
    set_seed(cfg.seed)  # every rank builds the same full model; pipeline stages are cut out of it
    data = load_mnist(cfg)
    train_loader, data_path = make_train_loader(data, cfg, par, make_loader)  # on the device, or a DataLoader
    val_loader = make_loader(data.val, cfg.eval_batch_size, shuffle=False, seed=cfg.seed)
    test_loader = make_loader(data.test, cfg.eval_batch_size, shuffle=False, seed=cfg.seed)
    model = build_model().to(memory_format=memory_format(cfg))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cfg.fused_optimizer == "true")
    n_params = count_params(model)
    model, optimizer, train_loader, val_loader, test_loader = (
        par.prepare(  # accelerator.prepare, per strategy
            model, optimizer, train_loader, val_loader, test_loader
        )
    )
    run = Run(
        accelerator,
        cfg,
        model="conv_autoencoder",
        script=__file__,
        data=data,
        metrics=METRICS,
        primary_metric="test/loss",
        model_info={"params": n_params, "steps_per_epoch": len(train_loader)},
        par=par,
        data_path=data_path,
    )
    best = BestCheckpoint(enabled=cfg.select_best)
    with run:
        # --compile: the graphs are compiled on the first batch before epoch 1, timed apart
        compile_s = compile_warmup(
            accelerator, cfg, par, model, train_loader, lambda b: (preprocess(b["x"], cfg),) * 2, F.mse_loss
        )
        run.timing(compile_s=compile_s)
        progress = Progress(accelerator, cfg, run, par, model, best)  # loads --resume
        for epoch in progress.epochs():
            train_loader.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
            reset_peak_memory(accelerator)
            t0 = synced_clock(accelerator)
            train_loss, n_train = train_one_epoch(model, train_loader, optimizer, par, cfg, progress)
            t1 = synced_clock(accelerator)
            val = evaluate(model, val_loader, par, cfg)
            t2 = synced_clock(accelerator)
            best.update(val["loss"], model, epoch)
            run.log_epoch(
                {
                    "epoch": epoch,
                    "step": progress.step,
                    "samples_seen": progress.samples + n_train,
                    "train/loss": train_loss,
                    "val/loss": val["loss"],
                    "val/psnr": val["psnr"],
                    "val/n_samples": val["n_samples"],
                    "time/train_s": t1 - t0,
                    "time/eval_s": t2 - t1,
                    "time/epoch_s": t2 - t0,
                    "throughput/samples_per_s": n_train / (t1 - t0),
                    "memory/peak_gib": peak_memory_gib(accelerator),
                }
            )
            if progress.epoch_done(n_train):  # checkpoint at the epoch end; True once max_steps is reached
                break
        best.restore(model)
        t0 = synced_clock(accelerator)
        test = evaluate(model, test_loader, par, cfg)
        run.finish(
            {
                "test/loss": test["loss"],
                "test/psnr": test["psnr"],
                "test/n_samples": test["n_samples"],
                "test/epoch": best.epoch or epoch,
                "test/time_s": synced_clock(accelerator) - t0,
            },
            model,
        )
    del model, optimizer
    shutdown(accelerator, par)


if __name__ == "__main__":
    entry(main)

"""Small CNN on CIFAR-10: 3 conv layers, 541,094 parameters (udacity/deep-learning-v2-pytorch,
convolutional-neural-networks/cifar-cnn/cifar10_cnn_solution).

Defaults reproduce the tutorial: RandomHorizontalFlip + RandomRotation(10) on train, normalisation 0.5 / 0.5
per channel, SGD lr 0.01 (no momentum), batch 20, 30 epochs, cross-entropy, the best-validation-loss epoch
is tested. Split 45,000 / 5,000 / 10,000 (split seed 1234; the tutorial held out 20%, the study 10%).
Upstream result: test loss 0.664, test accuracy 76% (per class 53% cat ... 88% automobile).

Launch (same script everywhere; hardware lives in accelerate_configs/, strategies in README "Strategies"):
    python scripts/cnn.py --data_dir ../shared/data
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/cnn.py --data_dir ../shared/data
    accelerate launch --config_file accelerate_configs/cpu_2proc_pipeline.yaml scripts/cnn.py --strategy pipeline --data_dir ../shared/data
    accelerate launch --config_file accelerate_configs/gpu_2_ddp.yaml scripts/cnn.py

`batch_size` is the global batch (split over processes). The study's settings: --optimizer adam --lr 0.01
--batch_size 64 (1 GPU) / --batch_size 128 (2 GPUs, 64 per process) --epochs 20. That learning rate is
100x too large for Adam here: the loss stays near ln 10 = 2.303 and accuracy near 10% (chance); the study
reported it as a result (0.436 -> 0.100). Default SGD 0.01 converges.

Expect: test accuracy about 0.70-0.76 after 30 epochs; metric: accuracy, overall and per class.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.utils import set_seed

from shared.augment import normalize, random_hflip, random_rotation
from shared.checkpoint import Progress
from shared.config import ConfigError, RunConfig
from shared.data import load_cifar10, make_loader
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
    lr: float = 0.01  # learning rate
    optimizer: str = "sgd"  # sgd (the tutorial, no momentum) | adam (the study's choice; diverges at lr 0.01)
    batch_size: int = 20  # global batch (all processes together)
    epochs: int = 30
    dropout: float = 0.25  # before each fully connected layer
    augment: bool = True  # random horizontal flip + rotation ±10° on the train split
    select_best: bool = True  # test the epoch with the lowest validation loss, as the tutorial does


METRICS = {
    "train/loss": {"label": "train loss (cross-entropy)", "goal": "min"},
    "val/loss": {"label": "validation loss (cross-entropy)", "goal": "min"},
    "val/acc": {"label": "validation accuracy", "unit": "fraction", "goal": "max"},
    "test/loss": {"label": "test loss (cross-entropy)", "goal": "min"},
    "test/acc": {"label": "test accuracy", "unit": "fraction", "goal": "max"},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# model_split / pipeline stages start at these layers, best first: 2 stages cut before conv 3 (~half the FLOPs)
SPLIT_POINTS = ["6", "3", "11"]


def preprocess(x: torch.Tensor, cfg: Config, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> normalised float; with `gen`, the tutorial's train augmentation first."""
    x = x.float() / 255
    if gen is not None and cfg.augment:
        x = random_rotation(random_hflip(x, gen), 10.0, gen)
    return normalize(x, MEAN, STD).contiguous(memory_format=memory_format(cfg))


def build_model(cfg: Config) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 16x16x16
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 32x8x8
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 64x4x4
        nn.Flatten(),
        nn.Dropout(cfg.dropout),
        nn.Linear(64 * 4 * 4, 500),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(500, 10),
    )


def train_one_epoch(model, loader, optimizer, par, cfg, gen, progress):
    model.train()
    for batch in progress.batches(loader):  # a resumed run skips the batches it already trained on
        optimizer.zero_grad(set_to_none=True)
        # loss_fn(model(x), y) + accelerator.backward, or a pipeline schedule's forward/backward over micro-batches
        loss = par.forward_backward(model, preprocess(batch["x"], cfg, gen), batch["y"], F.cross_entropy)
        if not progress.take_step(loss):  # non-finite loss: stop the run, or skip the step (--on_nan skip)
            continue
        optimizer.step()
        # The epoch's sums stay on the device (saved with checkpoints), reduced once per epoch.
        progress.stats[0] += loss * len(batch["y"])
        progress.stats[1] += len(batch["y"])
        if progress.step_done():  # checkpoint every N steps and on SIGTERM; True at max_steps
            break
    loss_sum, seen = par.reduce_sum(progress.stats)
    return (loss_sum / seen).item(), int(seen.item())


@torch.no_grad()
def evaluate(model, loader, par, cfg):
    """Sample-weighted loss and accuracy over the whole split, each sample counted once across ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=par.device, dtype=torch.float64)
    hits_per_class = torch.zeros(10, device=par.device, dtype=torch.long)
    per_class = torch.zeros(10, device=par.device, dtype=torch.long)
    n = 0
    for batch in loader:
        logits = model(preprocess(batch["x"], cfg))
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        preds, labels = logits.argmax(1), batch["y"]
        losses, preds, labels = par.gather_for_metrics((losses, preds, labels))  # drops last-batch padding
        loss_sum += losses.double().sum()
        hits_per_class += torch.bincount(labels[preds == labels], minlength=10)
        per_class += torch.bincount(labels, minlength=10)
        n += len(losses)
    acc_per_class = (hits_per_class.double() / per_class.clamp(min=1)).tolist()
    return {
        "loss": loss_sum.item() / n,
        "acc": hits_per_class.sum().item() / n,
        "n_samples": n,
        "acc_per_class": acc_per_class,
    }


def main():
    cfg = load_config(Config)
    if cfg.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"config key 'optimizer': expected sgd or adam, got {cfg.optimizer!r}")
    accelerator = make_accelerator(cfg)
    par = Parallel(accelerator, cfg, SPLIT_POINTS)  # checks the strategy before anything is built
    set_seed(cfg.seed)  # every rank builds the same full model; pipeline stages are cut out of it
    data = load_cifar10(cfg)
    train_loader, data_path = make_train_loader(data, cfg, par, make_loader)  # on the device, or a DataLoader
    val_loader = make_loader(data.val, cfg.eval_batch_size, shuffle=False, seed=cfg.seed)
    test_loader = make_loader(data.test, cfg.eval_batch_size, shuffle=False, seed=cfg.seed)
    model = build_model(cfg).to(memory_format=memory_format(cfg))
    optimizer = (torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam)(
        model.parameters(), lr=cfg.lr, fused=cfg.fused_optimizer == "true"
    )
    n_params = count_params(model)
    model, optimizer, train_loader, val_loader, test_loader = (
        par.prepare(  # accelerator.prepare, per strategy
            model, optimizer, train_loader, val_loader, test_loader
        )
    )
    run = Run(
        accelerator,
        cfg,
        model="cnn",
        script=__file__,
        data=data,
        metrics=METRICS,
        primary_metric="test/acc",
        model_info={"params": n_params, "steps_per_epoch": len(train_loader)},
        par=par,
        data_path=data_path,
    )
    gen = torch.Generator(accelerator.device).manual_seed(cfg.seed * 1000 + par.data_rank)
    best = BestCheckpoint(enabled=cfg.select_best)
    with run:
        # --compile: the graphs are compiled on the first batch before epoch 1, timed apart
        compile_s = compile_warmup(
            accelerator,
            cfg,
            par,
            model,
            train_loader,
            lambda b: (preprocess(b["x"], cfg), b["y"]),
            F.cross_entropy,
        )
        run.timing(compile_s=compile_s)
        progress = Progress(accelerator, cfg, run, par, model, best, gens=[gen])  # loads --resume
        for epoch in progress.epochs():
            train_loader.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
            reset_peak_memory(accelerator)
            t0 = synced_clock(accelerator)
            train_loss, n_train = train_one_epoch(model, train_loader, optimizer, par, cfg, gen, progress)
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
                    "val/acc": val["acc"],
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
                "test/acc": test["acc"],
                "test/n_samples": test["n_samples"],
                "test/acc_per_class": dict(zip(data.info["classes"], test["acc_per_class"], strict=True)),
                "test/epoch": best.epoch or epoch,
                "test/time_s": synced_clock(accelerator) - t0,
            },
            model,
        )
    del model, optimizer
    shutdown(accelerator, par)


if __name__ == "__main__":
    entry(main)

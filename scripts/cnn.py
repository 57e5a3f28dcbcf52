"""Small CNN on CIFAR-10: 3 conv layers, 541,094 parameters (udacity/deep-learning-v2-pytorch,
convolutional-neural-networks/cifar-cnn/cifar10_cnn_solution).

Defaults reproduce the tutorial: RandomHorizontalFlip + RandomRotation(10) on train, normalisation 0.5 / 0.5
per channel, SGD lr 0.01 (no momentum), batch 20, 30 epochs, cross-entropy, the best-validation-loss epoch
is tested. Split 45,000 / 5,000 / 10,000 (split seed 1234; the tutorial held out 20%, the study 10%).
Upstream result: test loss 0.664, test accuracy 76% (per class 53% cat ... 88% automobile).

Launch (same script everywhere; hardware lives in accelerate_configs/, strategies in docs/strategies.md):
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
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.augment import normalize, random_hflip, random_rotation
from shared.config import RunConfig
from shared.data import load_cifar10
from shared.session import Session, run


@dataclass
class Config(RunConfig):
    lr: float = 0.01  # learning rate
    optimizer: Literal["sgd", "adam"] = (
        "sgd"  # sgd (the tutorial, no momentum) | adam (the study's choice; diverges at lr 0.01)
    )
    batch_size: int = 20  # global batch (all processes together)
    epochs: int = 30
    dropout: float = 0.25  # before each fully connected layer
    augment: bool = True  # random horizontal flip + rotation ±10° on the train split
    select_best: bool = True  # test the epoch with the lowest validation loss, as the tutorial does


METRICS = {
    "train/loss": {"label": "train loss (cross-entropy)", "goal": "min"},
    "val/loss": {"label": "validation loss (cross-entropy)", "goal": "min"},
    "val/acc": {"label": "validation accuracy", "unit": "fraction", "goal": "max", "chance": 0.1},
    "test/loss": {"label": "test loss (cross-entropy)", "goal": "min"},
    "test/acc": {"label": "test accuracy", "unit": "fraction", "goal": "max", "chance": 0.1, "primary": True},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# model_split / pipeline stages start at these layers, best first: 2 stages cut before conv 3 (~half the FLOPs)
SPLIT_POINTS = ["6", "3", "11"]
UNSUPPORTED = {}  # every shared knob applies


def preprocess(x: torch.Tensor, cfg: Config, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> normalised float; with `gen`, the tutorial's train augmentation first."""
    x = x.float() / 255
    if gen is not None and cfg.augment:
        x = random_rotation(random_hflip(x, gen), 10.0, gen)
    memory_format = torch.channels_last if cfg.channels_last is True else torch.contiguous_format
    return normalize(x, MEAN, STD).contiguous(memory_format=memory_format)


def inputs(batch: dict, cfg: Config, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (input, target): the preprocessed images (augmented with `gen`) and their labels."""
    return preprocess(batch["x"], cfg, gen), batch["y"]


def build_model(cfg: Config, info: dict) -> nn.Sequential:
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


def train_one_epoch(s: Session, model, loader, optimizer) -> tuple[float, int]:
    model.train()
    loss_sum, seen = s.epoch_sums(2)  # on the device, reduced once per epoch; kept in checkpoints
    for batch in s.batches(loader):  # a resumed run skips the batches it already trained on
        x, y = inputs(batch, s.cfg, s.gen)
        optimizer.zero_grad(set_to_none=True)
        if s.micro_batched:  # a pipeline schedule, or --microbatches N accumulated under no_sync
            loss = s.micro_batch_step(model, x, y, F.cross_entropy)
        else:
            loss = F.cross_entropy(model(x), y)
            s.accelerator.backward(loss)
        if not s.step_ok(loss):  # non-finite loss: stop the run, or skip the step (--on_nan skip)
            continue
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        seen += len(y)
        if s.step_done():  # checkpoint every N steps and on SIGTERM; True at max_steps
            break
    loss_sum, seen = s.reduce_sum(torch.stack([loss_sum, seen])).tolist()
    return loss_sum / seen, int(seen)


@torch.no_grad()
def evaluate(s: Session, model, loader) -> dict:
    """Sample-weighted loss and accuracy over the whole split, each sample counted once across ranks."""
    model.eval()
    loss_sum = torch.zeros((), device=s.device, dtype=torch.float64)
    hits_per_class = torch.zeros(10, device=s.device, dtype=torch.long)
    per_class = torch.zeros(10, device=s.device, dtype=torch.long)
    n = 0
    for batch in loader:
        logits = model(preprocess(batch["x"], s.cfg))
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        preds, labels = logits.argmax(1), batch["y"]
        losses, preds, labels = s.gather_for_metrics((losses, preds, labels))  # drops last-batch padding
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
    with Session(Config, "cnn", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:
        cfg = s.cfg
        data = load_cifar10(cfg)
        loaders = s.loaders(data)  # train (resident on the device with --data_on_device), val, test
        model = build_model(cfg, data.info)
        sgd_or_adam = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
        optimizer = sgd_or_adam(model.parameters(), lr=cfg.lr, fused=cfg.fused_optimizer)
        # accelerator.prepare per strategy; opens the run record; --compile warms up on inputs(batch) and the loss
        model, optimizer, train_loader, val_loader, test_loader = s.prepare(
            model, optimizer, *loaders, inputs=inputs, loss_fn=F.cross_entropy
        )
        for _ in s.epochs():  # resumes where --resume left off; ends early at max_steps
            train_loss, n_train = train_one_epoch(s, model, train_loader, optimizer)
            with s.evaluating():
                val = evaluate(s, model, val_loader)
            s.log_epoch(n_train, {"train/loss": train_loss, "val/loss": val["loss"], "val/acc": val["acc"],
                                  "val/n_samples": val["n_samples"]})  # fmt: skip
        s.restore_best(model)
        with s.evaluating():
            test = evaluate(s, model, test_loader)
        per_class = dict(zip(data.info["classes"], test["acc_per_class"], strict=True))
        s.finish({"test/loss": test["loss"], "test/acc": test["acc"], "test/n_samples": test["n_samples"],
                  "test/acc_per_class": per_class})  # fmt: skip


if __name__ == "__main__":
    run(main)

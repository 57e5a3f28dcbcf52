"""NAME: your model, from the project's template (an MLP on MNIST until you replace the marked parts).

Made by `make new-model NAME=NAME`. It runs as it is, so the smoke test passes before you change anything;
then replace the four parts marked `# YOUR ...` (config, data, model, metric) and keep the rest: the skeleton
(Config, METRICS, SPLIT_POINTS, UNSUPPORTED, build_model, train_one_epoch, evaluate, main) is what lets
`make bench-all MODELS=path/to/NAME.py`, `make project PROJECT_ARGS="--script path/to/NAME.py"`, `make report`
and the dashboard take it like the built-in models (docs/scripts.md, "Your own model").

Launch (same script everywhere; hardware lives in accelerate_configs/):
    python NAME.py --data_dir data
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml NAME.py --data_dir data
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.augment import normalize, random_crop, random_rotation
from shared.config import RunConfig
from shared.data import load_mnist
from shared.session import Session, run


# YOUR CONFIG: the hyper-parameters of your recipe; the shared knobs (strategy, precision, limits, ...) come
# from RunConfig. `batch_size` is the global batch; make project profiles at its default.
@dataclass
class Config(RunConfig):
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 64  # global batch (all processes together)
    epochs: int = 10
    augment: bool = True  # rotation ±5° + random crop with padding 2 on the train split
    select_best: bool = True  # test the epoch with the lowest validation loss, as the tutorial does


# YOUR METRIC: what the run records; one entry is the primary metric (goal "max" or "min")
METRICS = {
    "train/loss": {"label": "train loss (cross-entropy)", "goal": "min"},
    "val/loss": {"label": "validation loss (cross-entropy)", "goal": "min"},
    "val/acc": {"label": "validation accuracy", "unit": "fraction", "goal": "max", "chance": 0.1},
    "test/loss": {"label": "test loss (cross-entropy)", "goal": "min"},
    "test/acc": {"label": "test accuracy", "unit": "fraction", "goal": "max", "chance": 0.1, "primary": True},
}
# model_split / pipeline stages start at these pieces of the model, best first (names of nn.Sequential children)
SPLIT_POINTS = ["3", "5"]
# shared knobs this model has no use for (setting one is an error, not a silent no-op)
UNSUPPORTED = {"channels_last": "the MLP has no convolutions"}
MEAN, STD = 0.1307, 0.3081


# YOUR DATA: load_mnist returns a shared.data.Data of tensors (train / val / test dicts); build yours with
# shared.data.Data.from_splits (scripts/transformer_lm.py's load_english is a worked example), and say in
# inputs() how a batch becomes (input, target)
def preprocess(x: torch.Tensor, cfg: Config, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> normalised float; with `gen`, the tutorial's train augmentation first."""
    x = x.float() / 255
    if gen is not None and cfg.augment:
        x = random_crop(random_rotation(x, 5.0, gen), 28, 2, gen)
    return normalize(x, MEAN, STD)


def inputs(batch: dict, cfg: Config, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (input, target): the preprocessed images (augmented with `gen`) and their labels."""
    return preprocess(batch["x"], cfg, gen), batch["y"]


# YOUR MODEL: an nn.Module; an nn.Sequential (with SPLIT_POINTS naming its pieces) also runs model_split and
# the pipelines. Any loss: change F.cross_entropy below and in main() together.
def build_model(cfg: Config, info: dict) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 250),
        nn.ReLU(),
        nn.Linear(250, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
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
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    n = 0
    for batch in loader:
        logits = model(preprocess(batch["x"], s.cfg))
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        hits = logits.argmax(1) == batch["y"]
        losses, hits = s.gather_for_metrics((losses, hits))  # drops the padding of the last batch
        loss_sum += losses.double().sum()
        correct += hits.sum()
        n += len(losses)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n, "n_samples": n}


def main():
    with Session(Config, "NAME", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:
        cfg = s.cfg
        data = load_mnist(cfg)
        loaders = s.loaders(data)  # train (resident on the device with --data_on_device), val, test
        model = build_model(cfg, data.info)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=cfg.fused_optimizer)
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
        s.finish({"test/loss": test["loss"], "test/acc": test["acc"], "test/n_samples": test["n_samples"]})


if __name__ == "__main__":
    run(main)

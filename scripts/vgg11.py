"""VGG11 with batch norm on CIFAR-10: 128,812,810 parameters with the 10-class head
(bentrevett/pytorch-image-classification, 4_vgg).

Defaults reproduce the tutorial: images resized to 224 px, train augmentation RandomRotation(5) +
RandomHorizontalFlip + RandomCrop(224, padding 10), ImageNet mean/std, Adam with discriminative learning
rates (features 5e-5, classifier 5e-4), batch 128, 5 epochs, the best-validation-loss epoch is tested.
Split 45,000 / 5,000 / 10,000 (split seed 1234). The tutorial fine-tunes torchvision's ImageNet `vgg11_bn`
(test accuracy 92.41%); `--pretrained` loads those weights from the torch hub cache or the internet and
stops with one line if neither has them. Random initialisation is the default here because the project's
machines are offline; the record says which (`model_info.init`).

`--image_size 32` skips the resize (random crop padding 4): the fast variant for CPUs and quick runs.

Launch (same script everywhere; hardware lives in accelerate_configs/, strategies in docs/strategies.md):
    python scripts/vgg11.py --data_dir ../shared/data --image_size 32
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/vgg11.py --data_dir ../shared/data --image_size 32
    accelerate launch --config_file accelerate_configs/gpu_2_fsdp.yaml scripts/vgg11.py --pretrained
    accelerate launch --config_file accelerate_configs/gpu_2_pipeline.yaml scripts/vgg11.py --strategy pipeline --pretrained
    accelerate launch --config_file accelerate_configs/gpu_2_ddp.yaml scripts/vgg11.py --pretrained

`batch_size` is the global batch (split over processes). The study's settings: --pretrained --freeze
(only the last Linear(4096, 10) trains: 40,970 of 128,812,810 parameters) --features_lr 5e-4 --epochs 3
--batch_size 32 (1 GPU) / --batch_size 64 (2 GPUs, 32 per process).

Expect: pretrained at 224 px, about 92% test accuracy after 5 epochs; from scratch at 32 px, about 75-80%
after 10 epochs (GPU). Metric: accuracy, overall and per class.
"""

import contextlib
import io
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.augment import normalize, random_crop, random_hflip, random_rotation
from shared.config import ConfigError, RunConfig
from shared.data import load_cifar10
from shared.session import Session, run


@dataclass
class Config(RunConfig):
    lr: float = 5e-4  # Adam learning rate of the classifier
    features_lr: float = 5e-5  # Adam learning rate of the convolutional features (discriminative rates)
    batch_size: int = 128  # global batch (all processes together)
    epochs: int = 5
    image_size: int = 224  # 224 = the tutorial (bilinear resize from 32); 32 = no resize, the fast variant
    crop_padding: int = -1  # random-crop padding; -1 = 10 at 224 px (the tutorial), 4 at 32 px
    pretrained: bool = False  # torchvision ImageNet weights (local torch hub cache or download)
    freeze: bool = False  # train only the last Linear layer (the study's setting)
    augment: bool = True  # rotation ±5° + horizontal flip + random crop on the train split
    eval_batch_size: int = 256  # global batch for validation and test
    select_best: bool = True  # test the epoch with the lowest validation loss, as the tutorial does


METRICS = {
    "train/loss": {"label": "train loss (cross-entropy)", "goal": "min"},
    "val/loss": {"label": "validation loss (cross-entropy)", "goal": "min"},
    "val/acc": {"label": "validation accuracy", "unit": "fraction", "goal": "max", "chance": 0.1},
    "test/loss": {"label": "test loss (cross-entropy)", "goal": "min"},
    "test/acc": {"label": "test accuracy", "unit": "fraction", "goal": "max", "chance": 0.1, "primary": True},
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as the pretrained weights expect
VGG11_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
# model_split / pipeline stages start here, best first. 2 stages: before conv 5, about half the FLOPs at 224 px;
# at 32 px the classifier (120M multiply-adds, 120M of the 129M parameters) makes it about 30 / 70.
SPLIT_POINTS = ["features.15", "features.8", "classifier.0"]
UNSUPPORTED = {}  # every shared knob applies


def preprocess(x: torch.Tensor, cfg: Config, gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> resized, normalised float; with `gen`, the tutorial's train augmentation."""
    x = x.float() / 255
    if cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    if gen is not None and cfg.augment:
        x = random_crop(
            random_hflip(random_rotation(x, 5.0, gen), gen), cfg.image_size, cfg.crop_padding, gen
        )
    memory_format = torch.channels_last if cfg.channels_last is True else torch.contiguous_format
    return normalize(x, MEAN, STD).contiguous(memory_format=memory_format)


class VGG11(nn.Sequential):
    """torchvision's vgg11_bn layout (same parameter names, so its ImageNet weights load directly)."""

    def __init__(self, num_classes: int = 10):
        layers, c_in = [], 3
        for v in VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():  # torchvision's initialisation of a fresh vgg11_bn
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


def inputs(batch: dict, cfg: Config, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as (input, target): the preprocessed images (augmented with `gen`) and their labels."""
    return preprocess(batch["x"], cfg, gen), batch["y"]


def build_model(cfg: Config, info: dict) -> VGG11:
    model = VGG11()
    info["init"] = "imagenet (torchvision vgg11_bn)" if cfg.pretrained else "random"
    if cfg.pretrained:
        try:
            from torchvision.models import VGG11_BN_Weights

            with contextlib.redirect_stderr(
                io.StringIO()
            ):  # torch.hub prints "Downloading: ..." before failing
                # hub cache, else download
                state = VGG11_BN_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # noqa: BLE001 - offline, no cache, corrupt file: one clear line
            raise ConfigError(
                f"--pretrained: ImageNet vgg11_bn weights are neither in the torch hub cache "
                f"({torch.hub.get_dir()}/checkpoints) nor downloadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            ) from None
        state = {k: v for k, v in state.items() if not k.startswith("classifier.6.")}  # new 10-class head
        model.load_state_dict(state, strict=False)
    if cfg.freeze:
        for p in model.parameters():
            p.requires_grad_(False)
        model.classifier[-1].requires_grad_(True)
    return model


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
    with Session(Config, "vgg11", METRICS, SPLIT_POINTS, UNSUPPORTED) as s:
        cfg = s.cfg
        if cfg.crop_padding < 0:
            cfg.crop_padding = 10 if cfg.image_size >= 224 else 4
        data = load_cifar10(cfg)
        loaders = s.loaders(data)  # train (resident on the device with --data_on_device), val, test
        model = build_model(cfg, data.info)
        optimizer = torch.optim.Adam(
            [
                {
                    "params": [p for p in model.features.parameters() if p.requires_grad],
                    "lr": cfg.features_lr,
                },
                {"params": [p for p in model.classifier.parameters() if p.requires_grad], "lr": cfg.lr},
            ],
            fused=cfg.fused_optimizer,
        )
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

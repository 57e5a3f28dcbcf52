"""`make bench-speed`: the project's training step against a study-style loop, same process, same device.

For each model, on the same device and the same real train data, it times
  project  the scripts' own pieces (build_model, preprocess, loss): for image models the split resident on
           the device (shared/device_data.DeviceLoader), batch-wise augmentation on the device, the loss
           summed on the device and read once; on CUDA also bf16 autocast, channels_last for convolutions,
           fused Adam/SGD and, with --compile, torch.compile;
  study    the study's style: a DataLoader over PIL images with per-sample torchvision transforms, fp32,
           and `loss.item()` after every step (a host sync); for the text models the same tokenised
           batches, read with a host sync per step, and Seq2Seq's tutorial decoder (one step at a time)
           against the project's segmented decoder (teacher-forced runs in one LSTM call);
and prints samples/s of each and the ratio, measured in this one process. Each measurement is written to
<runs_dir> as a run record (tag bench:<batch>:speed:<model>:<variant>:seed0), which the dashboard shows as
setups `speed-project` and `speed-study` (throughput, samples/s).

    python -m bench.speed --data_dir data                       # CPU: 10 steps per variant
    python -m bench.speed --data_dir data --epoch --compile     # GPU: a full training epoch
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time

import torch
import torch.nn.functional as F

from bench.launcher import load_script
from shared.data import load_cifar10, load_mnist, make_loader
from shared.device_data import DeviceLoader
from shared.record import (
    RunRecord,
    device_name,
    environment,
)
from shared.text import load_imdb, load_multi30k, pad_collate, pad_pair_collate

MODELS = ["mlp", "conv_autoencoder", "cnn", "vgg11", "nbow", "seq2seq"]
METRICS = {"throughput/samples_per_s": {"label": "training samples/s", "unit": "samples/s", "goal": "max"}}


def script(name: str):
    return load_script(name, f"bench_{name}")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- image models


def study_transform(name: str, cfg):
    """The tutorials' per-sample torchvision pipelines (what the study ran), on PIL images."""
    import torchvision.transforms as T

    if name == "mlp":
        return T.Compose([T.RandomRotation(5, fill=0), T.RandomCrop(28, padding=2), T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])  # fmt: skip
    if name == "conv_autoencoder":
        return T.ToTensor()
    if name == "cnn":
        return T.Compose([T.RandomHorizontalFlip(), T.RandomRotation(10), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])  # fmt: skip
    pad = cfg.crop_padding
    resize = [T.Resize(cfg.image_size)] if cfg.image_size != 32 else []
    return T.Compose(
        [*resize, T.RandomRotation(5), T.RandomHorizontalFlip(0.5), T.RandomCrop(cfg.image_size, padding=pad),
         T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )  # fmt: skip


class PILImages(torch.utils.data.Dataset):
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        from PIL import Image

        img = self.x[i].numpy()
        img = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
        return self.transform(img), int(self.y[i])


def image_optimizer(name: str, cfg, model, fused: bool) -> torch.optim.Optimizer:
    """The script's own optimizer: SGD for the CNN, Adam with two learning rates for VGG11, Adam otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kw = {"fused": True} if fused else {}
    if name == "cnn":
        return torch.optim.SGD(params, lr=cfg.lr, **opt_kw)
    if name == "vgg11":
        return torch.optim.Adam(
            [{"params": list(model.features.parameters()), "lr": cfg.features_lr},
             {"params": list(model.classifier.parameters()), "lr": cfg.lr}], **opt_kw,
        )  # fmt: skip
    return torch.optim.Adam(params, lr=cfg.lr, **opt_kw)


def cycled(loader, steps: int):
    """`steps` batches of `loader`, starting it over whenever it runs out."""
    it = iter(loader)
    for _ in range(steps):
        batch = next(it, None)
        if batch is None:
            it = iter(loader)
            batch = next(it)
        yield batch


def image_case(name: str, args, device):
    mod = script(name)
    cfg = mod.Config()
    cfg.data_dir, cfg.limit_train = args.data_dir, args.limit_train
    if name == "vgg11":
        cfg.image_size = args.vgg_size
        cfg.crop_padding = 10 if cfg.image_size >= 224 else 4  # the script's -1 default, resolved as it does
    data = (load_mnist if name in ("mlp", "conv_autoencoder") else load_cifar10)(cfg)
    autoencoder = name == "conv_autoencoder"
    conv = name != "mlp"
    fast = device.type == "cuda"

    def build(fused: bool):
        torch.manual_seed(0)
        model = mod.build_model(cfg, dict(data.info)).to(device)
        return model, image_optimizer(name, cfg, model, fused)

    def loss_of(model, x, y):
        out = model(x)
        return F.mse_loss(out, x) if autoencoder else F.cross_entropy(out, y)

    def project(steps, out):
        model, opt = build(fused=fast)
        if fast and conv:
            model = model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model) if args.compile else model
        loader = DeviceLoader(data.train, cfg.batch_size, seed=0, device=device, drop_last=True)
        gen = torch.Generator(device).manual_seed(0)
        total = torch.zeros((), device=device)
        n = 0
        for batch in cycled(loader, steps):
            x = mod.preprocess(batch["x"], cfg) if autoencoder else mod.preprocess(batch["x"], cfg, gen)
            if fast and conv:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
                loss = loss_of(step_model, x, batch["y"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()  # on the device: read once, after the clock stops
            n += len(batch["x"])
            yield n
        out["loss"] = float(total) / steps

    def study(steps, out):
        model, opt = build(fused=False)  # the tutorial's optimizer, unfused
        total = 0.0
        ds = PILImages(data.train["x"], data.train["y"], study_transform(name, cfg))
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
        n = 0
        for batch in cycled(loader, steps):
            x, y = batch[0].to(device), batch[1].to(device)
            loss = loss_of(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()  # the study read the loss every step: a host sync
            n += len(x)
            yield n
        out["loss"] = total / steps

    def step_flops() -> float:
        """Model FLOPs of one training step (forward + backward) at this batch, counted by torch."""
        from torch.utils.flop_counter import FlopCounterMode

        model, _ = build(fused=False)
        x = data.train["x"][: cfg.batch_size].to(device)
        x = mod.preprocess(x, cfg) if autoencoder else mod.preprocess(x, cfg, None)
        with FlopCounterMode(display=False) as counter:
            loss_of(model, x, data.train["y"][: cfg.batch_size].to(device)).backward()
        return float(counter.get_total_flops())

    project.flops = step_flops
    steps_per_epoch = len(data.train["x"]) // cfg.batch_size
    return cfg, data, project, study, steps_per_epoch


# ----------------------------------------------------------------------------- text models


def text_case(name: str, args, device):
    mod = script(name)
    cfg = mod.Config()
    cfg.data_dir, cfg.limit_train = args.data_dir, args.limit_train
    data = (load_imdb if name == "nbow" else load_multi30k)(cfg)
    info = data.info
    if name == "nbow":
        collate = pad_collate(info["pad_index"])
    else:
        collate = pad_pair_collate(info["src_pad_index"], info["trg_pad_index"])
        pad = info["trg_pad_index"]

    def build():
        torch.manual_seed(0)
        model = mod.build_model(cfg, dict(info)).to(device)
        return model, torch.optim.Adam(
            model.parameters(), lr=cfg.lr, **({"fused": True} if device.type == "cuda" else {})
        )

    def step_loss(model, batch, coins, study: bool):
        if name == "nbow":
            return F.cross_entropy(model(batch["ids"].to(device)), batch["y"].to(device)), len(batch["y"])
        src, trg = batch["src"].to(device), batch["trg"].to(device)
        logits = model(src, trg, coins(trg.shape[1] - 1), stepwise=study)  # the tutorial decodes step by step
        return F.cross_entropy(logits.flatten(0, 1), trg[:, 1:].flatten(), ignore_index=pad), len(trg)

    def run(steps, out, host_sync: bool):
        model, opt = build()
        loader = make_loader(data.train, cfg.batch_size, shuffle=True, seed=0, collate_fn=collate)
        gen = torch.Generator().manual_seed(0)
        if host_sync:  # the tutorial's random.random() per time step
            import random

            rnd = random.Random(0)
            coins = lambda t: [rnd.random() < cfg.teacher_forcing for _ in range(t)]  # noqa: E731
        else:
            coins = lambda t: (torch.rand(t, generator=gen) < getattr(cfg, "teacher_forcing", 0.5)).tolist()  # noqa: E731
        total = torch.zeros((), device=device)
        n = 0
        for batch in cycled(loader, steps):
            loss, rows = step_loss(model, batch, coins, host_sync)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if name == "seq2seq":
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            total += loss.item() if host_sync else loss.detach()  # the study's host sync per step
            n += rows
            yield n
        out["loss"] = float(total) / steps

    steps_per_epoch = len(data.train[next(iter(data.train))]) // cfg.batch_size
    return cfg, data, (lambda s, o: run(s, o, False)), (lambda s, o: run(s, o, True)), steps_per_epoch


# ----------------------------------------------------------------------------- timing


def matmul_peak(device) -> tuple[float, str]:
    """The device's measured dense matmul rate: bf16 on CUDA, fp32 on the CPU (the dtype the project runs).
    An idle GPU clocks down: multiply for at least half a second first, then take the best of 3 timings."""
    dtype, n, reps = (torch.bfloat16, 8192, 20) if device.type == "cuda" else (torch.float32, 1024, 5)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ b
        sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best, str(dtype).split(".")[-1]


def timed(make_iter, steps: int, warmup: int, device, out: dict) -> tuple[float, int]:
    """Seconds and samples for `steps` steps after `warmup` untimed ones (compilation, allocator, caches).
    The mean train loss over all steps lands in out["loss"] (read after the clock stopped)."""
    it = make_iter(warmup + steps, out)
    done = 0
    for _ in range(warmup):
        done = next(it)
    sync(device)
    t0 = time.perf_counter()
    n = done
    for n in it:  # noqa: B007 (the last yielded count is the total)
        pass
    sync(device)
    return time.perf_counter() - t0, n - done


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_dir", default="data")
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    ap.add_argument(
        "--steps", type=int, default=0, help="timed steps per variant (0 = 10 on CPU, a full epoch on CUDA)"
    )
    ap.add_argument("--epoch", action="store_true", help="time a full training epoch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--limit_train", type=int, default=0)
    ap.add_argument("--vgg_size", type=int, default=0, help="VGG11 image size (0 = 224 on CUDA, 32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the project step (CUDA)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.vgg_size = args.vgg_size or (224 if device.type == "cuda" else 32)
    batch = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    print(
        f"bench-speed {batch}: {device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    peak, peak_dtype = matmul_peak(device)
    print(f"measured {peak_dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s (the MFU denominator)")
    print(f"{'model':<17} {'project samples/s':>18} {'study samples/s':>16} {'ratio':>7}  {'MFU':>6}  steps")
    rows = []
    for name in args.models:
        case = image_case if name in ("mlp", "conv_autoencoder", "cnn", "vgg11") else text_case
        cfg, data, project, study, per_epoch = case(name, args, device)
        steps = per_epoch if args.epoch or (args.steps == 0 and device.type == "cuda") else (args.steps or 10)
        result, mfu = {}, None
        flops = project.flops() if hasattr(project, "flops") else None
        for variant, fn in (("project", project), ("study", study)):
            out = {}
            if device.type == "cuda":  # each record's peak is its own variant's, not the process's so far
                torch.cuda.reset_peak_memory_stats(device)
            seconds, samples = timed(fn, steps, args.warmup, device, out)
            result[variant] = samples / seconds
            extra = {}
            if flops and variant == "project":  # model FLOPs (forward + backward) per second over the peak
                achieved = flops / cfg.batch_size * samples / seconds
                mfu = achieved / peak
                extra = {
                    "throughput/model_tflops": achieved / 1e12,
                    "mfu": mfu,
                    "mfu_peak_tflops": peak / 1e12,
                }
            write_record(
                args, batch, name, variant, cfg, data, device, steps, samples, seconds, out["loss"], extra
            )
        ratio = result["project"] / result["study"]
        rows.append((name, result["project"], result["study"], ratio))
        shown = f"{mfu:6.1%}" if mfu is not None else f"{'-':>6}"
        print(
            f"{name:<17} {result['project']:>18.0f} {result['study']:>16.0f} {ratio:>6.1f}x  {shown}  {steps}",
            flush=True,
        )
    print(f"records in {args.runs_dir} (tag bench:{batch}:speed:...)")


def peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB on Linux)


def write_record(args, batch, name, variant, cfg, data, device, steps, samples, seconds, loss, extra):
    # the project's image step runs under bf16 autocast on CUDA; the text steps run fp32 everywhere
    fast = (
        device.type == "cuda" and variant == "project" and name in ("mlp", "conv_autoencoder", "cnn", "vgg11")
    )
    rec = RunRecord(
        args.runs_dir,
        {
            "model": name,
            "script": "bench/speed.py",
            "tag": f"bench:{batch}:speed:{name}:speed-{variant}:seed0",
            "config": {**dict(vars(cfg)), "seed": 0, "variant": variant, "steps": steps, "compile": bool(args.compile and variant == "project")},
            "setup": {
                "strategy": "single",
                "distributed_type": "NO",
                "num_processes": 1,
                "num_machines": 1,
                "devices": [str(device)],
                "device_names": [device_name(device)],
                "mixed_precision": "bf16" if fast else "no",
                "global_batch_size": cfg.batch_size,
                "per_device_batch_size": cfg.batch_size,
                "data_path": "device" if variant == "project" and name in ("mlp", "conv_autoencoder", "cnn", "vgg11") else "dataloader",
            },
            "environment": environment(),
            "data": data.provenance(),
            "model_info": {"image_size": getattr(cfg, "image_size", None)},
            "metrics": METRICS,
            "primary_metric": "throughput/samples_per_s",
            "timing": {"clocks": {"time/train_s": f"{steps} training steps after warm-up, device synchronised"}},
        },
    )  # fmt: skip
    rec.log_epoch(
        {
            "epoch": 1,
            "step": steps,
            "samples_seen": samples,
            "train/loss": loss,
            "time/train_s": seconds,
            "time/eval_s": 0.0,  # no evaluation in a speed run
            "time/epoch_s": seconds,
            "memory/peak_gib": peak_gib(device),
            **extra,
            "throughput/samples_per_s": samples / seconds,
            "time/epoch_equivalent_s": seconds / samples * len(data.train[next(iter(data.train))])
            if samples
            else math.nan,
        }
    )
    rec.data["test"] = {"throughput/samples_per_s": samples / seconds}
    rec.end("finished", seconds)


if __name__ == "__main__":
    main()

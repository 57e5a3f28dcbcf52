"""Layered run configuration: dataclass defaults -> optional YAML (--config file.yaml) -> --field value flags.

Every script declares one dataclass that subclasses `RunConfig`; its defaults are a faithful run of the
original tutorial. Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# "auto" is resolved per device at start-up; the record keeps what ran
Switch = Literal["auto", "true", "false"]


class UserError(Exception):
    """Bad input from the person running the script: reported as one line, exit status 2."""


class ConfigError(UserError):
    pass


@dataclass
class RunConfig:
    """Knobs every script shares. Scripts add their hyper-parameters (lr, batch_size, epochs, ...)."""

    seed: int = 0  # seeds model init, shuffling and augmentation
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = run every epoch)
    limit_train: int = 0  # train on the first N samples of the (shuffled) train split (0 = all)
    limit_eval: int = 0  # evaluate on the first N samples of val and of test (0 = all)
    data: Literal["auto", "local", "hub", "synthetic"] = (
        "auto"  # auto (local dir, then the HF hub) | local | hub | synthetic (smoke tests only)
    )
    data_dir: str = "data"  # root holding mnist/, cifar10/, imdb/, multi30k/ (docs/data.md)
    runs_dir: str = "runs"  # one JSON record per run is written here
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto (CUDA if present, else CPU) | cpu | cuda
    # Parallelism (docs/strategies.md). fsdp comes from the launch config; the others are chosen here.
    strategy: Literal["auto", "single", "ddp", "fsdp", "model_split", "pipeline", "hybrid"] = (
        "auto"  # auto (fsdp if the launch config is FSDP, ddp if >1 process, else single) | single | ddp | fsdp | model_split | pipeline | hybrid
    )
    microbatches: int = 0  # splits of each replica's batch; 0 = 4 for pipeline/hybrid, 1 otherwise (>1 = gradient accumulation)
    schedule: Literal["", "gpipe", "1f1b"] = ""  # pipeline/hybrid schedule: gpipe | 1f1b ("" = gpipe)
    pp_size: int = 0  # hybrid: pipeline stages per replica (0 = 2); the rest of the processes are replicas
    split_devices: str = (
        ""  # model_split: one device per stage, e.g. cuda:0,cuda:1 ("" = 2 GPUs if present, else cpu,cpu)
    )
    eval_batch_size: int = 1000  # global batch for validation and test
    save_model: bool = False  # also write the final weights to <runs_dir>/<run_id>.safetensors
    tag: str = ""  # free text stored in the record (e.g. the bench matrix cell)
    # Fault tolerance (docs/checkpoints.md)
    checkpoint_every: int = 0  # save_state every N optimizer steps and at each epoch end (0 = no checkpoints)
    keep_checkpoints: int = 2  # keep the newest K checkpoints of a run
    resume: str = (
        ""  # continue a run from its newest checkpoint: a run id, a path (record or checkpoint) or auto
    )
    on_nan: Literal["stop", "skip"] = (
        "stop"  # non-finite training loss: stop (record failed) | skip (drop that optimizer step)
    )
    # a rank waiting longer than this on the others fails (a peer died or hung); 0 = 60 on CPU, 1800 on CUDA
    collective_timeout_s: int = 0
    # Speed (docs/speed-levers.md); "auto" is resolved per device at start-up and the record keeps what ran.
    # data_on_device: the train split resident on the device, batches cut there: auto (CUDA, if it fits) | true | false
    data_on_device: Switch = "auto"
    mixed_precision: Literal["", "no", "bf16", "fp16"] = (
        ""  # "" = the launch config's; no | bf16 | fp16 (Accelerate's autocast)
    )
    channels_last: Switch = (
        "auto"  # convolutional models, NHWC memory format: auto (= on CUDA) | true | false
    )
    fused_optimizer: Switch = "auto"  # fused Adam / SGD kernels: auto (= on CUDA) | true | false
    # compile: torch.compile via Accelerate's dynamo plugin: "" (off) | default | reduce-overhead | max-autotune
    compile: Literal["", "default", "reduce-overhead", "max-autotune"] = ""
    warmup_steps: int = (
        5  # first steps of each process timed apart (time/warmup_s), not in the steady-state figures
    )
    check_every: int = (
        0  # steps between stop / non-finite-loss checks (a host sync each); 0 = 1 on CPU, 25 on CUDA
    )
    # a progress bar per epoch on the main process: auto (when stderr is a terminal) | true | false
    progress: Switch = "auto"
    # also send the epoch rows and test results to experiment trackers (Accelerate's, spelled as it spells them):
    # none | tensorboard | wandb | mlflow | aim | all (every installed one); output under <runs_dir>/trackers/
    log_with: Literal["none", "tensorboard", "wandb", "mlflow", "aim", "all"] = "none"
    # `make project` (bench/project.py): one process times its steps at its batch size, writes this file
    # (shared/profiling.py) and ends after that one epoch; "" = a normal run
    profile_out: str = ""
    # with --profile_out: time the steps only, no FLOPs, wrapper overheads or memory contention (bench/project.py
    # measures those at the full batch and each smaller size of its ladder in a process of its own)
    profile_steps_only: bool = False


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(a or '""' for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Convert a YAML value or flag string to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML reads `true` / `false` as booleans
            value = str(value).lower()
        if isinstance(value, str) and value in choices:
            return value
        shown = ", ".join(repr(c) if c == "" else c for c in choices)
        raise ConfigError(f"config key '{key}': expected one of {shown}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {_type_name(tp)}")


def _apply(cfg, key: str, value, source: str):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields:
        valid = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{key}' in {source} (valid keys: {valid})")
    hints = typing.get_type_hints(type(cfg))
    setattr(cfg, key, _coerce(key, value, hints[key]))


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--config {path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_config(cls, argv: list[str]):
    """Build `cls` from defaults, then `--config file.yaml`, then `--field value` / `--field=value` flags.

    A bool flag given alone (`--save_model`) means true. `-h/--help` raises SystemExit after printing fields.
    """
    cfg = cls()
    flags: list[tuple[str, object]] = []
    yaml_path = None
    bool_fields = {f.name for f in dataclasses.fields(cls) if typing.get_type_hints(cls)[f.name] is bool}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(describe(cfg))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --field value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key in bool_fields and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise ConfigError(f"flag --{key} needs a value")
            else:
                value = nxt
                i += 1
        if key == "config":
            yaml_path = value
        else:
            flags.append((key, value))
        i += 1
    if yaml_path is not None:
        for key, value in load_yaml(yaml_path).items():
            _apply(cfg, str(key), value, f"--config {yaml_path}")
    for key, value in flags:
        _apply(cfg, key, value, "flags")
    validate(cfg)
    return cfg


# What an unsupported knob must be left at (besides its default); "auto" switches resolve to it.
OFF = {"data_on_device": "false", "channels_last": "false", "compile": "", "microbatches": 1}


def refuse_unsupported(cfg, config_cls, name: str, unsupported: dict):
    """A knob the script does not use, set to anything but its default or off, is an error naming it;
    an "auto" one is resolved to off, so the record says what ran."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for knob, why in unsupported.items():
        if knob not in defaults:
            continue
        value = getattr(cfg, knob)
        if value not in (defaults[knob], OFF.get(knob)):
            raise ConfigError(f"config key '{knob}': {name} does not support {value!r} ({why})")
        if value == "auto":
            setattr(cfg, knob, OFF[knob])


def script_config(config_cls, name: str, unsupported: dict, argv: list[str]):
    """A script's config as its run uses it: parse_config, then the knobs the script does not use refused
    (refuse_unsupported), a profiling run (--profile_out) cut to one epoch with no step limit, checkpoints
    or resume, and --progress resolved, so the record says what ran."""
    cfg = parse_config(config_cls, argv)
    refuse_unsupported(cfg, config_cls, name, unsupported)
    if cfg.profile_out:
        cfg.epochs, cfg.max_steps, cfg.checkpoint_every, cfg.resume = 1, 0, 0, ""
    # the per-epoch line stays either way; the bar only where someone watches (or --progress true)
    on = cfg.progress == "true" or (cfg.progress == "auto" and sys.stderr.isatty())
    cfg.progress = "true" if on else "false"
    return cfg


# Lower bounds of the numeric knobs (choices are checked by their Literal types while parsing).
MINIMUM = {
    "max_steps": 0,
    "limit_train": 0,
    "limit_eval": 0,
    "microbatches": 0,
    "pp_size": 0,
    "warmup_steps": 0,
    "check_every": 0,
    "checkpoint_every": 0,
    "keep_checkpoints": 1,
    "collective_timeout_s": 0,
    "epochs": 1,
    "batch_size": 1,
    "eval_batch_size": 1,
}


def validate(cfg: RunConfig):
    for key, low in MINIMUM.items():
        if hasattr(cfg, key) and getattr(cfg, key) < low:
            raise ConfigError(f"config key '{key}': must be >= {low}, got {getattr(cfg, key)}")
    if hasattr(cfg, "lr") and not cfg.lr > 0:
        raise ConfigError(f"config key 'lr': must be > 0, got {cfg.lr}")


def describe(cfg) -> str:
    hints = typing.get_type_hints(type(cfg))
    lines = [f"{type(cfg).__module__} options (--field value, or a YAML file via --config):"]
    for f in dataclasses.fields(cfg):
        lines.append(f"  --{f.name:<18} {_type_name(hints[f.name]):<6} default {getattr(cfg, f.name)!r}")
    return "\n".join(lines)

from dataclasses import dataclass

import pytest

from bench import launcher
from shared.config import ConfigError, RunConfig, parse_config


@dataclass
class Cfg(RunConfig):
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 10
    augment: bool = True
    optimizer: str = "adam"


def test_defaults_yaml_then_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.01\nepochs: 3\noptimizer: sgd\n")
    cfg = parse_config(Cfg, ["--config", str(y), "--epochs", "5", "--augment=false"])
    assert (cfg.lr, cfg.epochs, cfg.optimizer, cfg.augment, cfg.batch_size) == (0.01, 5, "sgd", False, 64)


def test_flag_forms():
    cfg = parse_config(Cfg, ["--save_model", "--batch-size", "32", "--lr=2e-4"])
    assert cfg.save_model is True and cfg.batch_size == 32 and cfg.lr == 2e-4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--bogus", "1"], "unknown config key 'bogus'"),
        (["--lr", "fast"], "config key 'lr': expected a number"),
        (["--epochs", "2.5"], "config key 'epochs': expected an integer"),
        (["--augment", "maybe"], "config key 'augment': expected true or false"),
        (["--epochs"], "flag --epochs needs a value"),
        (["positional"], "unexpected argument"),
        (["--data", "web"], "config key 'data'"),
        (["--epochs", "0"], "config key 'epochs': must be >= 1"),
        (["--config", "/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_flags_name_the_key(argv, needle):
    with pytest.raises(ConfigError, match=None) as e:
        parse_config(Cfg, argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("lr: [0.1\n", "malformed YAML (line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("learning_rate: 0.1\n", "unknown config key 'learning_rate'"),
        ("epochs: ten\n", "config key 'epochs': expected an integer"),
        ("augment: 3\n", "config key 'augment': expected true or false"),
        ("epochs: true\n", "config key 'epochs': expected an integer"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, needle):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_config(Cfg, ["--config", str(y)])
    assert needle in str(e.value)


# ----------------------------------------------------------------------------- the scripts' configs, in-process

SCRIPTS = launcher.builtin_scripts()


def script_module(name: str):
    """A script imported as a module (its main() does not run): its Config and UNSUPPORTED knobs."""
    return launcher.load_script(name)


def configure(name: str, argv: list[str]):
    """What Session does with the command line before it builds anything."""
    from shared.config import script_config

    module = script_module(name)
    return script_config(module.Config, name, module.UNSUPPORTED, argv), module


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--bogus", "1"], "unknown config key 'bogus'"),
        (["--lr", "fast"], "config key 'lr': expected a number"),
        (["--lr", "0"], "config key 'lr': must be > 0"),
        (["--batch_size", "-4"], "config key 'batch_size': must be >= 1"),
        (["--strategy", "zero3"], "config key 'strategy': expected one of auto, single, ddp"),
        (["--schedule", "interleaved"], "config key 'schedule': expected one of '', gpipe, 1f1b"),
        (["--on_nan", "ignore"], "config key 'on_nan': expected one of stop, skip"),
        (["--data_on_device", "yes"], "config key 'data_on_device': expected one of auto, true, false"),
        (["--mixed_precision", "fp8"], "config key 'mixed_precision'"),
        (["--select_best", "maybe"], "config key 'select_best': expected true or false"),
        (["--resume"], "flag --resume needs a value"),
    ],
)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_bad_flags_in_one_line(script, argv, needle):
    with pytest.raises(ConfigError) as e:
        configure(script, argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_booleans_fill_switches_and_literals_are_typed(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data_on_device: true\nchannels_last: false\nstrategy: ddp\n")
    cfg, _ = configure("cnn", ["--config", str(y)])
    assert (cfg.data_on_device, cfg.channels_last, cfg.strategy) == ("true", "false", "ddp")
    with pytest.raises(ConfigError, match="config key 'optimizer': expected one of sgd, adam"):
        configure("cnn", ["--optimizer", "rmsprop"])


UNSUPPORTED_ON = {
    "data_on_device": "true",
    "channels_last": "true",
    "compile": "default",
    "microbatches": "2",
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_knob_a_script_does_not_use_is_an_error_naming_it(script):
    module = script_module(script)
    knobs = [k for k in module.UNSUPPORTED if k in UNSUPPORTED_ON]
    for knob in knobs:
        with pytest.raises(ConfigError, match=f"config key '{knob}': {script} does not support"):
            configure(script, [f"--{knob}", UNSUPPORTED_ON[knob]])
    cfg, _ = configure(script, [])  # left at "auto": resolved to off, so the record says what ran
    for knob in knobs:
        assert getattr(cfg, knob) in ("false", "", 0), knob
    # the knobs a script does take are accepted
    for knob in set(UNSUPPORTED_ON) - set(module.UNSUPPORTED):
        assert (
            str(getattr(configure(script, [f"--{knob}", UNSUPPORTED_ON[knob]])[0], knob))
            == UNSUPPORTED_ON[knob]
        )

from dataclasses import dataclass

import pytest

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
        (["--epochs", "0"], "config key 'epochs': must be > 0"),
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

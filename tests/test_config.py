import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from palate.config import add_config_arguments, config_from_args, config_from_dict, config_to_dict, doc_field
from palate.errors import ConfigError


@dataclass
class _Cfg:
    lr: float = doc_field(3e-4, "learning rate")
    steps: int = doc_field(100, "total steps")
    loss: Literal["clip", "kl_penalty"] = doc_field("clip", "which PPO objective")
    target_kl: float | None = doc_field(None, "early-stop KL")
    norm_obs: bool = doc_field(True, "normalise observations")
    sizes: list[int] = doc_field([64, 64], "hidden sizes")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Cfg)
    return parser.parse_args(argv)


def test_precedence_default_yaml_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.001\nsteps: 5000\nsizes: [32, 32]\n")
    cfg = config_from_args(_Cfg, _parse(["--steps", "7", "--norm-obs", "false"]), path)
    assert cfg.lr == 0.001 and cfg.steps == 7 and cfg.norm_obs is False and cfg.sizes == [32, 32]
    assert cfg.loss == "clip" and cfg.target_kl is None
    assert config_to_dict(cfg)["steps"] == 7


def test_optional_and_list_from_flags():
    cfg = config_from_args(_Cfg, _parse(["--target-kl", "0.02", "--sizes", "8,8,8", "--steps", "1e4"]))
    assert cfg.target_kl == 0.02 and cfg.sizes == [8, 8, 8] and cfg.steps == 10000


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*'lrr'"):
        config_from_dict(_Cfg, {"lrr": 1.0})
    with pytest.raises(ConfigError, match="'steps' expects int"):
        config_from_dict(_Cfg, {"steps": "many"})
    with pytest.raises(ConfigError, match="'loss' must be one of"):
        config_from_dict(_Cfg, {"loss": "huber"})
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_args(_Cfg, _parse([]), tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config_from_args(_Cfg, _parse([]), bad)


@dataclass
class _Nested:
    name: str = doc_field("x", "a name")
    label: dict = doc_field({}, "a stage's fields")


def test_mapping_flag_is_yaml_merged_over_the_files_section(tmp_path):
    """``--label '{k: 8}'`` overrides the keys it names and keeps the YAML section's others."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Nested)
    path = tmp_path / "p.yaml"
    path.write_text("label:\n  limit: 241\n  k: 4\n")
    cfg = config_from_args(_Nested, parser.parse_args(["--label", "{k: 8, redundancy: 4}"]), path)
    assert cfg.label == {"limit": 241, "k": 8, "redundancy": 4}
    assert config_from_args(_Nested, parser.parse_args(["--label", "{k: 2}"])).label == {"k": 2}
    for bad in ("[1, 2]", "{k: [1"):
        with pytest.raises(ConfigError, match="--label"):
            config_from_args(_Nested, parser.parse_args(["--label", bad]), path)

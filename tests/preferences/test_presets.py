"""Every shipped preference preset loads, and so does the RL config its ``rl`` block makes.

A typo in a preset's ``rl`` block (an unknown field, a PPO field under TRPO) would otherwise
surface only when the policy is built, after the random-policy labels were already collected.
"""

from pathlib import Path

import pytest

from palate.config import load_yaml
from palate.preferences.config import config_from_mapping, policy_config

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "prefs").glob("*.yaml"))


def test_the_presets_are_found() -> None:
    assert {p.stem for p in PRESETS} >= {"hopper", "halfcheetah", "pendulum", "cartpole"}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_and_its_rl_block_load(path: Path) -> None:
    cfg = config_from_mapping(load_yaml(path))
    rl = policy_config(cfg)
    assert rl.env == cfg.env
    assert all(getattr(rl, k) == v for k, v in cfg.rl.items())

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


def test_pong_preset_is_the_papers_budget_on_the_rl_atari_ppo():
    """configs/prefs/pong.yaml trains the PPO of configs/rl/atari-ppo.yaml, within 5,500 labels of 25-step clips."""
    from palate.rl.cli import preset_values

    root = PRESETS[0].parents[1]
    cfg = config_from_mapping(load_yaml(root / "prefs" / "pong.yaml"))
    atari = preset_values(load_yaml(root / "rl" / "atari-ppo.yaml"), "ppo")
    # What the RL preset sets, except what a preference run sets itself (env, steps, the wrappers).
    expected = {k: v for k, v in atari.items() if k not in ("env", "total_steps", "atari", "checkpoint_every")}
    assert cfg.rl == expected
    assert cfg.labels <= 5500 and cfg.segment_length == 25 and cfg.steps == policy_config(cfg).total_steps

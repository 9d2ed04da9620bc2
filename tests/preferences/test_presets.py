"""The Hopper preference preset trains the same TRPO as the RL preset.

The preference benchmark compares the label runs with "the same algorithm on the true reward"
(``palate.bench.prefs.run_true_reward`` uses the preference preset's ``rl`` block), and the docs
quote the RL preset's Hopper TRPO figures as that arm. This holds only while the two files agree;
session 8 changed the RL preset alone and the two drifted apart unnoticed until session 9.
"""

from pathlib import Path

from palate.config import config_from_dict, load_yaml
from palate.rl.cli import preset_values
from palate.rl.config import TRPOConfig

REPO = Path(__file__).resolve().parents[2]


def test_hopper_prefs_rl_block_is_the_rl_presets_trpo() -> None:
    prefs = load_yaml(REPO / "configs/prefs/hopper.yaml")
    rl = preset_values(load_yaml(REPO / "configs/rl/hopper.yaml"), "trpo")
    assert prefs["algo"] == "trpo"
    common = {"env": "Hopper-v5", "seed": 0, "total_steps": 1_000_000}
    from_prefs = config_from_dict(TRPOConfig, {**prefs["rl"], **common})
    from_rl = config_from_dict(TRPOConfig, {**rl, **common})
    assert from_prefs == from_rl

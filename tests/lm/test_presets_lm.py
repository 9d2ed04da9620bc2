"""Every shipped pipeline preset parses into valid stage configs, and its PPO optimises the learned RM.

The check a user would otherwise make an hour into a run: a typo in any section of a preset fails
here, and no preset's headline comes from the task's own scoring function (the oracle arm is a flag).
"""

from pathlib import Path

import pytest
import yaml

from palate.config import config_from_dict
from palate.lm.pipeline import PipelineConfig, stage_configs

PRESETS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs" / "lm").glob("*.yaml")
                 if p.name.startswith("pipeline-") or p.name.startswith("instructgpt"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_pipeline_preset_builds_every_stage_config(preset, tmp_path):
    raw = yaml.safe_load(preset.read_text())
    cfg = config_from_dict(PipelineConfig, {**raw, "runs_dir": str(tmp_path)}, source=str(preset))
    cfg.validate()
    configs = stage_configs(cfg)
    assert cfg.ppo_reward == "rm", f"{preset.name}: PPO must optimise the learned reward model"
    assert configs["ppo"].reward_model == str(cfg.root / "rm" / "model")
    assert configs["dpo"].train_data == str(cfg.root / "label" / "comparisons.jsonl")
    assert configs["dpo_eval"].seed == configs["eval"].seed


def test_presets_found():
    assert len(PRESETS) >= 2

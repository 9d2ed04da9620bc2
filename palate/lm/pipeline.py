"""The InstructGPT pipeline end to end: demonstrations -> SFT -> comparisons -> RM -> PPO -> eval -> best-of-N
(-> DPO on the same rankings -> its eval) -> report.

With ``label: {labeller: human, label_wait_s: S}`` the label stage asks people through the
feedback service and waits up to S seconds for all answers; if they are not all in, the pipeline
stops with a message, and running it again picks up the answers given meanwhile (no task is
asked twice, see :mod:`palate.lm.human_label`).

Each stage writes its own run directory ``<runs_dir>/<name>/<stage>/`` and finishes by writing
``summary.json``; a stage whose ``summary.json`` exists is skipped, so an interrupted pipeline
continues where it stopped and a finished one only rebuilds its report. Each stage's section of
the YAML file holds fields of that stage's own config; the pipeline supplies the paths that link
them (the SFT model is the reward model's initialisation, PPO's policy and reference, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from palate.config import config_from_dict, config_to_dict
from palate.lm.config import PipelineConfig
from palate.runs import atomic_write_json, read_run_config

log = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "run_pipeline", "stage_done", "warn_if_cpu_busy"]


def warn_if_cpu_busy(threads: int) -> bool:
    """Warn (and return True) when several torch threads start on a CPU that other jobs already load.

    torch's OpenMP threads spin-wait for each other; where another job holds a core, a thread waits
    for a time slice at every small matmul, and generation at batch 16 runs several times slower
    than with one thread. On an idle machine every core is the fastest setting, so the presets use
    them and this says when not to.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return False
    if threads > 1 and load >= 1.0:
        log.warning("the CPU is already busy (load average %.1f, %d cores) and torch runs %d threads: they "
                    "spin-wait on each other and may run several times slower than one; pass "
                    "--torch-threads 1 (or torch_threads: 1 in the YAML)", load, os.cpu_count() or 0, threads)
        return True
    return False


def stage_done(root: Path, stage: str) -> bool:
    """A stage is done when its ``summary.json`` exists (written last, atomically).

    An evaluation by people whose wait ran out before every pair was answered is not done: the
    next run of the pipeline runs it again, which creates no task twice and reads the answers
    given meanwhile (:mod:`palate.lm.human_eval`).
    """
    path = root / stage / "summary.json"
    if not path.is_file():
        return False
    if stage in ("eval", "dpo_eval"):
        try:
            human = json.loads(path.read_text()).get("human")
        except (OSError, ValueError):
            return False
        if isinstance(human, dict) and human.get("complete") is False:
            return False
    return True


def _merged(cls: type, defaults: dict[str, Any], overrides: dict[str, Any], source: str) -> Any:
    """``cls`` from the pipeline's linking defaults updated by the user's section."""
    return config_from_dict(cls, {**defaults, **overrides}, source=source)


def _data_stage(root: Path, stage: str, build: Any, cfg_obj: Any) -> Path:
    """Run a data-producing stage (demos, label) and record it like a training stage."""
    out_dir = root / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = Path(build(cfg_obj))
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    atomic_write_json(out_dir / "summary.json", {"path": str(path), "records": n,
                                                 "wall_s": time.perf_counter() - t0,
                                                 "config": config_to_dict(cfg_obj)})
    return path


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every stage's own config, linked by paths; built (and validated) before anything runs."""
    from palate.lm.best_of_n import BestOfNConfig
    from palate.lm.demos import DemosConfig, LabelConfig
    from palate.lm.dpo import DPOConfig
    from palate.lm.evaluate import EvalConfig
    from palate.lm.ppo import LMPPOConfig
    from palate.lm.reward import RMConfig
    from palate.lm.sft import SFTConfig

    root = cfg.root
    sft_model, rm_model = str(root / "sft" / "model"), str(root / "rm" / "model")
    uses_rm = "rm" in cfg.stages or (root / "rm" / "model").is_dir()
    reward = {"reward_model": rm_model} if cfg.ppo_reward == "rm" else {"reward_fn": cfg.task}
    ppo_defaults: dict[str, Any] = {
        "policy": sft_model, "reference": sft_model, "task": cfg.task, "seed": cfg.seed,
        "value_init": rm_model if uses_rm else None, "runs_dir": str(root), "run_name": "ppo",
        "torch_threads": cfg.torch_threads, **reward}
    if cfg.ppo.get("online_every"):
        ppo_defaults["online_comparisons"] = str(root / "label" / "comparisons.jsonl")
    # People (label: {labeller: human} / ppo: {online_labeller: human}) answer in the feedback project
    # named after the pipeline unless a section names another; online tasks go where the label
    # stage's went, through the same service.
    people = {"feedback_project": cfg.name, **{k: v for k, v in cfg.label.items()
                                               if k in ("feedback_url", "feedback_token_env", "feedback_project")}}
    if cfg.ppo.get("online_labeller") == "human":
        ppo_defaults.update(people)
    val = {"val_data": str(root / "label" / "val.jsonl")} if cfg.label_val else {}
    eval_defaults = {"reference": sft_model, "task": cfg.task, "seed": cfg.seed + 1234,
                     "torch_threads": cfg.torch_threads, "reward_model": rm_model if uses_rm else None}
    return {
        "demos": _merged(DemosConfig, {"model": cfg.base_model, "task": cfg.task, "split": "train",
                                       "out": str(root / "demos" / "demos.jsonl"), "seed": cfg.seed},
                         cfg.demos, "pipeline demos"),
        "sft": _merged(SFTConfig, {"model": cfg.base_model, "task": cfg.task, "seed": cfg.seed,
                                   "train_data": str(root / "demos" / "demos.jsonl"), "runs_dir": str(root),
                                   "run_name": "sft", "overwrite": True, "tensorboard": False},
                       cfg.sft, "pipeline sft"),
        "label": _merged(LabelConfig, {"model": sft_model, "task": cfg.task, "split": "train",
                                       "out": str(root / "label" / "comparisons.jsonl"), "seed": cfg.seed + 1,
                                       "feedback_project": cfg.name, "feedback_run": f"{cfg.name}-label"},
                         cfg.label, "pipeline label"),
        "label_val": _merged(LabelConfig, {"model": sft_model, "task": cfg.task, "split": "validation",
                                           "labellers": "all", "out": str(root / "label" / "val.jsonl"),
                                           "seed": cfg.seed + 2, "feedback_project": cfg.name,
                                           "feedback_run": f"{cfg.name}-label-val"}, cfg.label_val, "pipeline label_val")
        if cfg.label_val else None,
        "rm": _merged(RMConfig, {"model": sft_model, "task": cfg.task, "seed": cfg.seed,
                                 "train_data": str(root / "label" / "comparisons.jsonl"), "runs_dir": str(root),
                                 "run_name": "rm", "overwrite": True, "tensorboard": False, **val},
                      cfg.rm, "pipeline rm"),
        "ppo": _merged(LMPPOConfig, ppo_defaults, cfg.ppo, "pipeline ppo"),
        "eval": _merged(EvalConfig, {"run": str(root / "ppo"), "out": str(root / "eval"), **eval_defaults},
                        cfg.eval, "pipeline eval"),
        "bon": _merged(BestOfNConfig, {"model": sft_model, "reward_model": rm_model, "task": cfg.task,
                                       "out": str(root / "bon"), "seed": cfg.seed + 4321,
                                       "torch_threads": cfg.torch_threads}, cfg.bon, "pipeline bon")
        if uses_rm else None,
        # DPO learns from the very rankings the RM learns from, starting from the same SFT model,
        # and is judged on the same test prompts with the same seed: the offline baseline.
        "dpo": _merged(DPOConfig, {"model": sft_model, "reference": sft_model, "task": cfg.task, "seed": cfg.seed,
                                   "train_data": str(root / "label" / "comparisons.jsonl"), "runs_dir": str(root),
                                   "run_name": "dpo", "overwrite": True, "tensorboard": False, **val},
                       cfg.dpo, "pipeline dpo"),
        "dpo_eval": _merged(EvalConfig, {"run": str(root / "dpo"), "out": str(root / "dpo_eval"), **eval_defaults},
                            {**cfg.eval, **cfg.dpo_eval}, "pipeline dpo_eval"),
    }


def run_pipeline(cfg: PipelineConfig) -> Path:
    """Run the stages of ``cfg`` that are not done yet; returns the pipeline directory."""
    import json

    import torch

    from palate.lm.best_of_n import best_of_n
    from palate.lm.demos import build_demonstrations, label_comparisons
    from palate.lm.dpo import train_dpo
    from palate.lm.evaluate import evaluate
    from palate.lm.ppo_build import train_ppo
    from palate.lm.report import write_report
    from palate.lm.reward import train_reward_model
    from palate.lm.sft import train_sft

    cfg.validate()
    configs = stage_configs(cfg)  # a typo in any section fails now, not after an hour of SFT
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    warn_if_cpu_busy(torch.get_num_threads())
    root = cfg.root
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / "pipeline.json", config_to_dict(cfg))
    timings_path = root / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    for stage in cfg.stages:
        if stage != "report" and stage_done(root, stage):
            log.info("pipeline %s: stage %s already done, skipping", cfg.name, stage)
            continue
        log.info("pipeline %s: stage %s", cfg.name, stage)
        t0 = time.perf_counter()
        if stage == "demos":
            _data_stage(root, "demos", build_demonstrations, configs["demos"])
        elif stage == "sft":
            train_sft(configs["sft"])
        elif stage == "label":
            if configs["label_val"] is not None:
                # Written before the training set: the label stage is done only when both exist.
                label_comparisons(configs["label_val"])
            _data_stage(root, "label", label_comparisons, configs["label"])
        elif stage == "rm":
            train_reward_model(configs["rm"])
        elif stage == "ppo":
            resume = (root / "ppo" / "checkpoint.pt").is_file()
            train_ppo(configs["ppo"], resume=resume, overwrite=not resume)
        elif stage == "eval":
            evaluate(configs["eval"])
        elif stage == "bon":
            if configs["bon"] is None:
                log.info("pipeline %s: no reward model, so no best-of-N baseline", cfg.name)
                continue
            best_of_n(configs["bon"])
        elif stage == "dpo":
            train_dpo(configs["dpo"])
        elif stage == "dpo_eval":
            evaluate(configs["dpo_eval"])
        elif stage == "report":
            write_report(root)
        timings[stage] = round(time.perf_counter() - t0, 1)
        atomic_write_json(timings_path, timings)
    atomic_write_json(root / "summary.json", {"stages": cfg.stages, "timings_s": timings,
                                              "total_s": round(sum(timings.values()), 1)})
    return root


def pipeline_config_of(root: Path) -> dict[str, Any]:
    """The PPO stage's config of a pipeline directory (for reports)."""
    return read_run_config(root / "ppo") if (root / "ppo" / "config.yaml").is_file() else {}


def replace(cfg: PipelineConfig, **changes: Any) -> PipelineConfig:
    """A copy of ``cfg`` with fields changed (e.g. a different name for a second run)."""
    return dataclasses.replace(cfg, **changes)

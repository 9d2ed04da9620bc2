"""PPO for language models, palate vs TRL: ``python -m palate.bench lm-ppo`` (part of ``make bench``).

Both trainers start from the same SFT policy, score with the same reward model (palate's, turned
into a ``LlamaForSequenceClassification`` for TRL), see the same prompts (the ``sentiment`` task's
train split), the same rollout batch, minibatch, epochs, completion length, learning rate and KL
coefficient, and train the same weights (``trainable_layers``: the last blocks of policy and value). Each arm runs in its own process so its
peak memory (max RSS) is its own. Afterwards both final policies are evaluated the same way by
:func:`palate.lm.evaluate.evaluate_models`: reward-model score and KL to the SFT model on the test
prompts, and the held-out labeller's win rate against SFT.

Peer: TRL 1.12.0's ``trl.experimental.ppo.PPOTrainer`` (TRL removed PPO in 1.13). It is not a
palate dependency; it is installed without dependencies into a directory that shares palate's
torch/transformers/accelerate (so pip never pulls another torch)::

    .venv/bin/pip install --no-deps --target bench-venvs/trl-1.12 trl==1.12.0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TRL_PATH = ROOT / "bench-venvs" / "trl-1.12"

SETTINGS: dict[str, Any] = {
    "iterations": 3,            # rollout batches
    "batch_size": 8,            # prompts (= completions) per rollout batch
    "mini_batch_size": 4,       # completions per optimiser step
    "ppo_epochs": 2,
    "max_new_tokens": 24,
    "learning_rate": 3e-5,
    "kl_coef": 0.05,
    "trainable_layers": 6,      # both arms train the last 6 blocks of policy and value (CPU budget)
    "eval_prompts": 12,         # test prompts for the common evaluation (x 2 samples)
    "seed": 0,
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def export_reward_model_for_trl(rm_dir: Path, out: Path) -> Path:
    """palate's RewardModel as a ``LlamaForSequenceClassification`` directory (TRL's RM format).

    The normalised score is ``gain * (w.h + b) + bias``; the HF head has no bias, so it gets
    ``gain * w`` and the constant ``gain * b + bias`` is dropped: a constant added to every
    score changes neither PPO's advantages (whitened) nor its ordering of samples.
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from palate.lm.reward import load_reward_model

    if (out / "config.json").is_file():
        return out
    rm, tok = load_reward_model(rm_dir)
    config = AutoConfig.for_model(rm.backbone.config.model_type, **{
        k: v for k, v in rm.backbone.config.to_dict().items() if k not in ("model_type", "_name_or_path")})
    config.num_labels = 1
    config.pad_token_id = tok.pad_token_id
    seq = AutoModelForSequenceClassification.from_config(config)
    getattr(seq, seq.base_model_prefix).load_state_dict(rm.backbone.state_dict())
    with torch.no_grad():
        seq.score.weight.copy_(rm.head.weight * rm.gain)
    seq.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------- arms


def arm_palate(work: Path, sft: str, rm_dir: str) -> dict[str, Any]:
    from palate.lm.ppo import LMPPOConfig, build_trainer, read_metrics
    from palate.runs import prepare_run_dir

    s = SETTINGS
    cfg = LMPPOConfig(policy=sft, reference=sft, reward_model=rm_dir, task="sentiment", iterations=s["iterations"],
                      batch_size=s["batch_size"], mini_batch_size=s["mini_batch_size"], ppo_epochs=s["ppo_epochs"],
                      max_new_tokens=s["max_new_tokens"], learning_rate=s["learning_rate"], kl_coef=s["kl_coef"],
                      adaptive_kl=False, forward_batch_size=s["batch_size"], device="cpu", seed=s["seed"],
                      trainable_layers=s["trainable_layers"],
                      runs_dir=str(work), run_name="palate", save_every=10**6, whiten_advantages=True)
    run_dir = prepare_run_dir(cfg.run_dir, {"bench": "lm-ppo"}, overwrite=True)
    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.train(run_dir)
    wall = time.perf_counter() - start
    metrics = read_metrics(run_dir)
    tokens = sum(m["response/length"] * s["batch_size"] for m in metrics)
    return {"train_wall_s": wall, "generated_tokens": tokens, "model": str(run_dir / "model"),
            "final_train_reward": metrics[-1]["objective/reward"], "final_train_kl": metrics[-1]["objective/kl"]}


def arm_trl_ppo(work: Path, sft: str, rm_dir: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from palate.data.tasks import load_task

    s = SETTINGS
    hf_rm = export_reward_model_for_trl(Path(rm_dir), work / "trl-rm")
    tok = AutoTokenizer.from_pretrained(sft, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = load_task("sentiment").prompts("train")
    # Raw text prompts, tokenised as palate's formatting does for non-chat tasks.
    ds = Dataset.from_dict({"input_ids": [tok(p)["input_ids"] for p in prompts]})
    policy = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(str(hf_rm), num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(hf_rm), num_labels=1, dtype=torch.float32)
    if s["trainable_layers"]:
        # The same trainable set as palate's arm; HF's Trainer builds its optimiser from requires_grad.
        from palate.lm.ppo import freeze_all_but_last_layers

        freeze_all_but_last_layers(policy, s["trainable_layers"])
        freeze_all_but_last_layers(value, s["trainable_layers"])
        value.score.requires_grad_(True)
    args = PPOConfig(
        output_dir=str(work / "trl-ppo"), per_device_train_batch_size=s["mini_batch_size"],
        gradient_accumulation_steps=s["batch_size"] // s["mini_batch_size"],
        num_mini_batches=s["batch_size"] // s["mini_batch_size"], num_ppo_epochs=s["ppo_epochs"],
        total_episodes=s["iterations"] * s["batch_size"], response_length=s["max_new_tokens"],
        learning_rate=s["learning_rate"], lr_scheduler_type="constant", kl_coef=s["kl_coef"], temperature=1.0,
        stop_token="eos", local_rollout_forward_batch_size=s["batch_size"], num_sample_generations=0,
        report_to="none", save_strategy="no", seed=s["seed"], use_cpu=True, logging_steps=1,
        per_device_eval_batch_size=1)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, eval_dataset=ds.select(range(2)))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    out = work / "trl-ppo" / "model"
    trainer.policy_model.save_pretrained(out) if hasattr(trainer, "policy_model") else policy.save_pretrained(out)
    tok.save_pretrained(out)
    logs = [h for h in trainer.state.log_history if "objective/rlhf_reward" in h or "objective/scores" in h]
    last = logs[-1] if logs else {}
    return {"train_wall_s": wall, "generated_tokens": s["iterations"] * s["batch_size"] * s["max_new_tokens"],
            "generated_tokens_note": "upper bound (TRL does not log response lengths)", "model": str(out),
            "final_train_reward": last.get("objective/scores"), "final_train_kl": last.get("objective/kl")}


def evaluate_arm(model_dir: str, sft: str, rm_dir: str) -> dict[str, Any]:
    """The common evaluation: RM score, KL to SFT and held-out win rate on test prompts."""
    from palate.data.tasks import load_task
    from palate.lm.evaluate import evaluate_models
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.models import load_model
    from palate.lm.reward import RewardModel

    task = load_task("sentiment")
    policy, tok = load_model(model_dir)
    reference, _ = load_model(sft)
    rm = RewardModel.from_pretrained(rm_dir)
    prompts = task.prompts("test")[: SETTINGS["eval_prompts"]]
    metrics, _ = evaluate_models(
        policy, reference, tok, prompts,
        lambda p: encode_prompt_completion(tok, p, "", task.chat, 128, add_eos=False)["input_ids"],
        task.panel.held_out, lambda p, c: rm.score_texts(list(p), list(c), tok, batch_size=16).tolist(),
        max_new_tokens=SETTINGS["max_new_tokens"], samples_per_prompt=2, batch_size=38, seed=99)
    return {k: metrics[k] for k in ("reward", "reward_reference", "kl", "kl_stderr", "win_rate", "win_rate_stderr",
                                    "n_comparisons")}


def _child(arm: str, work: Path, sft: str, rm_dir: str, threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    fn = {"palate": arm_palate, "trl-ppo": arm_trl_ppo}[arm]
    result = fn(work, sft, rm_dir)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["eval"] = evaluate_arm(result["model"], sft, rm_dir)
    (work / f"{arm}.json").write_text(json.dumps(result, indent=2))
    return 0


def run(out_dir: str | Path, sft: str | None = None, rm_dir: str | None = None, arms: tuple[str, ...] = ("palate", "trl-ppo"),
        threads: int = 1, parallel: bool = False) -> dict[str, Any]:
    """Run each arm in its own process and write ``lm_ppo.md`` / ``lm_ppo.json`` under ``out_dir``.

    ``parallel`` runs the arms at the same time (one thread each): on a shared, busy machine that
    puts both under the same load, which sequential runs cannot promise.

    ``sft`` and ``rm_dir`` default to the models of the ``make run`` pipeline
    (``runs/sentiment-cpu/sft/model`` and ``runs/sentiment-cpu/rm/model``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sft = sft or str(ROOT / "runs" / "sentiment-cpu" / "sft" / "model")
    rm_dir = rm_dir or str(ROOT / "runs" / "sentiment-cpu" / "rm" / "model")
    for path in (sft, rm_dir):
        if not Path(path).is_dir():
            raise RuntimeError(f"{path} does not exist; run `make run` (the pipeline) first, or pass --sft/--rm")
    results: dict[str, Any] = {"settings": SETTINGS, "sft": sft, "reward_model": rm_dir, "threads": threads,
                               "parallel": parallel}
    procs: dict[str, tuple[subprocess.Popen, float]] = {}
    for arm in arms:
        env = dict(os.environ)
        if arm.startswith("trl"):
            if not (TRL_PATH / "trl").is_dir():
                results[arm] = {"skipped": f"TRL 1.12.0 not installed; run: .venv/bin/pip install --no-deps --target {TRL_PATH} trl==1.12.0"}
                continue
            env["PYTHONPATH"] = f"{TRL_PATH}{os.pathsep}{env.get('PYTHONPATH', '')}"
        cmd = [sys.executable, "-m", "palate.bench.lm_ppo", "--arm", arm, "--work", str(out), "--sft", sft,
               "--rm", rm_dir, "--threads", str(threads)]
        procs[arm] = (subprocess.Popen(cmd, env=env, cwd=ROOT), time.perf_counter())
        if not parallel:  # one at a time: each arm has the machine to itself
            procs[arm][0].wait()
    for arm, (proc, start) in procs.items():
        code = proc.wait()
        if code != 0:
            results[arm] = {"failed": f"exit code {code}"}
            continue
        results[arm] = json.loads((out / f"{arm}.json").read_text())
        results[arm]["process_wall_s"] = time.perf_counter() - start
    lines = ["| arm | train wall (s) | generated tokens/s | peak RSS (MB) | RM score (test) | KL to SFT (nats) | "
             "held-out win rate vs SFT |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = results.get(arm, {})
        if "eval" not in r:
            lines.append(f"| {arm} | {r.get('skipped') or r.get('failed')} | | | | | |")
            continue
        e = r["eval"]
        lines.append(f"| {arm} | {r['train_wall_s']:.0f} | {r['generated_tokens'] / r['train_wall_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {e['reward']:.3f} (SFT {e['reward_reference']:.3f}) | "
                     f"{e['kl']:.2f} ± {e['kl_stderr']:.2f} | {e['win_rate']:.3f} ± {e['win_rate_stderr']:.3f} |")
    (out / "lm_ppo.md").write_text("\n".join(lines) + "\n")
    (out / "lm_ppo.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n".join(lines))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.lm_ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=["palate", "trl-ppo"], help="run one arm (internal)")
    parser.add_argument("--work", default="bench-results/lm-ppo")
    parser.add_argument("--sft", default=None)
    parser.add_argument("--rm", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="palate,trl-ppo")
    parser.add_argument("--parallel", action="store_true", help="run the arms at the same time")
    args = parser.parse_args(argv)
    if args.arm:
        return _child(args.arm, Path(args.work), args.sft, args.rm, args.threads)
    run(args.work, args.sft, args.rm, tuple(args.arms.split(",")), args.threads, args.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())

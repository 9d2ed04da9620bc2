"""The CUDA path of the LM stages, on tiny random Llamas: the same numbers as on the CPU, and runs.

Skipped where no GPU is present (CI and the 2-core dev machine). Run on a GPU machine with
``python -m pytest tests/lm/test_gpu.py``; docs/benchmarks.md records where it last ran.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from palate.lm.testing import tiny_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 matrix products, so CPU and GPU results can be compared at float32 tolerance."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_sft_loss_and_gradients_match_the_cpu() -> None:
    from palate.data.formats import SFTExample
    from palate.lm.formatting import pad_batch
    from palate.lm.sft import encode_example, sft_forward_loss_sums

    model, tok = tiny_causal_lm(seed=1)
    items = [encode_example(tok, SFTExample(f"Review {i}: the film was", " wonderful" + " and happy" * i), False, 64)
             for i in range(6)]
    batch = pad_batch(items, tok.pad_token_id, padding_side="right")
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        m = copy.deepcopy(model).to(device)
        loss_sum, n = sft_forward_loss_sums(m, {k: v.to(device) for k, v in batch.items()})
        (loss_sum / n).backward()
        losses.append(loss_sum / n)
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert _rel(losses[1].reshape(1), losses[0].reshape(1)) < 1e-5
    assert _rel(grads[1], grads[0]) < 1e-4


def test_reward_head_reads_the_same_token_on_the_gpu_under_both_padding_sides() -> None:
    from palate.lm.reward_model import RewardModel

    model, tok = tiny_causal_lm(seed=2)
    rm_cpu = RewardModel.from_causal_lm(model)
    rm_gpu = copy.deepcopy(rm_cpu).to("cuda")
    prompts = ["The movie was", "I did not like the food, it was cold"]
    completions = [" wonderful.", " awful and sad, really bad."]
    ref = rm_cpu.score_texts(prompts, completions, tok)
    for side in ("left", "right"):
        tok.padding_side = side
        got = rm_gpu.score_texts(prompts, completions, tok)
        assert got.device.type == "cpu"  # scores come back to the host
        assert _rel(got, ref) < 1e-4, side


def _tiny_dir(tmp_path: Path) -> Path:
    model, tok = tiny_causal_lm()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_train_sft_runs_on_the_gpu_and_saves_a_loadable_model(tmp_path: Path, precision: str) -> None:
    from palate.lm.models import load_model
    from palate.lm.sft import SFTConfig, train_sft

    tiny = _tiny_dir(tmp_path)
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Review {i}: the film was", "response": " wonderful and happy."})
                            + "\n" for i in range(16)))
    run = train_sft(SFTConfig(model=str(tiny), train_data=str(data), val_fraction=0.25, max_steps=6, batch_size=4,
                              lr=1e-3, eval_every=3, mixed_precision=precision, runs_dir=str(tmp_path / "runs"),
                              tensorboard=False))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["sft/loss"] for r in records if "sft/loss" in r]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    summary = json.loads((run / "summary.json").read_text())
    assert summary.get("peak_gpu_mb") or summary.get("device", "cuda").startswith("cuda"), summary
    loaded, _ = load_model(str(run), device="cuda")
    assert next(loaded.parameters()).device.type == "cuda"


def test_train_reward_model_runs_on_the_gpu(tmp_path: Path) -> None:
    import numpy as np

    from palate.data.tasks import load_task
    from palate.lm.reward import RewardModel, RMConfig, train_reward_model

    tiny = _tiny_dir(tmp_path)
    task = load_task("sentiment")
    rng = np.random.default_rng(0)
    cands = ["It was wonderful, I loved it.", "It was awful and sad.", "It was fine.", "Terrible, bad."]
    for name, prompts, labs in (("train", task.prompts("train")[:16], task.panel.train_labellers[:1]),
                                ("val", task.prompts("validation")[:4], task.panel.labellers)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": p, "completions": cands, "labeller": lab.name,
                        "ranking": lab.compare(p, cands, rng)}) + "\n" for p in prompts for lab in labs))
    run = train_reward_model(RMConfig(
        model=str(tiny), train_data=str(tmp_path / "train.jsonl"), val_data=str(tmp_path / "val.jsonl"),
        task="sentiment", max_steps=4, batch_size=4, lr=1e-3, eval_every=2, mixed_precision="bf16",
        runs_dir=str(tmp_path / "runs"), tensorboard=False))
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["rm/val_accuracy"] <= 1.0
    rm = RewardModel.from_pretrained(run, device="cuda")
    assert rm.head.weight.device.type == "cuda"


def test_lm_ppo_iteration_on_the_gpu_matches_the_cpu_rollout_shapes_and_learns() -> None:
    from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel
    from palate.runs import seed_everything

    prompts = ["The movie was", "I did not like the food, it was cold", "Write a short poem", "List three colours"]

    def count_e(ps, completions):
        return [float(c.count("e")) for c in completions]

    cfg = LMPPOConfig(reward_fn="x", batch_size=16, mini_batch_size=8, iterations=8, learning_rate=3e-3,
                      max_new_tokens=12, kl_coef=0.01, adaptive_kl=False, device="cuda", ppo_epochs=4, seed=0)
    seed_everything(0)
    model, tok = tiny_causal_lm(seed=0)
    value = ValueModel.from_causal_lm(model)
    trainer = LMPPOTrainer(cfg, model, tok, value, count_e, prompts, lambda p: tok.encode(p),
                           reference=copy.deepcopy(model))
    assert trainer.device.type == "cuda"
    stats = [trainer.step()[0] for _ in range(cfg.iterations)]
    rewards = [s["objective/reward"] for s in stats]
    assert all(torch.isfinite(torch.tensor([s["objective/kl"] for s in stats])))
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards

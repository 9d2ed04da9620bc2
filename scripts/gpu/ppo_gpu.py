"""palate LM PPO timing on the GPU: a SmolLM2-135M-architecture policy, value and reference model.

Usage: ``python3 scripts/gpu/ppo_gpu.py MODEL_DIR BATCH`` (``DEV=cpu`` to try it on the CPU).
Four iterations of batch BATCH, 48 new tokens, 4 PPO epochs over minibatches of BATCH / 4, bf16
autocast; the reward is a stand-in (count of the letter 'e'): only the time is read.
"""

import copy
import json
import os
import sys
import time

import torch

from palate.data.tasks import load_task
from palate.lm.models import load_model
from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel
from palate.runs import seed_everything


def count_e(prompts, completions):
    return [float(c.count("e")) for c in completions]


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def main():
    path, batch = sys.argv[1], int(sys.argv[2])
    dev = os.environ.get("DEV", "cuda")
    prompts = load_task("sentiment").prompts("train")
    seed_everything(0)
    model, tok = load_model(path, device=dev)
    value = ValueModel.from_causal_lm(model)
    cfg = LMPPOConfig(reward_fn="x", batch_size=batch, mini_batch_size=batch // 4, iterations=4, learning_rate=1e-5,
                      max_new_tokens=48, kl_coef=0.05, device=dev, mixed_precision="bf16", ppo_epochs=4, seed=0)
    trainer = LMPPOTrainer(cfg, model, tok, value, count_e, prompts, lambda p: tok.encode(p),
                           reference=copy.deepcopy(model))
    rows = []
    for i in range(cfg.iterations):
        sync(dev)
        start = time.perf_counter()
        m = trainer.step()[0]
        sync(dev)
        rows.append({"iteration": i, "seconds": round(time.perf_counter() - start, 3),
                     **{k: m[k] for k in m if k.startswith(("time/", "charts/tokens_per_s", "objective/kl"))}})
        print(json.dumps(rows[-1]), flush=True)
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if dev == "cuda" else None
    print(json.dumps({"batch": batch, "max_new_tokens": 48, "peak_gpu_mb": peak,
                      "mean_s_after_first": sum(r["seconds"] for r in rows[1:]) / (len(rows) - 1)}))


if __name__ == "__main__":
    main()

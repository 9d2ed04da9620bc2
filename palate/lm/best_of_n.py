"""Best-of-N with the reward model: the baseline for PPO, and the overoptimisation curve.

Best-of-N draws N completions from the SFT model and keeps the one the reward model scores
highest. Its KL to the SFT model is known in closed form, ``log N - (N - 1) / N`` (Stiennon et al.
2020, appendix G.3; Gao et al. 2022), so one pool of ``n`` samples per prompt traces the whole
curve: for every N <= n the expected outcome of best-of-N is an exact average over the pool's
order statistics (:func:`max_of_subset_weights`), with no resampling noise.

For each N the stage reports the proxy (the reward model's score of the pick, what PPO
optimises), the gold score (the held-out labeller's utility, which trained nothing) and the
held-out labeller's expected win rate against an SFT sample. Where the proxy keeps rising and the
gold score flattens or falls, optimising the reward model has stopped paying (Gao et al.'s picture).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from palate.lm.config import BestOfNConfig
from palate.runs import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["BestOfNConfig", "best_of_n", "best_of_n_curve", "bon_kl", "max_of_subset_weights"]


def bon_kl(n: int) -> float:
    """KL(best-of-n || base) in nats: ``log n - (n - 1) / n``."""
    return math.log(n) - (n - 1) / n


def max_of_subset_weights(pool: int, n: int) -> np.ndarray:
    """``[pool]``: probability that the i-th smallest of ``pool`` items is the largest of a uniformly
    random ``n``-subset, ``C(i, n - 1) / C(pool, n)`` (i counted from 0)."""
    if not 1 <= n <= pool:
        raise ValueError(f"best-of-{n} needs 1 <= n <= pool ({pool})")
    return np.array([math.comb(i, n - 1) for i in range(pool)], dtype=float) / math.comb(pool, n)


def expected_win_against_pool(gold: np.ndarray, texts: Sequence[str], temperature: float) -> np.ndarray:
    """``[pool]``: each sample's probability of beating another sample of the pool in the held-out
    labeller's eyes. The labeller adds Gumbel noise of scale ``temperature`` to its utility, so
    ``P(a beats b) = sigmoid((u_a - u_b) / temperature)``; identical texts tie (1/2)."""
    k = len(gold)
    if k < 2:
        return np.full(k, 0.5)
    diff = gold[:, None] - gold[None, :]
    p = 1.0 / (1.0 + np.exp(-diff / temperature)) if temperature > 0 else (np.sign(diff) + 1.0) / 2.0
    same = np.array([[a == b for b in texts] for a in texts])
    p = np.where(same, 0.5, p)
    np.fill_diagonal(p, 0.0)
    return p.sum(1) / (k - 1)


def best_of_n_curve(proxy: np.ndarray, gold: np.ndarray, win: np.ndarray, ns: Sequence[int]) -> list[dict[str, float]]:
    """Expected proxy, gold and win rate of best-of-N for each N, from ``[prompts, pool]`` arrays."""
    prompts, pool = proxy.shape
    order = np.argsort(proxy, axis=1, kind="stable")
    rows = np.arange(prompts)[:, None]
    sorted_ = {name: a[rows, order] for name, a in (("proxy", proxy), ("gold", gold), ("win_rate", win))}
    curve = []
    for n in ns:
        w = max_of_subset_weights(pool, n)
        point = {"n": float(n), "kl": bon_kl(n)}
        for name, a in sorted_.items():
            point[name] = float((a @ w).mean())
        curve.append(point)
    return curve


def best_of_n(cfg: BestOfNConfig) -> dict[str, Any]:
    """Sample, score and trace best-of-N; writes ``summary.json`` and ``samples.jsonl`` to ``cfg.out``."""
    from palate.data.tasks import load_task
    from palate.lm.evaluate import sample_batches
    from palate.lm.formatting import encode_prompt_completion
    from palate.lm.generation import named_stream, row_seed
    from palate.lm.models import load_model
    from palate.lm.reward_model import RewardModel
    from palate.runs import seed_everything

    cfg.validate()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    t0 = time.perf_counter()
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else ("cpu" if cfg.device == "auto" else cfg.device)
    task = load_task(cfg.task)
    model, tokenizer = load_model(cfg.model, device=device)
    model.eval()
    rm = RewardModel.from_pretrained(cfg.reward_model, device=device)
    rm.eval()
    prompts = task.prompts(cfg.split)  # type: ignore[arg-type]
    if cfg.n_prompts:
        prompts = prompts[: cfg.n_prompts]
    max_new = cfg.max_new_tokens or task.max_new_tokens
    flat = [p for p in prompts for _ in range(cfg.n)]
    ids = [encode_prompt_completion(tokenizer, p, "", task.chat, 128, add_eos=False)["input_ids"] for p in flat]
    seed_everything(cfg.seed)
    # One generator per sample (seeded by its place in the pool): the pool does not depend on batch_size.
    stream = named_stream(f"best_of_n/{cfg.split}")
    with torch.no_grad():
        _, texts = sample_batches(model, tokenizer, ids, max_new, cfg.temperature, cfg.batch_size,
                                  row_seeds=[row_seed(cfg.seed, stream, i) for i in range(len(ids))])
        proxy = rm.score_texts(flat, texts, tokenizer, batch_size=16).numpy().reshape(len(prompts), cfg.n)
    judge = task.panel.held_out
    gold = np.array([judge.score(p, t) for p, t in zip(flat, texts)]).reshape(len(prompts), cfg.n)
    win = np.stack([expected_win_against_pool(gold[i], texts[i * cfg.n:(i + 1) * cfg.n], judge.temperature)
                    for i in range(len(prompts))])
    ns = [2 ** j for j in range(int(math.log2(cfg.n)) + 1)]
    curve = best_of_n_curve(proxy, gold, win, ns)
    summary = {"curve": curve, "n": cfg.n, "n_prompts": len(prompts), "split": cfg.split, "judge": judge.name,
               "model": cfg.model, "reward_model": cfg.reward_model, "task": task.name,
               "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "samples.jsonl", "".join(
        json.dumps({"prompt": p, "completion": t, "rm_score": float(r), "gold": float(g)}) + "\n"
        for p, t, r, g in zip(flat, texts, proxy.reshape(-1), gold.reshape(-1))))
    atomic_write_json(out / "summary.json", summary)
    top = curve[-1]
    log.info("best-of-%d: KL %.2f nats, RM score %.3f, held-out utility %.3f, expected win rate vs SFT %.3f",
             cfg.n, top["kl"], top["proxy"], top["gold"], top["win_rate"])
    return summary

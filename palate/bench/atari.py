"""Benchmark: palate PPO against Stable-Baselines3's PPO ``CnnPolicy`` on an Atari game.

Both train with rl-baselines3-zoo's PPO Atari hyperparameters (``configs/rl/atari-ppo.yaml``:
8 envs x 128 steps, 4 epochs of 256, learning rate 2.5e-4 and clip range 0.1 annealed linearly,
``vf_coef`` 0.5, ``ent_coef`` 0.01), on the same game, for the same number of agent steps, with
the same number of torch threads, one after the other in this process. Each side uses its own
DeepMind preprocessing (palate's :mod:`palate.rl.atari`; SB3's ``make_atari_env`` +
``VecFrameStack(4)``): noop reset, frame skip 4, 84x84 grey, 4 stacked frames, episodic life,
FIRE at reset, clipped rewards for training. The learning-rate and clip-range schedules anneal
over the zoo's 10M steps, as they would in the first ``steps`` of a full run. Reported per library:

* **steps/s**: agent steps (4 emulator frames each) over the wall time of ``learn`` alone;
* **score**: mean unclipped game score of the training games that ended (SB3's ``Monitor``
  buffer; palate's ``charts/episodic_return``), the last 100 at most.

A short budget measures speed; equal scores need the long runs (10M steps) this does not make.
SB3 is no palate dependency: ``pip install -e '.[bench,atari]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ZOO_TOTAL_STEPS = 10_000_000


def palate_config(env_id: str, steps: int, seed: int, threads: int) -> Any:
    """The preset ``configs/rl/atari-ppo.yaml`` for ``env_id``, annealing over the zoo's 10M steps."""
    from palate.config import config_from_dict, load_yaml
    from palate.rl.cli import preset_values
    from palate.rl.config import PPOConfig

    data = preset_values(load_yaml(REPO / "configs" / "rl" / "atari-ppo.yaml"), "ppo")
    return config_from_dict(PPOConfig, {**data, "env": env_id, "seed": seed, "total_steps": ZOO_TOTAL_STEPS,
                                        "torch_threads": threads, "checkpoint_every": 0})


def run_palate(cfg: Any, steps: int) -> dict[str, Any]:
    from palate.rl import PPO

    model = PPO(cfg)
    start = time.perf_counter()
    model.learn(total_steps=steps, progress=False)
    elapsed = time.perf_counter() - start
    scores = model._all_returns[-100:]
    return {"steps": model.global_step, "seconds": elapsed, "steps_per_s": model.global_step / elapsed,
            "games": model.episodes, "scored": len(scores), "score": float(np.mean(scores)) if scores else None}


def run_sb3(cfg: Any, steps: int) -> dict[str, Any]:
    """SB3 PPO CnnPolicy with the same hyperparameters, as the zoo builds it for Atari."""
    try:
        import ale_py
        import gymnasium as gym
        from stable_baselines3 import PPO as SB3PPO
        from stable_baselines3.common.env_util import make_atari_env
        from stable_baselines3.common.monitor import Monitor
        from stable_baselines3.common.vec_env import VecFrameStack
    except ImportError as err:
        raise SystemExit(f"the Atari benchmark needs SB3 and ale-py ({err}); run: pip install -e '.[bench,atari]'") \
            from err
    gym.register_envs(ale_py)
    env = VecFrameStack(make_atari_env(cfg.env, n_envs=cfg.n_envs, seed=cfg.seed), n_stack=4)
    lr, clip = cfg.learning_rate, cfg.clip_range
    # The zoo's lin_ schedules are in SB3's progress_remaining, which runs over its total_timesteps:
    # scaled here so that both libraries sit at the same point of a 10M-step schedule.
    scale = steps / ZOO_TOTAL_STEPS

    def at(value: float):
        return lambda p: value * (1.0 - (1.0 - p) * scale)

    model = SB3PPO("CnnPolicy", env, n_steps=cfg.n_steps, batch_size=cfg.batch_size, n_epochs=cfg.n_epochs,
                   learning_rate=at(lr), clip_range=at(clip), ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
                   max_grad_norm=cfg.max_grad_norm, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, seed=cfg.seed,
                   device="cpu", verbose=0)
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    elapsed = time.perf_counter() - start
    scores = [float(info["r"]) for info in model.ep_info_buffer]  # SB3 keeps the last 100 games
    games = sum(len(r) for r in env.env_method("get_episode_rewards")) if env.env_is_wrapped(Monitor)[0] else None
    env.close()
    return {"steps": int(model.num_timesteps), "seconds": elapsed, "steps_per_s": model.num_timesteps / elapsed,
            "games": games, "scored": len(scores), "score": float(np.mean(scores)) if scores else None}


def run(out_dir: str | Path, env_id: str = "BreakoutNoFrameskip-v4", steps: int = 50_000, seed: int = 0,
        threads: int = 1, peers: bool = True) -> dict[str, Any]:
    """Train palate and SB3 side by side; write ``atari.json`` and ``atari.md`` to ``out_dir``."""
    import torch

    torch.set_num_threads(threads)
    import torch._dynamo  # noqa: F401  (imported by torch.optim on first use: keep it out of timings)

    cfg = palate_config(env_id, steps, seed, threads)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "env": env_id,
                               "steps": steps, "seed": seed, "torch_threads": threads, "rows": {}}
    results["rows"]["palate"] = run_palate(cfg, steps)
    log.info("palate: %s", results["rows"]["palate"])
    if peers:
        results["rows"]["sb3"] = run_sb3(cfg, steps)
        log.info("sb3: %s", results["rows"]["sb3"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "atari.json").write_text(json.dumps(results, indent=2))
    (out_dir / "atari.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """The table of one run."""
    lines = [f"PPO on {results['env']}, {results['steps']} agent steps, seed {results['seed']}, "
             f"{results['torch_threads']} torch thread(s), {results['date']}", "",
             "| library | steps/s | wall s | games ended | mean score of the last games (how many) |",
             "|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        score = "n/a" if row["score"] is None else f"{row['score']:.2f} ({row['scored']})"
        lines.append(f"| {name} | {row['steps_per_s']:.0f} | {row['seconds']:.0f} | {row['games']} | {score} |")
    rows = results["rows"]
    if "sb3" in rows:
        lines += ["", f"palate / SB3 steps/s: {rows['palate']['steps_per_s'] / rows['sb3']['steps_per_s']:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.atari", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="BreakoutNoFrameskip-v4", help="an ALE id")
    parser.add_argument("--steps", type=int, default=50_000, help="agent steps per library")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both libraries")
    parser.add_argument("--no-peers", action="store_true", help="palate only (no SB3 needed)")
    parser.add_argument("--out", default="bench-results/atari", help="directory for atari.json and atari.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = run(args.out, args.env, args.steps, args.seed, args.threads, peers=not args.no_peers)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

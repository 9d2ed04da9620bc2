"""Benchmark: palate PPO/TRPO against Stable-Baselines3 PPO and sb3-contrib TRPO.

For every environment, algorithm and seed, both libraries train with the same hyperparameters
(the palate preset in ``configs/rl/``, translated field by field to SB3's arguments), the same
number of environments, the same step budget and one torch thread each, one after the other in
this process. Reported per run:

* **steps/s**: environment steps divided by the wall time of ``learn`` alone (no construction,
  no evaluation);
* **return**: mean true return of the deterministic policy over ``eval_episodes`` episodes of a
  fresh environment (episode i reset with seed 10_000 + i), observations normalised with the
  frozen training statistics;
* **raw env steps/s**: one ``gym.make`` environment stepped with random actions, the ceiling.

SB3 and sb3-contrib are not palate dependencies; install them with ``pip install -e '.[bench]'``.
Results: ``out_dir/rl.json`` and ``out_dir/rl.md``; ``--update-doc docs/benchmarks.md`` replaces
the "## Control: PPO and TRPO" section there with the new table.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PRESETS = {"CartPole-v1": "cartpole", "Pendulum-v1": "pendulum", "Hopper-v5": "hopper",
           "HalfCheetah-v5": "halfcheetah", "Walker2d-v5": "walker2d"}
DEFAULT_STEPS = {"CartPole-v1": 100_000, "Hopper-v5": 1_000_000}
SECTION = "## Control: PPO and TRPO"


def preset_config(env_id: str, algo: str, seed: int, total_steps: int) -> Any:
    """The palate config for ``env_id`` from its preset YAML."""
    from palate.config import config_from_dict, load_yaml
    from palate.rl.cli import preset_values
    from palate.rl.config import PPOConfig, TRPOConfig

    if env_id not in PRESETS:
        raise SystemExit(f"no preset for {env_id}; known: {sorted(PRESETS)}")
    data = preset_values(load_yaml(REPO / "configs" / "rl" / f"{PRESETS[env_id]}.yaml"), algo)
    cls = PPOConfig if algo == "ppo" else TRPOConfig
    return config_from_dict(cls, {**data, "env": env_id, "seed": seed, "total_steps": total_steps,
                                  "torch_threads": 1, "checkpoint_every": 0})


def raw_env_rate(env_id: str, steps: int = 20_000, seed: int = 0) -> float:
    """Steps/s of one environment under random actions (resets included)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(seed)
    actions = [env.action_space.sample() for _ in range(1000)]
    env.reset(seed=seed)
    start = time.perf_counter()
    for i in range(steps):
        _, _, terminated, truncated, _ = env.step(actions[i % 1000])
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def _episodes(env_id: str, act, episodes: int) -> list[float]:
    """Deterministic returns of ``act(raw_obs) -> action`` on a fresh env, seeds 10_000 + i."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=10_000 + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def run_palate(cfg: Any, algo: str, eval_episodes: int) -> dict[str, Any]:
    from palate.rl import PPO, TRPO

    model = (PPO if algo == "ppo" else TRPO)(cfg)
    start = time.perf_counter()
    model.learn(progress=False)
    elapsed = time.perf_counter() - start
    returns = _episodes(cfg.env, lambda obs: model.predict(obs, deterministic=True), eval_episodes)
    return {"steps": model.global_step, "seconds": elapsed, "steps_per_s": model.global_step / elapsed,
            "returns": returns}


def sb3_trust_region(max_kl: float, cg_damping: float, action_space: Any) -> tuple[float, float]:
    """sb3-contrib's ``(target_kl, cg_damping)`` for the same trust region as palate's settings.

    palate's KL is the paper's: of the joint action distribution, i.e. summed over a diagonal
    Gaussian's action dimensions. sb3-contrib builds its Gaussian from per-dimension ``Normal``s and
    takes ``kl_divergence(...).mean()`` over states *and* dimensions: its KL, and so its Fisher
    matrix, is palate's divided by the action dimension d. Its ``target_kl`` and its damping (added
    to that smaller Fisher) are therefore palate's divided by d: on Hopper (d = 3) its defaults
    0.01 and 0.1 are palate's ``max_kl: 0.03`` and ``cg_damping: 0.3``, the same step exactly.
    """
    from gymnasium import spaces

    dims = math.prod(action_space.shape) if isinstance(action_space, spaces.Box) else 1
    return max_kl / dims, cg_damping / dims


def sb3_model(cfg: Any, algo: str) -> tuple[Any, Any]:
    """SB3 PPO / sb3-contrib TRPO with the palate config's hyperparameters; returns (model, env)."""
    try:
        import torch
        from sb3_contrib import TRPO as SB3TRPO
        from stable_baselines3 import PPO as SB3PPO
        from stable_baselines3.common.env_util import make_vec_env
        from stable_baselines3.common.vec_env import VecNormalize
    except ImportError as err:
        raise SystemExit(f"the RL benchmark needs SB3 and sb3-contrib ({err}); run: pip install -e '.[bench]'") from err
    env = make_vec_env(cfg.env, n_envs=cfg.n_envs, seed=cfg.seed)
    if cfg.norm_obs or cfg.norm_reward:
        env = VecNormalize(env, norm_obs=cfg.norm_obs, norm_reward=cfg.norm_reward, clip_obs=cfg.clip_obs,
                           clip_reward=cfg.clip_reward, gamma=cfg.gamma)
    policy_kwargs = {"net_arch": {"pi": list(cfg.hidden_sizes), "vf": list(cfg.hidden_sizes)},
                     "activation_fn": {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[cfg.activation],
                     "ortho_init": cfg.ortho_init, "log_std_init": cfg.log_std_init}
    common = {"n_steps": cfg.n_steps, "batch_size": cfg.batch_size, "gamma": cfg.gamma, "gae_lambda": cfg.gae_lambda,
              "normalize_advantage": cfg.normalize_advantage, "policy_kwargs": policy_kwargs, "seed": cfg.seed,
              "device": "cpu", "verbose": 0}
    if algo == "ppo":
        lr, clip = cfg.learning_rate, cfg.clip_range
        model = SB3PPO("MlpPolicy", env, **common, n_epochs=cfg.n_epochs,
                       learning_rate=(lambda p: p * lr) if cfg.anneal_lr else lr,
                       clip_range=(lambda p: p * clip) if cfg.anneal_clip_range else clip,
                       clip_range_vf=cfg.clip_range_vf, ent_coef=cfg.ent_coef, vf_coef=cfg.vf_coef,
                       max_grad_norm=cfg.max_grad_norm, target_kl=cfg.target_kl)
    else:
        lr = cfg.vf_lr
        target_kl, damping = sb3_trust_region(cfg.max_kl, cfg.cg_damping, env.action_space)
        model = SB3TRPO("MlpPolicy", env, **common, learning_rate=(lambda p: p * lr) if cfg.anneal_lr else lr,
                        cg_max_steps=cfg.cg_iters, cg_damping=damping,
                        line_search_shrinking_factor=cfg.line_search_shrink,
                        line_search_max_iter=cfg.line_search_steps, n_critic_updates=cfg.vf_iters,
                        target_kl=target_kl)
    return model, env


def run_sb3(cfg: Any, algo: str, eval_episodes: int) -> dict[str, Any]:
    model, env = sb3_model(cfg, algo)
    start = time.perf_counter()
    model.learn(total_timesteps=cfg.total_steps)
    elapsed = time.perf_counter() - start
    normalize = getattr(env, "normalize_obs", None) if cfg.norm_obs else None

    def act(obs: np.ndarray) -> np.ndarray:
        obs = normalize(obs[None]) if normalize is not None else obs[None]
        return model.predict(obs, deterministic=True)[0][0]

    returns = _episodes(cfg.env, act, eval_episodes)
    steps = int(model.num_timesteps)
    env.close()
    return {"steps": steps, "seconds": elapsed, "steps_per_s": steps / elapsed, "returns": returns}


def run(out_dir: str | Path, envs: Sequence[str] = ("CartPole-v1", "Hopper-v5"), seeds: Sequence[int] = (0, 1, 2),
        steps: dict[str, int] | None = None, algos: Sequence[str] = ("ppo", "trpo"), eval_episodes: int = 10,
        peers: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train palate and the peers side by side; write ``rl.json`` and ``rl.md`` to ``out_dir``.

    Runs alternate palate / peer per seed, so a machine whose load drifts slows both alike.
    """
    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # noqa: F401  (imported by torch.optim on first use: keep it out of timings)

    steps = {**DEFAULT_STEPS, **(steps or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command,
        "envs": {},
    }
    for env_id in envs:
        budget = steps.get(env_id, 100_000)
        env_result: dict[str, Any] = {"steps": budget, "raw_env_steps_per_s": raw_env_rate(env_id), "algos": {}}
        results["envs"][env_id] = env_result
        for algo in algos:
            rows: dict[str, list[dict[str, Any]]] = {"palate": [], "sb3": []}
            for seed in seeds:
                cfg = preset_config(env_id, algo, seed, budget)
                rows["palate"].append(run_palate(cfg, algo, eval_episodes))
                log.info("%s %s seed %d palate: %s", env_id, algo, seed, _brief(rows["palate"][-1]))
                if peers:
                    rows["sb3"].append(run_sb3(cfg, algo, eval_episodes))
                    log.info("%s %s seed %d sb3: %s", env_id, algo, seed, _brief(rows["sb3"][-1]))
                env_result["algos"][algo] = {k: _aggregate(v) for k, v in rows.items() if v}
                _write(out_dir, results)
    _write(out_dir, results)
    return results


def _brief(row: dict[str, Any]) -> str:
    return f"{row['steps_per_s']:.0f} steps/s, return {np.mean(row['returns']):.1f}"


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    finals = [float(np.mean(r["returns"])) for r in rows]
    sps = [r["steps_per_s"] for r in rows]
    return {"runs": rows, "return_mean": float(np.mean(finals)), "return_std": float(np.std(finals)),
            "steps_per_s": float(np.mean(sps)), "steps_per_s_std": float(np.std(sps)), "seeds": len(rows)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, Python {platform.python_version()}"


def markdown(results: dict[str, Any]) -> str:
    """The results table: per env and algorithm, palate vs peer."""
    lines = [
        "| env | algorithm (peer) | steps | seeds | palate steps/s | peer steps/s | ratio "
        "| palate / raw env rate | palate return | peer return |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for env_id, env_result in results["envs"].items():
        raw = env_result["raw_env_steps_per_s"]
        for algo, by_lib in env_result["algos"].items():
            ours, peer = by_lib["palate"], by_lib.get("sb3")
            name = f"{algo.upper()} ({'SB3 PPO' if algo == 'ppo' else 'sb3-contrib TRPO'})"
            cells = [env_id, name, f"{env_result['steps']:,}", str(ours["seeds"]), f"{ours['steps_per_s']:,.0f}",
                     f"{peer['steps_per_s']:,.0f}" if peer else "-",
                     f"{ours['steps_per_s'] / peer['steps_per_s']:.2f}x" if peer else "-",
                     f"{ours['steps_per_s'] / raw:.1%} of {raw:,.0f}",
                     f"{ours['return_mean']:.1f} +- {ours['return_std']:.1f}",
                     f"{peer['return_mean']:.1f} +- {peer['return_std']:.1f}" if peer else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, results: dict[str, Any]) -> None:
    from palate.runs import atomic_write_json, atomic_write_text

    atomic_write_json(out_dir / "rl.json", results)
    atomic_write_text(out_dir / "rl.md", markdown(results))


def update_doc(doc: Path, body: str) -> None:
    """Replace (or append) the "## Control: PPO and TRPO" section of ``doc`` with ``body``."""
    from palate.runs import atomic_write_text

    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    atomic_write_text(doc, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.rl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Hopper-v5"], help="environment ids")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds")
    parser.add_argument("--algos", nargs="+", choices=["ppo", "trpo"], default=["ppo", "trpo"])
    parser.add_argument("--steps", nargs="+", default=[], metavar="ENV=N",
                        help="step budget per env, e.g. Hopper-v5=100000 (defaults: CartPole-v1=100000, "
                             "Hopper-v5=1000000)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--no-peers", action="store_true", help="palate only (no SB3 needed)")
    parser.add_argument("--out", default="bench-results/rl", help="directory for rl.json and rl.md")
    parser.add_argument("--update-doc", metavar="MD", help="also write the table into this Markdown file's section")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = {}
    for item in args.steps:
        env_id, _, n = item.partition("=")
        if not n.isdigit():
            parser.error(f"--steps wants ENV=N, got {item!r}")
        steps[env_id] = int(n)
    command = "python -m palate.bench.rl " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(args.out, args.envs, args.seeds, steps, args.algos, args.eval_episodes, peers=not args.no_peers,
                  command=command)
    table = markdown(results)
    print(table)
    if args.update_doc:
        update_doc(Path(args.update_doc), f"Measured {results['date']} on {results['machine']}.\n\n"
                   f"Command: `{results['command']}`\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Diagnostic: what a preference run's ``reward_offset`` is worth in the true reward's units.

On tasks that end when the agent fails (Hopper), the policy of a preference run optimises
``r_hat + reward_offset``, where r_hat is normalised to zero mean and unit std over recent
states. How much that makes staying alive worth depends on how r_hat's scale compares with the
true reward's, which no label says. This script measures it on a finished run: it rolls out the
run's final policy on the unmodified environment, scores each step with the run's final reward
model, and fits ``r_hat + offset ~ a * (r + c)`` by least squares. ``c`` is the offset translated
into true-reward units: what the policy gets per step alive beyond what the true reward gives.
``c < 0`` means the preference agent has less reason to stay up than an agent trained on the true
reward. Hopper runs with the preset's offset 3 measured c between -1.4 and -0.1, which is why the
preset now uses 5 (docs/benchmarks.md, "Why the Hopper preset is set as it is").

``python -m palate.bench.prefs_offset runs/NAME [--steps 4000] [--seed 123]`` prints one line per
mode (stochastic, deterministic) and writes ``offset_report.json`` into the run directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from palate.errors import PreferenceError


def offset_in_true_units(true_r: np.ndarray, policy_r: np.ndarray) -> dict[str, float]:
    """Least-squares ``policy_r ~ a * (true_r + c)``; returns ``a``, ``c`` and the fit's correlation.

    Also the mean/std ratio of both rewards: on a task with termination it measures how much a
    step alive is worth against how much one step's reward varies.
    """
    true_r = np.asarray(true_r, dtype=np.float64)
    policy_r = np.asarray(policy_r, dtype=np.float64)
    if true_r.shape != policy_r.shape or true_r.size < 2:
        raise PreferenceError(f"need two equal-length reward series of at least 2 steps, got {true_r.shape} "
                              f"and {policy_r.shape}")
    if np.std(true_r) == 0:
        raise PreferenceError("the true reward is constant over the rollout; no scale to translate the offset into")
    a, b = np.polyfit(true_r, policy_r, 1)
    policy_varies = np.std(policy_r) > 0
    return {
        "slope": float(a),
        "offset_true_units": float(b / a) if a != 0 else float("nan"),
        "correlation": float(np.corrcoef(true_r, policy_r)[0, 1]) if policy_varies else float("nan"),
        "true_mean": float(true_r.mean()), "true_std": float(true_r.std()),
        "true_mean_over_std": float(true_r.mean() / true_r.std()),
        "policy_mean": float(policy_r.mean()), "policy_std": float(policy_r.std()),
        "policy_mean_over_std": float(policy_r.mean() / policy_r.std()) if policy_varies else float("nan"),
    }


def offset_report(run_dir: str | Path, steps: int = 4000, seed: int = 123) -> dict[str, Any]:
    """Roll out ``run_dir``'s final policy for ``steps`` steps per mode and translate its offset."""
    import gymnasium as gym

    from palate.preferences.config import algo_classes, config_from_mapping, reward_model
    from palate.runs import read_run_config

    run_dir = Path(run_dir)
    cfg = config_from_mapping(read_run_config(run_dir))
    policy_file = run_dir / "policy" / "checkpoint.pt"
    if not policy_file.is_file():
        raise PreferenceError(f"{policy_file} does not exist; pass the directory of a preference run that "
                              "has trained past its first chunk")
    policy = algo_classes(cfg.algo)[0].load(policy_file)
    env = gym.make(cfg.env)
    try:
        model = reward_model(cfg, env.observation_space, env.action_space)
        model.load(run_dir / "reward_model.pt")
        report: dict[str, Any] = {"run_dir": str(run_dir), "env": cfg.env, "reward_offset": cfg.reward_offset,
                                  "steps": steps, "seed": seed}
        for mode, deterministic in (("stochastic", False), ("deterministic", True)):
            obs_rows, act_rows, rewards, lengths = [], [], [], []
            obs, _ = env.reset(seed=seed)
            length = 0
            for _ in range(steps):
                action = policy.predict(obs[None], deterministic=deterministic)[0]
                nxt, r, terminated, truncated, _ = env.step(action)
                obs_rows.append(obs)
                act_rows.append(action)
                rewards.append(r)
                length += 1
                obs = nxt
                if terminated or truncated:
                    lengths.append(length)
                    length = 0
                    obs, _ = env.reset()
            r_hat = model.predict(np.asarray(obs_rows, dtype=np.float32), np.asarray(act_rows, dtype=np.float32))
            fit = offset_in_true_units(np.asarray(rewards), r_hat + cfg.reward_offset)
            report[mode] = {**fit, "episode_lengths": lengths}
    finally:
        env.close()
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m palate.bench.prefs_offset", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished preference run (runs/NAME)")
    parser.add_argument("--steps", type=int, default=4000, help="environment steps per mode")
    parser.add_argument("--seed", type=int, default=123, help="reset seed of the first episode")
    args = parser.parse_args(argv)
    from palate.runs import atomic_write_json

    report = offset_report(args.run_dir, args.steps, args.seed)
    for mode in ("stochastic", "deterministic"):
        m = report[mode]
        print(f"{mode}: r_hat + {report['reward_offset']:g} ~ {m['slope']:.2f} * (r {m['offset_true_units']:+.2f}), "
              f"corr {m['correlation']:.3f}; true reward mean/std {m['true_mean_over_std']:.2f}, "
              f"policy reward {m['policy_mean_over_std']:.2f}; episodes {m['episode_lengths']}")
    atomic_write_json(Path(args.run_dir) / "offset_report.json", report)
    return report


if __name__ == "__main__":
    main()

"""The peer: ``imitation``'s PreferenceComparisons on a MuJoCo task, with synthetic labels.

Runs in its own virtual environment (imitation 1.0.1 pins gymnasium 0.29.1 and SB3 2.2.1), so it
imports nothing from palate; :mod:`palate.bench.prefs` calls it as a subprocess and reads the
JSON it prints on its last line. Settings mirror palate's run: the same fragment length, label
budget, share of initial labels, policy steps, fixed-length episodes (no early termination during
training) and evaluation on the unmodified environment.

    bench-venvs/imitation/bin/python palate/bench/imitation_prefs.py --env Hopper-v4 --labels 700 \
        --steps 100000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--env", default="Hopper-v4")
    parser.add_argument("--labels", type=int, default=700)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segment-length", type=int, default=25)
    parser.add_argument("--iterations", type=int, default=10, help="labelling/training rounds")
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--fixed-length", action="store_true", help="terminate_when_unhealthy=False in training")
    parser.add_argument("--fall-penalty", type=float, default=10.0,
                        help="with --fixed-length: reward subtracted per unhealthy step (as palate does)")
    args = parser.parse_args()

    import gymnasium as gym
    import numpy as np
    import torch
    from imitation.algorithms import preference_comparisons
    from imitation.policies.base import NormalizeFeaturesExtractor
    from imitation.rewards.reward_nets import BasicRewardNet
    from imitation.util.networks import RunningNorm
    from imitation.util.util import make_vec_env
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy

    torch.set_num_threads(1)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    kwargs = {"terminate_when_unhealthy": False} if args.fixed_length else {}

    class FallPenalty(gym.Wrapper):
        """palate's fixed-length episodes: a penalty per step fallen instead of termination."""

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if not self.env.unwrapped.is_healthy:
                reward = float(reward) - args.fall_penalty
            return obs, reward, terminated, truncated, info

    wrappers = [lambda env, _: FallPenalty(env)] if args.fixed_length and args.fall_penalty else None
    venv = make_vec_env(args.env, rng=rng, n_envs=1, env_make_kwargs=kwargs, post_wrappers=wrappers)
    reward_net = BasicRewardNet(venv.observation_space, venv.action_space, normalize_input_layer=RunningNorm)
    fragmenter = preference_comparisons.RandomFragmenter(warning_threshold=0, rng=rng)
    gatherer = preference_comparisons.SyntheticGatherer(rng=rng)
    preference_model = preference_comparisons.PreferenceModel(reward_net)
    reward_trainer = preference_comparisons.BasicRewardTrainer(
        preference_model=preference_model, loss=preference_comparisons.CrossEntropyRewardLoss(), epochs=3, rng=rng)
    agent = PPO("MlpPolicy", venv, seed=args.seed, n_steps=2048, batch_size=64, n_epochs=10, learning_rate=3e-4,
                gamma=0.99, gae_lambda=0.95, policy_kwargs={"features_extractor_class": NormalizeFeaturesExtractor},
                verbose=0)
    generator = preference_comparisons.AgentTrainer(
        algorithm=agent, reward_fn=reward_net, venv=venv, exploration_frac=0.05, rng=rng)
    trainer = preference_comparisons.PreferenceComparisons(
        generator, reward_net, num_iterations=args.iterations, fragmenter=fragmenter,
        preference_gatherer=gatherer, reward_trainer=reward_trainer, fragment_length=args.segment_length,
        transition_oversampling=1, initial_comparison_frac=0.25, allow_variable_horizon=not args.fixed_length,
        initial_epoch_multiplier=4, query_schedule="hyperbolic")
    trainer.train(total_timesteps=args.steps, total_comparisons=args.labels)
    train_s = time.perf_counter() - start
    eval_env = gym.make(args.env)
    eval_env.reset(seed=10_000 + args.seed)
    returns, _ = evaluate_policy(agent.policy, eval_env, n_eval_episodes=args.eval_episodes, deterministic=True,
                                 return_episode_rewards=True)
    print(json.dumps({"peer": "imitation", "env": args.env, "labels": args.labels, "steps": args.steps,
                      "seed": args.seed, "eval_true_return_mean": float(np.mean(returns)),
                      "eval_true_returns": [float(r) for r in returns], "wall_time_s": train_s}))


if __name__ == "__main__":
    main()

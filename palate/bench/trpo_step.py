"""One TRPO step, palate against sb3-contrib, on the same rollout from identical weights.

sb3-contrib collects one rollout (optionally after ``--warmup`` steps of its own training) with the
palate preset's settings translated by :func:`palate.bench.rl.sb3_model`; palate's policy is loaded
with sb3-contrib's weights and given that rollout (observations, actions, log-probabilities,
advantages, returns) as its batch. Both take their policy step; the script prints the two steps'
norms, their cosine and the log-std moves. A cosine of 1 and equal norms mean the two updates are
the same function of the data, so any gap in returns lies elsewhere (rollouts, critic, seeds).

    python -m palate.bench.trpo_step --env Hopper-v5            # the preset as it is
    python -m palate.bench.trpo_step --max-kl 0.01 --cg-damping 0.1 --sb3-untranslated

``--lockstep K`` goes further: both libraries train K iterations from the same weights, the same
env seeds and the same action noise (a full-batch critic, or with ``--minibatch`` the preset's
critic minibatches shuffled alike on both sides), and the script prints how far their parameters
are apart after each; identical loops stay at float rounding until MuJoCo's sensitivity to it
lets the trajectories part. ``--time-limit N`` cuts episodes at N steps so that truncated
episodes, bootstrapped with V(final observation), occur from the first rollout. Needs the
``bench`` extra (SB3, sb3-contrib).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

import numpy as np
import torch

_SB3_ACTOR = ["mlp_extractor.policy_net.0.weight", "mlp_extractor.policy_net.0.bias",
              "mlp_extractor.policy_net.2.weight", "mlp_extractor.policy_net.2.bias",
              "action_net.weight", "action_net.bias"]
_SB3_CRITIC = ["mlp_extractor.value_net.0.weight", "mlp_extractor.value_net.0.bias",
               "mlp_extractor.value_net.2.weight", "mlp_extractor.value_net.2.bias",
               "value_net.weight", "value_net.bias"]


def _load_sb3_weights(policy: Any, state: dict[str, torch.Tensor]) -> None:
    """Copy an SB3 MlpPolicy's (two hidden layers, separate networks) weights into palate's ActorCritic."""
    with torch.no_grad():
        for module, names in [(policy.actor, _SB3_ACTOR), (policy.critic, _SB3_CRITIC)]:
            for target, name in zip(module.parameters(), names, strict=True):
                target.copy_(state[name])
        policy.log_std.copy_(state["log_std"])


def _sb3_vector(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The named SB3 parameters as one flat vector, in palate's parameter order."""
    return torch.cat([state[n].reshape(-1) for n in names])


def _sb3_actor_vector(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return _sb3_vector(state, [*_SB3_ACTOR, "log_std"])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))


def _trpo_config(env: str, seed: int, max_kl: float | None, cg_damping: float | None, **overrides: Any) -> Any:
    """The env's preset TRPO config with ``max_kl`` / ``cg_damping`` (when given) and ``overrides``."""
    from palate.bench.rl import preset_config

    cfg = preset_config(env, "trpo", seed, 1_000_000)
    return dataclasses.replace(cfg, max_kl=cfg.max_kl if max_kl is None else max_kl,
                               cg_damping=cfg.cg_damping if cg_damping is None else cg_damping, **overrides)


def compare(env: str = "Hopper-v5", seed: int = 0, warmup: int = 0, max_kl: float | None = None,
            cg_damping: float | None = None, translate: bool = True, **overrides: Any) -> dict[str, Any]:
    """Run both steps on one shared rollout; returns norms, cosine and log-std moves.

    ``overrides`` replace other config fields (e.g. ``batch_size=2048, vf_iters=1``: one
    full-batch critic step, which does not depend on either library's minibatch shuffling).
    """
    from palate.bench.rl import sb3_model
    from palate.core.trust_region import flat_params
    from palate.rl import TRPO
    from palate.rl.buffer import Batch

    torch.set_num_threads(1)
    cfg = _trpo_config(env, seed, max_kl, cg_damping, **overrides)
    model, venv = sb3_model(cfg, "trpo")
    if not translate:  # sb3-contrib given palate's numbers as they are
        model.target_kl, model.cg_damping = cfg.max_kl, cfg.cg_damping
    if warmup:
        model.learn(total_timesteps=warmup)
    captured: dict[str, Any] = {}
    train = model.train

    def capturing_train() -> None:
        buf = model.rollout_buffer
        captured["rollout"] = {k: np.copy(getattr(buf, k))
                               for k in ["observations", "actions", "log_probs", "values", "advantages", "returns"]}
        captured["before"] = copy.deepcopy(model.policy.state_dict())
        train()
        captured["after"] = copy.deepcopy(model.policy.state_dict())

    model.train = capturing_train
    model.learn(total_timesteps=cfg.rollout_size, reset_num_timesteps=False)
    venv.close()

    def rows(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), dtype=torch.float32)

    r = captured["rollout"]
    batch = Batch(rows(r["observations"]), rows(r["actions"]), rows(r["log_probs"]), rows(r["values"]),
                  rows(r["advantages"]), rows(r["returns"]))
    ours = TRPO(cfg)
    ours._setup_model(venv.observation_space, venv.action_space)
    _load_sb3_weights(ours.policy, captured["before"])
    with torch.no_grad():
        logp_gap = (ours.policy.distribution(batch.obs).log_prob(batch.actions) - batch.logp).abs().max().item()
    start = flat_params(ours.policy.actor_parameters())
    critic_start = flat_params(ours.policy.critic_parameters())
    metrics = ours.update(batch, 1.0)
    step = flat_params(ours.policy.actor_parameters()) - start
    critic_step = flat_params(ours.policy.critic_parameters()) - critic_start
    sb3_critic_step = _sb3_vector(captured["after"], _SB3_CRITIC) - _sb3_vector(captured["before"], _SB3_CRITIC)
    sb3_step = _sb3_actor_vector(captured["after"]) - _sb3_actor_vector(captured["before"])
    dims = int(batch.actions.shape[-1])
    return {"env": env, "seed": seed, "warmup": warmup, "palate": {"max_kl": cfg.max_kl, "cg_damping": cfg.cg_damping},
            "sb3_contrib": {"target_kl": model.target_kl, "cg_damping": model.cg_damping},
            "logp_gap_at_start": logp_gap, "palate_step_norm": float(step.norm()),
            "sb3_step_norm": float(sb3_step.norm()), "cosine": _cosine(step, sb3_step),
            "palate_log_std_step": step[-dims:].tolist(), "sb3_log_std_step": sb3_step[-dims:].tolist(),
            "palate_kl": metrics["losses/approx_kl"], "palate_backtracks": metrics["trpo/backtracks"],
            "critic_step_norms": [float(critic_step.norm()), float(sb3_critic_step.norm())],
            "critic_cosine": _cosine(critic_step, sb3_critic_step)}


def _time_limited(env: str, limit: int) -> str:
    """An env id for ``env`` with a ``limit``-step time limit (registered once), to force truncation."""
    import gymnasium as gym

    new_id = f"palate-bench/{env.split('/')[-1].rsplit('-v', 1)[0]}Limit{limit}-v0"
    if new_id not in gym.registry:
        spec = gym.spec(env)
        gym.register(id=new_id, entry_point=spec.entry_point, kwargs=dict(spec.kwargs), max_episode_steps=limit)
    return new_id


def lockstep(env: str = "Hopper-v5", seed: int = 0, iterations: int = 5, max_kl: float | None = None,
             cg_damping: float | None = None, critic_eps: float | None = None,
             minibatch: bool = False, time_limit: int | None = None) -> list[dict[str, float]]:
    """Train both for ``iterations`` rollouts in lock-step; per iteration the max |parameter gap|.

    ``critic_eps`` overrides the Adam epsilon of palate's critic (sb3-contrib's is 1e-5 on the
    full MSE; palate's critic loss is half the MSE, so 5e-6 here is the same optimiser).
    ``minibatch`` keeps the preset's critic minibatches and hands both libraries the same
    shuffles (sb3-contrib's buffer is env-major, palate's batch time-major); otherwise the critic
    takes full-batch steps. ``time_limit`` cuts episodes at that many steps, so that truncated
    episodes (bootstrapped with V(final observation)) occur from the first rollout.
    """
    import gymnasium as gym
    from stable_baselines3.common.distributions import DiagGaussianDistribution

    from palate.bench.rl import sb3_model
    from palate.core.trust_region import flat_params
    from palate.rl import TRPO
    from palate.rl.policies import ActorCritic

    torch.set_num_threads(1)
    cfg = _trpo_config(env, seed, max_kl, cg_damping)
    if time_limit:
        cfg = dataclasses.replace(cfg, env=_time_limited(env, time_limit))
    if not minibatch:
        cfg = dataclasses.replace(cfg, batch_size=cfg.rollout_size)
    steps = iterations * cfg.rollout_size
    size, n_steps, n_envs = cfg.rollout_size, cfg.n_steps, cfg.n_envs
    shuffles = np.random.default_rng(seed).permuted(np.tile(np.arange(size), (iterations * cfg.vf_iters, 1)), axis=1)
    taken = {"sb3_calls": 0, "sb3": 0, "palate": 0}
    original_permutation, original_randperm = np.random.permutation, torch.randperm

    def sb3_permutation(n: Any) -> Any:
        if not (isinstance(n, int | np.integer) and n == size):
            return original_permutation(n)
        taken["sb3_calls"] += 1
        if (taken["sb3_calls"] - 1) % (cfg.vf_iters + 1) == 0:
            return np.arange(size)  # the policy step's one full batch: order does not matter
        taken["sb3"] += 1
        return shuffles[taken["sb3"] - 1].copy()

    def palate_randperm(n: int, generator: Any = None, **kwargs: Any) -> torch.Tensor:
        taken["palate"] += 1  # sb3-contrib's row i is env i // T, step i % T: palate's row t * N + env
        order = shuffles[taken["palate"] - 1]
        return torch.as_tensor((order % n_steps) * n_envs + order // n_steps)
    probe = gym.make(env)
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    noise = torch.randn((iterations, cfg.n_steps, cfg.n_envs, *act_space.shape),
                        generator=torch.Generator().manual_seed(seed))

    model, venv = sb3_model(cfg, "trpo")
    init = copy.deepcopy(model.policy.state_dict())
    drawn = {"sb3": 0, "palate": 0}
    original_sample, original_noise = DiagGaussianDistribution.sample, ActorCritic.noise

    def sb3_sample(dist: Any) -> torch.Tensor:  # one call per rollout step, all envs at once
        k, t = divmod(drawn["sb3"], cfg.n_steps)
        drawn["sb3"] += 1
        return dist.distribution.mean + dist.distribution.stddev * noise[k, t]

    def palate_noise(policy: Any, batch_shape: tuple[int, ...], generator: Any = None) -> torch.Tensor:
        drawn["palate"] += 1  # one call per rollout
        return noise[drawn["palate"] - 1]

    sb3_states: list[dict[str, torch.Tensor]] = []
    ours_states: list[tuple[torch.Tensor, torch.Tensor]] = []
    train = model.train

    def sb3_train() -> None:
        train()
        sb3_states.append(copy.deepcopy(model.policy.state_dict()))

    model.train = sb3_train
    ours = TRPO(cfg)
    ours._setup_model(obs_space, act_space)
    _load_sb3_weights(ours.policy, init)
    if critic_eps is not None:
        ours.optimizers["critic"].param_groups[0]["eps"] = critic_eps
    update = ours.update

    def ours_update(batch: Any, progress_remaining: float) -> dict[str, Any]:
        out = update(batch, progress_remaining)
        ours_states.append((flat_params(ours.policy.actor_parameters()), flat_params(ours.policy.critic_parameters())))
        return out

    ours.update = ours_update  # type: ignore[method-assign]
    try:
        DiagGaussianDistribution.sample = sb3_sample  # type: ignore[method-assign]
        ActorCritic.noise = palate_noise  # type: ignore[method-assign]
        if minibatch:
            np.random.permutation = sb3_permutation
        model.learn(total_timesteps=steps)
        np.random.permutation = original_permutation
        if minibatch:
            torch.randperm = palate_randperm
        ours.learn(total_steps=steps, progress=False)
    finally:
        DiagGaussianDistribution.sample, ActorCritic.noise = original_sample, original_noise  # type: ignore[method-assign]
        np.random.permutation, torch.randperm = original_permutation, original_randperm
        venv.close()
    gaps = []
    for state, (actor, critic) in zip(sb3_states, ours_states, strict=True):
        sb3_critic = _sb3_vector(state, _SB3_CRITIC)
        gaps.append({"actor_max_abs_gap": float((actor - _sb3_actor_vector(state)).abs().max()),
                     "critic_max_abs_gap": float((critic - sb3_critic).abs().max())})
    return gaps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Hopper-v5", help="an env with a configs/rl preset (continuous actions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=0, help="sb3-contrib training steps before the compared step")
    parser.add_argument("--max-kl", type=float, default=None, help="override the preset's max_kl")
    parser.add_argument("--cg-damping", type=float, default=None, help="override the preset's cg_damping")
    parser.add_argument("--critic-full-batch", type=int, default=0, metavar="EPOCHS",
                        help="fit the critic with EPOCHS full-batch steps (no minibatch shuffling on either side)")
    parser.add_argument("--sb3-untranslated", action="store_true",
                        help="give sb3-contrib palate's max_kl and cg_damping unscaled (the old benchmark's mistake)")
    parser.add_argument("--lockstep", type=int, default=0, metavar="K",
                        help="instead: train both K iterations in lock-step and print the parameter gaps")
    parser.add_argument("--critic-eps", type=float, default=None, help="with --lockstep: palate critic's Adam eps")
    parser.add_argument("--minibatch", action="store_true",
                        help="with --lockstep: the preset's critic minibatches, shuffled alike on both sides")
    parser.add_argument("--time-limit", type=int, default=None, metavar="N",
                        help="with --lockstep: cut episodes at N steps, so truncation (bootstrapping) is exercised")
    args = parser.parse_args(argv)
    if args.lockstep:
        gaps = lockstep(args.env, args.seed, args.lockstep, args.max_kl, args.cg_damping, args.critic_eps,
                        args.minibatch, args.time_limit)
        for k, gap in enumerate(gaps):
            print(f"iteration {k}: actor max|gap| {gap['actor_max_abs_gap']:.2e}, "
                  f"critic max|gap| {gap['critic_max_abs_gap']:.2e}")
        return
    overrides = {}
    if args.critic_full_batch:
        rollout = _trpo_config(args.env, args.seed, None, None).rollout_size
        overrides = {"batch_size": rollout, "vf_iters": args.critic_full_batch}
    out = compare(args.env, args.seed, args.warmup, args.max_kl, args.cg_damping, not args.sb3_untranslated,
                  **overrides)
    for key, value in out.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()

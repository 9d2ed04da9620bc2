"""Rollout collection: truncation bootstraps with V(final obs), termination does not; the hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from palate.rl import PPO, PPOConfig
from palate.rl.buffer import RolloutBuffer


def collect(model, source):
    """One rollout through the trainer's own machinery; returns (batch, buffer)."""
    envs, _ = model._open_envs(source)
    try:
        buffer = RolloutBuffer(model.config.n_steps, model.config.n_envs, model.observation_space.shape,
                               model.action_space.shape, model.policy.discrete)
        return model.collect_rollout(envs, buffer), buffer
    finally:
        envs.close()


def value(model, t: int) -> float:
    """V of the CountEnv observation after t steps."""
    with torch.no_grad():
        return float(model.policy.value(torch.tensor([[t / 10]], dtype=torch.float32)))


@pytest.mark.parametrize("continuous", [False, True])
def test_truncation_bootstraps_with_value_of_final_observation(count_env_factory, continuous):
    # gamma=0.5, lambda=0: the return target is r_t + gamma * V(next) exactly, so each row
    # shows which value was bootstrapped.
    model = PPO(PPOConfig(n_envs=1, n_steps=7, batch_size=7, gamma=0.5, gae_lambda=0.0, seed=3))
    batch, buffer = collect(model, count_env_factory(limit=5, continuous=continuous))
    assert buffer.truncated[:, 0].tolist() == [False] * 4 + [True] + [False] * 2
    assert not buffer.terminated.any()
    # obs index after each step: 1, 2, 3, 4, [5 final -> reset 0], 1, 2
    expected_next = [1, 2, 3, 4, 5, 1, 2]
    expected = [1.0 + 0.5 * value(model, k) for k in expected_next]
    np.testing.assert_allclose(batch.returns.numpy(), expected, rtol=1e-5)
    # Bootstrapping with the reset observation (t=0) instead would have given another number.
    assert abs(expected[4] - (1.0 + 0.5 * value(model, 0))) > 1e-6


def test_termination_does_not_bootstrap(count_env_factory):
    model = PPO(PPOConfig(n_envs=1, n_steps=7, batch_size=7, gamma=0.5, gae_lambda=0.0, seed=3))
    batch, buffer = collect(model, count_env_factory(limit=100, terminate_at=3))
    assert buffer.terminated[:, 0].tolist() == [False, False, True, False, False, True, False]
    returns = batch.returns.numpy()
    assert returns[2] == pytest.approx(1.0) and returns[5] == pytest.approx(1.0)
    assert returns[0] == pytest.approx(1.0 + 0.5 * value(model, 1), rel=1e-5)


def test_gae_recursion_stops_at_episode_end(count_env_factory):
    # lambda=1, gamma=1: the advantage sums rewards to the end of the episode only.
    model = PPO(PPOConfig(n_envs=1, n_steps=6, batch_size=6, gamma=1.0, gae_lambda=1.0, seed=0))
    batch, buffer = collect(model, count_env_factory(limit=100, terminate_at=3))
    returns = batch.returns.numpy()
    np.testing.assert_allclose(returns[:3], [3.0, 2.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(returns[3:6], [3.0, 2.0, 1.0], rtol=1e-6)


def test_reward_fn_replaces_env_reward_and_callback_sees_raw_arrays(count_env_factory):
    seen: dict = {}
    calls: list = []

    def reward_fn(obs, actions):
        calls.append((obs.copy(), actions.copy()))
        return np.full(len(obs), 2.0)

    model = PPO(PPOConfig(n_envs=2, n_steps=6, batch_size=12, gamma=0.0, gae_lambda=0.0, norm_obs=True, seed=0),
                reward_fn=reward_fn, rollout_callback=seen.update)
    batch, buffer = collect(model, count_env_factory(limit=4))
    assert set(seen) == {"obs", "actions", "true_rewards", "terminated", "truncated"}
    assert seen["obs"].shape == (6, 2, 1) and seen["true_rewards"].shape == (6, 2)
    # Raw (unnormalised) observations: the CountEnv's t / 10.
    np.testing.assert_allclose(seen["obs"][:, 0, 0], [0.0, 0.1, 0.2, 0.3, 0.0, 0.1], atol=1e-7)
    assert (seen["true_rewards"] == 1.0).all()
    assert seen["truncated"][3].all() and not seen["terminated"].any()
    # The policy saw normalised observations, the hooks the raw ones.
    assert not np.allclose(buffer.obs, buffer.raw_obs)
    # reward_fn got the same raw rows, flattened, and its output is the return target (gamma = 0).
    obs, actions = calls[0]
    np.testing.assert_array_equal(obs.reshape(6, 2, 1), seen["obs"])
    np.testing.assert_array_equal(actions.reshape(seen["actions"].shape), seen["actions"])
    np.testing.assert_allclose(batch.returns.numpy(), 2.0, rtol=1e-6)


def test_reward_fn_without_normalisation_gives_its_rewards(count_env_factory):
    model = PPO(PPOConfig(n_envs=2, n_steps=5, batch_size=10, gamma=0.0, gae_lambda=0.0, seed=0),
                reward_fn=lambda obs, actions: obs[:, 0] * 10.0)
    batch, buffer = collect(model, count_env_factory(limit=100))
    np.testing.assert_allclose(batch.returns.numpy(), (buffer.raw_obs[..., 0] * 10.0).reshape(-1), rtol=1e-6)


def test_reward_fn_wrong_shape_is_a_clear_error(count_env_factory):
    from palate.errors import ConfigError

    model = PPO(PPOConfig(n_envs=1, n_steps=4, batch_size=4), reward_fn=lambda o, a: np.zeros((len(o), 3)))
    with pytest.raises(ConfigError, match="reward_fn returned shape"):
        collect(model, count_env_factory())


@pytest.mark.parametrize("space", ["discrete", "box"])
def test_numpy_actor_acts_like_the_torch_policy(space):
    import gymnasium as gym

    from palate.rl.policies import ActorCritic, NumpyActor

    action_space = gym.spaces.Discrete(3) if space == "discrete" else gym.spaces.Box(-1.0, 1.0, (2,))
    torch.manual_seed(0)
    policy = ActorCritic(4, action_space, [16, 16], log_std_init=-0.5)
    obs = torch.randn(5, 4)
    noise = policy.noise((5,), torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_action, expected_logp = policy.act(obs, noise)
        actor = NumpyActor(policy)
        action, logp = actor.act(obs.numpy(), noise.numpy())
        np.testing.assert_allclose(action, expected_action.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logp, expected_logp.numpy(), rtol=1e-5, atol=1e-5)
        policy.actor[0].weight.mul_(2.0)  # in-place updates reach the NumPy views
        moved_action, _ = policy.act(obs, noise)
        np.testing.assert_allclose(actor.act(obs.numpy(), noise.numpy())[0], moved_action.numpy(),
                                   rtol=1e-5, atol=1e-6)

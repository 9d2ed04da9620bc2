"""The hand-derived PPO step (palate.rl.fused) gives autograd's numbers."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from palate.core.ppo import clipped_surrogate_loss, value_loss
from palate.rl import PPO, PPOConfig
from palate.rl.fused import (
    FlatBuffer,
    FlatParameters,
    FusedClipStep,
    FusedValueStep,
    adam_step,
    load_flat_optimizer_state,
)
from palate.rl.policies import ActorCritic

SPACES = {"discrete": gym.spaces.Discrete(4), "gaussian": gym.spaces.Box(-1.0, 1.0, (3,))}


def _minibatch(policy: ActorCritic, n: int = 48, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 5, generator=g)
    with torch.no_grad():
        dist = policy.distribution(obs)
        actions, logp = dist.sample(policy.noise((n,), g))
    # Old log-probs half a nat away on average: many ratios fall outside [0.8, 1.2], some inside.
    old_logp = logp + 0.5 * torch.randn(n, generator=g)
    return obs, actions, old_logp, torch.randn(n, generator=g), torch.randn(n, generator=g)


def _autograd_loss(policy: ActorCritic, batch: tuple[torch.Tensor, ...], clip: float, vf_coef: float,
                   ent_coef: float) -> tuple[torch.Tensor, ...]:
    obs, actions, old_logp, adv, returns = batch
    dist = policy.distribution(obs)
    pg, stats = clipped_surrogate_loss(dist.log_prob(actions), old_logp, adv, clip)
    v, _ = value_loss(policy.value(obs), returns, returns)
    entropy = dist.entropy().mean()
    return pg + vf_coef * v - ent_coef * entropy, pg, v, entropy, stats["approx_kl"], stats["clipfrac"]


@pytest.mark.parametrize("kind", ["discrete", "gaussian"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("hidden", [[16], [16, 8, 8]])
@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_fused_gradient_equals_autograd(kind: str, activation: str, hidden: list[int], ent_coef: float) -> None:
    torch.manual_seed(1)
    policy = ActorCritic(5, SPACES[kind], hidden, activation, log_std_init=-0.3)
    flat = FlatParameters(policy)
    batch = _minibatch(policy)
    loss, *expected = _autograd_loss(policy, batch, 0.2, 0.5, ent_coef)
    flat.zero_grad()
    loss.backward()  # accumulates into the module's .grad, which are views of flat.grad
    autograd_grad = flat.grad.clone()
    assert autograd_grad.abs().sum() > 0

    flat.grad.fill_(123.0)  # the fused step must overwrite every entry
    got = FusedClipStep(flat)(*batch, 0.2, 0.5, ent_coef)
    torch.testing.assert_close(flat.grad, autograd_grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    clipfrac = float(got[-1])
    assert 0.0 < clipfrac < 1.0  # the test covers both sides of the clip


def test_flat_parameters_are_the_module_parameters() -> None:
    policy = ActorCritic(5, SPACES["gaussian"], [8, 8])
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    flat = FlatParameters(policy)
    for k, v in policy.state_dict().items():
        torch.testing.assert_close(v, before[k])  # moved, not changed
    obs = torch.randn(4, 5)
    mean_before = policy.distribution(obs).mean.detach().clone()
    with torch.no_grad():
        flat.param.add_(0.1)
    assert not torch.allclose(policy.distribution(obs).mean, mean_before)
    policy.load_state_dict(before)  # load_state_dict copies into the flat buffer
    torch.testing.assert_close(flat.param.data, torch.cat([before[k].reshape(-1) for k in (
        "actor.0.weight", "critic.0.weight", "actor.0.bias", "critic.0.bias",
        "actor.2.weight", "critic.2.weight", "actor.2.bias", "critic.2.bias",
        "actor.4.weight", "actor.4.bias", "critic.4.weight", "critic.4.bias", "log_std")]))


def test_optimizer_state_from_separate_parameters_is_merged() -> None:
    torch.manual_seed(0)
    policy = ActorCritic(5, SPACES["gaussian"], [8])
    separate = torch.optim.Adam(policy.parameters(), lr=1e-3)
    loss, *_ = _autograd_loss(policy, _minibatch(policy), 0.2, 0.5, 0.0)
    loss.backward()
    separate.step()
    state = separate.state_dict()
    moments = [separate.state[p]["exp_avg"].clone() for p in policy.parameters()]
    flat = FlatParameters(policy)
    merged = torch.optim.Adam([flat.param], lr=1e-3)
    load_flat_optimizer_state(merged, state, flat)
    for p, m in zip(policy.parameters(), moments, strict=True):
        torch.testing.assert_close(flat.view(merged.state[flat.param]["exp_avg"], p), m)
    with pytest.raises(ValueError, match="parameter tensors"):
        load_flat_optimizer_state(merged, {"state": {}, "param_groups": [{"params": [0, 1]}]}, flat)


@pytest.mark.parametrize("env", ["CartPole-v1", "Pendulum-v1"])
def test_fused_and_autograd_training_agree(env: str) -> None:
    """A few updates of real training land on the same parameters either way."""
    cfg = PPOConfig(env=env, n_envs=2, n_steps=64, batch_size=32, n_epochs=2, ent_coef=0.01, total_steps=256)
    fused = PPO(cfg).learn(progress=False)
    plain = PPO(cfg.replace(fused_update=False)).learn(progress=False)
    assert fused.fused_step is not None and plain.fused_step is None
    for (name, a), b in zip(fused.policy.state_dict().items(), plain.policy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_adam_step_equals_torch_adam() -> None:
    torch.manual_seed(0)
    policies = [ActorCritic(5, SPACES["gaussian"], [8]) for _ in range(2)]
    policies[1].load_state_dict(policies[0].state_dict())
    flats = [FlatParameters(p) for p in policies]
    optims = [torch.optim.Adam([f.param], lr=1e-2, eps=1e-5) for f in flats]
    for i in range(5):
        g = torch.randn(flats[0].grad.shape, generator=torch.Generator().manual_seed(i))
        for f in flats:
            f.grad.copy_(g)
        optims[0].step()
        adam_step(optims[1], flats[1])
    torch.testing.assert_close(flats[1].param.data, flats[0].param.data)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(optims[1].state[flats[1].param][key], optims[0].state[flats[0].param][key])


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_fused_value_gradient_equals_autograd(activation: str) -> None:
    torch.manual_seed(2)
    policy = ActorCritic(5, SPACES["gaussian"], [16, 8], activation)
    flat = FlatBuffer(policy.critic_parameters())
    obs, returns = torch.randn(40, 5), torch.randn(40)
    expected, _ = value_loss(policy.value(obs), returns, returns)
    flat.zero_grad()
    expected.backward()
    autograd_grad = flat.grad.clone()
    flat.grad.fill_(7.0)
    loss = FusedValueStep(policy.critic, flat)(obs, returns)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(flat.grad, autograd_grad, rtol=1e-4, atol=1e-6)

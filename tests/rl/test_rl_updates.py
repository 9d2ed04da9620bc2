"""The update rules as the trainers apply them: KL-penalty beta, target_kl, the trust region."""

from __future__ import annotations

import json
import math

import pytest

from palate.rl import PPO, TRPO, PPOConfig, TRPOConfig


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kl_penalty_beta_follows_the_papers_rule(tmp_path):
    cfg = PPOConfig(env="CartPole-v1", loss="kl_penalty", kl_coef=1.0, kl_target=0.01, n_envs=2, n_steps=128,
                    batch_size=64, n_epochs=4, learning_rate=3e-3, total_steps=2048, checkpoint_every=0)
    PPO(cfg).learn(run_dir=tmp_path, progress=False)
    beta = cfg.kl_coef
    rows = metrics(tmp_path)
    assert len(rows) == 8
    for row in rows:
        d = row["losses/kl"]
        expected = beta / 2 if d < 0.01 / 1.5 else beta * 2 if d > 0.01 * 1.5 else beta
        assert row["losses/kl_coef"] == pytest.approx(expected)
        beta = expected
    assert len({r["losses/kl_coef"] for r in rows}) > 1  # it did adapt


def test_target_kl_stops_the_epochs_early(tmp_path):
    cfg = PPOConfig(env="CartPole-v1", target_kl=1e-6, n_envs=2, n_steps=64, batch_size=32, n_epochs=10,
                    learning_rate=1e-2, total_steps=256, checkpoint_every=0)
    PPO(cfg).learn(run_dir=tmp_path, progress=False)
    assert all(row["losses/early_stop"] == 1.0 for row in metrics(tmp_path))


@pytest.mark.parametrize("update", ["trust_region", "kl_penalty"])
def test_trpo_steps_respect_their_objective(tmp_path, update):
    cfg = TRPOConfig(env="Pendulum-v1", update=update, max_kl=0.005, n_envs=2, n_steps=128, batch_size=64,
                     vf_iters=2, total_steps=1024, checkpoint_every=0)
    model = TRPO(cfg).learn(run_dir=tmp_path, progress=False)
    rows = metrics(tmp_path)
    assert model.line_search_attempts == len(rows) == 4
    for row in rows:
        if row["trpo/line_search_accepted"]:
            assert 0 < row["trpo/step_fraction"] <= 1
            if update == "trust_region":
                assert row["losses/approx_kl"] <= cfg.max_kl * (1 + 1e-5)
        else:  # rejected: parameters restored, the policy did not move
            assert row["trpo/step_fraction"] == 0 and row["losses/approx_kl"] == pytest.approx(0, abs=1e-9)
    assert rows[-1]["trpo/line_search_success_rate"] == pytest.approx(model.line_search_successes / 4)


def test_detached_gaussian_is_a_frozen_copy_of_pi_old():
    """pi_old must not move with in-place parameter updates, or the KL misses the log-std.

    Regression: the log-std of a policy's distribution is a view of the parameter, so an
    "old" distribution built under no_grad used to follow every update (KL[old, new] blind to
    log-std changes, and TRPO's Fisher with no log-std block).
    """
    import gymnasium as gym
    import torch

    from palate.rl.policies import ActorCritic

    policy = ActorCritic(4, gym.spaces.Box(-1.0, 1.0, (2,)))
    obs = torch.randn(8, 4)
    with torch.no_grad():
        old = policy.distribution(obs).detach()
        policy.log_std.add_(0.5)
    assert not old.log_std.requires_grad
    kl = old.kl(policy.distribution(obs)).mean()
    # KL between N(m, 1) and N(m, e^0.5) per dim: 0.5 (e^-1 - 1 + 1) = 0.5 e^-1; two dims.
    expected = 2 * 0.5 * (math.exp(-1.0) - 1.0 + 1.0)
    assert abs(kl.item() - expected) < 1e-5


def test_gaussian_kl_is_the_joint_kl_and_sb3_trust_region_divides_by_action_dims():
    """max_kl bounds the KL of the joint action distribution (the sum over a diagonal Gaussian's
    dimensions). sb3-contrib averages over dimensions, so the benchmark hands it max_kl / d and
    cg_damping / d; the natural-gradient step is then the same step exactly."""
    import gymnasium as gym
    import torch

    from palate.bench.rl import sb3_trust_region
    from palate.core.trust_region import flat_params, natural_gradient_step, set_flat_params
    from palate.rl.policies import ActorCritic, DiagGaussian

    gen = torch.Generator().manual_seed(0)
    p = DiagGaussian(torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen) * 0.3)
    q = DiagGaussian(torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen) * 0.3)
    joint = torch.distributions.Independent(torch.distributions.Normal(p.mean, p.log_std.exp()), 1)
    other = torch.distributions.Independent(torch.distributions.Normal(q.mean, q.log_std.exp()), 1)
    torch.testing.assert_close(p.kl(q), torch.distributions.kl_divergence(joint, other))
    per_dim = torch.distributions.kl_divergence(joint.base_dist, other.base_dist)  # sb3-contrib's
    torch.testing.assert_close(p.kl(q).mean() / 3, per_dim.mean())

    box = gym.spaces.Box(-1.0, 1.0, shape=(3,))
    target_kl, damping = sb3_trust_region(0.03, 0.3, box)
    assert (target_kl, damping) == (pytest.approx(0.01), pytest.approx(0.1))
    assert sb3_trust_region(0.01, 0.1, gym.spaces.Discrete(2)) == (0.01, 0.1)

    torch.manual_seed(0)
    policy = ActorCritic(4, box)
    params = policy.actor_parameters()
    obs, actions, adv = torch.randn(64, 4), torch.randn(64, 3), torch.randn(64)
    with torch.no_grad():
        old = policy.distribution(obs).detach()
        old_logp = old.log_prob(actions)

    def surrogate():
        return (torch.exp(policy.distribution(obs).log_prob(actions) - old_logp) * adv).mean()

    start = flat_params(params)
    steps = []
    for scale, max_kl, cg_damping in [(1.0, 0.03, 0.3), (1.0 / 3, target_kl, damping)]:
        set_flat_params(params, start)
        result = natural_gradient_step(params, surrogate, lambda s=scale: s * old.kl(policy.distribution(obs)).mean(),
                                       max_kl, cg_iters=15, damping=cg_damping)
        assert result.accepted
        steps.append(flat_params(params) - start)
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-4, atol=1e-6)


def test_trpo_step_equals_sb3_contribs_on_a_shared_rollout():
    """From sb3-contrib's weights and rollout, palate's TRPO step is sb3-contrib's (bench extra only)."""
    pytest.importorskip("sb3_contrib")
    from palate.bench.trpo_step import compare

    out = compare("Hopper-v5", seed=0)
    assert out["logp_gap_at_start"] < 1e-4
    assert out["cosine"] > 0.9999
    assert out["palate_step_norm"] == pytest.approx(out["sb3_step_norm"], rel=1e-3)


def test_trpo_loop_tracks_sb3_contrib_in_lockstep():
    """Same weights, env seeds, action noise and critic shuffles: rollouts, GAE, normalisation and
    both updates agree to float rounding over two iterations (bench extra only)."""
    pytest.importorskip("sb3_contrib")
    from palate.bench.trpo_step import lockstep

    gaps = lockstep("Hopper-v5", seed=0, iterations=2, max_kl=0.03, cg_damping=0.3, critic_eps=5e-6, minibatch=True)
    assert len(gaps) == 2
    for gap in gaps:
        assert gap["actor_max_abs_gap"] < 1e-4 and gap["critic_max_abs_gap"] < 1e-4


def test_trpo_loop_tracks_sb3_contrib_in_lockstep_through_truncation():
    """With a 30-step time limit, truncated episodes bootstrap with V(final observation) on both
    sides, the final observation normalised with the same statistics (bench extra only)."""
    pytest.importorskip("sb3_contrib")
    from palate.bench.trpo_step import lockstep

    gaps = lockstep("Hopper-v5", seed=0, iterations=2, max_kl=0.03, cg_damping=0.3, critic_eps=5e-6, minibatch=True,
                    time_limit=30)
    for gap in gaps:
        assert gap["actor_max_abs_gap"] < 1e-5 and gap["critic_max_abs_gap"] < 1e-5

"""save / load / resume: a resumed run equals an uninterrupted one, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from palate.errors import CheckpointError
from palate.rl import PPO, TRPO, PPOConfig, TRPOConfig


def assert_same_model(a, b) -> None:
    assert a.global_step == b.global_step and a.iteration == b.iteration
    for (name, p), q in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(p, q), f"parameter {name} differs"
    for name, opt in a.optimizers.items():
        sa, sb = opt.state_dict()["state"], b.optimizers[name].state_dict()["state"]
        for k in sa:
            for key, value in sa[k].items():
                assert torch.equal(value, sb[k][key]), f"optimizer {name} state {k}.{key} differs"
    assert a.obs_norm.state_dict() == b.obs_norm.state_dict()
    assert a.reward_norm.state_dict() == b.reward_norm.state_dict()
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


CASES = {
    # discrete, pure-Python env: pickled whole; normalisation and both annealings on
    "ppo-cartpole": (PPO, PPOConfig(env="CartPole-v1", n_envs=2, n_steps=64, batch_size=32, n_epochs=2,
                                    anneal_lr=True, anneal_clip_range=True, norm_obs=True, norm_reward=True,
                                    total_steps=1024)),
    "trpo-cartpole": (TRPO, TRPOConfig(env="CartPole-v1", n_envs=2, n_steps=64, batch_size=64, vf_iters=2,
                                       norm_obs=True, total_steps=1024)),
    # continuous, the adaptive KL penalty's beta must survive too
    "ppo-kl-pendulum": (PPO, PPOConfig(env="Pendulum-v1", n_envs=2, n_steps=64, batch_size=64, n_epochs=2,
                                       loss="kl_penalty", norm_obs=True, norm_reward=True, total_steps=1024)),
    # MuJoCo: the simulator state is restored with mj_setState (pickling alone would reset it)
    "trpo-hopper": (TRPO, TRPOConfig(env="Hopper-v5", n_envs=2, n_steps=64, batch_size=64, vf_iters=2,
                                     norm_obs=True, norm_reward=True, total_steps=512)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_uninterrupted_run(tmp_path, case):
    cls, cfg = CASES[case]
    half = cfg.total_steps // 2
    full = cls(cfg).learn(progress=False)
    first = cls(cfg).learn(total_steps=half, progress=False)
    first.save(tmp_path / "run")
    resumed = cls.load(tmp_path / "run").learn(progress=False)  # on to config.total_steps
    assert resumed.global_step == cfg.total_steps
    assert_same_model(full, resumed)
    if isinstance(full, PPO):
        assert full.kl_penalty.kl_coef == resumed.kl_penalty.kl_coef
    else:
        assert full.line_search_successes == resumed.line_search_successes


def test_learn_in_chunks_equals_one_call():
    cfg = PPOConfig(env="CartPole-v1", n_envs=2, n_steps=64, batch_size=64, n_epochs=2, anneal_lr=True,
                    total_steps=768)
    whole = PPO(cfg).learn(progress=False)
    chunked = PPO(cfg)
    for _ in range(3):
        chunked.learn(total_steps=256, progress=False)
    assert_same_model(whole, chunked)


def test_learn_past_total_steps_raises_the_horizon():
    model = PPO(PPOConfig(n_envs=1, n_steps=64, batch_size=64, n_epochs=1, total_steps=64))
    model.learn(total_steps=128, progress=False)
    assert model.global_step == 128 and model.config.total_steps == 128


def test_normalisation_statistics_round_trip(tmp_path):
    cfg = PPOConfig(env="Pendulum-v1", n_envs=2, n_steps=64, batch_size=64, n_epochs=1, norm_obs=True,
                    norm_reward=True, total_steps=256)
    model = PPO(cfg).learn(progress=False)
    assert model.obs_norm.rms.count > 256  # statistics were gathered
    path = model.save(tmp_path / "pendulum.pt")
    loaded = PPO.load(path)
    assert loaded.obs_norm.state_dict() == model.obs_norm.state_dict()
    assert loaded.reward_norm.state_dict() == model.reward_norm.state_dict()
    obs = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32) * 3
    np.testing.assert_array_equal(loaded.predict(obs), model.predict(obs))
    assert loaded.predict(obs[0]).shape == (1,)
    # Without the statistics the same observations map to other actions: they matter.
    loaded.obs_norm.enabled = False
    assert not np.array_equal(loaded.predict(obs), model.predict(obs))


def test_subprocess_envs_train_and_resume_with_fresh_episodes(tmp_path):
    cfg = PPOConfig(env="CartPole-v1", n_envs=2, n_steps=32, batch_size=64, n_epochs=1, vec_env="subprocess",
                    total_steps=128)
    model = PPO(cfg).learn(total_steps=64, progress=False)
    model.save(tmp_path / "run")
    resumed = PPO.load(tmp_path / "run").learn(progress=False)
    assert resumed.global_step == 128


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        PPO.load(tmp_path / "missing")
    model = TRPO(TRPOConfig(n_envs=1, n_steps=64, batch_size=64, vf_iters=1)).learn(total_steps=64, progress=False)
    model.save(tmp_path / "trpo")
    with pytest.raises(CheckpointError, match="trpo"):
        PPO.load(tmp_path / "trpo")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        PPO.load(tmp_path / "junk.pt")


def test_same_seed_same_run_other_seed_other_run():
    cfg = PPOConfig(env="CartPole-v1", n_envs=2, n_steps=64, batch_size=64, n_epochs=2, total_steps=256)
    a, b = PPO(cfg).learn(progress=False), PPO(cfg).learn(progress=False)
    assert_same_model(a, b)
    c = PPO(cfg.replace(seed=1)).learn(progress=False)
    assert not torch.equal(a.policy.actor[0].weight, c.policy.actor[0].weight)

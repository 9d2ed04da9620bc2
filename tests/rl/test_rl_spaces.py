"""MultiDiscrete / MultiBinary actions; image, Dict and Tuple observations: learning on tiny envs,
uint8 storage, normalisation of vector parts only, save/load/predict round trips."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

from palate.errors import EnvError
from palate.rl import PPO, TRPO
from palate.rl.callbacks import Callback
from palate.rl.policies import Bernoulli, MultiCategorical
from palate.rl.spaces import ObsLayout


class Bandit(gym.Env):
    """One-step episodes; the reward counts the components of the action that hit ``best``."""

    def __init__(self, action_space: gym.Space, best: np.ndarray) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = action_space
        self.best = best

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        assert self.action_space.contains(np.asarray(action, self.action_space.dtype)), action
        return np.zeros(2, np.float32), float(np.sum(np.asarray(action) == self.best)), True, False, {}


class PixelEnv(gym.Env):
    """A random uint8 image; one pixel is bright or dark, and action 1 pays exactly when it is bright.

    ``layout`` picks H x W x C, C x H x W or H x W; chance is a return of 0.5 per step.
    """

    def __init__(self, layout: str = "hwc", size: int = 8) -> None:
        shape = {"hwc": (size, size, 1), "chw": (1, size, size), "hw": (size, size)}[layout]
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)
        self.action_space = gym.spaces.Discrete(2)
        self.layout = layout

    def _obs(self):
        img = self.np_random.integers(0, 40, self.observation_space.shape, dtype=np.uint8)
        self.bright = bool(self.np_random.integers(2))
        index = {"hwc": (2, 3, 0), "chw": (0, 2, 3), "hw": (2, 3)}[self.layout]
        img[index] = 255 if self.bright else 0
        return img

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == int(self.bright))
        return self._obs(), reward, False, False, {}


class DictEnv(gym.Env):
    """Dict (or Tuple) of an RGB image, a vector and a Discrete flag; the best action is the flag
    when the vector's first entry is positive and (flag + 1) % 3 otherwise."""

    def __init__(self, as_tuple: bool = False) -> None:
        parts = {"image": gym.spaces.Box(0, 255, (6, 6, 3), np.uint8),
                 "vec": gym.spaces.Box(-5.0, 5.0, (2,), np.float32), "flag": gym.spaces.Discrete(3)}
        self.as_tuple = as_tuple
        self.observation_space = gym.spaces.Tuple(tuple(parts.values())) if as_tuple else gym.spaces.Dict(parts)
        self.action_space = gym.spaces.Discrete(3)
        self.t = 0

    def _obs(self):
        self.vec = self.np_random.normal(size=2).astype(np.float32) * 3
        self.flag = int(self.np_random.integers(3))
        obs = {"image": self.np_random.integers(0, 256, (6, 6, 3), dtype=np.uint8), "vec": self.vec,
               "flag": self.flag}
        return tuple(obs.values()) if self.as_tuple else obs

    def best(self) -> int:
        return self.flag if self.vec[0] > 0 else (self.flag + 1) % 3

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == self.best())
        self.t += 1
        return self._obs(), reward, False, self.t >= 16, {}


class BatchDtypes(Callback):
    """Records the dtype of every observation part of each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[dict[str, torch.dtype]] = []

    def _on_rollout_end(self) -> None:
        obs = self.locals["batch"].obs
        self.dtypes.append({k: v.dtype for k, v in obs.items()})


def _roundtrip(model, tmp_path, obs):
    """predict before save == predict after load, deterministic, for one obs and for a batch."""
    before = model.predict(obs)
    model.save(tmp_path / "run")
    loaded = type(model).load(tmp_path / "run")
    np.testing.assert_array_equal(loaded.predict(obs), before)
    return loaded


def test_multidiscrete_bandit_learns_the_best_arm_per_component(tmp_path):
    # start=[1, 0]: the env's actions are 1..3 and 0..3; the policy samples from 0 and palate shifts.
    space = gym.spaces.MultiDiscrete([3, 4], start=[1, 0])
    best = np.array([3, 1])
    model = PPO(n_envs=4, n_steps=16, batch_size=32, n_epochs=4, learning_rate=0.02, ent_coef=0.0, seed=0)
    model.learn(lambda: Bandit(space, best), total_steps=1536, progress=False)
    action = model.predict(np.zeros(2, np.float32))
    np.testing.assert_array_equal(action, best)
    assert np.mean(model._all_returns[-50:]) > 1.6  # of 2; a uniform policy scores 1/3 + 1/4
    loaded = _roundtrip(model, tmp_path, np.zeros((3, 2), np.float32))
    assert isinstance(loaded.action_space, gym.spaces.MultiDiscrete)
    np.testing.assert_array_equal(loaded.action_space.start, [1, 0])


def test_multibinary_bandit_learns_each_bit(tmp_path):
    best = np.array([1, 0, 1, 1], np.int8)
    model = PPO(n_envs=4, n_steps=16, batch_size=32, n_epochs=4, learning_rate=0.02, seed=1)
    model.learn(lambda: Bandit(gym.spaces.MultiBinary(4), best), total_steps=1536, progress=False)
    action = model.predict(np.zeros(2, np.float32))
    assert action.dtype == np.int8
    np.testing.assert_array_equal(action, best)
    assert np.mean(model._all_returns[-50:]) > 3.4  # of 4; chance is 2
    _roundtrip(model, tmp_path, np.zeros(2, np.float32))


def test_multicategorical_and_bernoulli_match_torch_distributions():
    torch.manual_seed(0)
    nvec = (3, 2, 4)
    logits, other = torch.randn(5, sum(nvec)), torch.randn(5, sum(nvec))
    mine, theirs = MultiCategorical(logits, nvec), MultiCategorical(other, nvec)
    refs = [torch.distributions.Categorical(logits=chunk) for chunk in logits.split(nvec, dim=-1)]
    refs_o = [torch.distributions.Categorical(logits=chunk) for chunk in other.split(nvec, dim=-1)]
    actions = torch.stack([r.sample() for r in refs], dim=-1)
    torch.testing.assert_close(mine.log_prob(actions), sum(r.log_prob(a) for r, a in zip(refs, actions.T)))
    torch.testing.assert_close(mine.entropy(), sum(r.entropy() for r in refs))
    torch.testing.assert_close(mine.kl(theirs), sum(torch.distributions.kl_divergence(a, b)
                                                    for a, b in zip(refs, refs_o)))
    sample, logp = mine.sample(MultiCategorical.noise((5, sum(nvec))))
    assert all(((sample[:, i] >= 0) & (sample[:, i] < n)).all() for i, n in enumerate(nvec))
    torch.testing.assert_close(logp, mine.log_prob(sample))

    bits, bits_o = Bernoulli(logits[:, :4]), Bernoulli(other[:, :4])
    ref, ref_o = (torch.distributions.Bernoulli(logits=x[:, :4]) for x in (logits, other))
    a = ref.sample()
    torch.testing.assert_close(bits.log_prob(a), ref.log_prob(a).sum(-1))
    torch.testing.assert_close(bits.entropy(), ref.entropy().sum(-1))
    torch.testing.assert_close(bits.kl(bits_o), torch.distributions.kl_divergence(ref, ref_o).sum(-1))
    # Logistic-noise sampling is exact: the frequency of a 1 is sigma(logit).
    many = Bernoulli(torch.full((20_000, 1), 0.7))
    freq = many.sample(Bernoulli.noise((20_000, 1), torch.Generator().manual_seed(0)))[0].float().mean()
    assert abs(freq.item() - torch.sigmoid(torch.tensor(0.7)).item()) < 0.015


def test_image_env_learns_the_pixel_and_keeps_uint8_in_the_buffer(tmp_path):
    dtypes = BatchDtypes()
    # gamma 0: the next image is independent of the action, so this is a contextual bandit and
    # the discounted future would only add noise to a run this short.
    model = PPO(n_envs=4, n_steps=32, batch_size=64, n_epochs=4, learning_rate=1e-3, cnn="small",
                cnn_features=32, gamma=0.0, seed=0)
    model.learn(lambda: PixelEnv("hwc"), total_steps=3072, progress=False, callback=dtypes)
    assert all(d == {"obs": torch.uint8} for d in dtypes.dtypes)
    env = PixelEnv("hwc")
    env.reset(seed=123)
    obs = np.stack([env._obs() for _ in range(200)])
    bright = obs[:, 2, 3, 0] == 255
    accuracy = np.mean(model.predict(obs) == bright)
    assert accuracy > 0.8  # chance is 0.5
    _roundtrip(model, tmp_path, obs[:5])
    _roundtrip(model, tmp_path, obs[0])


@pytest.mark.parametrize("layout", ["chw", "hw"])
def test_channels_first_and_grey_images_train_and_predict(layout, tmp_path):
    captured = []
    model = PPO(n_envs=2, n_steps=16, batch_size=32, n_epochs=1, cnn="small", cnn_features=16, seed=0)
    model.learn(lambda: PixelEnv(layout), total_steps=64, progress=False,
                rollout_callback=lambda r: captured.append(r["obs"]))
    shape = PixelEnv(layout).observation_space.shape
    assert captured[0].dtype == np.uint8 and captured[0].shape == (16, 2, *shape)
    env = PixelEnv(layout)
    env.reset(seed=0)
    _roundtrip(model, tmp_path, np.stack([env._obs() for _ in range(4)]))


@pytest.mark.parametrize("as_tuple", [False, True])
def test_dict_and_tuple_observations_learn_with_one_combined_encoder(as_tuple, tmp_path):
    dtypes = BatchDtypes()
    model = PPO(n_envs=4, n_steps=32, batch_size=64, n_epochs=4, learning_rate=2e-3, cnn="small",
                cnn_features=8, norm_obs=True, seed=0)
    model.learn(lambda: DictEnv(as_tuple), total_steps=4096, progress=False, callback=dtypes)
    keys = ("0", "1", "2") if as_tuple else ("image", "vec", "flag")
    assert dtypes.dtypes[-1] == {keys[0]: torch.uint8, keys[1]: torch.float32, keys[2]: torch.int64}
    # Only the vector part is whitened; the image and the flag pass through untouched.
    assert list(model.obs_norm.norms) == [keys[1]]
    assert model.obs_norm.norms[keys[1]].rms.count > 4096
    env = DictEnv(as_tuple)
    env.reset(seed=5)
    hits = []
    for _ in range(300):
        obs = env._obs()
        hits.append(int(model.predict(obs)) == env.best())
    assert np.mean(hits) > 0.6  # chance is 1/3
    batch = env.observation_space.sample()
    loaded = _roundtrip(model, tmp_path, batch)
    assert loaded.observation_space == env.observation_space


def test_trpo_on_dict_observations_gives_the_critic_its_own_encoder(tmp_path):
    model = TRPO(n_envs=2, n_steps=32, batch_size=32, vf_iters=2, cnn="small", cnn_features=8, seed=0)
    model.learn(lambda: DictEnv(), total_steps=128, progress=False)
    policy = model.policy
    assert policy.critic_encoder is not None
    actor_ids = {id(p) for p in policy.actor_parameters()}
    assert not actor_ids & {id(p) for p in policy.critic_parameters()}
    assert model.line_search_attempts == 2
    _roundtrip(model, tmp_path, DictEnv().observation_space.sample())


def test_predict_names_the_part_of_a_wrong_observation():
    model = PPO(n_envs=1, n_steps=8, batch_size=8, n_epochs=1, cnn="small", cnn_features=8)
    model.learn(lambda: DictEnv(), total_steps=8, progress=False)
    obs = DictEnv().observation_space.sample()
    obs["vec"] = np.zeros(5, np.float32)
    with pytest.raises(EnvError, match="'vec' has shape"):
        model.predict(obs)
    obs["vec"] = np.array([np.nan, 0.0], np.float32)
    with pytest.raises(EnvError, match="'vec' holds NaN"):
        model.predict(obs)
    del obs["vec"]
    with pytest.raises(EnvError, match="does not match the model's observation space"):
        model.predict(obs)


def test_small_images_for_the_nature_cnn_say_what_to_do():
    with pytest.raises(EnvError, match="8x8 image, smaller than the nature CNN's minimum 36x36; set cnn: small"):
        PPO(n_envs=1, n_steps=8, batch_size=8).learn(lambda: PixelEnv("hwc"), total_steps=8, progress=False)


def test_unsupported_action_spaces_are_named():
    env = Bandit(gym.spaces.Tuple((gym.spaces.Discrete(2), gym.spaces.Discrete(2))), np.zeros(2))
    with pytest.raises(EnvError, match="actions must be Discrete, Box, MultiDiscrete or MultiBinary"):
        PPO(n_envs=1, n_steps=8, batch_size=8).learn(lambda: env, total_steps=8, progress=False)


def test_layout_of_nested_spaces():
    space = gym.spaces.Dict({"a": gym.spaces.Tuple((gym.spaces.MultiBinary(3), gym.spaces.MultiDiscrete([2, 5]))),
                             "img": gym.spaces.Box(0, 255, (4, 40, 40), np.uint8)})
    layout = ObsLayout(space)
    assert [(p.key, p.kind, p.shape) for p in layout.parts] == [
        ("a/0", "multibinary", (3,)), ("a/1", "multidiscrete", (2,)), ("img", "image", (4, 40, 40))]
    assert layout.parts[2].channels_first
    sample = space.sample()
    parts = layout.split(sample)
    np.testing.assert_array_equal(parts["a/1"], sample["a"][1])
    assert parts["img"].dtype == np.uint8 and parts["a/0"].dtype == np.float32


def test_image_and_dict_runs_resume_from_their_checkpoint(tmp_path):
    for name, make in (("pixels", lambda: PixelEnv("chw")), ("dict", lambda: DictEnv())):
        model = PPO(n_envs=2, n_steps=16, batch_size=32, n_epochs=1, cnn="small", cnn_features=8, seed=0)
        model.learn(make, total_steps=32, progress=False, run_dir=tmp_path / name)
        resumed = PPO.load(tmp_path / name)
        resumed.learn(make, total_steps=32, progress=False)
        assert resumed.global_step == 64 and resumed.iteration == 2
        assert isinstance(resumed._raw_obs, dict)  # the episodes' last observation came back as parts

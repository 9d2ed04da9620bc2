"""Preferences from pixels: Atari runs end to end, the CNN reward ensemble, and clips rendered from frames."""

from __future__ import annotations

import io
import json

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("cv2")

from palate.errors import PreferenceError  # noqa: E402
from palate.preferences import PreferenceConfig, resume_preferences  # noqa: E402
from palate.preferences.labellers import SyntheticOracle  # noqa: E402
from palate.preferences.render import SegmentRenderer, image_frame  # noqa: E402
from palate.preferences.reward_model import PreferenceDataset, RewardEnsemble  # noqa: E402
from palate.preferences.segments import Segment, SegmentPair  # noqa: E402
from palate.preferences.storage import load_labels  # noqa: E402
from palate.preferences.trainer import PreferenceTrainer  # noqa: E402
from palate.preferences.wrappers import make_env_factory  # noqa: E402
from palate.rl.atari import ContinuousGames, EpisodicLife, wrap_atari  # noqa: E402

PONG = "PongNoFrameskip-v4"


def _wrappers(env: gym.Env) -> list[type]:
    out = []
    while isinstance(env, gym.Wrapper):
        out.append(type(env))
        env = env.env
    return out


def _tiny(tmp_path, **overrides) -> PreferenceConfig:
    fields = dict(env=PONG, labels=12, steps=768, chunk_steps=256, ensemble_size=2, rm_hidden_sizes=[16],
                  rm_epochs=1, rm_initial_epochs=2, rm_stats_steps=200, pool_steps=1000, random_steps=300,
                  label_schedule_t0=1000, eval_episodes=0, oversample=2,
                  rl={"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 1, "cnn_features": 32},
                  runs_dir=str(tmp_path), run_name="pong", progress=False)
    return PreferenceConfig(**{**fields, **overrides})


class TenfoldReward(gym.Wrapper):
    """Below the preprocessing: the game's reward x 10, so a reward that was clipped shows as +-1."""

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, 10.0 * reward, terminated, truncated, info


def test_prefs_env_is_the_rl_stack_unclipped_and_continuous():
    import ale_py

    gym.register_envs(ale_py)
    env = make_env_factory(PreferenceConfig(env=PONG))()
    kinds = _wrappers(env)
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    assert kinds[0] is ContinuousGames and EpisodicLife not in kinds
    assert gym.wrappers.TransformReward not in kinds and gym.wrappers.AtariPreprocessing in kinds
    env.close()
    # The environment's own episodes on request: a lost life ends one, as in `palate rl train`.
    episodic = make_env_factory(PreferenceConfig(env=PONG, fixed_length_episodes=False))()
    assert EpisodicLife in _wrappers(episodic)
    episodic.close()

    # A whole random game runs without an episode end; its unclipped score is kept for the metrics.
    env = wrap_atari(TenfoldReward(gym.make(PONG, frameskip=1)), training=True, clip_reward=False,
                     episodic_life=False, continuous=True)
    env.reset(seed=0)
    rewards, scores = set(), []
    rng = np.random.default_rng(0)
    for _ in range(3000):
        _obs, reward, terminated, truncated, _info = env.step(int(rng.integers(6)))
        rewards.add(reward)
        assert not terminated and not truncated
        scores, lengths = env.get_wrapper_attr("pop_game_scores")()
        if scores:
            break
    assert rewards <= {-10.0, 0.0, 10.0} and -10.0 in rewards  # unclipped: the oracle judges the game's points
    assert len(scores) == 1 and scores[0] <= -150.0 and lengths[0] > 500  # a lost game: 21 points against, x 10
    env.close()


class StopInThirdRollout(PreferenceTrainer):
    """Ctrl-C inside PPO's third rollout: in the second round, after the checkpoint of the first."""

    def _build_policy(self):
        policy = super()._build_policy()
        feed, seen = policy.rollout_callback, []

        def callback(batch):
            feed(batch)
            seen.append(1)
            if len(seen) == 3:
                raise KeyboardInterrupt

        policy.rollout_callback = callback
        return policy


def test_atari_preference_run_end_to_end_and_resume(tmp_path):
    cfg = _tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        StopInThirdRollout(cfg).train()
    run = tmp_path / "pong"
    before = (run / "labels.jsonl").read_text().splitlines()
    assert 0 < len(before) < cfg.labels
    labelled = load_labels(run)
    seg = labelled[0].pair.left
    assert seg.obs.dtype == np.uint8 and seg.obs.shape == (25, 4, 84, 84)  # frames stay uint8 on disk

    summary = resume_preferences(run)
    assert summary["policy_steps"] == 768 and summary["labels_used"] == cfg.labels
    lines = (run / "labels.jsonl").read_text().splitlines()
    assert lines[:len(before)] == before and len(lines) == cfg.labels  # appended, never rewritten
    assert all(json.loads(x)["env"] == PONG for x in lines)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 256, 512, 768]
    assert all(np.isfinite(m["prefs/rm_val_loss"]) for m in metrics)
    model = RewardEnsemble(gym.spaces.Box(0, 255, (4, 84, 84), np.uint8), gym.spaces.Discrete(6), n_members=2,
                           hidden_sizes=[16])
    model.load(run / "reward_model.pt")  # the trained CNN ensemble, fitted once per round
    assert model.n_fits == len(metrics)
    assert (run / "policy" / "checkpoint.pt").is_file()


def _bright_corner_segment(rng: np.random.Generator, length: int = 6) -> Segment:
    """Noise frames; the true reward of a step is 1 when its frames carry a bright square top left."""
    obs = rng.integers(0, 100, size=(length, 4, 48, 48), dtype=np.uint8)
    lit = rng.random(length) < 0.5
    obs[lit, :, :8, :8] = 255
    return Segment(obs, rng.integers(0, 3, size=length), lit.astype(np.float64))


def test_cnn_ensemble_learns_a_reward_from_frames():
    rng = np.random.default_rng(0)
    spaces = gym.spaces.Box(0, 255, (4, 48, 48), np.uint8), gym.spaces.Discrete(3)
    model = RewardEnsemble(*spaces, n_members=2, hidden_sizes=[16], dropout=0.0, lr=3e-3, seed=0)
    assert model.image
    oracle = SyntheticOracle(temperature=0.0, error_rate=0.0, rng=np.random.default_rng(1))
    data = PreferenceDataset()
    for k in range(96):
        pair = SegmentPair(_bright_corner_segment(rng), _bright_corner_segment(rng))
        mu = {"left": 1.0, "right": 0.0, "equal": 0.5}[oracle.label(pair)]
        data.add(pair, mu, str(k))
    model.fit(data, epochs=15)
    test = [SegmentPair(_bright_corner_segment(rng), _bright_corner_segment(rng)) for _ in range(60)]
    prefs = model.member_preferences(test).mean(axis=0)
    truth = np.array([p.left.true_return - p.right.true_return for p in test])
    decided = truth != 0
    assert np.mean((prefs[decided] > 0.5) == (truth[decided] > 0)) > 0.8
    # The policy's reward: one value per row of (frames, action), chunked over any number of rows.
    obs = np.concatenate([p.left.obs for p in test])
    assert model.predict(obs, np.zeros(len(obs), np.int64)).shape == (len(obs),)


def test_cnn_reward_model_refuses_tiny_images_and_unknown_devices():
    with pytest.raises(PreferenceError, match="at least 43x43"):
        RewardEnsemble(gym.spaces.Box(0, 255, (4, 42, 42), np.uint8), gym.spaces.Discrete(2))
    with pytest.raises(PreferenceError, match="rm_device 'gpu'"):
        RewardEnsemble(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(2), device="gpu")


def test_atari_clip_renders_to_a_gif_the_feedback_service_accepts():
    from PIL import Image

    from palate.feedback.media import sniff_media

    env = make_env_factory(PreferenceConfig(env=PONG))()
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    frames = [obs]
    for _ in range(24):
        obs, *_ = env.step(env.action_space.sample())
        frames.append(obs)
    env.close()
    segment = Segment(np.stack(frames), np.zeros(25, np.int64), np.zeros(25))
    renderer = SegmentRenderer(PONG)
    assert renderer.kind == "atari"
    data = renderer(segment)
    assert sniff_media(data) == "gif"
    gif = Image.open(io.BytesIO(data))
    assert len(renderer.frames(segment)) == 25 and gif.size == (160, 160)
    # (The GIF may hold fewer frames: Pillow merges identical neighbours and adds up their time.)
    played = 0
    for k in range(gif.n_frames):
        gif.seek(k)
        played += gif.info["duration"]
    assert 1500 <= played <= 1750  # the game's speed: 15 agent steps a second, 25 steps in 1.67 s
    # Each GIF frame is the newest frame of its stack.
    first = np.asarray(image_frame(segment.obs[-1], size=84))[..., 0]
    assert np.array_equal(first, segment.obs[-1][-1])
    # Other image layouts: H x W x 3 colour, H x W grey.
    assert image_frame(np.zeros((10, 20, 3), np.uint8), size=20).shape == (20, 40, 3)
    assert image_frame(np.zeros((10, 10), np.uint8), size=30).shape == (30, 30, 3)

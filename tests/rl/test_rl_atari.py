"""Atari through ale-py: the preprocessing stack, unclipped game scores, uint8 frame stacks in training."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("ale_py")
pytest.importorskip("cv2")

from palate.rl import PPO  # noqa: E402
from palate.rl.atari import EpisodicLife, wrap_atari  # noqa: E402
from palate.rl.callbacks import Callback  # noqa: E402
from palate.rl.envs import make_env, uses_atari_wrappers  # noqa: E402


class ScaleReward(gym.Wrapper):
    """Below the preprocessing: multiplies the game's reward by 10 and records it, so a score that
    survived clipping is told apart from one that did not."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.game_scores: list[float] = []
        self.score = 0.0

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.score += 10.0 * reward
        if terminated or truncated:
            self.game_scores.append(self.score)
        return obs, 10.0 * reward, terminated, truncated, info

    def reset(self, **kwargs):
        self.score = 0.0
        return self.env.reset(**kwargs)


def test_training_stack_reports_whole_games_unclipped_while_rewards_are_signs():
    import ale_py

    gym.register_envs(ale_py)
    probe = ScaleReward(gym.make("BreakoutNoFrameskip-v4", frameskip=1))
    env = wrap_atari(probe, training=True)
    assert env.observation_space == gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(3)  # a random game that hits two bricks: 20 points under the probe
    rewards, lives_lost, game = set(), 0, None
    for _ in range(5000):
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(4)))
        rewards.add(reward)
        if terminated or truncated:
            if "episode" in info:
                game = info["episode"]
                break
            lives_lost += 1
            env.reset()
    assert game is not None and obs.dtype == np.uint8
    assert rewards <= {-1.0, 0.0, 1.0}
    assert lives_lost == 4  # Breakout's five lives: four learner episodes end before the game does
    assert float(game["r"]) == probe.game_scores[-1] > 1.0  # the game's score, not its signs
    # Evaluation plays whole games: no EpisodicLife in that stack.
    eval_env = make_env("BreakoutNoFrameskip-v4", training=False)
    wrappers = []
    e = eval_env
    while isinstance(e, gym.Wrapper):
        wrappers.append(type(e))
        e = e.env
    assert EpisodicLife not in wrappers
    eval_env.close()


class GameScores(Callback):
    """The RecordEpisodeStatistics scores of the games that end during training."""

    def __init__(self) -> None:
        super().__init__()
        self.scores: list[float] = []
        self.life_ends = 0

    def _on_step(self) -> bool:
        dones, infos = self.locals["dones"], self.locals["infos"]
        if dones.any():
            final = infos["final_info"]
            mask = final.get("_episode", np.zeros(len(dones), bool))
            self.scores += [float(final["episode"]["r"][i]) for i in np.flatnonzero(dones & mask)]
            self.life_ends += int((dones & ~mask).sum())
        return True


def test_ppo_on_an_ale_id_trains_on_uint8_frame_stacks_and_counts_games(tmp_path):
    assert uses_atari_wrappers("ALE/Pong-v5", None) and not uses_atari_wrappers("CartPole-v1", None)
    frames, games = [], GameScores()
    model = PPO(env="ALE/Breakout-v5", n_envs=1, n_steps=128, batch_size=64, n_epochs=1, cnn_features=64,
                seed=0)
    model.learn(total_steps=768, progress=False, callback=games,
                rollout_callback=lambda r: frames.append(r["obs"]))
    assert frames[0].dtype == np.uint8 and frames[0].shape == (128, 1, 4, 84, 84)
    assert games.scores, "no Breakout game ended in 768 steps"
    # charts/episodic_return counts games with their unclipped scores; lost lives are no episodes.
    assert model.episodes == len(games.scores) and games.life_ends >= 4 * len(games.scores)
    assert model._all_returns == games.scores
    obs = frames[-1][-1]  # [1, 4, 84, 84]: a batch of one
    model.save(tmp_path / "run")
    loaded = PPO.load(tmp_path / "run")
    np.testing.assert_array_equal(loaded.predict(obs), model.predict(obs))
    assert loaded.predict(obs[0]).shape == ()

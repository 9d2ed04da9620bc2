"""The environments of a preference run: fixed-length episodes (:func:`make_env_factory`) and their wrappers.

The wrappers live at module level for one reason: a class defined inside a function cannot be
pickled, and a resumed run continues its episodes exactly only if its environments can be
(:func:`palate.rl.envs.snapshot_envs`). Importing this module imports gymnasium, so the trainer
imports it only when it builds an environment.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gymnasium as gym

if TYPE_CHECKING:
    from palate.preferences.config import PreferenceConfig


class FallPenaltyWrapper(gym.Wrapper):
    """Subtract ``penalty`` from the reward of every step the robot is unhealthy (has fallen)."""

    def __init__(self, env: gym.Env, penalty: float) -> None:
        super().__init__(env)
        self.penalty = float(penalty)

    def step(self, action: Any) -> Any:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if not self.env.unwrapped.is_healthy:
            reward = float(reward) - self.penalty
        return obs, reward, terminated, truncated, info


class IgnoreTerminationWrapper(gym.Wrapper):
    """Report no termination, so an env that keeps simulating runs to its time limit (CartPole).

    CartPole pays +1 per step until the pole falls, then 0 while the physics carry on; its
    reward is constant while upright, so two clips of equal length would compare as equal. Run to
    the time limit instead, and a clip where the pole falls scores less, which is what a person
    comparing them sees.
    """

    def step(self, action: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() called after terminated": intended
            obs, reward, _terminated, truncated, info = self.env.step(action)
        return obs, reward, False, truncated, info


#: MuJoCo locomotion tasks whose early termination can be switched off (fixed-length episodes).
_TERMINATING_MUJOCO = ("Hopper", "Walker2d", "Ant", "Humanoid", "HumanoidStandup", "InvertedPendulum",
                       "InvertedDoublePendulum")
#: Environments that keep simulating, with zero reward, after they report termination; with
#: fixed-length episodes their termination is ignored until the time limit.
_CONTINUE_AFTER_TERMINATION = ("CartPole",)


def make_env_factory(cfg: PreferenceConfig) -> Callable[[], Any]:
    """A zero-argument env factory; fixed-length episodes where the env supports it.

    MuJoCo locomotion tasks end an episode when the robot falls; that end tells the agent it did
    badly without any reward. Like the paper, palate makes such episodes fixed length and puts a
    penalty where the termination was: with ``fixed_length_episodes``, ``terminate_when_unhealthy``
    is off and every step spent unhealthy (fallen) costs ``fall_penalty``, so the true reward the
    oracle judges by still says that falling is bad. Without the penalty a robot lying on the
    ground and sliding forward scores well, and the policy learns exactly that. Other
    environments keep their natural episodes, and segments are cut within episodes (see
    :mod:`palate.preferences.segments`).
    """
    from palate.rl.atari import is_ale_id
    from palate.rl.envs import check_env_id

    check_env_id(cfg.env)
    if is_ale_id(cfg.env):
        return atari_env_factory(cfg)
    kwargs: dict[str, Any] = {}
    family = cfg.env.split("-")[0]
    penalise = cfg.fixed_length_episodes and family in _TERMINATING_MUJOCO
    if penalise:
        kwargs["terminate_when_unhealthy"] = False
    ignore_termination = cfg.fixed_length_episodes and family in _CONTINUE_AFTER_TERMINATION

    def factory() -> Any:
        env = gym.make(cfg.env, **kwargs)
        if ignore_termination:
            return IgnoreTerminationWrapper(env)
        if penalise and cfg.fall_penalty and hasattr(env.unwrapped, "is_healthy"):
            return FallPenaltyWrapper(env, cfg.fall_penalty)
        return env

    factory.__name__ = cfg.env
    factory.env_kwargs = kwargs  # type: ignore[attr-defined]
    return factory


def atari_env_factory(cfg: PreferenceConfig) -> Callable[[], Any]:
    """The Atari stack of ``palate rl train`` (:mod:`palate.rl.atari`), changed for a preference run.

    The reward stays unclipped: the agent optimises r_hat, and the synthetic oracle should judge
    clips by the game's real score. With ``fixed_length_episodes`` (the paper's Atari setting)
    no lost life and no game over ends an episode: the next game starts at once
    (:class:`palate.rl.atari.ContinuousGames`), so the agent's one episode runs to the emulator's
    frame limit and its end says nothing about the reward. Without it, the RL stack's episodes
    (a lost life ends one) are kept. Either way the game scores are collected for the metrics.
    """
    from palate.rl.atari import make_atari_env

    continuous = bool(cfg.fixed_length_episodes)

    def factory() -> Any:
        return make_atari_env(cfg.env, training=True, clip_reward=False, episodic_life=not continuous,
                              continuous=continuous)

    factory.__name__ = cfg.env
    factory.env_kwargs = {}  # type: ignore[attr-defined]
    factory.atari = True  # type: ignore[attr-defined]
    # The same stack in envpool's C++ pool, for rl: {vec_env: envpool} (palate.rl.atari.EnvpoolAtari).
    factory.envpool_options = {"env_id": cfg.env, "clip_reward": False,  # type: ignore[attr-defined]
                               "episodic_life": not continuous, "continuous": continuous}
    return factory

"""Atari through ``ale-py`` with the standard DeepMind preprocessing, as rl-baselines3-zoo runs it.

The wrappers, innermost first, and why each is there:

* the ALE env with ``frameskip=1`` (a ``v5`` id skips 4 frames itself, which would stack with
  the preprocessing's skip), keeping the id's own sticky-action setting;
* gymnasium's ``AtariPreprocessing``: up to 30 no-op actions at reset (varied starts), frame
  skip 4 with the max over the last two frames (the ALE flickers), 84 x 84 grey uint8;
* gymnasium's ``RecordEpisodeStatistics``: the *game's* score and length, before anything below
  changes rewards or episode boundaries; palate reports its ``info["episode"]`` as
  ``charts/episodic_return``, so the chart shows the real, unclipped score of whole games;
* for training only, :class:`EpisodicLife` (a lost life ends the learner's episode, so the
  value of dying is learnt, while the game itself goes on) and the sign of the reward (scores of
  every game on one scale);
* :class:`FireReset` for games that wait for FIRE after a reset (and, in evaluation, after a
  lost life);
* gymnasium's ``FrameStackObservation`` of 4: motion, as a ``4 x 84 x 84`` uint8 observation,
  which the policy sees as a channels-first image (the Nature CNN).

Evaluation (``palate rl eval``, ``eval_every``) builds the same stack without the training-only
wrappers, so it plays and scores whole games.

Gymnasium has no EpisodicLife or FireReset wrapper (its AtariPreprocessing's
``terminal_on_life_loss`` resets the whole game at a lost life), hence the two small ones here.

Preference runs (:mod:`palate.preferences`) build the training stack with two changes
(:func:`wrap_atari`'s ``clip_reward`` and ``continuous``): the reward is left unclipped, since the
agent optimises r_hat and only the synthetic oracle reads the game's reward; and, as in
Christiano et al. 2017, neither a lost life nor the end of a game is shown to the agent:
:class:`ContinuousGames` starts the next game at once and reports no termination, so one
episode runs until the time limit and no episode end can tell the agent anything about the reward.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from palate.errors import EnvError

FRAME_STACK = 4
ATARI_INSTALL_HINT = "install ale-py (pip install 'palate[atari]'); its ROMs ship in the wheel"


def register_ale() -> bool:
    """Import ale_py so its ids (``ALE/Pong-v5``, ``PongNoFrameskip-v4``, ...) are registered; False if absent."""
    try:
        import ale_py
    except ImportError:
        return False
    gym.register_envs(ale_py)
    return True


def looks_like_ale(env_id: str) -> bool:
    """Ids ale-py would register: ``ALE/...``, and the v0/v4 ``...NoFrameskip-v4``/``...Deterministic-v4`` forms."""
    return env_id.startswith("ALE/") or "NoFrameskip" in env_id or "Deterministic-v" in env_id


def is_ale_id(env_id: str) -> bool:
    """True for an id whose entry point is ale-py's AtariEnv (registering ale-py's ids first when installed)."""
    if looks_like_ale(env_id) and env_id not in gym.envs.registry:
        register_ale()
    spec = gym.envs.registry.get(env_id)
    return spec is not None and "ale_py" in str(spec.entry_point)


class EpisodicLife(gym.Wrapper):
    """A lost life terminates the learner's episode; the game resets only when it is really over.

    ``reset`` after a life loss takes one no-op step instead of resetting the emulator, so the
    next "episode" continues the same game (Mnih et al. 2015; SB3's EpisodicLifeEnv).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives = 0
        self.game_over = True

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        if self.game_over:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _reward, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:  # the no-op ended the game after all
                obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE (then the next action, as SB3's FireResetEnv) after every reset, for games
    that wait for it (Breakout would otherwise sit still until the agent learns to fire).

    Args:
        on_life_loss: also press FIRE after a lost life. For evaluation, which plays whole games
            without :class:`EpisodicLife`: a deterministic policy that never fires would
            otherwise wait out the time limit after its first lost life.
    """

    def __init__(self, env: gym.Env, on_life_loss: bool = False) -> None:
        super().__init__(env)
        self.on_life_loss = on_life_loss
        self.lives = 0

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.on_life_loss:
            lives = self.env.unwrapped.ale.lives()
            if lives < self.lives and not (terminated or truncated):
                obs, fire_reward, terminated, truncated, info = self.env.step(1)
                reward += fire_reward
            self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self.lives = self.env.unwrapped.ale.lives()
        self.env.reset(**kwargs)
        for action in (1, 2):
            obs, _reward, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class ContinuousGames(gym.Wrapper):
    """Keep the scores of finished games; with ``continuous``, start the next game without an episode end.

    Outermost (around the frame stack), so a new game starts with a fresh stack. The game scores
    come from ``RecordEpisodeStatistics`` inside (unclipped, whole games); a vector env's infos
    keep them only on the steps that end an episode, which a continuous run never has, so they
    are collected here and read with :meth:`pop_game_scores` (``VectorEnv.call`` works for sync
    and subprocess vector envs alike).

    Args:
        continuous: a game that ends (terminated) is reset here and reported as not terminated.
            Truncation (the emulator's frame limit) still ends the episode.
    """

    def __init__(self, env: gym.Env, continuous: bool = True) -> None:
        super().__init__(env)
        self.continuous = continuous
        self.game_scores: list[float] = []
        self.game_lengths: list[int] = []

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        episode = info.get("episode")
        if episode is not None:
            self.game_scores.append(float(np.asarray(episode["r"]).reshape(-1)[0]))
            self.game_lengths.append(int(np.asarray(episode["l"]).reshape(-1)[0]))
        if self.continuous and terminated and not truncated:
            obs, reset_info = self.env.reset()
            info = {**info, **reset_info}
            terminated = False
        return obs, reward, terminated, truncated, info

    def pop_game_scores(self) -> tuple[list[float], list[int]]:
        """Scores and lengths (agent steps) of the games finished since the last call."""
        scores, lengths = self.game_scores, self.game_lengths
        self.game_scores, self.game_lengths = [], []
        return scores, lengths


def wrap_atari(env: gym.Env, training: bool = True, *, clip_reward: bool = True, episodic_life: bool = True,
               continuous: bool | None = None) -> gym.Env:
    """The preprocessing of the module docstring around an ALE env made with ``frameskip=1``.

    ``clip_reward`` and ``episodic_life`` apply to the training stack only. ``continuous`` (None:
    no wrapper) adds :class:`ContinuousGames` outermost, with its ``continuous`` set to it.
    """
    if not hasattr(env.unwrapped, "ale"):
        raise EnvError(f"atari preprocessing needs an ALE environment (ale-py), got {env.unwrapped}; "
                       "set atari: false in the config for other environments")
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                          terminal_on_life_loss=False, grayscale_obs=True, scale_obs=False)
    env = gym.wrappers.RecordEpisodeStatistics(env)
    fire = "FIRE" in env.unwrapped.get_action_meanings()
    if training:
        if episodic_life:
            env = EpisodicLife(env)
        if fire:
            env = FireReset(env, on_life_loss=not episodic_life)
        if clip_reward:
            env = gym.wrappers.TransformReward(env, _reward_sign)
    elif fire:
        env = FireReset(env, on_life_loss=True)
    env = gym.wrappers.FrameStackObservation(env, FRAME_STACK)
    return env if continuous is None else ContinuousGames(env, continuous)


def _reward_sign(reward: float) -> float:
    """The clipped training reward; a module function, unlike a lambda, pickles with the env."""
    return float(np.sign(reward))


def make_atari_env(env_id: str, render_mode: str | None = None, training: bool = True,
                   **options: Any) -> gym.Env:
    """``gym.make(env_id, frameskip=1)`` wrapped by :func:`wrap_atari` (``options``: its keywords)."""
    if not register_ale():
        raise EnvError(f"environment '{env_id}' needs ale-py; {ATARI_INSTALL_HINT}")
    kwargs: dict[str, Any] = {"frameskip": 1}
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        raise EnvError(f"cannot build environment '{env_id}': {err}") from err
    return wrap_atari(env, training, **options)


ENVPOOL_INSTALL_HINT = "install envpool (pip install 'palate[envpool]'), or set vec_env: sync"


def envpool_task(env_id: str) -> str:
    """envpool's name for an ALE id: ``PongNoFrameskip-v4`` and ``ALE/Pong-v5`` are both ``Pong-v5``."""
    game = env_id.removeprefix("ALE/")
    if game.endswith("NoFrameskip-v4"):
        game = game.removesuffix("NoFrameskip-v4")
    elif game.endswith("-v5"):
        game = game.removesuffix("-v5")
    else:
        raise EnvError(f"vec_env: envpool takes ALE ids like PongNoFrameskip-v4 or ALE/Pong-v5, got '{env_id}' "
                       "(its frame skip is not the preprocessing's); use vec_env: sync")
    return f"{game}-v5"


class EnvpoolAtari(gym.vector.VectorEnv):
    """envpool's C++ Atari with palate's vector-env contract: SAME_STEP autoreset and whole-game scores.

    envpool does the preprocessing of :func:`wrap_atari` itself (no-op starts, frame skip 4 with
    the max of the last two frames, 84 x 84 grey, FIRE at reset, a stack of 4, episodic life,
    reward sign), on its own threads, so the emulator is no longer stepped one env at a time
    by Python. Its images come from its own resize, so they are close to, not bit-identical
    with, gymnasium's; ``palate rl eval`` still plays on the gymnasium stack.

    What this class adds: envpool resets an env on the step *after* it ends (that step ignores
    its action); palate needs the reset observation on the step that ends it
    (``info["final_obs"]`` keeps the last one), so ended envs take that step at once. The unclipped score and length of each finished game go to
    ``info["final_info"]["episode"]`` as ``RecordEpisodeStatistics`` reports them, and to
    :meth:`pop_game_scores` (``call("pop_game_scores")``), as :class:`ContinuousGames` does.

    Args:
        env_id: an ALE id; its sticky-action probability and action set are kept.
        num_envs: N.
        clip_reward, episodic_life, continuous: as :func:`wrap_atari` (training stack).
        num_threads: envpool's worker threads (0: one per env, up to the CPU count).
    """

    def __init__(self, env_id: str, num_envs: int, *, clip_reward: bool = True, episodic_life: bool = True,
                 continuous: bool | None = None, num_threads: int = 0) -> None:
        try:
            import envpool
        except ImportError as err:
            raise EnvError(f"vec_env: envpool for '{env_id}': {ENVPOOL_INSTALL_HINT}") from err
        if not register_ale():
            raise EnvError(f"environment '{env_id}' needs ale-py; {ATARI_INSTALL_HINT}")
        task = envpool_task(env_id)
        if task not in envpool.list_all_envs():
            raise EnvError(f"envpool has no Atari game '{task}' for '{env_id}'; use vec_env: sync")
        spec = gym.spec(env_id).kwargs
        self._make = envpool.make_gymnasium
        self._kwargs = dict(
            task_id=task, num_envs=num_envs, batch_size=num_envs, num_threads=num_threads,
            episodic_life=episodic_life and not continuous, reward_clip=clip_reward,
            repeat_action_probability=float(spec.get("repeat_action_probability", 0.0)),
            full_action_space=bool(spec.get("full_action_space", False)),
            max_episode_steps=int(spec.get("max_num_frames_per_episode", 108_000)) // 4,
            noop_max=30, frame_skip=4, stack_num=FRAME_STACK, img_height=84, img_width=84, gray_scale=True,
            use_fire_reset=True)
        self.env_id = env_id
        self.continuous = bool(continuous)
        self._pool = self._make(seed=0, **self._kwargs)
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(0, 255, (FRAME_STACK, 84, 84), np.uint8)
        self.single_action_space = gym.spaces.Discrete(int(self._pool.action_space.n))
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self._score = np.zeros(num_envs, np.float64)
        self._length = np.zeros(num_envs, np.int64)
        self._games: list[tuple[list[float], list[int]]] = [([], []) for _ in range(num_envs)]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset every env; a ``seed`` rebuilds the pool with it (env i gets ``seed + i``, envpool's rule)."""
        if seed is not None:
            self._pool.close()
            self._pool = self._make(seed=int(seed), **self._kwargs)
        obs, _info = self._pool.reset()
        self._score[:] = 0.0
        self._length[:] = 0
        return np.asarray(obs), {}

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self._pool.step(np.asarray(actions))
        obs = np.asarray(obs)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        self._score += np.asarray(info["reward"], np.float64)  # the game's points, before the sign
        self._length += 1
        game_over = np.asarray(info["terminated"], bool) | truncated
        if self.continuous:
            terminated = np.zeros_like(terminated)  # the next game starts at once (ContinuousGames)
        done = terminated | truncated
        infos: dict[str, Any] = {}
        if game_over.any():
            infos["final_info"] = {"episode": {"r": self._score.copy(), "l": self._length.copy()},
                                   "_episode": game_over.copy()}
            for i in np.flatnonzero(game_over):
                self._games[i][0].append(float(self._score[i]))
                self._games[i][1].append(int(self._length[i]))
            self._score[game_over] = 0.0
            self._length[game_over] = 0
        restart = np.flatnonzero(done | game_over)
        if restart.size:
            if done.any():
                final = np.empty(self.num_envs, dtype=object)
                for i in np.flatnonzero(done):
                    final[i] = obs[i].copy()
                infos["final_obs"], infos["_final_obs"] = final, done.copy()
            # envpool's own reset of an ended env, now rather than on the next step: a step of those
            # envs alone, whose action it ignores (a lost life: no-ops and FIRE, the game goes on;
            # a game over: a new game). Its reset() would start a new game even after a lost life.
            new_obs, *_ = self._pool.step(np.zeros(restart.size, np.int64), restart)
            obs = obs.copy()
            obs[restart] = np.asarray(new_obs)
        return obs, np.asarray(reward, np.float64), terminated, truncated, infos

    def pop_game_scores(self) -> list[tuple[list[float], list[int]]]:
        """Per env: scores and lengths of the games finished since the last call."""
        games, self._games = self._games, [([], []) for _ in range(self.num_envs)]
        return games

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        if name == "pop_game_scores":
            return tuple(self.pop_game_scores())
        raise AttributeError(f"EnvpoolAtari has no per-env method '{name}'")

    def close_extras(self, **kwargs: Any) -> None:
        pool = getattr(self, "_pool", None)  # absent when the constructor failed
        if pool is not None:
            pool.close()

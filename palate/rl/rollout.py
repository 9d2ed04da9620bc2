"""Rollout collection of PPO and TRPO: N envs x T steps with the current policy, then V and GAE.

A mixin of :class:`palate.rl.on_policy.OnPolicyAlgorithm` (it reads the model's policy,
normalisers, envs' running state and episode statistics), kept apart because it is the hot loop:
everything that runs once per environment step lives here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from palate.errors import ConfigError
from palate.rl.buffer import Batch, RolloutBuffer
from palate.rl.callbacks import Callback
from palate.rl.spaces import tree_concat, tree_len, tree_map

VALUE_CHUNK = 2048
"""Rows per critic forward after a rollout of images (bounds the CNN's activation memory)."""


def _game_over(info: dict[str, Any], ended: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(envs whose game is over, scores, lengths)`` from RecordEpisodeStatistics' ``final_info``.

    Under the Atari training wrappers a lost life ends the learner's episode; the game's own
    (unclipped) score comes only with the step that ends the game.
    """
    final = info.get("final_info", {})
    mask = final.get("_episode")
    if mask is None:
        return ended[:0], np.zeros(0), np.zeros(0)
    stats = final["episode"]
    return ended[np.asarray(mask)[ended]], np.asarray(stats["r"], np.float64), np.asarray(stats["l"], np.int64)



class RolloutMixin:
    """``collect_rollout`` and the batched critic pass after it."""

    def collect_rollout(self, envs: gym.vector.VectorEnv, buffer: RolloutBuffer,
                        callback: Callback | None = None) -> Batch | None:
        """Run the policy for T steps in N envs and return the GAE'd batch.

        With a ``callback``, its ``on_step`` runs after every vector step, with the model's
        ``global_step`` and last observation up to date; None comes back when it asks to stop.

        The hot loop does only what acting needs: one actor forward per step under
        ``inference_mode``, NumPy writes into the preallocated buffer, no ``.item()``. The
        critic is not needed to act, so V(s_t) for the whole rollout (and V of truncated
        episodes' final observations) is one batched forward afterwards: the same numbers for a
        fraction of the cost of T single-row forwards.
        """
        cfg, policy = self.config, self.policy
        assert policy is not None and self.obs_norm is not None and self.reward_norm is not None
        box = None if policy.discrete else self.action_space
        layout, to_env = self.obs_layout, self._to_env_action
        obs, raw_obs = self._obs, self._raw_obs
        ep_return, ep_length = self._ep_return, self._ep_length
        finals: list[tuple[int, np.ndarray, Any]] = []  # (t, env indices, normalised final obs)
        start_step = self.global_step
        if callback is not None:
            callback.on_rollout_start()  # before the noise is drawn: a checkpoint saved here resumes exactly
        # All sampling noise at once: one generator call per rollout instead of one per step.
        noise = policy.noise((cfg.n_steps, cfg.n_envs), self.generator).numpy()
        actor = policy.rollout_actor()  # for an MLP NumPy: on a few rows its per-op cost is a fifth of torch's
        with torch.inference_mode():
            for t in range(cfg.n_steps):
                action_np, logp = actor.act(obs, noise[t])
                # Gaussian samples are unbounded; the env gets them clipped, the buffer keeps the
                # sample so its log-probability stays exact (as SB3 does).
                env_action = action_np if box is None else np.minimum(np.maximum(action_np, box.low), box.high)
                if to_env is not None:
                    env_action = to_env(env_action)
                next_raw, reward, terminated, truncated, info = envs.step(env_action)
                if layout is None:
                    buffer.obs[t] = obs
                    buffer.raw_obs[t] = raw_obs
                else:
                    buffer.store_obs(t, obs, raw_obs)
                    next_raw = layout.split(next_raw)
                    if actor.value is not None:  # V(s_t) from the acting forward (shared encoder)
                        buffer.values[t] = actor.value
                buffer.actions[t] = action_np
                buffer.env_actions[t] = env_action
                buffer.logp[t] = logp
                buffer.true_rewards[t] = reward
                buffer.terminated[t] = terminated
                buffer.truncated[t] = truncated
                ep_return += reward
                ep_length += 1
                raw_obs = next_raw
                obs = self.obs_norm(raw_obs, update=True)
                done = terminated | truncated
                if done.any():
                    # Truncated, not terminated: the episode had a future, worth V(final observation),
                    # normalised with the statistics that include this step's observations, as SB3's
                    # VecNormalize does for its terminal observations.
                    cut = np.flatnonzero(truncated & ~terminated)
                    if cut.size:
                        final = [info["final_obs"][i] for i in cut]
                        finals.append((t, cut, self.obs_norm(np.stack(final) if layout is None else layout.stack(final))))
                    ended = np.flatnonzero(done)
                    scores, lengths = ep_return, ep_length
                    if self._game_scores:  # Atari: whole games' unclipped scores, not the lives' clipped ones
                        ended, scores, lengths = _game_over(info, ended)
                    for i in ended:
                        self._finished_returns.append(float(scores[i]))
                        self._finished_lengths.append(int(lengths[i]))
                        self._all_returns.append(float(scores[i]))
                    self.episodes += len(ended)
                    ep_return[done] = 0.0
                    ep_length[done] = 0
                if callback is not None:  # the one test a step pays without a callback
                    self._obs, self._raw_obs = obs, raw_obs
                    self.global_step = start_step + (t + 1) * cfg.n_envs
                    callback.update_locals({"t": t, "obs": tree_map(lambda x, t=t: x[t], buffer.raw_obs),
                                            "actions": env_action,
                                            "new_obs": raw_obs, "rewards": reward, "terminated": terminated,
                                            "truncated": truncated, "dones": done, "infos": info})
                    if not callback.on_step():
                        return None
            if layout is None:
                flat_obs = buffer.obs.reshape(cfg.rollout_size, -1)
                rows = [flat_obs, obs] + [f[2] for f in finals]
                values = policy.value(torch.from_numpy(np.concatenate(rows))).numpy()
            else:
                rest = self._values(tree_concat([obs] + [f[2] for f in finals]))
                if actor.value is not None:
                    values = np.concatenate([buffer.values.reshape(-1), rest])
                else:
                    flat_obs = tree_map(lambda x: x.reshape(cfg.rollout_size, *x.shape[2:]), buffer.obs)
                    values = np.concatenate([self._values(flat_obs), rest])
        buffer.values[:] = values[:cfg.rollout_size].reshape(cfg.n_steps, cfg.n_envs)
        buffer.last_value[:] = values[cfg.rollout_size:cfg.rollout_size + cfg.n_envs]
        offset = cfg.rollout_size + cfg.n_envs
        for t, cut, _final in finals:
            buffer.bootstrap[t, cut] = values[offset:offset + len(cut)]
            offset += len(cut)
        self._obs, self._raw_obs = obs, raw_obs
        self.global_step = start_step + cfg.rollout_size
        del self._all_returns[:-1000]

        rewards = buffer.true_rewards
        if self.reward_fn is not None:
            flat = cfg.rollout_size
            predicted = self.reward_fn(buffer.external_raw_obs((flat,)),
                                       buffer.env_actions.reshape(flat, *buffer.env_actions.shape[2:]))
            predicted = np.asarray(predicted, np.float32)
            if predicted.shape not in ((flat,), (flat, 1)):
                raise ConfigError(f"reward_fn returned shape {predicted.shape}; expected ({flat},)")
            rewards = predicted.reshape(cfg.n_steps, cfg.n_envs)
        if self.rollout_callback is not None:
            self.rollout_callback(buffer.raw_dict())
        rewards = self.reward_norm(rewards, buffer.terminated | buffer.truncated)
        return buffer.compute_batch(rewards, cfg.gamma, cfg.gae_lambda)

    def _values(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """V(s) of a parts batch, in chunks of :data:`VALUE_CHUNK` rows (inside ``inference_mode``)."""
        n = tree_len(obs)
        out = [self.policy.value(tree_map(lambda x, s=s: torch.from_numpy(x[s:s + VALUE_CHUNK]), obs)).numpy()
               for s in range(0, n, VALUE_CHUNK)]
        return np.concatenate(out)

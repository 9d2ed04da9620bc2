"""The networks of the preference reward ensemble: the input featurizer, the MLP and the CNN member.

:class:`palate.preferences.reward_model.RewardEnsemble` builds one member per bootstrap sample:
an MLP over (observation, action) features, or, on image observations, the Atari predictor of
Christiano et al. 2017 (four convolutions, the action one-hot beside their flattened output).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from palate.errors import PreferenceError

#: The smallest image side the Atari predictor's convolutions take (43 -> 13 -> 5 -> 3 -> 1).
CNN_MIN_SIDE = 43


class Featurizer:
    """Turns (observation, action) into one float vector: the reward model's input.

    Box actions are clipped to their bounds (a Gaussian policy samples outside them, the
    environment clips them, so the reward model should see what the environment saw); discrete
    actions become one-hot vectors.
    """

    def __init__(self, observation_space: Any, action_space: Any) -> None:
        from gymnasium import spaces

        if not isinstance(observation_space, spaces.Box):
            raise PreferenceError(
                f"preference learning needs a Box observation space, got {observation_space}; "
                "flatten dict or image observations with a gymnasium wrapper first"
            )
        self.obs_shape = tuple(observation_space.shape)
        self.obs_dim = int(np.prod(self.obs_shape))
        if isinstance(action_space, spaces.Discrete):
            self.discrete, self.act_dim = True, int(action_space.n)
            self.low = self.high = None
        elif isinstance(action_space, spaces.Box):
            self.discrete, self.act_dim = False, int(np.prod(action_space.shape))
            low, high = action_space.low.reshape(-1), action_space.high.reshape(-1)
            finite = np.isfinite(low) & np.isfinite(high)
            self.low = np.where(finite, low, -np.inf).astype(np.float32)
            self.high = np.where(finite, high, np.inf).astype(np.float32)
        else:
            raise PreferenceError(f"unsupported action space {action_space}; use Box or Discrete")
        self.dim = self.obs_dim + self.act_dim

    def obs_features(self, obs: np.ndarray) -> np.ndarray:
        return np.asarray(obs, dtype=np.float32).reshape(-1, self.obs_dim)

    def act_features(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        if self.discrete:
            idx = actions.reshape(-1).astype(np.int64)
            out = np.zeros((len(idx), self.act_dim), dtype=np.float32)
            out[np.arange(len(idx)), idx] = 1.0
            return out
        flat = actions.astype(np.float32).reshape(-1, self.act_dim)
        return np.clip(flat, self.low, self.high)

    def __call__(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return np.concatenate([self.obs_features(obs), self.act_features(actions)], axis=1)


class CnnMember(nn.Module):
    """r_hat(o, a) on an image: the paper's Atari predictor (module docstring), action beside its features.

    Args:
        obs_shape: one observation, ``C x H x W``, ``H x W x C`` or ``H x W`` (uint8).
        act_dim: width of the action features (one-hot for Discrete).
        hidden: widths of the fully connected layers after the convolutions.
        dropout: dropout after every convolution and hidden layer.
    """

    def __init__(self, obs_shape: tuple[int, ...], act_dim: int, hidden: Sequence[int], dropout: float) -> None:
        super().__init__()
        if len(obs_shape) == 2:
            self.layout, channels, (h, w) = "hw", 1, obs_shape
        elif int(np.argmin(obs_shape)) == 0:
            self.layout, (channels, h, w) = "chw", obs_shape
        else:
            self.layout, (h, w, channels) = "hwc", obs_shape
        if min(h, w) < CNN_MIN_SIDE:
            raise PreferenceError(
                f"the reward model's CNN needs images of at least {CNN_MIN_SIDE}x{CNN_MIN_SIDE} pixels, got {h}x{w}; resize the "
                "observations (gymnasium.wrappers.ResizeObservation) or flatten them into a vector")
        layers: list[nn.Module] = []
        last = channels
        for kernel, stride in ((7, 3), (5, 2), (3, 1), (3, 1)):
            layers += [nn.Conv2d(last, 16, kernel, stride=stride), nn.LeakyReLU(0.01)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            last = 16
        self.conv = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, channels, h, w)).shape[1]
        self.head = mlp(flat + act_dim, hidden, dropout)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = obs
        if self.layout == "hw":
            x = x.unsqueeze(1)
        elif self.layout == "hwc":
            x = x.permute(0, 3, 1, 2)
        # Channels-last memory for oneDNN's NHWC convolutions (as palate.rl.encoders.ImageEncoder).
        x = x.contiguous(memory_format=torch.channels_last).float() / 255.0
        return self.head(torch.cat([self.conv(x), act], dim=-1))


def mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = in_dim
    for h in hidden:
        # Leaky ReLU as in the paper's MuJoCo predictor (two layers of 64).
        layers += [nn.Linear(last, h), nn.LeakyReLU(0.01)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        last = h
    layers.append(nn.Linear(last, 1))
    return nn.Sequential(*layers)

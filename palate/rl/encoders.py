"""Encoders for observations other than a flat vector: the Nature CNN for images, and one
combined encoder for Dict and Tuple observations (Stable-Baselines3's CombinedExtractor).

The images arrive as uint8 (that is how the rollout buffer keeps them) and become floats in
[0, 1] here, so the /255 costs one op on a minibatch instead of four times the buffer's memory.
Vector parts are flattened (Discrete and MultiDiscrete parts one-hot), every image part gets its
own CNN, and the features of all parts are concatenated; the policy's MLP heads sit on top.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from palate.errors import ConfigError, EnvError
from palate.rl.spaces import ObsLayout, Part

CNN_MIN_SIZE = {"nature": 36, "small": 5}
"""The smallest image side each CNN can take (below it a convolution has no output)."""


def _conv_stack(kind: str, channels: int) -> nn.Sequential:
    if kind == "nature":
        # Mnih et al. 2015 (SB3's NatureCNN): 32 8x8/4, 64 4x4/2, 64 3x3/1.
        return nn.Sequential(nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2),
                             nn.ReLU(), nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
    if kind == "small":
        # For small images (grid worlds, tests): 16 3x3/1, 32 3x3/2.
        return nn.Sequential(nn.Conv2d(channels, 16, 3, stride=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2),
                             nn.ReLU(), nn.Flatten())
    raise ConfigError(f"cnn must be 'nature' or 'small', got {kind!r}")


class ImageEncoder(nn.Module):
    """uint8 image -> ``features`` floats: /255, the CNN, then a ReLU linear layer (as SB3's NatureCNN).

    Args:
        part: the image part (H x W x C, C x H x W or H x W); channels-last input is permuted here.
        kind: ``nature`` or ``small`` (:data:`CNN_MIN_SIZE`).
        features: width of the output.
    """

    def __init__(self, part: Part, kind: str, features: int) -> None:
        super().__init__()
        shape = part.shape
        if len(shape) == 2:
            self.layout, (h, w), c = "hw", shape, 1
        elif part.channels_first:
            self.layout, (c, h, w) = "chw", shape
        else:
            self.layout, (h, w, c) = "hwc", shape
        if min(h, w) < CNN_MIN_SIZE.get(kind, 0):
            raise EnvError(f"observation '{part.key}' is a {h}x{w} image, smaller than the {kind} CNN's "
                           f"minimum {CNN_MIN_SIZE[kind]}x{CNN_MIN_SIZE[kind]}; set cnn: small in the config "
                           "(or resize the images, e.g. gymnasium.wrappers.ResizeObservation)")
        self.cnn = _conv_stack(kind, c)
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, c, h, w)).shape[1]
        self.linear = nn.Linear(flat, features)
        self.out_dim = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "hw":
            x = x.unsqueeze(1)
        elif self.layout == "hwc":
            x = x.permute(0, 3, 1, 2)  # a view: its memory is already channels-last
        # Channels-last memory (the values and shape are unchanged) sends the convolutions to oneDNN's
        # NHWC kernels: forward + backward of the Nature CNN on 256 Atari frames takes 0.31-0.32 s
        # instead of 0.41-0.49 s on one CPU thread. The copy is made on the uint8 image, a quarter of
        # the float bytes; .float() keeps the layout and is a new tensor, so the in-place /255 leaves
        # the rollout buffer alone.
        x = x.contiguous(memory_format=torch.channels_last).float().div_(255.0)
        return torch.relu(self.linear(self.cnn(x)))


def _flat_width(part: Part) -> int:
    if part.kind in ("discrete", "multidiscrete"):
        return sum(part.sizes)
    return math.prod(part.shape)


class CombinedEncoder(nn.Module):
    """Parts dict -> one feature vector: a CNN per image part, the rest flattened, concatenated.

    Args:
        layout: the observation layout (:class:`palate.rl.spaces.ObsLayout`).
        cnn: which CNN the image parts get (``nature`` or ``small``).
        cnn_features: output width of each image part's CNN.
        ortho_init: orthogonal init with gain sqrt(2), as SB3 initialises its extractors.
    """

    def __init__(self, layout: ObsLayout, cnn: str = "nature", cnn_features: int = 512,
                 ortho_init: bool = True) -> None:
        super().__init__()
        self.parts = layout.parts
        self.images = nn.ModuleDict({_module_key(p.key): ImageEncoder(p, cnn, cnn_features)
                                     for p in self.parts if p.kind == "image"})
        self.out_dim = sum(cnn_features if p.kind == "image" else _flat_width(p) for p in self.parts)
        if ortho_init:
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.orthogonal_(m.weight, math.sqrt(2.0))
                    nn.init.zeros_(m.bias)

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        features = []
        for p in self.parts:
            x = obs[p.key]
            if p.kind == "image":
                features.append(self.images[_module_key(p.key)](x))
            elif p.kind == "discrete":
                features.append(torch.nn.functional.one_hot(x.long(), p.sizes[0]).float())
            elif p.kind == "multidiscrete":
                features.append(torch.cat([torch.nn.functional.one_hot(x[:, i].long(), n).float()
                                           for i, n in enumerate(p.sizes)], dim=-1))
            else:
                features.append(x.reshape(x.shape[0], -1).float())
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)


def _module_key(key: str) -> str:
    """ModuleDict keys may not contain '.'; part keys of nested spaces hold '/' and user names."""
    return "p_" + key.replace(".", "_").replace("/", "__")

"""Actor-critic policies: categorical for Discrete actions, diagonal Gaussian for Box actions,
a product of categoricals for MultiDiscrete and of Bernoullis for MultiBinary.

Actor and critic are separate MLPs (as in CleanRL and SB3's default), so the value loss cannot
drag the policy's features around and TRPO can constrain the actor alone. The distributions are
written out by hand rather than with ``torch.distributions``: no argument validation, no
broadcasting machinery, and sampling from an explicit ``torch.Generator`` so a run's randomness
is one object that the checkpoint can save. At the batch sizes of control (8 rows) this halves
the cost of a rollout step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from palate.rl.encoders import CombinedEncoder
from palate.rl.spaces import ObsLayout

_LOG_2PI = math.log(2.0 * math.pi)


class Categorical:
    """pi(a|s) = softmax(logits)[a]."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = torch.log_softmax(logits, dim=-1)

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel(0, 1) noise for :meth:`sample`; drawn for a whole rollout at once."""
        u = torch.rand(shape, generator=generator).clamp_(min=1e-20)
        return -torch.log(-torch.log(u))

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(action, log_prob)``; Gumbel-max: argmax(logits + G) is an exact sample."""
        action = (self.logits + noise).argmax(dim=-1)
        return action, self.log_prob(action)

    def mode(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.logits.exp() * self.logits).sum(-1)

    def kl(self, other: Categorical) -> torch.Tensor:
        """KL[self || other] per row, exact."""
        return (self.logits.exp() * (self.logits - other.logits)).sum(-1)

    def detach(self) -> Categorical:
        """A frozen copy (the logits are computed, never a view of a parameter)."""
        return Categorical(self.logits.detach())

    def rows(self, idx: torch.Tensor) -> Categorical:
        return Categorical(self.logits[idx])

    def slice(self, start: int, end: int) -> Categorical:
        return Categorical(self.logits[start:end])


class DiagGaussian:
    """pi(a|s) = N(mean(s), diag(exp(log_std))^2) with a state-independent log_std."""

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor) -> None:
        self.mean = mean
        self.log_std = log_std.expand_as(mean)

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise for :meth:`sample`; drawn for a whole rollout at once."""
        return torch.randn(shape, generator=generator)

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(action, log_prob)``; the standardised action is the noise itself, so its
        log-density needs no division."""
        action = self.mean + self.log_std.exp() * noise
        return action, -(0.5 * noise.pow(2) + self.log_std + 0.5 * _LOG_2PI).sum(-1)

    def mode(self) -> torch.Tensor:
        return self.mean

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - self.mean) * torch.exp(-self.log_std)
        return -(0.5 * z.pow(2) + self.log_std + 0.5 * _LOG_2PI).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (self.log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)

    def kl(self, other: DiagGaussian) -> torch.Tensor:
        """KL[self || other] per row, exact."""
        var_ratio = torch.exp(2.0 * (self.log_std - other.log_std))
        z = (self.mean - other.mean) * torch.exp(-other.log_std)
        return 0.5 * (var_ratio + z.pow(2) - 1.0 - torch.log(var_ratio)).sum(-1)

    def detach(self) -> DiagGaussian:
        """A frozen copy: pi_old for a KL or a ratio while the parameters move.

        The log-std of a distribution built by the policy is a view of the live parameter (and a
        view made under ``no_grad`` still requires grad), so without the copy an in-place
        update would move pi_old along with pi and the KL would never see the log-std change.
        """
        return DiagGaussian(self.mean.detach(), self.log_std.detach().clone())

    def rows(self, idx: torch.Tensor) -> DiagGaussian:
        return DiagGaussian(self.mean[idx], self.log_std[idx])

    def slice(self, start: int, end: int) -> DiagGaussian:
        return DiagGaussian(self.mean[start:end], self.log_std[start:end])


class MultiCategorical:
    """pi(a|s) = prod_i softmax(logits_i)[a_i]: one categorical per MultiDiscrete component.

    The logits of all components sit side by side in one row (``sum(nvec)`` wide), laid into a
    ``[B, k, max(nvec)]`` block whose unused cells (a component with fewer choices) hold -1e9,
    so every operation is one tensor op over all components instead of a loop over them. -1e9,
    not -inf: its probability is exactly 0 and 0 * -1e9 stays 0 in the entropy, the KL and their
    gradients (with -inf they would be NaN).
    """

    def __init__(self, logits: torch.Tensor, nvec: Sequence[int], index: torch.Tensor | None = None) -> None:
        self.nvec = tuple(nvec)
        width = max(self.nvec)
        self.index = index if index is not None else torch.cat(
            [torch.arange(n) + i * width for i, n in enumerate(self.nvec)])
        if logits.dim() == 2:  # the head's output [B, sum(nvec)] -> [B, k, width]
            block = logits.new_full((logits.shape[0], len(self.nvec) * width), -1e9)
            block[:, self.index] = logits
            logits = torch.log_softmax(block.view(-1, len(self.nvec), width), dim=-1)
        self.logits = logits  # [B, k, width] log-probabilities

    def _like(self, logits: torch.Tensor) -> MultiCategorical:
        return MultiCategorical(logits, self.nvec, self.index)

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Gumbel noise, ``sum(nvec)`` wide like the head (see :meth:`Categorical.noise`)."""
        return Categorical.noise(shape, generator)

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(action [B, k], log_prob)`` by Gumbel-max in every component."""
        block = noise.new_zeros((noise.shape[0], self.logits.shape[1] * self.logits.shape[2]))
        block[:, self.index] = noise
        action = (self.logits + block.view_as(self.logits)).argmax(dim=-1)
        return action, self.log_prob(action)

    def mode(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        return self.logits.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1).sum(-1)

    def entropy(self) -> torch.Tensor:
        return -(self.logits.exp() * self.logits).sum((-2, -1))

    def kl(self, other: MultiCategorical) -> torch.Tensor:
        """KL[self || other] per row, exact: the sum of the components' KLs."""
        return (self.logits.exp() * (self.logits - other.logits)).sum((-2, -1))

    def detach(self) -> MultiCategorical:
        return self._like(self.logits.detach())

    def rows(self, idx: torch.Tensor) -> MultiCategorical:
        return self._like(self.logits[idx])

    def slice(self, start: int, end: int) -> MultiCategorical:
        return self._like(self.logits[start:end])


class Bernoulli:
    """pi(a|s) = prod_i sigma(l_i)^a_i (1 - sigma(l_i))^(1 - a_i): independent bits (MultiBinary)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    @staticmethod
    def noise(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Logistic(0, 1) noise: l + L > 0 has probability sigma(l), an exact sample."""
        u = torch.rand(shape, generator=generator).clamp_(1e-7, 1.0 - 1e-7)
        return torch.log(u) - torch.log1p(-u)

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        action = (self.logits + noise > 0).long()
        return action, self.log_prob(action)

    def mode(self) -> torch.Tensor:
        return (self.logits > 0).long()

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        # log sigma(l) for a = 1 and log sigma(-l) for a = 0, i.e. -softplus(-(2a - 1) l).
        sign = 2.0 * actions.to(self.logits.dtype) - 1.0
        return -torch.nn.functional.softplus(-sign * self.logits).sum(-1)

    def entropy(self) -> torch.Tensor:
        p = torch.sigmoid(self.logits)
        return (torch.nn.functional.softplus(self.logits) - p * self.logits).sum(-1)

    def kl(self, other: Bernoulli) -> torch.Tensor:
        """KL[self || other] per row, exact."""
        p, logsig = torch.sigmoid(self.logits), torch.nn.functional.logsigmoid
        return (p * (logsig(self.logits) - logsig(other.logits))
                + (1.0 - p) * (logsig(-self.logits) - logsig(-other.logits))).sum(-1)

    def detach(self) -> Bernoulli:
        return Bernoulli(self.logits.detach())

    def rows(self, idx: torch.Tensor) -> Bernoulli:
        return Bernoulli(self.logits[idx])

    def slice(self, start: int, end: int) -> Bernoulli:
        return Bernoulli(self.logits[start:end])


Distribution = Categorical | DiagGaussian | MultiCategorical | Bernoulli


class MLP(nn.Sequential):
    """An ``nn.Sequential`` of Linear/activation layers with a lean forward.

    ``nn.Module.__call__`` costs microseconds per layer (hooks, attribute lookups); at a rollout's
    batch of a few rows that is most of the forward, so ``forward`` calls the functional ops on
    the layers' parameters directly. Same parameters, same numbers as ``nn.Sequential``.

    Attributes:
        linears: the Linear layers in order (what the hand-written forwards and backwards of
            :class:`NumpyActor` and :mod:`palate.rl.fused` walk).
        tanh: True for tanh hidden activations, False for ReLU.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self._plan = [(m.weight, m.bias) if isinstance(m, nn.Linear) else type(m) for m in layers]
        self.linears: list[nn.Linear] = [m for m in layers if isinstance(m, nn.Linear)]
        self.tanh = any(isinstance(m, nn.Tanh) for m in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._plan:
            if isinstance(step, tuple):
                x = torch.nn.functional.linear(x, step[0], step[1])
            elif step is nn.Tanh:
                x = torch.tanh(x)
            else:
                x = torch.relu(x)
        return x


def mlp(sizes: Sequence[int], activation: str, ortho_init: bool, out_gain: float) -> MLP:
    """Linear layers with ``activation`` between them; orthogonal init as in CleanRL when asked."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        if ortho_init:
            last = i == len(sizes) - 2
            nn.init.orthogonal_(linear.weight, out_gain if last else math.sqrt(2.0))
            nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(act())
    return MLP(*layers)


class NumpyActor:
    """The actor of an :class:`ActorCritic` as NumPy views of its parameters, for the rollout.

    A rollout step acts on a handful of rows, where each PyTorch op costs ~5 us of dispatch and
    the equivalent NumPy op ~1 us; the actor forward plus sampling is ~15 ops, once per env step.
    The arrays are views of the torch parameters (no copies), so they follow in-place updates;
    build a new one after anything that replaces the parameter tensors. Sampling takes the same
    noise as :meth:`ActorCritic.act` (Gumbel for categorical, standard normal for Gaussian), so
    the samples are the same up to float rounding of the forward.
    """

    def __init__(self, policy: ActorCritic) -> None:
        self.discrete = policy.discrete
        self.tanh = policy.actor.tanh
        self.layers = [(m.weight.detach().numpy().T, m.bias.detach().numpy()) for m in policy.actor.linears]
        if not self.discrete:
            self.log_std = policy.log_std.detach().numpy()

    def act(self, obs: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(action, log_prob)`` for float32 ``obs [B, obs_dim]`` and one step of :meth:`ActorCritic.noise`."""
        x = obs
        last = len(self.layers) - 1
        for i, (w_t, b) in enumerate(self.layers):
            x = x @ w_t
            x += b
            if i < last:
                x = np.tanh(x, out=x) if self.tanh else np.maximum(x, 0.0, out=x)
        if self.discrete:
            action = (x + noise).argmax(-1)
            top = x.max(-1, keepdims=True)
            log_norm = top[:, 0] + np.log(np.exp(x - top).sum(-1))
            return action, x[np.arange(len(x)), action] - log_norm
        std = np.exp(self.log_std)
        action = x + std * noise
        return action, -(0.5 * np.square(noise) + (self.log_std + np.float32(0.5 * _LOG_2PI))).sum(-1)


class ActorCritic(nn.Module):
    """pi(a|s) and V(s) as two MLPs over the (normalised) observation.

    Args:
        obs_dim: length of the flat observation.
        action_space: Discrete -> categorical logits; Box -> Gaussian mean + free log_std.
        hidden_sizes, activation, ortho_init, log_std_init: as in the trainer config.
    """

    def __init__(self, obs_dim: int, action_space: gym.Space, hidden_sizes: Sequence[int] = (64, 64),
                 activation: str = "tanh", ortho_init: bool = True, log_std_init: float = 0.0) -> None:
        super().__init__()
        self.discrete = isinstance(action_space, gym.spaces.Discrete)
        out_dim = int(action_space.n) if self.discrete else int(action_space.shape[0])
        hidden = list(hidden_sizes)
        self.actor = mlp([obs_dim, *hidden, out_dim], activation, ortho_init, out_gain=0.01)
        self.critic = mlp([obs_dim, *hidden, 1], activation, ortho_init, out_gain=1.0)
        if not self.discrete:
            self.log_std = nn.Parameter(torch.full((out_dim,), float(log_std_init)))

    def actor_parameters(self) -> list[nn.Parameter]:
        """What TRPO's trust region constrains: the actor MLP and the log-std."""
        params = list(self.actor.parameters())
        return params + [self.log_std] if not self.discrete else params

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def distribution(self, obs: torch.Tensor) -> Distribution:
        out = self.actor(obs)
        return Categorical(out) if self.discrete else DiagGaussian(out, self.log_std)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    @property
    def dist_class(self) -> type[Categorical] | type[DiagGaussian]:
        return Categorical if self.discrete else DiagGaussian

    def noise(self, batch_shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampling noise for ``batch_shape`` rows (e.g. ``(T, N)``), to pass row by row to :meth:`act`."""
        width = self.actor[-1].out_features
        return self.dist_class.noise((*batch_shape, width), generator)

    def act(self, obs: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample with ``noise`` (from :meth:`noise`), or take the mode when it is None;
        returns ``(action, log_prob)``. The critic is not needed to act (see collect_rollout)."""
        dist = self.distribution(obs)
        if noise is None:
            action = dist.mode()
            return action, dist.log_prob(action)
        return dist.sample(noise)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_prob, entropy, value)`` of stored actions under the current parameters."""
        dist, value = self.distribution_and_value(obs)
        return dist.log_prob(actions), dist.entropy(), value

    def distribution_and_value(self, obs: torch.Tensor) -> tuple[Distribution, torch.Tensor]:
        """pi(.|s) and V(s) together (a policy with a shared encoder runs it once for both)."""
        return self.distribution(obs), self.value(obs)

    def rollout_actor(self) -> NumpyActor:
        """What the rollout acts with: the NumPy views of the MLP (see :class:`NumpyActor`)."""
        return NumpyActor(self)


class TorchActor:
    """:class:`NumpyActor`'s interface for an :class:`EncoderActorCritic`: a CNN (or a dict of
    parts) is no job for NumPy, so this runs the torch forward on the parts and hands back arrays.

    With a shared encoder the critic head costs nothing next to the CNN that acting already ran,
    so ``act`` also leaves V(s) in :attr:`value` and the rollout needs no second pass of the CNN
    over its observations (None when the critic has its own encoder).
    """

    def __init__(self, policy: EncoderActorCritic) -> None:
        self.policy = policy
        self.shared = policy.critic_encoder is None
        self.value: np.ndarray | None = None

    def act(self, obs: dict[str, np.ndarray], noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obs_t = {k: torch.from_numpy(v) for k, v in obs.items()}
        if self.shared:
            dist, value = self.policy.distribution_and_value(obs_t)
            self.value = value.numpy()
            action, logp = dist.sample(torch.from_numpy(noise))
        else:
            action, logp = self.policy.act(obs_t, torch.from_numpy(noise))
        return action.numpy(), logp.numpy()


def action_kind(action_space: gym.Space) -> str:
    """discrete, box, multidiscrete or multibinary (the spaces :func:`palate.rl.spaces.check_action_space` allows)."""
    for cls, kind in ((gym.spaces.Discrete, "discrete"), (gym.spaces.Box, "box"),
                      (gym.spaces.MultiDiscrete, "multidiscrete"), (gym.spaces.MultiBinary, "multibinary")):
        if isinstance(action_space, cls):
            return kind
    raise ValueError(f"unsupported action space {action_space}")


class EncoderActorCritic(ActorCritic):
    """pi(a|s) and V(s) for every observation space other than a flat Box, and for
    MultiDiscrete / MultiBinary actions: a :class:`~palate.rl.encoders.CombinedEncoder`, then
    the actor and critic MLP heads (linear heads for a lone image, as SB3's CnnPolicy).

    Args:
        layout: the observation's parts (:class:`~palate.rl.spaces.ObsLayout`).
        action_space: Discrete, Box, MultiDiscrete or MultiBinary (1-D).
        share_encoder: one encoder for actor and critic (PPO, as SB3: half the CNN work);
            False gives the critic its own, so TRPO's trust region covers the actor alone.
        cnn, cnn_features: the image CNN and its output width.
        hidden_sizes, activation, ortho_init, log_std_init: as in the trainer config.
    """

    def __init__(self, layout: ObsLayout, action_space: gym.Space, hidden_sizes: Sequence[int] = (64, 64),
                 activation: str = "tanh", ortho_init: bool = True, log_std_init: float = 0.0,
                 cnn: str = "nature", cnn_features: int = 512, share_encoder: bool = True) -> None:
        nn.Module.__init__(self)
        self.kind = action_kind(action_space)
        self.discrete = self.kind != "box"
        self.nvec = tuple(int(n) for n in action_space.nvec) if self.kind == "multidiscrete" else ()
        out_dim = {"discrete": lambda: int(action_space.n), "multidiscrete": lambda: sum(self.nvec)}.get(
            self.kind, lambda: int(action_space.shape[0]))()
        self.encoder = CombinedEncoder(layout, cnn, cnn_features, ortho_init)
        self.critic_encoder = None if share_encoder else CombinedEncoder(layout, cnn, cnn_features, ortho_init)
        hidden = [] if layout.lone_image else list(hidden_sizes)
        self.actor = mlp([self.encoder.out_dim, *hidden, out_dim], activation, ortho_init, out_gain=0.01)
        self.critic = mlp([self.encoder.out_dim, *hidden, 1], activation, ortho_init, out_gain=1.0)
        if self.kind == "box":
            self.log_std = nn.Parameter(torch.full((out_dim,), float(log_std_init)))

    def actor_parameters(self) -> list[nn.Parameter]:
        params = list(self.encoder.parameters()) + list(self.actor.parameters())
        return params + [self.log_std] if self.kind == "box" else params

    def critic_parameters(self) -> list[nn.Parameter]:
        encoder = [] if self.critic_encoder is None else list(self.critic_encoder.parameters())
        return encoder + list(self.critic.parameters())

    def _dist(self, out: torch.Tensor) -> Distribution:
        if self.kind == "discrete":
            return Categorical(out)
        if self.kind == "multidiscrete":
            return MultiCategorical(out, self.nvec)
        if self.kind == "multibinary":
            return Bernoulli(out)
        return DiagGaussian(out, self.log_std)

    def distribution(self, obs: dict[str, torch.Tensor]) -> Distribution:
        return self._dist(self.actor(self.encoder(obs)))

    def value(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        encoder = self.encoder if self.critic_encoder is None else self.critic_encoder
        return self.critic(encoder(obs)).squeeze(-1)

    def distribution_and_value(self, obs: dict[str, torch.Tensor]) -> tuple[Distribution, torch.Tensor]:
        if self.critic_encoder is not None:
            return self.distribution(obs), self.value(obs)
        features = self.encoder(obs)
        return self._dist(self.actor(features)), self.critic(features).squeeze(-1)

    @property
    def dist_class(self) -> type:
        return {"discrete": Categorical, "multidiscrete": MultiCategorical, "multibinary": Bernoulli,
                "box": DiagGaussian}[self.kind]

    def rollout_actor(self) -> TorchActor:  # type: ignore[override]
        return TorchActor(self)

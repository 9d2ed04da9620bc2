"""The reward model r_hat(o, a): an ensemble of MLPs fitted to segment comparisons.

Each detail below is Christiano et al. 2017, section 2.2.3, and acts where it is named:

* **Bradley-Terry with the error model.** P[s1 > s2] = exp(sum r_hat(s1)) / (exp(sum r_hat(s1)) +
  exp(sum r_hat(s2))), mixed with a uniform answer with probability epsilon (0.1), fitted by
  cross-entropy against the label (``palate.core.preference.bradley_terry_loss``).
* **Ensemble on bootstrap samples.** Each of the ``n_members`` predictors trains on ``|D|``
  comparisons drawn with replacement from its own training set; disagreement between members is
  what query selection looks for, and their average is smoother than any one of them.
* **1/e held out.** Each member keeps its own fixed random 1/e of the comparisons for
  validation (fixed, so a comparison a member once trained on never becomes its validation data).
* **Adaptive L2.** After each fit, the L2 coefficient of each member grows when its validation
  loss exceeds 1.5x its training loss and shrinks when it falls below 1.1x.
* **Dropout** in the hidden layers.
* **Pixels.** On image observations (Atari's 4 x 84 x 84 uint8 frame stacks) each member is the
  paper's Atari predictor: four convolutions (7x7 stride 3, 5x5 stride 2, 3x3, 3x3; 16 filters
  each, leaky ReLU, dropout), the action one-hot beside the flattened features, then the same
  fully connected layers as the MLP. The paper also puts batch norm on the convolutions; palate
  leaves it out, so a member's output does not depend on the other clips in its batch. Frames
  stay uint8 until a minibatch is built (a float copy of 5,500 labelled clip pairs would take
  31 GB), and every pass over many clips runs in chunks.
* **Normalised output.** Each member's output is normalised to zero mean and unit std over the
  states the policy visits now, the members are averaged, and the average is normalised again:
  the policy sees a reward of a fixed scale whatever the ensemble's drift, which keeps PPO/TRPO
  step sizes meaningful while r_hat is non-stationary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from palate.core.preference import bradley_terry_loss, ensemble_disagreement, segment_returns
from palate.errors import PreferenceError
from palate.preferences.reward_nets import CnnMember, Featurizer, mlp
from palate.preferences.segments import Segment, SegmentPair

#: Validation share of each member (the paper's 1/e).
VAL_FRACTION = 1.0 / math.e
#: Images per CNN forward outside training (bounds the activations' memory).
IMAGE_CHUNK = 1024
#: Clip pairs per minibatch when a CNN ensemble is evaluated on many pairs.
PAIR_CHUNK = 64


@dataclass
class FitStats:
    """What one ``RewardEnsemble.fit`` call measured, averaged over members."""

    train_loss: float
    val_loss: float
    val_accuracy: float
    l2_coef: float
    n_train: int
    n_val: int

    def as_metrics(self) -> dict[str, float]:
        return {
            "prefs/rm_train_loss": self.train_loss,
            "prefs/rm_val_loss": self.val_loss,
            "prefs/rm_val_accuracy": self.val_accuracy,
            "prefs/rm_l2_coef": self.l2_coef,
        }


class PreferenceDataset:
    """The labelled comparisons D = {(s1, s2, mu)}, grown as labels arrive.

    ``mu`` is the probability that the left segment is preferred: 1 (left), 0 (right), 0.5
    (equal). "Can't tell" answers never enter (the paper drops them).
    """

    def __init__(self) -> None:
        self.pairs: list[SegmentPair] = []
        self.mu: list[float] = []
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, pair: SegmentPair, mu: float, comparison_id: str = "") -> None:
        if not 0.0 <= mu <= 1.0:
            raise PreferenceError(f"label probability must lie in [0, 1], got {mu} for comparison {comparison_id!r}")
        self.pairs.append(pair)
        self.mu.append(float(mu))
        self.ids.append(comparison_id)


class RewardEnsemble:
    """An ensemble of reward predictors r_hat_m(o, a) (MLPs, or CNNs on images), trained on segment comparisons.

    Args:
        observation_space, action_space: the environment's gymnasium spaces.
        n_members: ensemble size (the paper: 3).
        hidden_sizes: hidden widths of each MLP (the paper: 64, 64).
        dropout: dropout probability in the hidden layers.
        lr: Adam learning rate.
        batch_size: comparisons per gradient step.
        l2_coef: initial L2 coefficient, adapted per member after each fit.
        error_rate: epsilon of the error model in the loss.
        seed: seeds the validation splits, bootstrap samples, initialisation and dropout.
        device: where the members train and predict (``cpu``, ``cuda``, ``auto``: cuda when
            available); inputs and outputs stay NumPy on the CPU.
    """

    def __init__(
        self,
        observation_space: Any,
        action_space: Any,
        n_members: int = 3,
        hidden_sizes: Sequence[int] = (64, 64),
        dropout: float = 0.2,
        lr: float = 1e-3,
        batch_size: int = 32,
        l2_coef: float = 1e-4,
        error_rate: float = 0.1,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        from palate.rl.spaces import is_image_space

        if n_members < 1:
            raise PreferenceError(f"ensemble_size must be at least 1, got {n_members}")
        if not 0.0 <= error_rate < 1.0:
            raise PreferenceError(f"error_rate must lie in [0, 1), got {error_rate}")
        self.features = Featurizer(observation_space, action_space)
        self.image = is_image_space(observation_space)
        self.device = _device(device)
        self.n_members = n_members
        self.batch_size = batch_size
        self.error_rate = error_rate
        self.rng = np.random.default_rng(seed)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        if self.image:
            self.members: list[nn.Module] = [
                CnnMember(self.features.obs_shape, self.features.act_dim, hidden_sizes, dropout).to(self.device)
                for _ in range(n_members)]
        else:
            self.members = [mlp(self.features.dim, hidden_sizes, dropout).to(self.device) for _ in range(n_members)]
        torch.random.set_rng_state(gen_state)
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=lr) for m in self.members]
        self.l2_coefs = [float(l2_coef)] * n_members
        self._is_val: list[np.ndarray] = [np.zeros(0, dtype=bool) for _ in range(n_members)]
        # Input statistics (observation part only) and output statistics.
        self.in_mean = np.zeros(self.features.dim, dtype=np.float32)
        self.in_std = np.ones(self.features.dim, dtype=np.float32)
        self.member_mean = np.zeros(n_members, dtype=np.float32)
        self.member_std = np.ones(n_members, dtype=np.float32)
        self.out_mean, self.out_std = 0.0, 1.0
        self.n_fits = 0

    # ------------------------------------------------------------------ forward
    def _inputs(self, obs: np.ndarray, actions: np.ndarray) -> tuple[torch.Tensor, ...]:
        """What a member takes for rows of (o, a): ``(features,)``, or ``(uint8 images, action features)``."""
        if self.image:
            images = np.asarray(obs, dtype=np.uint8).reshape(-1, *self.features.obs_shape)
            acts = self.features.act_features(actions)
            return torch.from_numpy(images).to(self.device), torch.from_numpy(acts).to(self.device)
        x = (self.features(obs, actions) - self.in_mean) / self.in_std
        return (torch.from_numpy(x.astype(np.float32)).to(self.device),)

    def _step_rewards(self, member: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A member's r_hat per step: inputs ``[..., F]`` (or images ``[..., *obs_shape]``) -> ``[...]``."""
        if not self.image:
            return member(inputs[0]).squeeze(-1)
        images, acts = inputs
        lead = acts.shape[:-1]
        out = member(images.reshape(-1, *images.shape[len(lead):]), acts.reshape(-1, acts.shape[-1]))
        return out.reshape(lead)

    @torch.no_grad()
    def member_rewards(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """``[M, N]`` raw (unnormalised) r_hat_m(o, a) of every member, dropout off."""
        if not self.image or len(obs) <= IMAGE_CHUNK:
            return self._member_rewards(obs, actions)
        return np.concatenate([self._member_rewards(obs[s:s + IMAGE_CHUNK], actions[s:s + IMAGE_CHUNK])
                               for s in range(0, len(obs), IMAGE_CHUNK)], axis=1)

    def _member_rewards(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        inputs = self._inputs(obs, actions)
        outs = []
        for m in self.members:
            m.eval()
            outs.append(self._step_rewards(m, inputs))
        return torch.stack(outs).cpu().numpy()

    def predict(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The reward the policy optimises: normalised members, averaged, normalised again.

        This is the trainer's ``reward_fn``: ``obs [N, ...]``, ``actions [N, ...]`` -> ``[N]``.
        """
        r = self.member_rewards(obs, actions)
        r = (r - self.member_mean[:, None]) / self.member_std[:, None]
        avg = r.mean(axis=0)
        return ((avg - self.out_mean) / self.out_std).astype(np.float32)

    __call__ = predict

    def update_output_stats(self, obs: np.ndarray, actions: np.ndarray) -> None:
        """Re-measure the output statistics on states the policy visits now.

        Called after every fit: statistics gathered under the previous weights say nothing about
        the new ones, so they are recomputed on the pool's recent window rather than averaged
        over the whole run.
        """
        r = self.member_rewards(obs, actions)
        self.member_mean = r.mean(axis=1).astype(np.float32)
        self.member_std = np.maximum(r.std(axis=1), 1e-6).astype(np.float32)
        avg = ((r - self.member_mean[:, None]) / self.member_std[:, None]).mean(axis=0)
        self.out_mean = float(avg.mean())
        self.out_std = float(max(avg.std(), 1e-6))

    # ------------------------------------------------------------------ segments
    def _batch(self, segments: Sequence[Segment], length: int | None = None
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Pad segments to one length (``length``, default the longest): member inputs and ``mask [B, L]``.

        The inputs are ``(x [B, L, F],)`` normalised features, or for images ``(uint8 frames
        [B, L, *obs_shape], action features [B, L, A])``.
        """
        lmax = length or max(len(s) for s in segments)
        mask = np.zeros((len(segments), lmax), dtype=np.float32)
        for i, s in enumerate(segments):
            mask[i, : len(s)] = 1.0
        if self.image:
            frames = np.zeros((len(segments), lmax, *self.features.obs_shape), dtype=np.uint8)
            acts = np.zeros((len(segments), lmax, self.features.act_dim), dtype=np.float32)
            for i, s in enumerate(segments):
                frames[i, : len(s)] = s.obs
                acts[i, : len(s)] = self.features.act_features(s.actions)
            inputs: tuple[torch.Tensor, ...] = (torch.from_numpy(frames), torch.from_numpy(acts))
        else:
            x = np.zeros((len(segments), lmax, self.features.dim), dtype=np.float32)
            for i, s in enumerate(segments):
                x[i, : len(s)] = (self.features(s.obs, s.actions) - self.in_mean) / self.in_std
            inputs = (torch.from_numpy(x),)
        return tuple(t.to(self.device) for t in inputs), torch.from_numpy(mask).to(self.device)

    @torch.no_grad()
    def member_segment_returns(self, segments: Sequence[Segment]) -> np.ndarray:
        """``[M, B]`` sum_t r_hat_m over each segment (raw scale: the scale the loss was fitted in)."""
        chunk = PAIR_CHUNK if self.image else max(len(segments), 1)
        parts = []
        for start in range(0, len(segments), chunk):
            inputs, mask = self._batch(segments[start:start + chunk])
            out = []
            for m in self.members:
                m.eval()
                out.append(segment_returns(self._step_rewards(m, inputs), mask))
            parts.append(torch.stack(out).cpu().numpy())
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.n_members, 0), np.float32)

    def member_preferences(self, pairs: Sequence[SegmentPair]) -> np.ndarray:
        """``[M, B]`` each member's P[left > right] (without the error model)."""
        r1 = self.member_segment_returns([p.left for p in pairs])
        r2 = self.member_segment_returns([p.right for p in pairs])
        return 1.0 / (1.0 + np.exp(-np.clip(r1 - r2, -60.0, 60.0)))  # clipped: no overflow, same value

    def disagreement(self, pairs: Sequence[SegmentPair]) -> np.ndarray:
        """``[B]`` variance over members of P[left > right]: the query-selection score."""
        r1 = torch.from_numpy(self.member_segment_returns([p.left for p in pairs]))
        r2 = torch.from_numpy(self.member_segment_returns([p.right for p in pairs]))
        return ensemble_disagreement(r1, r2).numpy()

    # ------------------------------------------------------------------ fitting
    def _assign_splits(self, n: int) -> None:
        """Give each new comparison, per member, a fixed place: validation with probability 1/e."""
        for k in range(self.n_members):
            have = len(self._is_val[k])
            if n > have:
                self._is_val[k] = np.concatenate([self._is_val[k], self.rng.random(n - have) < VAL_FRACTION])

    def _split(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        is_val = self._is_val[k][:n]
        train, val = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        if len(train) == 0 or len(val) == 0:
            # Too few labels to hold any out: train and validate on everything.
            everything = np.arange(n)
            return everything, everything
        return train, val

    def _update_input_stats(self, dataset: PreferenceDataset) -> None:
        if self.image:
            return  # pixels are scaled by 1/255 in the member; no per-pixel statistics
        obs = np.concatenate([np.concatenate([p.left.obs, p.right.obs]) for p in dataset.pairs])
        acts = np.concatenate([np.concatenate([p.left.actions, p.right.actions]) for p in dataset.pairs])
        feats = self.features(obs, acts)
        d = self.features.obs_dim
        # Only observations are standardised; one-hot or bounded actions already have a sane scale.
        self.in_mean[:d] = feats[:, :d].mean(axis=0)
        self.in_std[:d] = np.maximum(feats[:, :d].std(axis=0), 1e-3)

    def _loss(self, member: nn.Module, batch: _PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        (in1, m1), (in2, m2), mu = batch
        r1 = segment_returns(self._step_rewards(member, in1), m1)
        r2 = segment_returns(self._step_rewards(member, in2), m2)
        return bradley_terry_loss(r1, r2, mu, self.error_rate), r1 - r2

    @torch.no_grad()
    def _evaluate(self, member: nn.Module, pairs: _PairSource, idx: np.ndarray) -> tuple[float, float]:
        """Mean loss and accuracy of ``member`` on comparisons ``idx`` (images in chunks of :data:`PAIR_CHUNK`)."""
        member.eval()
        chunk = PAIR_CHUNK if self.image else max(len(idx), 1)
        losses, sizes, correct = [], [], []
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            batch = pairs(part)
            loss, diff = self._loss(member, batch)
            mu = batch[2]
            losses.append(float(loss))
            sizes.append(len(part))
            decided = mu != 0.5
            correct.append(((diff > 0) == (mu > 0.5))[decided].float())
        hits = torch.cat(correct) if correct else torch.zeros(0)
        acc = float(hits.mean()) if len(hits) else float("nan")
        # One chunk (every MLP fit): its mean as it is, so the L2 adaptation sees the exact loss.
        loss = losses[0] if len(losses) == 1 else float(np.average(losses, weights=sizes))
        return loss, acc

    def _pair_source(self, dataset: PreferenceDataset) -> _PairSource:
        """``idx -> minibatch`` of comparisons: tensors built once for MLPs, per minibatch for images."""
        mu_all = torch.tensor(dataset.mu, dtype=torch.float32).to(self.device)
        if self.image:
            # Frames stay uint8 in the segments; only a minibatch is ever padded and moved.
            def build(idx: np.ndarray) -> _PairBatch:
                lefts = [dataset.pairs[int(i)].left for i in idx]
                rights = [dataset.pairs[int(i)].right for i in idx]
                lmax = max(len(s) for s in lefts + rights)
                return self._batch(lefts, lmax), self._batch(rights, lmax), mu_all[torch.from_numpy(np.asarray(idx))]
            return build
        (x1,), m1 = self._batch([p.left for p in dataset.pairs])
        (x2,), m2 = self._batch([p.right for p in dataset.pairs])
        lmax = max(x1.shape[1], x2.shape[1])
        x1, m1 = _pad_to(x1, m1, lmax)
        x2, m2 = _pad_to(x2, m2, lmax)

        def take(idx: np.ndarray) -> _PairBatch:
            b = torch.from_numpy(np.asarray(idx))
            return ((x1[b],), m1[b]), ((x2[b],), m2[b]), mu_all[b]
        return take

    def fit(self, dataset: PreferenceDataset, epochs: int = 5) -> FitStats:
        """Train every member for ``epochs`` passes over a fresh bootstrap sample of its data."""
        n = len(dataset)
        if n == 0:
            raise PreferenceError("no labelled comparisons to fit the reward model on; collect labels first")
        self._assign_splits(n)
        self._update_input_stats(dataset)
        pairs = self._pair_source(dataset)
        train_losses, val_losses, val_accs = [], [], []
        n_train = n_val = 0
        for k, (member, opt) in enumerate(zip(self.members, self.optimizers)):
            train_idx, val_idx = self._split(k, n)
            boot = self.rng.choice(train_idx, size=len(train_idx), replace=True)
            for _ in range(epochs):
                member.train()
                order = self.rng.permutation(boot)
                for start in range(0, len(order), self.batch_size):
                    loss, _ = self._loss(member, pairs(order[start : start + self.batch_size]))
                    l2 = sum((p**2).sum() for name, p in member.named_parameters() if name.endswith("weight"))
                    opt.zero_grad(set_to_none=True)
                    (loss + self.l2_coefs[k] * l2).backward()
                    opt.step()
            train_loss, _ = self._evaluate(member, pairs, train_idx)
            val_loss, val_acc = self._evaluate(member, pairs, val_idx)
            ratio = val_loss / max(train_loss, 1e-8)
            if ratio > 1.5:
                self.l2_coefs[k] *= 1.5
            elif ratio < 1.1:
                self.l2_coefs[k] /= 1.5
            train_losses.append(train_loss)
            val_losses.append(val_loss)
            val_accs.append(val_acc)
            n_train, n_val = n_train + len(train_idx), n_val + len(val_idx)
        self.n_fits += 1
        return FitStats(
            train_loss=float(np.mean(train_losses)),
            val_loss=float(np.mean(val_losses)),
            val_accuracy=float(np.nanmean(val_accs)) if not np.all(np.isnan(val_accs)) else float("nan"),
            l2_coef=float(np.mean(self.l2_coefs)),
            n_train=n_train // self.n_members,
            n_val=n_val // self.n_members,
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "members": [m.state_dict() for m in self.members],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "l2_coefs": list(self.l2_coefs),
            "is_val": [v.copy() for v in self._is_val],
            "in_mean": self.in_mean.copy(),
            "in_std": self.in_std.copy(),
            "member_mean": self.member_mean.copy(),
            "member_std": self.member_std.copy(),
            "out_mean": self.out_mean,
            "out_std": self.out_std,
            "n_fits": self.n_fits,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["members"]) != self.n_members:
            raise PreferenceError(
                f"reward model checkpoint has {len(state['members'])} members, this ensemble {self.n_members}; "
                "set ensemble_size to match"
            )
        for m, s in zip(self.members, state["members"]):
            m.load_state_dict(s)
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)
        self.l2_coefs = list(state["l2_coefs"])
        self._is_val = [np.asarray(v, dtype=bool) for v in state["is_val"]]
        self.in_mean, self.in_std = np.asarray(state["in_mean"]), np.asarray(state["in_std"])
        self.member_mean, self.member_std = np.asarray(state["member_mean"]), np.asarray(state["member_std"])
        self.out_mean, self.out_std = float(state["out_mean"]), float(state["out_std"])
        self.n_fits = int(state["n_fits"])
        self.rng.bit_generator.state = state["rng"]

    def save(self, path: str | Path) -> None:
        """Write the ensemble (weights, optimisers, statistics) atomically."""
        from palate.runs import atomic_torch_save

        atomic_torch_save(self.state_dict(), path)

    def load(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise PreferenceError(f"reward model file {path} does not exist")
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


_Side = tuple[tuple[torch.Tensor, ...], torch.Tensor]
_PairBatch = tuple[_Side, _Side, torch.Tensor]
"""One minibatch of comparisons: (left inputs, left mask), (right inputs, right mask), mu."""
_PairSource = Any
"""``idx (np.ndarray) -> _PairBatch``: how ``fit`` reads its comparisons."""


def _device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto`` (cuda when available) as a torch device, with a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PreferenceError(f"rm_device {name!r} is not a torch device; use cpu, cuda or auto") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PreferenceError(f"rm_device {name!r}: this machine has no CUDA GPU; use cpu or auto")
    return device


def _pad_to(x: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - x.shape[1]
    if extra <= 0:
        return x, mask
    x = torch.cat([x, x.new_zeros(x.shape[0], extra, x.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return x, mask

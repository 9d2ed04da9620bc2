"""Per-token KL reward shaping, the KL controllers and GAE over padded token sequences."""

import torch

from palate.core.advantages import gae_masked
from palate.core.kl import AdaptiveKLController, FixedKLController, kl_shaped_rewards
from palate.lm.generation import RolloutBatch, left_pad, response_mask_after_eos


def test_shaped_rewards_hand_values_with_padding():
    # Row 0: three generated tokens; row 1: two tokens then padding (ended at EOS).
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.7, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # kl_t = logp - ref on real tokens; r_t = -0.1 kl_t, + score at the last real token.
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.5, -0.5, 0.0]]))
    expected = torch.tensor([[-0.05, 0.1, 2.0], [-0.05, 0.05 - 1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_adaptive_controller_moves_beta_toward_target():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100, k_beta=0.1)
    up = ctl.update(kl=12.0, n_steps=10)  # KL too high -> more penalty
    assert up > 0.1
    # e is clipped to 0.2: beta * (1 + 0.1 * 0.2 * 10 / 100)
    assert abs(up - 0.1 * (1 + 0.1 * 0.2 * 10 / 100)) < 1e-12
    down = AdaptiveKLController(0.1, 6.0, 100).update(kl=3.0, n_steps=10)  # too low -> less
    # e = 3/6 - 1 = -0.5, clipped to -0.2.
    assert abs(down - 0.1 * (1 - 0.1 * 0.2 * 10 / 100)) < 1e-12
    fixed = FixedKLController(0.1)
    assert fixed.update(100.0, 10) == 0.1


def test_gae_over_tokens_ignores_padding_after_eos():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0], [0.3, 0.4, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae_masked(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 1 by hand: delta_1 = 2 - 0.4; delta_0 = 0 + 0.4 - 0.3; A_0 = delta_0 + 0.5 * A_1.
    a1 = 2.0 - 0.4
    a0 = 0.4 - 0.3 + 0.5 * a1
    torch.testing.assert_close(adv[1], torch.tensor([a0, a1, 0.0, 0.0]))
    # Row 0: the padded value 9.0 must not be bootstrapped into the last real token.
    a2 = 1.0 - 0.1
    a1 = 0.1 - 0.2 + 0.5 * a2
    a0 = 0.2 - 0.5 + 0.5 * a1
    torch.testing.assert_close(adv[0], torch.tensor([a0, a1, a2, 0.0]))
    torch.testing.assert_close(ret * mask, (adv + values) * mask)


def test_response_mask_keeps_first_eos_and_drops_the_rest():
    eos, pad = 7, 0
    ids = torch.tensor([[3, 4, eos, pad, pad], [3, 3, 3, 3, 3], [eos, 5, eos, 2, 2]])
    mask, ended = response_mask_after_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_left_pad_and_batch_layout():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    batch = RolloutBatch(ids, mask, torch.tensor([[1, 2], [3, 0]]), torch.tensor([[1, 1], [1, 0]]),
                         torch.tensor([False, True]))
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert len(batch.select(torch.tensor([1]))) == 1

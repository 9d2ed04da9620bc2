import numpy as np
import pytest
import torch
from gymnasium import spaces

from palate.errors import PreferenceError
from palate.preferences.labellers import SyntheticOracle
from palate.preferences.reward_model import PreferenceDataset, RewardEnsemble


def _labelled(linear, rng, n, oracle):
    ds = PreferenceDataset()
    for pair in linear.pairs(rng, n):
        oracle.moments.update(np.array([pair.left.true_return, pair.right.true_return]))
        ds.add(pair, {"left": 1.0, "right": 0.0}[oracle.label(pair)])
    return ds


def test_ensemble_learns_a_linear_reward(box_spaces, linear):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    oracle = SyntheticOracle(temperature=0.05, error_rate=0.1, rng=np.random.default_rng(1))
    ds = _labelled(linear, rng, 300, oracle)
    model = RewardEnsemble(*box_spaces, n_members=3, dropout=0.1, seed=0)
    stats = None
    for _ in range(2):
        stats = model.fit(ds, epochs=10)
    obs = rng.normal(size=(2000, linear.obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(2000, 2)).astype(np.float32)
    true = np.concatenate([obs, act], axis=1) @ linear.weights
    model.update_output_stats(obs, act)
    pred = model.predict(obs, act)
    assert np.corrcoef(pred, true)[0, 1] > 0.9
    # Normalised output for the policy: zero mean, unit std on the reference states.
    assert abs(pred.mean()) < 1e-4 and pred.std() == pytest.approx(1.0, rel=1e-3)
    assert stats.val_accuracy > 0.8
    assert stats.n_val > 0 and stats.n_train > stats.n_val


def test_validation_split_is_one_over_e_and_fixed(box_spaces):
    model = RewardEnsemble(*box_spaces, n_members=3, seed=3)
    model._assign_splits(3000)
    first = [v.copy() for v in model._is_val]
    for v in first:
        assert v.mean() == pytest.approx(1 / np.e, abs=0.03)
    model._assign_splits(3500)
    for before, after in zip(first, model._is_val):
        assert np.array_equal(before, after[:3000]), "a comparison must keep its split"
    assert not np.array_equal(first[0], first[1]), "members hold out different comparisons"


def test_l2_grows_when_overfitting(box_spaces, linear):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    oracle = SyntheticOracle(temperature=1.0, error_rate=0.5, rng=np.random.default_rng(1))
    ds = _labelled(linear, rng, 40, oracle)  # tiny noisy dataset: the members overfit
    model = RewardEnsemble(*box_spaces, n_members=2, dropout=0.0, l2_coef=1e-6, seed=0)
    before = list(model.l2_coefs)
    model.fit(ds, epochs=60)
    assert all(after > b for after, b in zip(model.l2_coefs, before))


def test_disagreement_and_preferences_shapes(box_spaces, linear):
    rng = np.random.default_rng(0)
    model = RewardEnsemble(*box_spaces, n_members=4, seed=0)
    pairs = linear.pairs(rng, 7)
    assert model.member_preferences(pairs).shape == (4, 7)
    d = model.disagreement(pairs)
    assert d.shape == (7,) and np.all(d >= 0)


def test_discrete_actions_are_one_hot_and_state_round_trips(tmp_path):
    obs_space = spaces.Box(-np.inf, np.inf, (3,), np.float32)
    model = RewardEnsemble(obs_space, spaces.Discrete(2), n_members=2, seed=0)
    feats = model.features(np.zeros((2, 3)), np.array([0, 1]))
    assert feats[:, 3:].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    obs = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    model.update_output_stats(obs, np.array([0, 1, 0, 1, 1]))
    model.save(tmp_path / "rm.pt")
    other = RewardEnsemble(obs_space, spaces.Discrete(2), n_members=2, seed=1)
    other.load(tmp_path / "rm.pt")
    assert np.allclose(other.predict(obs, np.zeros(5)), model.predict(obs, np.zeros(5)))


def test_fit_without_labels_and_bad_settings_raise(box_spaces):
    with pytest.raises(PreferenceError, match="no labelled comparisons"):
        RewardEnsemble(*box_spaces).fit(PreferenceDataset())
    with pytest.raises(PreferenceError, match="ensemble_size"):
        RewardEnsemble(*box_spaces, n_members=0)
    with pytest.raises(PreferenceError, match="Box observation"):
        RewardEnsemble(spaces.Discrete(3), box_spaces[1])

import keras
import numpy as np
import pytest
from backend_utils import value_and_grad

from keras_kd.losses import AttentionTransfer, FeatureMSE


def np_pool(x, f):
    b, h, w, c = x.shape
    return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


def np_at(f, p=2):
    a = (np.abs(f) ** p).mean(-1).reshape(f.shape[0], -1)
    return a / (np.linalg.norm(a, axis=-1, keepdims=True) + 1e-12)


@pytest.fixture
def maps():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(4, 8, 8, 6)).astype("float32"),
            rng.normal(size=(4, 4, 4, 3)).astype("float32"))


def test_attention_transfer_matches_numpy_with_pooling(maps):
    t, s = maps  # teacher 8x8x6, student 4x4x3: pool teacher, any channels
    expected = ((np_at(s) - np_at(np_pool(t, 2))) ** 2).mean(-1).mean()
    np.testing.assert_allclose(float(AttentionTransfer()(t, s)), expected,
                               rtol=1e-5)
    assert abs(float(AttentionTransfer()(t, t))) < 1e-8


@pytest.mark.parametrize("p", [1, 3.5])
def test_attention_transfer_other_powers_match_numpy(maps, p):
    t, s = maps
    expected = ((np_at(s, p) - np_at(np_pool(t, 2), p)) ** 2).mean(-1).mean()
    np.testing.assert_allclose(float(AttentionTransfer(p=p)(t, s)), expected,
                               rtol=1e-5)


def test_feature_mse_matches_numpy_with_pooling(maps):
    t, _ = maps
    s = np.random.default_rng(2).normal(size=(4, 4, 4, 6)).astype("float32")
    expected = ((s - np_pool(t, 2)) ** 2).mean()
    np.testing.assert_allclose(float(FeatureMSE()(t, s)), expected, rtol=1e-5)
    assert float(FeatureMSE()(t, t)) == 0.0


def test_feature_losses_honour_sample_weight(maps):
    t, s = maps
    w = np.array([1, 0, 1, 0], "float32")
    for loss in (AttentionTransfer(), FeatureMSE()):
        s_same = s if isinstance(loss, AttentionTransfer) else t
        noisy = s_same.copy()
        noisy[[1, 3]] += 100.0  # only zero-weight samples change
        np.testing.assert_allclose(
            float(loss(t, s_same, sample_weight=w)),
            float(loss(t, noisy, sample_weight=w)), rtol=1e-6)


def test_feature_losses_gradients_finite(maps):
    t, s = maps
    s_mse = np.zeros((4, 4, 4, 6), "float32") + 0.5
    _, grads = value_and_grad(
        lambda s_at, s_mse: AttentionTransfer()(t, s_at)
        + FeatureMSE()(t, s_mse), s, s_mse)
    for g in grads:
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_indivisible_spatial_sizes_raise():
    t = np.zeros((1, 6, 6, 2), "float32")
    s = np.zeros((1, 4, 4, 2), "float32")
    with pytest.raises(ValueError, match="divide"):
        FeatureMSE()(t, s)


@pytest.mark.parametrize("cls", [AttentionTransfer, FeatureMSE])
def test_feature_loss_config_round_trip(cls):
    loss = cls(name="custom")
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss))
    assert type(clone) is cls and clone.name == "custom"
    assert clone.get_config() == loss.get_config()

import keras
import numpy as np
import pytest
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import value_and_grad
from backend_utils import evaluate
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.losses import KD
from keras_kd.losses.logits import kd_loss
from keras_kd.losses.logits import standardize_logits


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kd(t, s, tau):
    lt, ls = np_log_softmax(t / tau), np_log_softmax(s / tau)
    return tau**2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()


def np_zscore(z):
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True)
                                               + 1e-7)


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(6, 7)) * 3).astype("float32"), (
        rng.normal(size=(6, 7)) * 3).astype("float32")


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_matches_numpy(logits, tau):
    t, s = logits
    np.testing.assert_allclose(float(KD(tau)(t, s)), np_kd(t, s, tau),
                               rtol=1e-5)


def test_kd_zero_and_shift_invariant(logits):
    t, s = logits
    shifts = np.arange(6, dtype="float32")[:, None] * 10.0
    assert abs(float(KD()(t, t))) < 1e-6
    assert abs(float(KD()(t, t + shifts))) < 1e-5
    np.testing.assert_allclose(float(KD()(t + shifts, s)), float(KD()(t, s)),
                               rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_standardized_kd_gradient_for_a_constant_student_row(logits,
                                                             compiled):
    # A zero-initialized head gives equal logits; sqrt'(0) made the gradient
    # NaN under XLA (and about 5e5 eagerly).
    t, _ = logits
    s = np.zeros_like(t)
    run = value_and_grad_fn(
        lambda a, b: ops.sum(kd_loss(a, b, standardize=True)), argnums=(1,))
    run = jit(run) if compiled else run
    value, (grad,) = evaluate(run(t, s))
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert np.abs(grad).max() < 10.0
    np.testing.assert_array_equal(to_numpy(standardize_logits(s)),
                                  np.zeros(s.shape))


def test_standardized_kd_uses_unbiased_std(logits):
    t, s = logits
    np.testing.assert_allclose(to_numpy(standardize_logits(t)), np_zscore(t),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(KD(2.0, standardize=True)(t, s)),
        np_kd(np_zscore(t), np_zscore(s), 2.0), rtol=1e-5)
    # Standardization makes the loss invariant to a per-row scale too.
    assert abs(float(KD(2.0, standardize=True)(t, 3.0 * t))) < 1e-5


def test_kd_sample_weight_zero_drops_sample(logits):
    t, s = logits
    w = np.array([1, 1, 1, 0, 0, 0], "float32")
    full = float(KD()(t, s, sample_weight=w))
    # Mean over the batch of the per-sample losses of the weighted samples.
    expected = np_kd(t[:3], s[:3], 4.0) * 3 / 6
    np.testing.assert_allclose(full, expected, rtol=1e-5)


def test_kd_gradient_finite_and_teacher_not_differentiated(logits):
    t, s = logits
    _, (g_t, g) = value_and_grad(KD(standardize=False), t * 100, s * 100)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    assert np.all(g_t == 0)  # the teacher gets no gradient


def test_kd_config_round_trip():
    loss = KD(temperature=2.5, standardize=True, name="zkd")
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss))
    assert isinstance(clone, KD)
    assert (clone.temperature, clone.standardize, clone.name) == (
        2.5, True, "zkd")
    with pytest.raises(ValueError, match="temperature"):
        KD(temperature=0)

import keras
import numpy as np
import pytest
from backend_utils import jit
from backend_utils import value_and_grad
from backend_utils import evaluate
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.losses import ActivationMapping, FeatureMSE
from keras_kd.losses.activation_mapping import activation_map


def np_pool(x, f):
    b, h, w, c = x.shape
    return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))


def np_map(f, pooling, normalize):
    pooled = {"avg": f.mean(-1), "max": f.max(-1),
              "avg_max": f.mean(-1) + f.max(-1)}[pooling]
    m = pooled.reshape(len(f), -1).astype("float64")
    if normalize == "sigmoid":
        z = (m - m.mean(-1, keepdims=True)) / (m.std(-1, keepdims=True) + 1e-6)
        return 1.0 / (1.0 + np.exp(-z))
    low, high = m.min(-1, keepdims=True), m.max(-1, keepdims=True)
    return (m - low) / (high - low + 1e-6)


@pytest.fixture
def maps():
    rng = np.random.default_rng(3)
    return (rng.normal(size=(4, 8, 8, 6)).astype("float32"),
            rng.normal(size=(4, 4, 4, 6)).astype("float32"))


@pytest.mark.parametrize("pooling,normalize", [
    ("avg_max", "sigmoid"), ("avg", "minmax"), ("max", "sigmoid")])
def test_matches_numpy_with_pooling(maps, pooling, normalize):
    t, s = maps  # teacher 8x8 is average-pooled to the student's 4x4
    tp = np_pool(t, 2)
    a = np_map(tp, pooling, normalize)
    d = ((s - tp) ** 2).mean(-1).reshape(len(s), -1)
    expected = (0.7 * (a * d).mean(-1) + 0.2 * ((1 - a) * d).mean(-1)).mean()
    loss = ActivationMapping(alpha=0.7, beta=0.2, pooling=pooling,
                             normalize=normalize)
    np.testing.assert_allclose(float(loss(t, s)), expected, rtol=1e-5)


def test_map_range_and_scale_invariance(maps):
    t, _ = maps
    relu = np.maximum(t, 0)
    for normalize in ("sigmoid", "minmax"):
        a = keras.ops.convert_to_numpy(activation_map(relu, "avg_max",
                                                      normalize))
        assert a.shape == (4, 64)
        assert a.min() >= 0.0 and a.max() <= 1.0
        # Non-negative features use the whole range, not just [0.5, 1).
        assert a.min() < 0.3 and a.max() > 0.7
        scaled = keras.ops.convert_to_numpy(
            activation_map(relu * 50.0, "avg_max", normalize))
        np.testing.assert_allclose(scaled, a, atol=1e-4)


def test_alpha_equal_beta_is_scaled_feature_mse(maps):
    t, s = maps
    value = float(ActivationMapping(alpha=0.5, beta=0.5)(t, s))
    np.testing.assert_allclose(value, 0.5 * float(FeatureMSE()(t, s)),
                               rtol=1e-5)


def test_beta_zero_ignores_where_teacher_is_inactive():
    rng = np.random.default_rng(4)
    t = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    t[:, 0, 0, :] = -10.0  # the teacher's weakest position: map is 0 there
    s = rng.normal(size=t.shape).astype("float32")
    moved = s.copy()
    moved[:, 0, 0, :] += 5.0
    for beta, same in ((0.0, True), (0.3, False)):
        loss = ActivationMapping(alpha=1.0, beta=beta, normalize="minmax")
        close = np.isclose(float(loss(t, s)), float(loss(t, moved)),
                           rtol=1e-6)
        assert close == same


def test_gradient_reaches_student_only(maps):
    t, s = maps
    _, (g_t, g_s) = value_and_grad(ActivationMapping(), t, s)
    assert np.all(g_t == 0)  # no gradient (None on TensorFlow and torch)
    assert np.all(np.isfinite(g_s)) and np.abs(g_s).sum() > 0


def test_sample_weight_zero(maps):
    t, s = maps
    w = np.array([1, 0, 1, 0], "float32")
    noisy = s.copy()
    noisy[[1, 3]] += 100.0
    loss = ActivationMapping()
    np.testing.assert_allclose(float(loss(t, s, sample_weight=w)),
                               float(loss(t, noisy, sample_weight=w)),
                               rtol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="channels.*\\(2, 4, 4, 6\\)"):
        ActivationMapping()(np.zeros((2, 4, 4, 6), "float32"),
                            np.zeros((2, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match="spatial axis.*\\(2, 6\\)"):
        ActivationMapping()(np.zeros((2, 6), "float32"),
                            np.zeros((2, 6), "float32"))
    with pytest.raises(ValueError, match="pooling"):
        ActivationMapping(pooling="median")
    with pytest.raises(ValueError, match="normalize"):
        ActivationMapping(normalize="softmax")
    with pytest.raises(ValueError, match="beta"):
        ActivationMapping(beta=-1.0)


def test_config_round_trip():
    loss = ActivationMapping(alpha=2.0, beta=0.0, pooling="max",
                             normalize="minmax", name="ndam")
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss))
    assert type(clone) is ActivationMapping
    assert clone.get_config() == loss.get_config()


@pytest.mark.parametrize("mode", [
    "eager",
    # A TensorFlow graph without XLA (where the gradient is ordered after
    # the value); the other backends have no such mode.
    pytest.param("graph", marks=pytest.mark.backends("tensorflow")),
    "xla",
])
def test_gradient_equals_autodiff_of_the_formula(maps, mode):
    # The loss writes its gradient out by hand (for memory); it must equal
    # plain automatic differentiation of the formula, written here with
    # keras.ops.
    t, s = maps
    t = np_pool(t, 2)  # same spatial size as the student
    weights = np.array([1.0, 0.0, 2.0, 0.5], "float32")
    attention = np_map(t, "avg_max", "sigmoid").astype("float32")
    loss = ActivationMapping(alpha=0.7, beta=0.2)

    def reference(s):
        a = ops.convert_to_tensor(attention)
        d = ops.reshape(ops.mean(ops.square(s - ops.convert_to_tensor(t)),
                                 -1), (4, -1))
        per_sample = ops.mean(0.7 * a * d + 0.2 * (1.0 - a) * d, -1)
        return ops.sum(per_sample * ops.convert_to_tensor(weights)) / 4.0

    def ours(s):
        return loss(t, s, sample_weight=weights)

    run = value_and_grad_fn(ours)
    if mode == "graph":
        import tensorflow as tf

        run = tf.function(run)
    elif mode == "xla":
        run = jit(run)
    value, (grad,) = evaluate(run(s))
    ref_value, (ref_grad,) = value_and_grad(reference, s)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert np.abs(grad[1]).max() == 0  # weight-0 sample: no grad

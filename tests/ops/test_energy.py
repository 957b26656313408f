"""`keras_kd.ops.energy.channel_energy` (the attention map of attention
transfer with p = 2, before its normalisation): values and gradients
against NumPy, eagerly and compiled, on every backend (in float32: on JAX
Keras' float64 result still differed from NumPy's at float32 precision)."""

import numpy as np
from backend_utils import evaluate
from backend_utils import jit
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.ops.energy import channel_energy


def test_channel_energy_values_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    feature = rng.normal(size=(3, 5, 4, 6)).astype("float32")
    weights = rng.normal(size=(3, 5, 4)).astype("float32")
    x, w = feature.astype("float64"), weights.astype("float64")
    expected = np.mean(x**2, axis=-1)
    expected_grad = 2.0 * x * w[..., None] / x.shape[-1]
    gradient = value_and_grad_fn(
        lambda f: ops.sum(ops.multiply(channel_energy(f), weights)))
    for run, grad in ((channel_energy, gradient),
                      (jit(channel_energy), jit(gradient))):
        value, got_grad = evaluate((run(feature), grad(feature)[1][0]))
        np.testing.assert_allclose(value, expected, rtol=1e-5)
        np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5,
                                   atol=1e-7)

"""`keras_kd.ops.energy.channel_energy` (the attention map of attention
transfer with p = 2, before its normalisation): values and gradients
against NumPy in float64, eagerly and compiled, on every backend."""

import numpy as np
from backend_utils import evaluate
from backend_utils import float64_context
from backend_utils import jit
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.ops.energy import channel_energy


def test_channel_energy_values_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    feature = rng.normal(size=(3, 5, 4, 6))
    weights = rng.normal(size=(3, 5, 4))
    expected = np.mean(feature**2, axis=-1)
    expected_grad = 2.0 * feature * weights[..., None] / feature.shape[-1]
    with float64_context():
        gradient = value_and_grad_fn(
            lambda f: ops.sum(ops.multiply(channel_energy(f), weights)))
        for run, grad in ((channel_energy, gradient),
                          (jit(channel_energy), jit(gradient))):
            value, got_grad = evaluate((run(feature), grad(feature)[1][0]))
            np.testing.assert_allclose(value, expected, rtol=1e-12)
            np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-12)

"""`keras_kd.ops.channel_affine` and the `ChannelAdapter` built on it,
against NumPy's `x @ kernel + bias` and `keras.layers.Dense`: values and
gradients, on the current backend, eagerly and compiled."""

import keras
import numpy as np
import pytest
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import value_and_grad_fn

from keras_kd.adapters import ChannelAdapter
from keras_kd.adapters import channel_adapter
from keras_kd.ops.affine import channel_affine


def arrays(shape, units, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype("float32")
    kernel = rng.normal(size=(shape[-1], units)).astype("float32")
    bias = rng.normal(size=(units,)).astype("float32")
    weights = rng.normal(size=shape[:-1] + (units,)).astype("float32")
    return x, kernel, bias, weights


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 4, 3), (2, 3, 5, 6, 4)])
def test_values_and_gradients_equal_numpy(shape, compiled):
    x, kernel, bias, weights = arrays(shape, 7)

    def loss(x, kernel, bias):
        return keras.ops.sum(channel_affine(x, kernel, bias)
                             * keras.ops.convert_to_tensor(weights))

    fn = value_and_grad_fn(loss, argnums=(0, 1, 2))
    value, (dx, dkernel, dbias) = (jit(fn) if compiled else fn)(
        x, kernel, bias)
    np.testing.assert_allclose(to_numpy(value),
                               np.sum((x @ kernel + bias) * weights),
                               rtol=1e-4)
    rows_w = weights.reshape(-1, 7)
    np.testing.assert_allclose(to_numpy(dx), weights @ kernel.T,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(dkernel),
                               x.reshape(-1, shape[-1]).T @ rows_w,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(to_numpy(dbias), rows_w.sum(0), rtol=1e-4,
                               atol=1e-5)


def test_without_bias():
    x, kernel, _, _ = arrays((2, 3, 3, 4), 5)
    np.testing.assert_allclose(to_numpy(channel_affine(x, kernel)),
                               x @ kernel, rtol=1e-5, atol=1e-6)


def test_adapter_is_dense_on_channels():
    """Same weights, same outputs as `keras.layers.Dense`; the adapter's
    weights are named as Dense's (kernel, bias)."""
    adapter = channel_adapter((None, 4, 4, 6), (None, 4, 4, 3), "a")
    assert isinstance(adapter, ChannelAdapter) and adapter.built
    assert [w.name for w in adapter.weights] == ["kernel", "bias"]
    assert channel_adapter((None, 4, 4, 6), (None, 4, 4, 6), "a") is None
    x, kernel, bias, _ = arrays((2, 4, 4, 3), 6)
    adapter.set_weights([kernel, bias])
    dense = keras.layers.Dense(6)
    dense.build((None, 4, 4, 3))
    dense.set_weights([kernel, bias])
    np.testing.assert_allclose(to_numpy(adapter(x)), to_numpy(dense(x)),
                               rtol=1e-5, atol=1e-5)
    assert adapter.compute_output_shape((None, 4, 4, 3)) == (None, 4, 4, 6)


def test_adapter_config_round_trip():
    adapter = ChannelAdapter(6, use_bias=False, name="fit", dtype="float16")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(adapter))
    assert isinstance(restored, ChannelAdapter)
    assert (restored.units, restored.use_bias, restored.name) == (
        6, False, "fit")
    assert restored.dtype_policy.name == "float16"
    restored.build((None, 3))
    assert [w.name for w in restored.weights] == ["kernel"]

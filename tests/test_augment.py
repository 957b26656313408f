import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import augment


def test_presets_are_keras_layers_active_in_training_only():
    x = np.random.default_rng(0).random((16, 12, 12, 3)).astype("float32")
    weak, strong = augment.weak(seed=1), augment.strong(seed=1)
    kinds = {type(layer).__name__ for layer in strong.layers}
    assert {type(layer).__name__ for layer in weak.layers} == {
        "RandomTranslation", "RandomFlip"}
    assert {"RandomRotation", "RandomZoom", "RandomErasing"} <= kinds
    assert "RandomFlip" not in {
        type(layer).__name__ for layer in augment.weak(flip=False).layers}
    for preset in (weak, strong):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(preset(x, training=False)), x)
        changed = keras.ops.convert_to_numpy(
            augment.apply_augmentation(preset, x))
        assert changed.shape == x.shape and not np.allclose(changed, x)
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(strong))
    assert [type(layer) for layer in again.layers] == [
        type(layer) for layer in strong.layers]


def _identity_model_and_swap():
    """A model that returns its 6 inputs as logits, data it gets 80% right,
    an augmentation that swaps two features, and the affinity it has."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype("float32")
    y = x.argmax(-1)
    y[:40] = (y[:40] + 1) % 6  # clean accuracy 0.8
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Identity()(inputs))

    def swap(batch):  # swaps the first two features
        return keras.ops.concatenate(
            [batch[:, 1:2], batch[:, 0:1], batch[:, 2:]], axis=-1)

    swapped = x.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    expected = np.mean(swapped.argmax(-1) == y) / np.mean(x.argmax(-1) == y)
    assert expected < 0.9
    return model, x, y, swap, expected


def test_affinity_is_augmented_over_clean_accuracy():
    model, x, y, swap, expected = _identity_model_and_swap()
    assert keras_kd.affinity(model, (x, y), swap, batch_size=64) == \
        pytest.approx(expected)
    assert keras_kd.affinity(model, (x, y), None) == 1.0
    with pytest.raises(ValueError, match="zero accuracy"):
        keras_kd.affinity(model, (x[:40], (x[:40].argmax(-1) + 1) % 6), swap)


def test_affinity_of_a_batched_tf_data_dataset():
    # Keras reads tf.data pipelines under every backend.
    tf = pytest.importorskip("tensorflow")
    model, x, y, swap, expected = _identity_model_and_swap()
    dataset = tf.data.Dataset.from_tensor_slices(
        (x, np.eye(6)[y])).batch(50)  # one-hot labels, batched dataset
    assert keras_kd.affinity(model, dataset, swap) == pytest.approx(expected)

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

NUM_CLASSES = 5


def make_cnn(prefix, width, classes=NUM_CLASSES, batchnorm=True,
             regularizer=None, size=8):
    """A two-stage CNN whose stages are named `<prefix>_stage1/2`."""
    inputs = keras.Input((size, size, 1), name=f"{prefix}_input")
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu",
                            name=f"{prefix}_stage1")(inputs)
    if batchnorm:
        x = keras.layers.BatchNormalization(momentum=0.5,
                                            name=f"{prefix}_bn")(x)
    x = keras.layers.MaxPooling2D(name=f"{prefix}_pool")(x)
    x = keras.layers.Conv2D(width * 2, 3, padding="same", activation="relu",
                            kernel_regularizer=regularizer,
                            name=f"{prefix}_stage2")(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_gap")(x)
    outputs = keras.layers.Dense(classes, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=prefix)


def make_token_lm(prefix, width, vocabulary=50, length=12):
    """A per-token language model: `(batch, length)` token ids (0 is
    padding, masked) to `(batch, length, vocabulary)` logits."""
    inputs = keras.Input((length,), dtype="int32", name=f"{prefix}_tokens")
    x = keras.layers.Embedding(vocabulary, width, mask_zero=True,
                               name=f"{prefix}_embedding")(inputs)
    x = keras.layers.Dense(width, activation="tanh",
                           name=f"{prefix}_hidden")(x)
    outputs = keras.layers.Dense(
        vocabulary, name=f"{prefix}_logits",
        kernel_initializer=keras.initializers.RandomNormal(stddev=1.0))(x)
    return keras.Model(inputs, outputs, name=prefix)


def uneven_tokens(vocabulary=50, length=12):
    """16 padded sequences and their token weights; the first half of the
    batch is much shorter than the second, so that two replicas hold very
    different numbers of real tokens."""
    lengths = np.array([2, 3, 1, 4, 2, 3, 2, 1,
                        12, 12, 10, 12, 12, 11, 12, 12]) * length // 12
    weights = (np.arange(length)[None] < np.maximum(lengths, 1)[:, None])
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocabulary, (len(lengths), length)) * weights
    return x.astype("int32"), weights.astype("float32")


def assert_augmented_once_per_training_step(distiller, augmentations,
                                            x, y):
    """Fits `distiller` for 4 steps and evaluates it, and checks that the
    seed generators of `augmentations` advanced exactly as 4 calls each
    would advance them: once per training step, never in evaluation."""
    def seeds():
        return [keras.ops.convert_to_numpy(v).astype("int64")
                for aug in augmentations for v in aug.non_trainable_variables]

    before = seeds()
    assert before
    distiller.fit(x, y, batch_size=len(x) // 4, epochs=1, verbose=0)
    distiller.evaluate(x, y, batch_size=len(x) // 4, verbose=0)
    after = seeds()
    # What one call of each augmentation draws.
    for aug in augmentations:
        aug(x[:2], training=True)
    per_call = [b - a for a, b in zip(after, seeds())]
    assert all(np.any(p) for p in per_call)
    for a, b, p in zip(before, after, per_call):
        np.testing.assert_array_equal(b - a, 4 * p)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=32)
    return x, y


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backends(*names): run the test only on these Keras backends "
        "(tensorflow, jax, torch); it is skipped on the others.")


def pytest_runtest_setup(item):
    for marker in item.iter_markers(name="backends"):
        if keras.backend.backend() not in marker.args:
            pytest.skip(f"runs on {', '.join(marker.args)} only, not on "
                        f"{keras.backend.backend()}")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1)
    yield
    # Without the full garbage collection of `free_memory=True`, which costs
    # about a second per test late in a run (a large heap), most on JAX;
    # Python's own collector still runs.
    keras.backend.clear_session(free_memory=False)

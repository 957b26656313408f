"""The epoch value a `Distiller` logs for a token divergence under sample
weights: the mean over the epoch's tokens weighted by mask times
`sample_weight` (each batch weighs by its `log_weight`, the sum of its
token weights). On every backend."""

import keras
import numpy as np

from backend_utils import to_numpy
from keras_kd import Distiller, Term
from keras_kd.losses import ForwardKL

VOCAB = 11


def token_model(name, units, seed):
    """Tokens -> Embedding(mask_zero) -> logits; token 0 is padding. The
    weights come from NumPy, so every backend computes the same values."""
    inputs = keras.Input((None,), dtype="int32", name=f"{name}_tokens")
    x = keras.layers.Embedding(VOCAB, units, mask_zero=True,
                               name=f"{name}_embedding")(inputs)
    outputs = keras.layers.Dense(VOCAB, name=f"{name}_logits")(x)
    model = keras.Model(inputs, outputs, name=name)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


def np_forward_kl(t, s):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(t.astype("float64")), log_softmax(s.astype("float64"))
    return (np.exp(lt) * (lt - ls)).sum(-1)


def test_fit_logs_the_sample_weighted_token_mean_of_the_epoch():
    teacher, student = token_model("t", 6, 1), token_model("s", 3, 2)
    rng = np.random.default_rng(0)
    lengths = [8, 2, 5, 8, 1, 7, 3, 8, 4, 6]
    tokens = rng.integers(1, VOCAB, size=(10, 8))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    tokens = tokens.astype("int32")
    sample_weight = np.array([3.0, 0.5, 1.0, 0.0, 2.0, 0.2, 4.0, 1.0, 0.1,
                              5.0], "float32")
    distiller = Distiller(teacher, student,
                          terms=[Term(ForwardKL(chunk_size=3))])
    # A zero learning rate: the models the batches saw are the final ones.
    distiller.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    # Keras drops `sample_weight` from a batch without targets, so the
    # tokens stand in for them (no student loss reads them).
    history = distiller.fit(tokens, tokens, sample_weight=sample_weight,
                            batch_size=4, epochs=1, shuffle=False, verbose=0)
    logged = history.history["forward_kl_loss"][0]

    per_token = np_forward_kl(to_numpy(teacher(tokens)),
                              to_numpy(student(tokens)))
    weights = (tokens != 0) * sample_weight[:, None].astype("float64")
    expected = (weights * per_token).sum() / weights.sum()
    # The test can tell: batches weighed by their unweighted token counts
    # (a `log_weight` that ignored `sample_weight`) give another value.
    batches = (slice(0, 4), slice(4, 8), slice(8, 10))
    means = [(weights[b] * per_token[b]).sum() / weights[b].sum()
             for b in batches]
    counts = [(tokens[b] != 0).sum() for b in batches]
    by_count = np.dot(means, counts) / sum(counts)
    assert abs(by_count - expected) > 0.05 * expected
    np.testing.assert_allclose(logged, expected, rtol=1e-4)

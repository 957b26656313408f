"""Token-level divergences in the Distiller: masked sequence models, the
history's token means, vocabulary checks and the LM-head fused form."""

import keras
import numpy as np
import pytest

from backend_utils import to_numpy
from keras_kd import Distiller, Term
from keras_kd.losses import KD, ForwardKL, GeneralizedJSD

VOCAB = 13


def token_model(name, units, vocab=VOCAB, hidden_only=False):
    """Tokens -> Embedding(mask_zero) -> Dense(tanh) -> logits, or the
    hidden states (`hidden_only`); token 0 is padding."""
    inputs = keras.Input((None,), dtype="int32", name=f"{name}_tokens")
    embedding = keras.layers.Embedding(vocab, units, mask_zero=True,
                                       name=f"{name}_embedding")
    x = embedding(inputs)
    x = keras.layers.Dense(units, activation="tanh", name=f"{name}_hidden")(x)
    if hidden_only:
        return keras.Model(inputs, x, name=name), embedding
    outputs = keras.layers.Dense(
        vocab, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name=f"{name}_logits")(x)
    return keras.Model(inputs, outputs, name=name)


def padded_tokens(lengths, length=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(len(lengths), length))
    for row, n in enumerate(lengths):
        tokens[row, n:] = 0
    return tokens.astype("int32")


def np_forward_kl(t, s):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(t.astype("float64")), log_softmax(s.astype("float64"))
    return (np.exp(lt) * (lt - ls)).sum(-1)


def test_history_is_the_token_mean_of_the_epoch():
    teacher, student = token_model("t", 8), token_model("s", 4)
    # Two batches of 4 and 2 sequences with very different token counts.
    tokens = padded_tokens([8, 8, 8, 8, 1, 2])
    distiller = Distiller(teacher, student,
                          terms=[Term(ForwardKL(chunk_size=3))])
    distiller.compile(optimizer="sgd")
    logs = distiller.evaluate(tokens, batch_size=4, return_dict=True,
                              verbose=0)
    per = np_forward_kl(to_numpy(teacher(tokens)), to_numpy(student(tokens)))
    mask = (tokens != 0).astype("float64")
    token_mean = (per * mask).sum() / mask.sum()
    batch_means = [(per[b] * mask[b]).sum() / mask[b].sum()
                   for b in (slice(0, 4), slice(4, 6))]
    by_batch_size = (4 * batch_means[0] + 2 * batch_means[1]) / 6
    assert abs(token_mean - by_batch_size) > 0.02 * token_mean
    np.testing.assert_allclose(logs["forward_kl_loss"], token_mean,
                               rtol=1e-4)


def test_masked_sequence_model_distils():
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8, 2, 6, 8, 4], seed=1)
    distiller = Distiller(teacher, student, terms=[
        Term(GeneralizedJSD(beta=0.5, chunk_size=3))])
    distiller.compile(optimizer=keras.optimizers.Adam(0.05))
    history = distiller.fit(tokens, batch_size=4, epochs=8, verbose=0)
    losses = history.history["generalized_jsd_loss"]
    assert losses[-1] < 0.7 * losses[0]


def test_vocabulary_sizes_are_checked_at_construction():
    teacher = token_model("t", 8, vocab=VOCAB + 3)
    student = token_model("s", 4)
    with pytest.raises(ValueError, match=f"{VOCAB + 3} and {VOCAB} entries"):
        Distiller(teacher, student, terms=[Term(KD())])
    with pytest.raises(ValueError, match=f"{VOCAB + 3} entries.*has {VOCAB}"):
        Distiller(teacher, student, terms=[Term(ForwardKL())])
    distiller = Distiller(teacher, student, terms=[
        Term(ForwardKL(vocab_mapping="truncate", chunk_size=4))])
    distiller.compile(optimizer="sgd")
    logs = distiller.evaluate(padded_tokens([8, 5]), return_dict=True,
                              verbose=0)
    assert np.isfinite(logs["forward_kl_loss"])


def test_fused_lm_head_in_the_distiller():
    teacher = token_model("t", 8)
    # The student outputs its hidden states; its tied input embedding is
    # the LM head, applied chunk by chunk inside the loss.
    student, embedding = token_model("s", 8, hidden_only=True)
    tokens = padded_tokens([8, 3, 5, 8], seed=2)
    fused = ForwardKL(chunk_size=3, lm_head=embedding)
    distiller = Distiller(teacher, student, terms=[Term(fused)])
    distiller.compile(optimizer=keras.optimizers.Adam(0.05))
    before = to_numpy(embedding.embeddings.value).copy()
    history = distiller.fit(tokens, batch_size=4, epochs=6, verbose=0)
    assert not np.allclose(to_numpy(embedding.embeddings.value), before)
    losses = history.history["forward_kl_loss"]
    assert losses[-1] < losses[0]
    # The same value as the unfused loss on the student's logits.
    logits = keras.ops.matmul(student(tokens),
                              keras.ops.transpose(embedding.embeddings))
    np.testing.assert_allclose(
        float(to_numpy(fused(teacher(tokens), student(tokens)))),
        float(to_numpy(ForwardKL()(teacher(tokens), logits,
                                   sample_weight=tokens != 0))), rtol=1e-5)
    small, small_embedding = token_model("s2", 8, vocab=VOCAB - 2,
                                         hidden_only=True)
    with pytest.raises(ValueError, match=f"{VOCAB} entries.*has {VOCAB - 2}"):
        Distiller(teacher, small, terms=[
            Term(ForwardKL(lm_head=small_embedding))])

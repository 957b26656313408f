"""Per-token top-k teacher caches (issue 16, point 6): (batch, time, vocab)
teacher logits stored as each token's top-k log-probabilities, indices and
tail mass, read by the token divergences in their sparse form."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, Term
from keras_kd.cache import TeacherCache
from keras_kd.losses import KD, ForwardKL, ReverseKL
from keras_kd.teachers import Teachers

from backend_utils import to_numpy
from test_language_models import VOCAB, padded_tokens, token_model

BATCH = 4


def log_softmax(z):
    z = np.asarray(z, "float64")
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def clone(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def compiled(teacher, student, loss=None, **kwargs):
    d = Distiller(teacher, clone(student),
                  terms=[Term(loss if loss is not None else ForwardKL())],
                  **kwargs)
    d.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
    return d


def cache_of(teacher, tokens, **kwargs):
    return keras_kd.cache_teacher_outputs(teacher, tokens, batch_size=BATCH,
                                          verbose=0, **kwargs)


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(a.get_weights(), b.get_weights()))


def test_cache_stores_each_tokens_top_k_and_tail_mass():
    teacher = token_model("t", 8)
    tokens = padded_tokens([8, 3, 5, 8], seed=2)
    cache = cache_of(teacher, tokens, top_k=4, temperature=2.0)
    arrays = cache.arrays
    assert set(arrays) == {"log_probs", "indices", "tail_mass"}
    assert arrays["log_probs"].shape == (4, 8, 4)
    assert arrays["log_probs"].dtype == np.float16
    assert arrays["indices"].dtype == np.int16
    assert arrays["tail_mass"].shape == (4, 8)
    assert arrays["tail_mass"].dtype == np.float32
    assert cache.tag.endswith(
        f"_tokens_tau2.0_i{int(arrays['indices'].max())}")

    reference = log_softmax(to_numpy(teacher(tokens)) / 2.0)
    top = np.argsort(-reference, axis=-1, kind="stable")[..., :4]
    np.testing.assert_array_equal(arrays["indices"], top)
    np.testing.assert_allclose(
        arrays["log_probs"], np.take_along_axis(reference, top, -1),
        rtol=1e-3, atol=1e-3)
    tail = 1.0 - np.exp(np.take_along_axis(reference, top, -1)).sum(-1)
    np.testing.assert_allclose(arrays["tail_mass"], tail, rtol=1e-5,
                               atol=1e-7)
    assert tail.min() > 0.05  # a real tail at k = 4 of 13


def test_top_k_equal_to_vocab_trains_as_the_live_teacher(monkeypatch):
    """At k = V the sparse teacher is the dense one, up to its float16
    log-probabilities: same history and weights as the live teacher, with
    the padding masked alike."""
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8, 2, 6, 8, 4], seed=1)
    cache = cache_of(teacher, tokens, top_k=VOCAB)
    live = compiled(teacher, student)
    cached = compiled(teacher, student)
    fit = dict(batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    live_history = live.fit(tokens, **fit).history

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(Teachers, "__call__", no_teacher)
    cached_history = cached.fit(cache.inputs(tokens), **fit).history
    monkeypatch.undo()
    assert max_difference(live.student, student) > 1e-2  # it trained
    assert max_difference(live.student, cached.student) <= 1e-3
    # Values about 3e-3: the float16 log-probabilities (spacing 2e-3 near
    # log p = -2.6) shift them by up to about 1e-4.
    np.testing.assert_allclose(cached_history["forward_kl_loss"],
                               live_history["forward_kl_loss"], atol=2e-4)



@pytest.mark.parametrize("ensemble", ["logits", "losses"])
def test_top_k_cache_of_two_teachers_trains_as_the_live_ensemble(
        monkeypatch, ensemble):
    """Two teachers: `ensemble="losses"` stores each teacher's top-k and
    averages the divergences over them; `"logits"` stores the top-k of the
    averaged logits. At k = V either trains as the live ensemble."""
    teachers = [token_model("t1", 8), token_model("t2", 8)]
    student = token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8, 2, 6, 8, 4], seed=3)
    cache = cache_of(teachers, tokens, top_k=VOCAB, ensemble=ensemble)
    assert cache.arrays["log_probs"].shape == (
        (8, 2, 8, VOCAB) if ensemble == "losses" else (8, 8, VOCAB))
    live = compiled(teachers, student, ensemble=ensemble)
    cached = compiled(teachers, student, ensemble=ensemble)
    fit = dict(batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
    live_history = live.fit(tokens, **fit).history

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(Teachers, "__call__", no_teacher)
    cached_history = cached.fit(cache.inputs(tokens), **fit).history
    monkeypatch.undo()
    assert max_difference(live.student, student) > 1e-2  # it trained
    assert max_difference(live.student, cached.student) <= 1e-3
    np.testing.assert_allclose(cached_history["forward_kl_loss"],
                               live_history["forward_kl_loss"], atol=2e-4)

def np_sparse_kl(indices, log_t, tail_t, student_logits, reverse=False):
    """KL on the k + 1 bins (top-k tokens, then the rest), in NumPy."""
    log_s = log_softmax(student_logits)
    picked = np.take_along_axis(log_s, indices.astype(int), -1)
    in_top = np.zeros(log_s.shape, bool)
    np.put_along_axis(in_top, indices.astype(int), True, -1)
    tail_s = np.log(np.where(in_top, 0.0, np.exp(log_s)).sum(-1))
    p = np.concatenate([log_t.astype("float64"),
                        np.log(tail_t.astype("float64"))[..., None]], -1)
    q = np.concatenate([picked, tail_s[..., None]], -1)
    if reverse:
        p, q = q, p
    return (np.exp(p) * (p - q)).sum(-1)


@pytest.mark.parametrize("loss_class", [ForwardKL, ReverseKL])
def test_top_k_cache_reads_the_k_plus_one_bins(loss_class):
    """Below k = V the divergences compare the teacher's top-k tokens and
    its tail bucket with the student's; the value is the masked token
    mean."""
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8], seed=3)
    cache = cache_of(teacher, tokens, top_k=3, temperature=2.0)
    d = compiled(teacher, student, loss_class(temperature=2.0))
    logs = d.evaluate(cache.inputs(tokens), batch_size=BATCH,
                      return_dict=True, verbose=0)
    arrays = cache.arrays
    per = 4.0 * np_sparse_kl(arrays["indices"], arrays["log_probs"],
                             arrays["tail_mass"],
                             to_numpy(student(tokens)) / 2.0,
                             reverse=loss_class is ReverseKL)
    mask = tokens != 0
    expected = per[mask].mean()
    name = f"{loss_class(temperature=2.0).name}_loss"
    np.testing.assert_allclose(logs[name], expected, rtol=5e-4)
    # Not the dense value: the tail bucket changes it.
    dense = d.evaluate(tokens, batch_size=BATCH, return_dict=True,
                       verbose=0)[name]
    assert abs(dense - expected) > 1e-3 * expected


def test_top_k_cache_distils_and_reloads(tmp_path):
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8, 2, 6, 8, 4], seed=4)
    cache = cache_of(teacher, tokens, top_k=4, directory=tmp_path / "c")
    loaded = TeacherCache.load(tmp_path / "c")
    assert loaded.tag == cache.tag
    np.testing.assert_array_equal(loaded.arrays["tail_mass"],
                                  cache.arrays["tail_mass"])
    d = Distiller(teacher, clone(student), terms=[Term(ForwardKL())])
    d.compile(optimizer=keras.optimizers.Adam(0.05))
    history = d.fit(loaded.dataset(tokens, batch_size=BATCH), epochs=8,
                    verbose=0).history["forward_kl_loss"]
    assert history[-1] < 0.7 * history[0]


def test_per_token_caches_are_checked():
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8], seed=5)
    cache = cache_of(teacher, tokens, top_k=4)
    with pytest.raises(ValueError, match="term 'kd' reads it with KD"):
        compiled(teacher, student, KD()).fit(cache.inputs(tokens), verbose=0)
    with pytest.raises(ValueError, match="cannot be re-softened"):
        compiled(teacher, student, ForwardKL(temperature=2.0)).fit(
            cache.inputs(tokens), verbose=0)
    with pytest.raises(ValueError, match="diagnostics compare full"):
        compiled(teacher, student, diagnostics=["top1_agreement"]).fit(
            cache.inputs(tokens), verbose=0)
    wide_teacher = token_model("w", 8, vocab=VOCAB + 3)
    wide = cache_of(wide_teacher, tokens, top_k=4)
    with pytest.raises(ValueError, match="predicts 13"):
        compiled(wide_teacher, student,
                 ForwardKL(vocab_mapping="truncate")).fit(
            wide.inputs(tokens), verbose=0)
    with pytest.raises(ValueError, match="at most the vocabulary size"):
        cache_of(teacher, tokens, top_k=VOCAB + 1)
    with pytest.raises(ValueError, match="per-token top-k caches only"):
        cache_of(teacher, tokens, temperature=2.0)


def test_cached_token_ids_beyond_the_students_vocabulary_are_refused():
    """The manifest records the largest cached token id; a cache whose ids
    reach past the student's vocabulary (a damaged or hand-made one: on
    JAX the divergence would be NaN, silently) is refused before the first
    step, naming both sizes. A manifest without it reads the indices."""
    teacher, student = token_model("t", 8), token_model("s", 4)
    tokens = padded_tokens([8, 3, 5, 8], seed=5)
    cache = cache_of(teacher, tokens, top_k=4)
    assert cache.manifest["max_index"] == int(cache.arrays["indices"].max())
    assert cache.tag.endswith(f"_i{cache.manifest['max_index']}")
    indices = np.array(cache.arrays["indices"])
    indices[1, 2, 0] = VOCAB + 2
    manifest = dict(cache.manifest)
    del manifest["max_index"]  # as in a cache written without it
    damaged = TeacherCache(manifest, dict(cache.arrays, indices=indices))
    assert damaged.max_index == VOCAB + 2
    d = compiled(teacher, student)
    before = d.student.get_weights()
    with pytest.raises(ValueError, match=(
            f"token ids up to {VOCAB + 2}, but the student 's' of the term "
            f"'forward_kl' predicts {VOCAB} tokens")):
        d.fit(damaged.inputs(tokens), batch_size=BATCH, verbose=0)
    assert all(np.array_equal(a, b)
               for a, b in zip(before, d.student.get_weights()))
    d.fit(cache.inputs(tokens), batch_size=BATCH, verbose=0)

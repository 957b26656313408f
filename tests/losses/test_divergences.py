"""Token-level divergences: NumPy references per direction and endpoint,
the token-mean reduction under masks and weights, chunking, the LM-head
fused form, sparse top-k teachers and vocabulary checks. On every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from backend_utils import jit, to_numpy, value_and_grad
from keras_kd.losses import (
    KD,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    TopKDistribution,
    top_k_distribution,
)
from keras_kd.losses.chunking import divergence_loss
from keras_kd.ops.divergences import forward_kl


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def np_mix(log_p, log_q, w):
    return np.log(w * np.exp(log_p) + (1 - w) * np.exp(log_q))


def np_divergence(kind, t, s, tau=1.0, **kw):
    """Per-position reference in float64: `tau^2 * D(p_t, p_s)`."""
    lt = np_log_softmax(t.astype("float64") / tau)
    ls = np_log_softmax(s.astype("float64") / tau)
    if kind == "forward":
        value = np_kl(lt, ls)
    elif kind == "reverse":
        value = np_kl(ls, lt)
    elif kind == "jsd":  # GKD's JSD(beta): m = beta p_t + (1 - beta) p_s
        beta = kw["beta"]
        m = np_mix(lt, ls, beta)
        value = beta * np_kl(lt, m) + (1 - beta) * np_kl(ls, m)
    elif kind == "skew":
        a = kw["alpha"]
        value = np_kl(lt, np_mix(lt, ls, a))
    elif kind == "skew_reverse":
        a = kw["alpha"]
        value = np_kl(ls, np_mix(ls, lt, a))
    return tau**2 * value


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    # A peaked teacher and a flatter student: KL's directions differ.
    t = (rng.normal(size=(3, 7, 11)) * 3).astype("float32")
    s = (rng.normal(size=(3, 7, 11)) * 1).astype("float32")
    return t, s


def value(loss, t, s, sample_weight=None):
    return float(to_numpy(loss(t, s, sample_weight=sample_weight)))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_directions_match_numpy(logits, tau):
    t, s = logits
    forward = np_divergence("forward", t, s, tau).mean()
    reverse = np_divergence("reverse", t, s, tau).mean()
    assert abs(forward - reverse) > 0.1  # the directions are told apart
    np.testing.assert_allclose(value(ForwardKL(tau), t, s), forward,
                               rtol=1e-5)
    np.testing.assert_allclose(value(ReverseKL(tau), t, s), reverse,
                               rtol=1e-5)


def test_generalized_jsd_endpoints_and_scaling(logits):
    t, s = logits
    forward = np_divergence("forward", t, s).mean()
    reverse = np_divergence("reverse", t, s).mean()
    # The endpoints are exactly forward and reverse KL.
    np.testing.assert_allclose(value(GeneralizedJSD(beta=0.0), t, s),
                               forward, rtol=1e-5)
    np.testing.assert_allclose(value(GeneralizedJSD(beta=1.0), t, s),
                               reverse, rtol=1e-5)
    # In between: GKD's JSD(beta) / (beta (1 - beta)), or GKD's itself.
    for beta in (0.1, 0.5, 0.9):
        raw = np_divergence("jsd", t, s, beta=beta).mean()
        np.testing.assert_allclose(
            value(GeneralizedJSD(beta=beta), t, s),
            raw / (beta * (1 - beta)), rtol=1e-4)
        np.testing.assert_allclose(
            value(GeneralizedJSD(beta=beta, normalized=False), t, s), raw,
            rtol=1e-4)
    # Continuous at the endpoints: the scaling makes the limits the KLs
    # (the convergence is slow where one distribution is tiny, hence milder
    # logits here).
    t = t / 3
    np.testing.assert_allclose(value(GeneralizedJSD(beta=1e-3), t, s),
                               np_divergence("forward", t, s).mean(),
                               rtol=1e-2)
    np.testing.assert_allclose(value(GeneralizedJSD(beta=1 - 1e-3), t, s),
                               np_divergence("reverse", t, s).mean(),
                               rtol=1e-2)
    with pytest.raises(ValueError, match="normalized=False"):
        GeneralizedJSD(beta=0.0, normalized=False)


def test_skew_kl_matches_numpy(logits):
    t, s = logits
    np.testing.assert_allclose(value(SkewKL(alpha=0.0), t, s),
                               np_divergence("forward", t, s).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(value(SkewKL(alpha=0.0, reverse=True), t, s),
                               np_divergence("reverse", t, s).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(value(SkewKL(alpha=0.3), t, s),
                               np_divergence("skew", t, s, alpha=0.3).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(
        value(SkewKL(alpha=0.3, reverse=True, temperature=2.0), t, s),
        np_divergence("skew_reverse", t, s, 2.0, alpha=0.3).mean(),
        rtol=1e-5)


def test_classifier_logits_and_kd(logits):
    t, s = logits[0][:, 0], logits[1][:, 0]  # (batch, classes)
    np.testing.assert_allclose(
        value(ForwardKL(4.0, reduction="sum_over_batch_size"), t, s),
        value(KD(4.0), t, s), rtol=1e-5)
    np.testing.assert_allclose(value(ReverseKL(), t, s),
                               np_divergence("reverse", t, s).mean(),
                               rtol=1e-5)


def test_token_mean_over_unmasked_tokens(logits):
    t, s = logits
    lengths = [7, 2, 4]  # uneven padding
    w = np.array([[1.0] * n + [0.0] * (7 - n) for n in lengths], "float32")
    per = np_divergence("forward", t, s)
    token_mean = (per * w).sum() / w.sum()
    per_sequence = np.mean([(p * m).sum() / m.sum() for p, m in zip(per, w)])
    keras_default = (per * w).sum() / w.size  # sum_over_batch_size
    assert min(abs(token_mean - per_sequence),
               abs(token_mean - keras_default)) > 0.05
    np.testing.assert_allclose(value(ForwardKL(), t, s, w), token_mean,
                               rtol=1e-5)
    for chunk in (1, 3, 5):
        np.testing.assert_allclose(
            value(ForwardKL(chunk_size=chunk), t, s, w), token_mean,
            rtol=1e-5)
    # A (batch,) weight weighs every token of its sequence.
    seq_w = np.array([1.0, 0.0, 2.0], "float32")
    full = np.broadcast_to(seq_w[:, None], per.shape)
    np.testing.assert_allclose(value(ReverseKL(), t, s, seq_w),
                               (np_divergence("reverse", t, s) * full).sum()
                               / full.sum(), rtol=1e-5)
    # Nothing unmasked: 0, not NaN.
    assert value(ForwardKL(), t, s, np.zeros_like(w)) == 0.0


def masked_lm(vocab=11, units=8, name="lm"):
    """An embedding with `mask_zero=True` (token 0 is padding) and a dense
    head: the logits carry the padding mask."""
    inputs = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(vocab, units, mask_zero=True)(inputs)
    x = keras.layers.Dense(units, activation="tanh")(x)
    outputs = keras.layers.Dense(
        vocab, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0),
        name=f"{name}_logits")(x)
    return keras.Model(inputs, outputs, name=name)


def padded_tokens():
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 11, size=(3, 7)).astype("int32")
    for row, n in enumerate([7, 2, 4]):
        tokens[row, n:] = 0
    return tokens


def test_keras_mask_is_honoured():
    tokens = padded_tokens()
    teacher, student = masked_lm(name="t"), masked_lm(name="s")
    t = teacher(tokens)
    s = student(tokens)
    mask = (tokens != 0).astype("float32")
    per = np_divergence("forward", to_numpy(t), to_numpy(s))
    expected = (per * mask).sum() / mask.sum()
    assert abs(expected - per.mean()) > 0.01 * expected
    # These two untrained models nearly agree: a KL near 5e-3 is a
    # difference of float32 log-probabilities near -2.4, which alone carries
    # relative errors up to 2e-5 (NumPy in float32 too). 1e-4 still sits far
    # below the 1% that ignoring the mask would move the value.
    np.testing.assert_allclose(value(ForwardKL(chunk_size=3), t, s),
                               expected, rtol=1e-4)
    # The mask and a sample weight combine.
    w = np.array([[2.0] * 7, [1.0] * 7, [0.5] * 7], "float32")
    np.testing.assert_allclose(value(ForwardKL(), t, s, w),
                               (per * mask * w).sum() / (mask * w).sum(),
                               rtol=1e-4)


PADDING = np.array([[1.0] * 7, [1.0] * 2 + [0.0] * 5, [1.0] * 4 + [0.0] * 3],
                   "float32")


def test_chunking_changes_neither_value_nor_gradient(logits):
    t, s = logits
    for loss in (ForwardKL(temperature=1.5), ReverseKL(),
                 GeneralizedJSD(beta=0.3), SkewKL(alpha=0.2, reverse=True)):
        results = []
        for chunk in (None, 3):  # 7 = 3 + 3 + 1
            loss.chunk_size = chunk
            results.append(value_and_grad(
                lambda a, b, c: loss(a, b, sample_weight=c), t, s, PADDING))
        (ref, (_, ref_grad, _)), (got, (t_grad, grad, _)) = results
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
        assert not np.any(t_grad)  # the teacher is not differentiated
        assert np.abs(ref_grad[1, 2:]).max() == 0.0  # padding: no gradient


@pytest.mark.backends("jax")  # TensorFlow's XLA compile takes ~10 s more
def test_chunking_compiles(logits):
    t, s = logits
    chunked = ForwardKL(chunk_size=2)
    fn = jit(lambda a, b, c: chunked(a, b, sample_weight=c))
    got, (_, grad, _) = value_and_grad(fn, t, s, PADDING)
    ref, (_, ref_grad, _) = value_and_grad(
        lambda a, b, c: ForwardKL()(a, b, sample_weight=c), t, s, PADDING)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_half_precision_inputs(logits):
    t, s = logits
    half = ForwardKL(chunk_size=3)(ops.cast(t, "float16"),
                                   ops.cast(s, "float16"))
    np.testing.assert_allclose(float(to_numpy(half)),
                               np_divergence("forward", t, s).mean(),
                               rtol=2e-3)


def test_top_k_teacher_equals_dense_loss_at_full_k(logits):
    t, s = logits
    sparse = top_k_distribution(t, 11, temperature=2.0, dtype="float32")
    half = top_k_distribution(t, 11, temperature=2.0)  # as a cache keeps it
    for loss in (ForwardKL(temperature=2.0, chunk_size=3),
                 GeneralizedJSD(beta=0.4, temperature=2.0)):
        dense_value, (dense_grad,) = value_and_grad(
            lambda b: loss(t, b, sample_weight=PADDING), s)
        sparse_value, (sparse_grad,) = value_and_grad(
            lambda b: loss(sparse, b, sample_weight=PADDING), s)
        np.testing.assert_allclose(sparse_value, dense_value, rtol=1e-5)
        np.testing.assert_allclose(sparse_grad, dense_grad, rtol=1e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(value(loss, half, s, PADDING),
                                   dense_value, rtol=2e-3)


def test_top_k_teacher_is_the_k_plus_one_bin_divergence(logits):
    t, s = logits
    k = 3
    lt = np_log_softmax(t.astype("float64"))
    ls = np_log_softmax(s.astype("float64"))
    top = np.argsort(-lt, axis=-1)[..., :k]
    pt, ps = np.exp(lt), np.exp(ls)
    bins_t = np.take_along_axis(pt, top, -1)
    bins_s = np.take_along_axis(ps, top, -1)
    bins_t = np.concatenate([bins_t, 1 - bins_t.sum(-1, keepdims=True)], -1)
    bins_s = np.concatenate([bins_s, 1 - bins_s.sum(-1, keepdims=True)], -1)
    expected = np_kl(np.log(bins_t), np.log(bins_s)).mean()
    sparse = top_k_distribution(t, k, dtype="float32")
    assert isinstance(sparse, TopKDistribution)
    np.testing.assert_array_equal(to_numpy(sparse.indices), top)
    np.testing.assert_allclose(value(ForwardKL(chunk_size=2), sparse, s),
                               expected, rtol=1e-5)
    dense = np_divergence("forward", t, s).mean()
    assert expected < dense  # coarser bins: a lower bound


def test_top_k_teacher_gradient_is_that_of_the_k_plus_one_bins(logits):
    """Below the full vocabulary, the student's bins of a sparse teacher
    (read without its full log-softmax, `keras_kd.ops.topk`) give the value
    and gradient of the divergence between the bins taken from both full
    log-softmaxes, chunked or not, compiled or not."""
    t, s = logits
    k, tau = 4, 2.0
    sparse = top_k_distribution(t, k, temperature=tau, dtype="float32")
    indices = ops.convert_to_tensor(sparse.indices)

    def bins(log_p):
        picked = ops.take_along_axis(log_p, indices, axis=-1)
        columns = ops.arange(log_p.shape[-1], dtype="int32")
        listed = ops.any(ops.equal(columns[:, None], indices[..., None, :]),
                         axis=-1)
        rest = ops.logsumexp(ops.where(listed, -1e30, log_p), axis=-1)
        return ops.concatenate([picked, rest[..., None]], axis=-1)

    for loss in (ForwardKL(temperature=tau), ReverseKL(temperature=tau),
                 GeneralizedJSD(beta=0.3, temperature=tau)):
        def reference(b, c):
            log_t = bins(ops.log_softmax(ops.convert_to_tensor(t) / tau,
                                         axis=-1))
            log_s = bins(ops.log_softmax(b / tau, axis=-1))
            per_token = tau**2 * loss.divergence(log_t, log_s)
            return ops.sum(per_token * c) / ops.sum(c)

        ref, (ref_grad, _) = value_and_grad(reference, s, PADDING)
        for chunk, compile_ in ((None, False), (3, False), (None, True)):
            loss.chunk_size = chunk
            fn = lambda b, c: loss(sparse, b, sample_weight=c)  # noqa: E731
            got, (grad, _) = value_and_grad(jit(fn) if compile_ else fn,
                                            s, PADDING)
            np.testing.assert_allclose(got, ref, rtol=1e-5)
            np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
            assert np.abs(grad[1, 2:]).max() == 0.0  # padding: no gradient


def test_fused_lm_head_equals_logits():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(2, 7, 5)).astype("float32")
    kernel = rng.normal(size=(5, 11)).astype("float32")
    bias = rng.normal(size=(11,)).astype("float32")
    t_hidden = rng.normal(size=(2, 7, 4)).astype("float32")
    t_kernel = rng.normal(size=(4, 11)).astype("float32")
    w = np.array([[1.0] * 7, [1.0] * 3 + [0.0] * 4], "float32")

    def unfused(h, k, b):
        teacher = ops.matmul(t_hidden, t_kernel)
        return GeneralizedJSD(0.3)(teacher, ops.matmul(h, k) + b,
                                   sample_weight=w)

    def fused(h, k, b):
        loss = GeneralizedJSD(
            0.3, chunk_size=3,
            lm_head=lambda x: ops.matmul(x, k) + b,
            teacher_lm_head=lambda x: ops.matmul(x, t_kernel))
        return loss(t_hidden, h, sample_weight=w)

    ref, ref_grads = value_and_grad(unfused, hidden, kernel, bias)
    got, grads = value_and_grad(fused, hidden, kernel, bias)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_lm_head_layers():
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(2, 6, 5)).astype("float32")
    teacher = rng.normal(size=(2, 6, 9)).astype("float32")
    dense = keras.layers.Dense(9)
    dense.build((None, 5))
    np.testing.assert_allclose(
        value(ForwardKL(chunk_size=4, lm_head=dense), teacher, hidden),
        value(ForwardKL(), teacher, dense(hidden)), rtol=1e-5)
    # A tied embedding table: logits = hidden @ table^T.
    table = keras.layers.Embedding(9, 5)
    table.build((None,))
    logits = ops.matmul(hidden, ops.transpose(table.embeddings))
    loss = ForwardKL(chunk_size=4, lm_head=table)
    np.testing.assert_allclose(value(loss, teacher, hidden),
                               value(ForwardKL(), teacher, logits),
                               rtol=1e-5)
    assert loss.vocab_sizes((None, None, 9), (None, None, 5)) == (9, 9)
    with pytest.raises(NotImplementedError, match="cannot be serialized"):
        loss.get_config()


def test_vocabulary_mismatch_and_truncation(logits):
    t, s = logits
    padded = np.concatenate([t, np.full((3, 7, 2), -3.0, "float32")], -1)
    with pytest.raises(ValueError, match="13 entries.*has 11"):
        ForwardKL()(padded, s)
    truncated = ForwardKL(vocab_mapping="truncate", chunk_size=3)
    np.testing.assert_allclose(value(truncated, padded, s),
                               value(ForwardKL(), t, s), rtol=1e-6)
    # Either side may be the larger one.
    np.testing.assert_allclose(value(truncated, t, padded),
                               value(ForwardKL(), t, t), atol=1e-6)
    with pytest.raises(ValueError, match="vocab_mapping"):
        ForwardKL(vocab_mapping="shared")


def test_masked_teacher_logits_are_finite(logits):
    t, s = logits
    t = t.copy()
    t[..., :3] = -np.inf  # e.g. tokens the teacher may never emit
    for loss in (ForwardKL(), GeneralizedJSD(0.5), SkewKL(0.1)):
        got, (grad,) = value_and_grad(lambda b: loss(t, b), s)
        assert np.isfinite(got) and np.isfinite(grad).all()
    # Masked tokens have p_t = 0: only the others count.
    lt = np_log_softmax(t[..., 3:].astype("float64"))
    ls = np_log_softmax(s.astype("float64"))[..., 3:]
    np.testing.assert_allclose(value(ForwardKL(), t, s),
                               np_kl(lt, ls).mean(), rtol=1e-5)


def test_config_round_trip():
    for loss in (ForwardKL(2.0, chunk_size=64, vocab_mapping="truncate"),
                 GeneralizedJSD(beta=0.2, normalized=False),
                 SkewKL(alpha=0.3, reverse=True), ReverseKL(name="rkl")):
        clone = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(loss))
        assert type(clone) is type(loss)
        assert clone.get_config() == loss.get_config()


def test_pure_function_is_per_position(logits):
    t, s = logits
    out = divergence_loss(t, s, forward_kl, chunk_size=2)
    assert tuple(out.shape) == (3, 7)
    np.testing.assert_allclose(to_numpy(out), np_divergence("forward", t, s),
                               rtol=1e-5)


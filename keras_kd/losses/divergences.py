"""Token-level divergences for language-model distillation: forward KL,
reverse KL, generalized Jensen-Shannon and skew KL, on `(batch, time,
vocab)` logits (or `(batch, classes)`), with masks, a token-mean reduction,
sequence chunking, an LM-head-fused form and sparse top-k teachers.

Everything is `keras.ops`: the same code runs on TensorFlow, JAX and PyTorch.

Notation (every docstring below uses it): `p_t = softmax(z_t / tau)` is the
teacher's distribution over the vocabulary and `p_s = softmax(z_s / tau)`
the student's, per token; `KL(p || q) = sum_v p_v (log p_v - log q_v)`.
"""

import inspect
import math
from typing import NamedTuple

import keras
from keras import ops

from keras_kd import _keras_compat as compat
from keras_kd.distribution import scale_for_replicas
from keras_kd.losses.base import DistillationLoss

# The teacher's log-probabilities are floored here, so that a masked (-inf)
# teacher logit gives a probability of exactly 0 and finite arithmetic
# (0 * -inf would be NaN, and so would the gradient of a log-sum-exp of two
# -infs). A real log-probability below it is a probability that float32
# rounds to 0. The student's are not: flooring them would keep one more
# (batch, time, vocab) tensor for the backward pass, so student logits must
# be finite.
LOG_FLOOR = -1e30

VOCAB_MAPPINGS = (None, "truncate")
REDUCTIONS = ("mean_with_sample_weight", "sum_over_batch_size", "mean", "sum",
              "none", None)


# --------------------------------------------------------------------------
# Divergences between normalized distributions given as log-probabilities.
# Each takes `log_p_t` and `log_p_s` of the same shape `(..., bins)` and
# returns one value per row, shape `(...)`.
# --------------------------------------------------------------------------


def kl_divergence(log_p, log_q):
    """`KL(p || q) = sum_v p_v (log p_v - log q_v)` over the last axis.

    Args:
        log_p: log-probabilities of `p`, shape `(..., bins)`.
        log_q: log-probabilities of `q`, same shape.

    Returns:
        A tensor of shape `(...)`.
    """
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def log_mixture(log_p, log_q, weight):
    """`log(weight * p + (1 - weight) * q)`, elementwise, for
    `0 < weight < 1`."""
    return ops.logaddexp(log_p + math.log(weight),
                         log_q + math.log1p(-weight))


def forward_kl(log_p_t, log_p_s):
    """Forward KL: `KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)`.

    Mean-seeking: the student is penalized where the teacher has mass and
    the student has none. Hinton's KD loss is this divergence.
    """
    return kl_divergence(log_p_t, log_p_s)


def reverse_kl(log_p_t, log_p_s):
    """Reverse KL: `KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)`.

    Mode-seeking: the student is penalized where it has mass and the teacher
    has none.
    """
    return kl_divergence(log_p_s, log_p_t)


def generalized_jsd(log_p_t, log_p_s, beta=0.5, normalized=True):
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    `JSD(beta) = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)` with the
    mixture `m = beta * p_t + (1 - beta) * p_s`. As `beta -> 0`,
    `JSD(beta) / beta -> KL(p_t || p_s)` (forward KL); as `beta -> 1`,
    `JSD(beta) / (1 - beta) -> KL(p_s || p_t)` (reverse KL).

    With `normalized=True` the value is `JSD(beta) / (beta * (1 - beta))`,
    which is continuous in `beta` on `[0, 1]` and equals forward KL at
    `beta = 0` and reverse KL at `beta = 1` (both computed as such). With
    `normalized=False` it is GKD's `JSD(beta)` itself, defined for
    `0 < beta < 1` only (it tends to 0 at both ends).

    Args:
        log_p_t: teacher log-probabilities, shape `(..., bins)`.
        log_p_s: student log-probabilities, same shape.
        beta: the interpolation coefficient in `[0, 1]`.
        normalized: divide by `beta * (1 - beta)`.

    Returns:
        A tensor of shape `(...)`.
    """
    beta = float(beta)
    if beta in (0.0, 1.0):
        if not normalized:
            raise ValueError(
                "`beta` must be in (0, 1) when `normalized=False` "
                f"(GKD's JSD(beta) is 0 at both ends); got {beta}."
            )
        if beta == 0.0:
            return forward_kl(log_p_t, log_p_s)
        return reverse_kl(log_p_t, log_p_s)
    log_m = log_mixture(log_p_t, log_p_s, beta)
    value = (beta * kl_divergence(log_p_t, log_m)
             + (1.0 - beta) * kl_divergence(log_p_s, log_m))
    if normalized:
        value = value / (beta * (1.0 - beta))
    return value


def skew_kl(log_p_t, log_p_s, alpha=0.1, reverse=False):
    """Skew KL divergence (DistiLLM, Ko et al. 2024).

    Forward (`reverse=False`): `KL(p_t || alpha * p_t + (1 - alpha) * p_s)`.
    Reverse (`reverse=True`): `KL(p_s || alpha * p_s + (1 - alpha) * p_t)`.
    `alpha = 0` is exactly forward (reverse) KL. Mixing some of the first
    distribution into the second bounds the value by `-log(alpha)` and keeps
    the gradient finite where the second distribution has no mass.

    Args:
        log_p_t: teacher log-probabilities, shape `(..., bins)`.
        log_p_s: student log-probabilities, same shape.
        alpha: the skew in `[0, 1)`.
        reverse: skew the reverse KL instead of the forward KL.

    Returns:
        A tensor of shape `(...)`.
    """
    alpha = float(alpha)
    first, second = (log_p_s, log_p_t) if reverse else (log_p_t, log_p_s)
    if alpha == 0.0:
        return kl_divergence(first, second)
    return kl_divergence(first, log_mixture(first, second, alpha))


# --------------------------------------------------------------------------
# Sparse (top-k) teachers.
# --------------------------------------------------------------------------


class TopKDistribution(NamedTuple):
    """A teacher's per-token distribution kept as its top-k entries plus one
    bucket for the rest (the form a teacher-output cache stores).

    Attributes:
        indices: `(..., k)` integer token ids of the teacher's `k` most
            probable tokens (distinct).
        log_probs: `(..., k)` the teacher's log-probabilities of those tokens
            under `softmax(z_t / tau)`, at the temperature `tau` of the loss
            that reads them (any float dtype; float16 is enough).
        tail_mass: `(...)` the probability of every other token together,
            `1 - sum(exp(log_probs))`, clipped to `[0, 1]`.

    A divergence given a `TopKDistribution` compares the teacher and the
    student on `k + 1` bins: the teacher's `k` tokens and one bucket holding
    the rest of each distribution. With `k` equal to the vocabulary size it
    is the dense divergence.
    """

    indices: object
    log_probs: object
    tail_mass: object


def top_k_distribution(teacher_logits, k, temperature=1.0, dtype="float16"):
    """The `TopKDistribution` of dense teacher logits.

    Args:
        teacher_logits: `(..., vocab)` logits.
        k: how many tokens to keep per position (`1 <= k <= vocab`).
        temperature: `tau`; the divergence that reads the result must use
            the same temperature (a sparse teacher cannot be re-softened).
        dtype: dtype of `log_probs` and `tail_mass`.

    Returns:
        A `TopKDistribution` with int32 `indices`.
    """
    vocab = teacher_logits.shape[-1]
    if int(k) != k or k < 1 or (vocab is not None and k > vocab):
        raise ValueError(f"`k` must be an integer in [1, {vocab}], got {k}.")
    log_p = ops.log_softmax(
        ops.cast(teacher_logits, "float32") / float(temperature), axis=-1)
    values, indices = ops.top_k(log_p, int(k), sorted=True)
    tail = ops.clip(1.0 - ops.sum(ops.exp(values), axis=-1), 0.0, 1.0)
    return TopKDistribution(ops.cast(indices, "int32"),
                            ops.cast(values, dtype), ops.cast(tail, dtype))


def _log_or_floor(x):
    """`log(x)` where `x > 0`, else `LOG_FLOOR` (finite gradients)."""
    positive = x > 0
    return ops.where(positive, ops.log(ops.where(positive, x, 1.0)),
                     LOG_FLOOR)


def _topk_bins(teacher, log_p_s):
    """Teacher and student log-probabilities on the `k + 1` bins of a
    `TopKDistribution` (its `k` tokens, then the tail bucket)."""
    indices = ops.cast(teacher.indices, "int32")
    log_t = ops.maximum(ops.cast(teacher.log_probs, "float32"), LOG_FLOOR)
    tail_t = _log_or_floor(ops.cast(teacher.tail_mass, "float32"))
    picked = ops.take_along_axis(log_p_s, indices, axis=-1)
    vocab = log_p_s.shape[-1]
    k = indices.shape[-1]
    if k is not None and k == vocab:
        # Every token is kept: the tail is empty (a stored tail mass is
        # rounding noise).
        return log_t, picked
    # The student's tail, as a log-sum-exp over the tokens outside the top
    # k (1 - sum(p) would lose a small tail to rounding). The top-k tokens
    # are marked by one scatter over the flattened positions.
    flat = ops.reshape(indices, (-1, 1))
    rows = ops.shape(flat)[0] // k
    row_ids = ops.reshape(ops.repeat(ops.arange(rows, dtype="int32")[:, None],
                                     k, axis=1), (-1, 1))
    in_top = ops.scatter(ops.concatenate([row_ids, flat], axis=-1),
                         ops.ones(ops.shape(flat)[:1], "float32"),
                         (rows, vocab))
    in_top = ops.reshape(in_top, ops.shape(log_p_s)) > 0
    tail_s = ops.logsumexp(ops.where(in_top, LOG_FLOOR, log_p_s), axis=-1)
    tail_s = ops.maximum(tail_s, LOG_FLOOR)
    return (ops.concatenate([log_t, tail_t[..., None]], axis=-1),
            ops.concatenate([picked, tail_s[..., None]], axis=-1))


# --------------------------------------------------------------------------
# LM heads (the fused form).
# --------------------------------------------------------------------------


def _head(head):
    """`(fn, vocab_size)` for an LM head: `fn(hidden) -> logits`.

    A Keras Hub `ReversibleEmbedding` (tied embeddings) is called with
    `reverse=True`; a plain `keras.layers.Embedding` projects onto its
    transposed table; any other layer or callable is called as is. The
    vocabulary size is read from the layer when it has one (`units`,
    `input_dim`), else from a `vocab_size` attribute, else unknown.
    """
    if head is None:
        return None, None
    if not callable(head):
        raise TypeError(
            "An LM head must be a Keras layer or a callable mapping hidden "
            f"states to logits, got {head!r}."
        )
    vocab = getattr(head, "vocab_size", None)
    if isinstance(head, keras.layers.Embedding) or hasattr(head,
                                                          "embeddings"):
        vocab = getattr(head, "input_dim", vocab)
        params = inspect.signature(head.call).parameters
        if "reverse" in params:
            return (lambda h: head(h, reverse=True)), vocab

        def project(hidden):
            table = ops.convert_to_tensor(head.embeddings)
            return ops.matmul(hidden, ops.transpose(
                ops.cast(table, hidden.dtype)))

        return project, vocab
    if hasattr(head, "units"):
        vocab = head.units
    return head, vocab


# --------------------------------------------------------------------------
# The chunked computation.
# --------------------------------------------------------------------------


def _split(x, pieces, axis):
    """`x` in `pieces` consecutive parts along `axis` (sizes differ by at
    most one), with static shapes on every backend."""
    if hasattr(ops, "array_split"):
        return list(ops.array_split(x, pieces, axis=axis))
    length = x.shape[axis]
    base, extra = divmod(length, pieces)
    bounds, edge = [], 0
    for index in range(pieces - 1):
        edge += base + (1 if index < extra else 0)
        bounds.append(edge)
    return list(ops.split(x, bounds, axis=axis))


def _flatten_teacher(teacher):
    if isinstance(teacher, TopKDistribution):
        return list(teacher), True
    return [teacher], False


def divergence_loss(teacher_output, student_output, divergence,
                    temperature=1.0, chunk_size=None, vocab_mapping=None,
                    lm_head=None, teacher_lm_head=None):
    """Per-position divergence between teacher and student outputs.

    Args:
        teacher_output: `(..., vocab)` teacher logits; or, with
            `teacher_lm_head`, `(..., hidden)` teacher hidden states; or a
            `TopKDistribution`.
        student_output: `(..., vocab)` student logits; or, with `lm_head`,
            `(..., hidden)` student hidden states.
        divergence: a function `(log_p_t, log_p_s) -> (...)` such as
            `forward_kl`.
        temperature: `tau`; the result is multiplied by `tau ** 2`.
        chunk_size: `None`, or the number of positions along axis `-2`
            (the time axis of `(batch, time, vocab)` logits, the batch axis
            of `(batch, classes)`) computed at once. Each chunk is
            rematerialized (`keras.remat`) in the backward pass.
        vocab_mapping: `None` (vocabularies must be equal) or `"truncate"`
            (both sides are cut to the smaller vocabulary's first entries).
        lm_head: `None`, or the student's LM head (a layer or a callable
            `hidden -> logits`), applied chunk by chunk.
        teacher_lm_head: `None`, or the teacher's LM head, likewise.

    Returns:
        A float32 tensor of shape `student_output.shape[:-1]`.
    """
    if vocab_mapping not in VOCAB_MAPPINGS:
        raise ValueError(f"`vocab_mapping` must be one of {VOCAB_MAPPINGS}, "
                         f"got {vocab_mapping!r}.")
    student_head, _ = _head(lm_head)
    teacher_head, _ = _head(teacher_lm_head)
    parts, sparse = _flatten_teacher(teacher_output)
    parts = [ops.stop_gradient(ops.convert_to_tensor(p)) for p in parts]
    if sparse and teacher_head is not None:
        raise ValueError("A `TopKDistribution` teacher has no LM head to "
                         "apply; leave `teacher_lm_head` unset.")
    temperature = float(temperature)

    def per_position(student, *teacher):
        if student_head is not None:
            student = student_head(student)
        log_p_s = ops.log_softmax(
            ops.cast(student, "float32") / temperature, axis=-1)
        if sparse:
            log_p_t, log_p_s = _topk_bins(TopKDistribution(*teacher),
                                          log_p_s)
        else:
            logits = teacher[0]
            if teacher_head is not None:
                logits = ops.stop_gradient(teacher_head(logits))
            logits = ops.cast(logits, "float32")
            v_t, v_s = logits.shape[-1], log_p_s.shape[-1]
            if v_t != v_s:
                if vocab_mapping != "truncate" or None in (v_t, v_s):
                    raise vocab_error(v_t, v_s)
                size = min(v_t, v_s)
                logits = logits[..., :size]
                # Renormalized over the kept entries.
                log_p_s = ops.log_softmax(
                    ops.cast(student, "float32")[..., :size] / temperature,
                    axis=-1)
            log_p_t = ops.maximum(
                ops.log_softmax(logits / temperature, axis=-1), LOG_FLOOR)
        return (temperature ** 2) * divergence(log_p_t, log_p_s)

    student_output = ops.convert_to_tensor(student_output)
    rank = len(student_output.shape)
    if rank < 2:
        raise ValueError(
            "Divergences take `(batch, vocab)` or `(batch, time, vocab)` "
            f"outputs; got shape {tuple(student_output.shape)}.")
    axis = rank - 2
    length = student_output.shape[axis]
    if chunk_size is None or (length is not None and length <= chunk_size):
        return per_position(student_output, *parts)
    if length is None:
        raise ValueError(
            f"`chunk_size={chunk_size}` needs the length of axis {axis} of "
            f"the outputs to be known when the loss is traced; got shape "
            f"{tuple(student_output.shape)}. Give the data a fixed sequence "
            "length (and, for (batch, classes) outputs, "
            "`drop_remainder=True`).")
    # TensorFlow's `tf.recompute_grad` differentiates the chunk's inputs and
    # the variables it reads, not tensors a callable closes over: a student
    # head that is not a Keras layer would silently get no gradient, so its
    # chunks are not rematerialized there.
    remat = not (keras.backend.backend() == "tensorflow"
                 and lm_head is not None
                 and not isinstance(lm_head, keras.layers.Layer))
    return _chunked_map(per_position, student_output, parts, chunk_size,
                        axis, remat=remat)


def _chunked_map(fn, student, parts, chunk_size, axis, remat=True):
    """`fn(student, *parts)` computed over consecutive chunks of
    `chunk_size` positions along `axis`, each rematerialized in the backward
    pass; the per-position results are concatenated along `axis`.

    On JAX the full chunks run in one `lax.scan` over chunk indices whose
    body slices the inputs itself and is checkpointed: the scan makes XLA
    run the chunks one after another (a Python loop over slices lets XLA
    keep every slice, and several chunks' intermediates, alive), and the
    gradients of the full inputs accumulate across iterations. Elsewhere the
    inputs are split into views (PyTorch) or tensors (TensorFlow) and each
    chunk goes through `keras.remat`; eager PyTorch frees each chunk's
    intermediates before the next.
    """
    length = student.shape[axis]
    if keras.backend.backend() == "jax":
        return _jax_chunked_map(fn, student, parts, chunk_size, axis)
    pieces = -(-length // chunk_size)
    student_chunks = _split(student, pieces, axis)
    teacher_chunks = [_split(p, pieces, axis) for p in parts]
    step = keras.remat(fn) if remat else fn
    values = [step(s, *t) for s, *t in zip(student_chunks, *teacher_chunks)]
    return ops.concatenate(values, axis=axis)


def _jax_chunked_map(fn, student, parts, chunk_size, axis):
    import jax

    length = student.shape[axis]
    full, rest = divmod(length, chunk_size)

    def chunk(x, start, size):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)

    @jax.checkpoint
    def body(carry, index):
        start = index * chunk_size
        value = fn(chunk(student, start, chunk_size),
                   *[chunk(p, start, chunk_size) for p in parts])
        return carry, value

    _, stacked = jax.lax.scan(body, 0, ops.arange(full, dtype="int32"))
    # (chunks, *leading, chunk_size) -> (*leading, chunks * chunk_size).
    values = ops.moveaxis(stacked, 0, axis)
    shape = tuple(values.shape)
    values = ops.reshape(
        values, shape[:axis] + (full * chunk_size,) + shape[axis + 2:])
    if rest:
        start = full * chunk_size
        tail = jax.checkpoint(fn)(chunk(student, start, rest),
                                  *[chunk(p, start, rest) for p in parts])
        values = ops.concatenate([values, tail], axis=axis)
    return values


def vocab_error(teacher_vocab, student_vocab, teacher="teacher",
                student="student"):
    """The error for teacher and student vocabularies of different sizes."""
    return ValueError(
        f"The {teacher} has a vocabulary of {teacher_vocab} entries (last "
        f"axis of its logits) but the {student} has {student_vocab}. If both "
        "use one tokenizer and one embedding table is only padded (e.g. "
        "151936 vs 152064), give the divergence `vocab_mapping='truncate'` "
        "to compare the first min(V_teacher, V_student) entries. Different "
        "tokenizers are not supported (cross-tokenizer distillation is out "
        "of scope).")


# --------------------------------------------------------------------------
# Weights and reduction.
# --------------------------------------------------------------------------


def _as_weights(values, mask, sample_weight):
    """The weights of `values` (shape `(batch,)` or `(batch, time)`): the
    Keras mask times `sample_weight` broadcast to `values.shape`, or `None`
    when neither is given."""
    weights = None
    if sample_weight is not None:
        weights = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
        rank = len(values.shape)
        while len(weights.shape) > rank and weights.shape[-1] == 1:
            weights = ops.squeeze(weights, axis=-1)
        while len(weights.shape) < rank:
            weights = ops.expand_dims(weights, axis=-1)
        weights = ops.broadcast_to(weights, ops.shape(values))
    if mask is not None:
        mask = ops.cast(mask, "float32")
        if len(mask.shape) > len(values.shape):
            mask = ops.squeeze(mask, axis=-1)
        mask = ops.broadcast_to(mask, ops.shape(values))
        weights = mask if weights is None else weights * mask
    return weights


def reduce_token_losses(values, weights, reduction):
    """Reduces per-position losses with their weights.

    `"mean_with_sample_weight"`: `sum(w * l) / sum(w)`, the mean over the
    unmasked positions of the whole batch (0 when every weight is 0).
    `"sum_over_batch_size"` and `"mean"`: `sum(w * l) / N`, `N` the number
    of positions (Keras' reduction). `"sum"`: `sum(w * l)`. `"none"` or
    `None`: `w * l`, unreduced.
    """
    weighted = values if weights is None else values * weights
    if reduction in (None, "none"):
        return weighted
    total = ops.sum(weighted)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weights is not None:
        divisor = ops.sum(weights)
    else:
        divisor = ops.cast(ops.size(values), "float32")
    return scale_for_replicas(ops.divide_no_nan(total, divisor))


class TokenDivergence(DistillationLoss):
    """Base class of the token-level divergences (see `ForwardKL`).

    `call` returns the per-token losses (shape `(batch, time)`, or
    `(batch,)` for `(batch, classes)` outputs); `__call__` weights them by
    the student output's Keras mask (`mask_zero`, `_keras_mask`) times
    `sample_weight` (shape `(batch,)` or `(batch, time)`) and reduces them,
    by default to the mean over the unmasked tokens of the whole batch.

    Subclasses implement `divergence(log_p_t, log_p_s)`.
    """

    matches_channels = False

    def __init__(self, temperature=1.0, chunk_size=None, vocab_mapping=None,
                 lm_head=None, teacher_lm_head=None, name=None,
                 reduction="mean_with_sample_weight", dtype=None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got "
                             f"{reduction!r}.")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        temperature = float(temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(
                f"`temperature` must be positive, got {temperature}.")
        if chunk_size is not None and (int(chunk_size) != chunk_size
                                       or chunk_size < 1):
            raise ValueError(
                f"`chunk_size` must be None or an integer >= 1, got "
                f"{chunk_size!r}.")
        if vocab_mapping not in VOCAB_MAPPINGS:
            raise ValueError(f"`vocab_mapping` must be one of "
                             f"{VOCAB_MAPPINGS}, got {vocab_mapping!r}.")
        _head(lm_head)
        _head(teacher_lm_head)
        self.temperature = temperature
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.vocab_mapping = vocab_mapping
        self.lm_head = lm_head
        self.teacher_lm_head = teacher_lm_head

    def divergence(self, log_p_t, log_p_s):  # pragma: no cover
        raise NotImplementedError

    def call(self, teacher_output, student_output):
        return divergence_loss(
            teacher_output, student_output, self.divergence,
            temperature=self.temperature, chunk_size=self.chunk_size,
            vocab_mapping=self.vocab_mapping, lm_head=self.lm_head,
            teacher_lm_head=self.teacher_lm_head)

    def __call__(self, y_true, y_pred, sample_weight=None):
        mask = compat.keras_mask(y_pred)
        with keras.name_scope(self.name):
            values = self.call(y_true, y_pred)
            weights = _as_weights(values, mask, sample_weight)
            loss = reduce_token_losses(values, weights, self.reduction)
            return ops.cast(loss, self.dtype)

    def log_weight(self, student_output, sample_weight=None):
        """The weight of one batch's value in an epoch's mean (the
        `Distiller`'s history): the sum of the token weights for the
        token-mean reduction, so that the epoch value is the mean over the
        epoch's tokens; `None` (the batch size) for the other reductions."""
        if self.reduction != "mean_with_sample_weight":
            return None
        mask = compat.keras_mask(student_output)
        positions = ops.zeros(ops.shape(student_output)[:-1], "float32")
        weights = _as_weights(positions, mask, sample_weight)
        if weights is None:
            return ops.cast(ops.size(positions), "float32")
        return ops.sum(weights)

    def vocab_sizes(self, teacher_shape, student_shape):
        """`(teacher vocabulary, student vocabulary)` from the static output
        shapes the distiller compares (hidden states when an LM head is
        set); `None` where unknown."""
        teacher_vocab = teacher_shape[-1] if teacher_shape else None
        student_vocab = student_shape[-1] if student_shape else None
        if self.teacher_lm_head is not None:
            teacher_vocab = _head(self.teacher_lm_head)[1]
        if self.lm_head is not None:
            student_vocab = _head(self.lm_head)[1]
        return teacher_vocab, student_vocab

    def check_output_shapes(self, teacher_shape, student_shape,
                            teacher_name, student_name):
        """Raises a `ValueError` naming both vocabulary sizes when they
        differ and `vocab_mapping` is `None` (called by the `Distiller` at
        construction)."""
        v_t, v_s = self.vocab_sizes(teacher_shape, student_shape)
        if None in (v_t, v_s) or v_t == v_s or self.vocab_mapping:
            return
        raise vocab_error(v_t, v_s, teacher=f"teacher '{teacher_name}'",
                          student=f"student '{student_name}'")

    def get_config(self):
        if self.lm_head is not None or self.teacher_lm_head is not None:
            raise NotImplementedError(
                f"{type(self).__name__} with an `lm_head` holds a layer of "
                "the model and cannot be serialized. Save the student "
                "instead (`distiller.student.save(...)`).")
        config = super().get_config()
        config.update(temperature=self.temperature,
                      chunk_size=self.chunk_size,
                      vocab_mapping=self.vocab_mapping, dtype=self.dtype)
        return config


_COMMON_ARGS = """
        temperature: softening temperature `tau`; the value is multiplied by
            `tau ** 2`, as in KD. Defaults to 1.
        chunk_size: `None`, or how many positions (along the time axis of
            `(batch, time, vocab)` outputs; the batch axis of
            `(batch, classes)`) are computed at once. The float32 softmax
            intermediates then exist for one chunk at a time, forward and
            backward (each chunk is recomputed in the backward pass,
            `keras.remat`). The value does not depend on it.
        vocab_mapping: `None` (teacher and student vocabularies must have
            equal sizes) or `"truncate"`: both are cut to the first
            `min(V_teacher, V_student)` entries and renormalized (one
            tokenizer, embedding tables padded to different sizes).
        lm_head: `None`, or the student's LM head (a `Dense` layer, a Keras
            Hub `ReversibleEmbedding`, a `keras.layers.Embedding` used as a
            tied head, or a callable `hidden -> logits`). The student output
            is then its last hidden states and its logits are computed
            chunk by chunk, never for the whole batch at once.
        teacher_lm_head: the same for the teacher's side.
        name: name of the loss; also the default `Term` name.
        reduction: `"mean_with_sample_weight"` (default): the mean over the
            unmasked tokens of the whole batch, `sum(w * l) / sum(w)` with
            `w` the Keras mask times `sample_weight`. Also
            `"sum_over_batch_size"`, `"sum"`, `"none"`.
        dtype: dtype of the returned loss (the computation is float32)."""


@keras.saving.register_keras_serializable(package="keras_kd")
class ForwardKL(TokenDivergence):
    """Forward KL per token: `tau^2 * KL(p_t || p_s)`, i.e.
    `tau^2 * sum_v p_t,v (log p_t,v - log p_s,v)`.

    The teacher's distribution is the target (mean-seeking); on
    `(batch, classes)` logits at a temperature of 4 and with
    `reduction="sum_over_batch_size"` it is `keras_kd.losses.KD()`.

    Args:{args}

    Example:

    >>> loss = keras_kd.losses.ForwardKL(chunk_size=4)
    >>> rng = np.random.default_rng(0)
    >>> teacher_logits = rng.normal(size=(2, 8, 100))  # (batch, time, vocab)
    >>> student_logits = rng.normal(size=(2, 8, 100))
    >>> loss(teacher_logits, teacher_logits)  # equal distributions: 0
    >>> padding = np.array([[1] * 8, [1] * 5 + [0] * 3])  # (batch, time)
    >>> loss(teacher_logits, student_logits, sample_weight=padding)
    """

    def __init__(self, temperature=1.0, chunk_size=None, vocab_mapping=None,
                 lm_head=None, teacher_lm_head=None, name="forward_kl",
                 reduction="mean_with_sample_weight", dtype=None):
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head, name=name,
                         reduction=reduction, dtype=dtype)

    def divergence(self, log_p_t, log_p_s):
        return forward_kl(log_p_t, log_p_s)


@keras.saving.register_keras_serializable(package="keras_kd")
class ReverseKL(TokenDivergence):
    """Reverse KL per token: `tau^2 * KL(p_s || p_t)`, i.e.
    `tau^2 * sum_v p_s,v (log p_s,v - log p_t,v)`.

    The student's own distribution weighs the log-ratio (mode-seeking): the
    student is pushed off tokens the teacher finds unlikely rather than
    onto every token the teacher finds likely.

    Args:{args}

    Example:

    >>> # teacher_logits, student_logits and padding as in ForwardKL's
    >>> loss = keras_kd.losses.ReverseKL(chunk_size=4)
    >>> loss(teacher_logits, student_logits, sample_weight=padding)
    """

    def __init__(self, temperature=1.0, chunk_size=None, vocab_mapping=None,
                 lm_head=None, teacher_lm_head=None, name="reverse_kl",
                 reduction="mean_with_sample_weight", dtype=None):
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head, name=name,
                         reduction=reduction, dtype=dtype)

    def divergence(self, log_p_t, log_p_s):
        return reverse_kl(log_p_t, log_p_s)


@keras.saving.register_keras_serializable(package="keras_kd")
class GeneralizedJSD(TokenDivergence):
    """Generalized Jensen-Shannon divergence per token (GKD).

    With `m = beta * p_t + (1 - beta) * p_s` (the convention of GKD,
    Agarwal et al. 2024, teacher first) and `normalized=True` (default):

        tau^2 * [beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)]
              / (beta * (1 - beta))

    This is continuous in `beta` and its endpoints are exactly forward KL
    (`beta = 0`, `KL(p_t || p_s)`) and reverse KL (`beta = 1`,
    `KL(p_s || p_t)`). The division by `beta * (1 - beta)` is the
    documented scaling: GKD's (and TRL's) `JSD(beta)` for `0 < beta < 1` is
    this value times `beta * (1 - beta)` (at `beta = 0.5`, a quarter of
    it), which `normalized=False` returns.

    Args:
        beta: interpolation coefficient in `[0, 1]` (`(0, 1)` when
            `normalized=False`). Defaults to 0.5.
        normalized: divide by `beta * (1 - beta)`. Defaults to True.{args}

    Example:

    >>> # teacher_logits, student_logits and padding as in ForwardKL's
    >>> loss = keras_kd.losses.GeneralizedJSD(beta=0.5, chunk_size=4)
    >>> loss(teacher_logits, student_logits, sample_weight=padding)
    """

    def __init__(self, beta=0.5, normalized=True, temperature=1.0,
                 chunk_size=None, vocab_mapping=None, lm_head=None,
                 teacher_lm_head=None, name="generalized_jsd",
                 reduction="mean_with_sample_weight", dtype=None):
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head, name=name,
                         reduction=reduction, dtype=dtype)
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
        if not normalized and beta in (0.0, 1.0):
            raise ValueError(
                "`beta` must be in (0, 1) when `normalized=False` (GKD's "
                f"JSD(beta) is 0 at both ends); got {beta}.")
        self.beta = beta
        self.normalized = bool(normalized)

    def divergence(self, log_p_t, log_p_s):
        return generalized_jsd(log_p_t, log_p_s, self.beta, self.normalized)

    def get_config(self):
        config = super().get_config()
        config.update(beta=self.beta, normalized=self.normalized)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class SkewKL(TokenDivergence):
    """Skew KL divergence per token (DistiLLM, Ko et al. 2024).

    `reverse=False` (skew KL): `tau^2 * KL(p_t || alpha p_t + (1-alpha) p_s)`.
    `reverse=True` (skew reverse KL):
    `tau^2 * KL(p_s || alpha p_s + (1-alpha) p_t)`.
    `alpha = 0` is exactly `ForwardKL` (`ReverseKL`). The value is at most
    `-tau^2 log(alpha)`, and the gradient stays bounded where the second
    distribution has no mass.

    Args:
        alpha: the skew in `[0, 1)`. Defaults to 0.1 (DistiLLM's choice).
        reverse: skew the reverse KL. Defaults to False.{args}

    Example:

    >>> # teacher_logits, student_logits and padding as in ForwardKL's
    >>> loss = keras_kd.losses.SkewKL(alpha=0.1, chunk_size=4)
    >>> loss(teacher_logits, student_logits, sample_weight=padding)
    """

    def __init__(self, alpha=0.1, reverse=False, temperature=1.0,
                 chunk_size=None, vocab_mapping=None, lm_head=None,
                 teacher_lm_head=None, name="skew_kl",
                 reduction="mean_with_sample_weight", dtype=None):
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head, name=name,
                         reduction=reduction, dtype=dtype)
        alpha = float(alpha)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"`alpha` must be in [0, 1), got {alpha}.")
        self.alpha = alpha
        self.reverse = bool(reverse)

    def divergence(self, log_p_t, log_p_s):
        return skew_kl(log_p_t, log_p_s, self.alpha, self.reverse)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, reverse=self.reverse)
        return config


for _cls in (ForwardKL, ReverseKL, GeneralizedJSD, SkewKL):
    _cls.__doc__ = _cls.__doc__.replace("{args}", _COMMON_ARGS)
del _cls

"""The sparse form of a teacher's per-token distribution: its top-k entries
plus one bucket for the rest (`TopKDistribution`), as a teacher-output
cache stores it, and how a divergence reads it against dense student
logits (`topk_bins`)."""

from __future__ import annotations

from typing import NamedTuple

from keras import ops

from keras_kd.ops.probabilities import LOG_FLOOR
from keras_kd.ops.topk import log_softmax_bins
from keras_kd._typing import Tensor


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


def top_k_distribution(teacher_logits: Tensor, k: int,
                       temperature: float = 1.0,
                       dtype: str = "float16") -> TopKDistribution:
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


def _log_or_floor(x: Tensor) -> Tensor:
    """`log(x)` where `x > 0`, else `LOG_FLOOR` (finite gradients)."""
    positive = x > 0
    return ops.where(positive, ops.log(ops.where(positive, x, 1.0)),
                     LOG_FLOOR)


def topk_bins(teacher: TopKDistribution, student_logits: Tensor,
              temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities on the `k + 1` bins of a
    `TopKDistribution` (its `k` tokens, then the tail bucket).

    Args:
        teacher: the teacher's `TopKDistribution`, made at `temperature`.
        student_logits: `(..., vocab)` float logits of the student (or its
            log-probabilities: any shift per row gives the same bins).
        temperature: `tau`; the student's distribution is
            `softmax(student_logits / tau)`.

    Returns:
        `(log_p_t, log_p_s)`, each `(..., k + 1)` float32; with `k` equal to
        the vocabulary size, `(..., k)` (no tail).
    """
    indices = ops.cast(teacher.indices, "int32")
    log_t = ops.maximum(ops.cast(teacher.log_probs, "float32"), LOG_FLOOR)
    vocab = student_logits.shape[-1]
    k = indices.shape[-1]
    if k is not None and k == vocab:
        # Every token is kept: the tail is empty (a stored tail mass is
        # rounding noise).
        log_p_s = ops.log_softmax(student_logits / temperature, axis=-1)
        return log_t, ops.take_along_axis(log_p_s, indices, axis=-1)
    tail_t = _log_or_floor(ops.cast(teacher.tail_mass, "float32"))
    # The student's tail is a log-sum-exp over the tokens outside the top k
    # (1 - sum(p) would lose a small tail to rounding), taken without the
    # full log-softmax (see `keras_kd.ops.topk`).
    log_p_s = log_softmax_bins(student_logits, indices, temperature)
    return ops.concatenate([log_t, tail_t[..., None]], axis=-1), log_p_s

"""Token-level divergence losses for language-model distillation: forward
KL, reverse KL, generalized Jensen-Shannon and skew KL, on `(batch, time,
vocab)` logits (or `(batch, classes)`), with masks and a token-mean
reduction.

The formulas are `keras_kd.ops.divergences`; the per-position computation
(softmax at a temperature, LM-head-fused form, vocabulary truncation,
sparse top-k teachers, sequence chunking) is
`keras_kd.losses.chunking.divergence_loss`. This file holds the loss
classes, the weights (Keras mask times `sample_weight`) and the reductions.

Everything is `keras.ops`: the same code runs on TensorFlow, JAX and PyTorch.

Notation (every docstring below uses it): `p_t = softmax(z_t / tau)` is the
teacher's distribution over the vocabulary and `p_s = softmax(z_s / tau)`
the student's, per token; `KL(p || q) = sum_v p_v (log p_v - log q_v)`.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from keras_kd import _keras_compat as compat
from keras_kd.distribution import global_sum, scale_for_replicas
from keras_kd.losses.base import DistillationLoss
from keras_kd.losses.chunking import VOCAB_MAPPINGS, divergence_loss
from keras_kd.losses.chunking import lm_head_function, vocab_error
from keras_kd.ops.divergences import forward_kl, generalized_jsd
from keras_kd.ops.divergences import reverse_kl, skew_kl
from keras_kd._typing import Config, Shape, Tensor

REDUCTIONS = ("mean_with_sample_weight", "sum_over_batch_size", "mean", "sum",
              "none", None)


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
    if reduction == "mean_with_sample_weight":
        # Under `tf.distribute`, each replica divides its tokens' sum by
        # the global token count: the replicas' gradients add up to those
        # of the mean over the global batch, however the padding falls.
        divisor = (ops.cast(ops.size(values), "float32") if weights is None
                   else ops.sum(weights))
        return ops.divide_no_nan(total, global_sum(divisor))
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
    reads_distribution = True

    def __init__(self, temperature: float = 1.0,
                 chunk_size: int | None = None,
                 vocab_mapping: Any = None,
                 lm_head: Tensor | None = None,
                 teacher_lm_head: Tensor | None = None,
                 from_logits: bool = True,
                 name: str | None = None,
                 reduction: str = "mean_with_sample_weight",
                 dtype: str | None = None) -> None:
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
        lm_head_function(lm_head)
        lm_head_function(teacher_lm_head)
        self.temperature = temperature
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.vocab_mapping = vocab_mapping
        self.lm_head = lm_head
        self.teacher_lm_head = teacher_lm_head
        self.from_logits = bool(from_logits)

    def divergence(self, log_p_t: Tensor,
                   log_p_s: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return divergence_loss(
            teacher_output, student_output, self.divergence,
            temperature=self.temperature, chunk_size=self.chunk_size,
            vocab_mapping=self.vocab_mapping, lm_head=self.lm_head,
            teacher_lm_head=self.teacher_lm_head,
            from_logits=self.from_logits)

    def __call__(self, y_true: Tensor, y_pred: Tensor,
                 sample_weight: Tensor | None = None) -> Tensor:
        mask = compat.keras_mask(y_pred)
        with keras.name_scope(self.name):
            values = self.call(y_true, y_pred)
            weights = _as_weights(values, mask, sample_weight)
            loss = reduce_token_losses(values, weights, self.reduction)
            return ops.cast(loss, self.dtype)

    def log_weight(self, student_output: Tensor,
                   sample_weight: Tensor | None = None) -> Tensor | None:
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

    def vocab_sizes(self, teacher_shape: Shape | None,
                    student_shape: Shape | None
                    ) -> tuple[int | None, int | None]:
        """`(teacher vocabulary, student vocabulary)` from the static output
        shapes the distiller compares (hidden states when an LM head is
        set); `None` where unknown."""
        teacher_vocab = teacher_shape[-1] if teacher_shape else None
        student_vocab = student_shape[-1] if student_shape else None
        if self.teacher_lm_head is not None:
            teacher_vocab = lm_head_function(self.teacher_lm_head)[1]
        if self.lm_head is not None:
            student_vocab = lm_head_function(self.lm_head)[1]
        return teacher_vocab, student_vocab

    def check_output_shapes(self, teacher_shape: Shape | None,
                            student_shape: Shape | None,
                            teacher_name: str, student_name: str) -> None:
        """Raises a `ValueError` naming both vocabulary sizes when they
        differ and `vocab_mapping` is `None` (called by the `Distiller` at
        construction)."""
        v_t, v_s = self.vocab_sizes(teacher_shape, student_shape)
        if None in (v_t, v_s) or v_t == v_s or self.vocab_mapping:
            return
        raise vocab_error(v_t, v_s, teacher=f"teacher '{teacher_name}'",
                          student=f"student '{student_name}'")

    def get_config(self) -> Config:
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
        from_logits: `True` (default) when the outputs (after the LM heads)
            are logits; `False` when they are probabilities (e.g. a softmax
            output), read as `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`): the loss is then that
            of the logits. A cached `TopKDistribution` teacher holds
            log-probabilities and is read as it is.
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

    def __init__(self, temperature: float = 1.0,
                 chunk_size: int | None = None,
                 vocab_mapping: Any = None,
                 lm_head: Tensor | None = None,
                 teacher_lm_head: Tensor | None = None,
                 from_logits: bool = True,
                 name: str | None = "forward_kl",
                 reduction: str = "mean_with_sample_weight",
                 dtype: str | None = None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head,
                         from_logits=from_logits, name=name,
                         reduction=reduction, dtype=dtype)

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return forward_kl(log_p_t, log_p_s)


@keras.saving.register_keras_serializable(package="keras_kd")
class ReverseKL(TokenDivergence):
    """Reverse KL per token: `tau^2 * KL(p_s || p_t)`, i.e.
    `tau^2 * sum_v p_s,v (log p_s,v - log p_t,v)`.

    The student's own distribution weighs the log-ratio (mode-seeking): the
    student is pushed off tokens the teacher finds unlikely rather than
    onto every token the teacher finds likely.

    Masked teacher entries (`-inf` logits, probability 0) would make the
    reverse KL infinite wherever the student has mass on them. With `S` the
    teacher's support, `m_S` the student's mass on it and `q = p_s / m_S`
    the student renormalized on `S`, the value is then
    `tau^2 * [KL(q || p_t) - log(m_S)]`: the reverse KL on the support plus
    the forward KL of "in the support or not" (teacher `(1, 0)`, student
    `(m_S, 1 - m_S)`). It is 0 only when `p_s = p_t`, equals the reverse KL
    when nothing is masked, is finite for finite student logits, and the
    gradient of the `-log(m_S)` penalty with respect to each student logit
    is at most `tau` in magnitude (`keras_kd.ops.divergences.reverse_kl`;
    `docs/losses/divergences.md` gives the reasons).

    Args:{args}

    Example:

    >>> # teacher_logits, student_logits and padding as in ForwardKL's
    >>> loss = keras_kd.losses.ReverseKL(chunk_size=4)
    >>> loss(teacher_logits, student_logits, sample_weight=padding)
    """

    def __init__(self, temperature: float = 1.0,
                 chunk_size: int | None = None,
                 vocab_mapping: Any = None,
                 lm_head: Tensor | None = None,
                 teacher_lm_head: Tensor | None = None,
                 from_logits: bool = True,
                 name: str | None = "reverse_kl",
                 reduction: str = "mean_with_sample_weight",
                 dtype: str | None = None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head,
                         from_logits=from_logits, name=name,
                         reduction=reduction, dtype=dtype)

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
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
    `KL(p_s || p_t)`, with `ReverseKL`'s definition for masked teacher
    entries). For `0 < beta < 1` a masked teacher entry `v` (a `-inf`
    logit) adds the bounded `-(1 - beta) p_s,v log(1 - beta)` to
    `JSD(beta)`. The division by `beta * (1 - beta)` is the
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

    def __init__(self, beta: float = 0.5, normalized: bool = True,
                 temperature: float = 1.0,
                 chunk_size: int | None = None,
                 vocab_mapping: Any = None,
                 lm_head: Tensor | None = None,
                 teacher_lm_head: Tensor | None = None,
                 from_logits: bool = True,
                 name: str | None = "generalized_jsd",
                 reduction: str = "mean_with_sample_weight",
                 dtype: str | None = None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head,
                         from_logits=from_logits, name=name,
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

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return generalized_jsd(log_p_t, log_p_s, self.beta, self.normalized)

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(beta=self.beta, normalized=self.normalized)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class SkewKL(TokenDivergence):
    """Skew KL divergence per token (DistiLLM, Ko et al. 2024).

    `reverse=False` (skew KL): `tau^2 * KL(p_t || alpha p_t + (1-alpha) p_s)`.
    `reverse=True` (skew reverse KL):
    `tau^2 * KL(p_s || alpha p_s + (1-alpha) p_t)`.
    `alpha = 0` is exactly `ForwardKL` (`ReverseKL`, with its definition
    for masked teacher entries). The value is at most `-tau^2 log(alpha)`,
    and the gradient stays bounded where the second distribution has no
    mass: a masked teacher entry `v` (a `-inf` logit) adds
    `-tau^2 p_s,v log(alpha)` to the skew reverse KL and nothing to the
    skew KL.

    Args:
        alpha: the skew in `[0, 1)`. Defaults to 0.1 (DistiLLM's choice).
        reverse: skew the reverse KL. Defaults to False.{args}

    Example:

    >>> # teacher_logits, student_logits and padding as in ForwardKL's
    >>> loss = keras_kd.losses.SkewKL(alpha=0.1, chunk_size=4)
    >>> loss(teacher_logits, student_logits, sample_weight=padding)
    """

    def __init__(self, alpha: float = 0.1, reverse: bool = False,
                 temperature: float = 1.0,
                 chunk_size: int | None = None,
                 vocab_mapping: Any = None,
                 lm_head: Tensor | None = None,
                 teacher_lm_head: Tensor | None = None,
                 from_logits: bool = True,
                 name: str | None = "skew_kl",
                 reduction: str = "mean_with_sample_weight",
                 dtype: str | None = None) -> None:
        super().__init__(temperature=temperature, chunk_size=chunk_size,
                         vocab_mapping=vocab_mapping, lm_head=lm_head,
                         teacher_lm_head=teacher_lm_head,
                         from_logits=from_logits, name=name,
                         reduction=reduction, dtype=dtype)
        alpha = float(alpha)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"`alpha` must be in [0, 1), got {alpha}.")
        self.alpha = alpha
        self.reverse = bool(reverse)

    def divergence(self, log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
        return skew_kl(log_p_t, log_p_s, self.alpha, self.reverse)

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(alpha=self.alpha, reverse=self.reverse)
        return config


for _cls in (ForwardKL, ReverseKL, GeneralizedJSD, SkewKL):
    _cls.__doc__ = (_cls.__doc__ or "").replace("{args}", _COMMON_ARGS)
del _cls

"""Correlation losses on logits: Pearson, Spearman, DIST and CMKD.

Each loss is a pure function of tensors (`pearson_loss`, `spearman_loss`,
`dist_loss`, `cmkd_loss`) plus a thin `DistillationLoss` class around it.
Notation: `z` are logits of shape `(batch, classes)`, `tau` the temperature,
`p = softmax(z / tau)` and `rho(a, b)` the Pearson correlation of two
vectors, i.e. the cosine similarity of the mean-centred vectors, with the
product of their norms floored at `1e-8`, computed in float32 for
half-precision inputs. A vector whose spread is at rounding level (see
`_correlation`) counts as constant: its correlation is 0 up to that
rounding, and its norm counts as 1 in the gradient.

Spearman terms rank the student's logits with
`keras_kd.ops.rank.sort_and_soft_rank` (the soft ranks of `soft_rank`: sort
once, smooth comparisons with a fixed window of sorted neighbours, left in
sorted order) and the teacher's with `keras_kd.ops.rank.exact_rank`; both
are pure `keras.ops`, so every loss here runs on any backend and inside
compiled (XLA) training steps. The per-sample terms of the Spearman and
CMKD losses are computed in the student's sorted order, into which the
teacher's values are gathered.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_kd.losses.base import DistillationLoss
from keras_kd.losses.logits import standardize_logits
from keras_kd.ops.rank import DEFAULT_STRENGTH
from keras_kd.ops.rank import DEFAULT_WINDOW
from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import sort_and_soft_rank

EPSILON = 1e-8
HARD_SAMPLE_TERMS = ("spearman", "pearson")


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------


def pearson_correlation(a, b, axis=-1, epsilon=EPSILON):
    """Pearson correlation of `a` and `b` along `axis`.

    The cosine similarity of the mean-centred vectors,
    `sum(a_c * b_c) / max(|a_c| |b_c|, epsilon)`. A constant vector, or one
    whose spread is at rounding level (the root mean square of its centred
    values at most `n + 4` machine epsilons of its dtype times that of its
    values, for `n` entries along `axis`; float32 epsilons for the `n` of
    half-precision inputs), has correlation 0 with anything (up to that
    rounding) and a bounded gradient.

    Args:
        a: tensor.
        b: tensor of the same shape.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the norms.

    Returns:
        The correlations, with `axis` removed.
    """

    a, b = ops.convert_to_tensor(a), ops.convert_to_tensor(b)

    def centre(x):
        return x - ops.mean(x, axis=axis, keepdims=True)

    return _correlation(
        a, b, centre, ops.sum, axis, epsilon, _length(a, axis)
    )


def weighted_pearson_correlation(a, b, weights, axis=0, epsilon=EPSILON):
    """Pearson correlation along `axis` with one weight per position.

    Means, covariance and variances are weighted by `weights` (non-negative,
    one per entry along `axis`). A position of weight 0 has no influence at
    all: the result equals the unweighted correlation of the other
    positions. With all weights equal it is `pearson_correlation`. If all
    weights are 0 the result is 0.

    Args:
        a: tensor.
        b: tensor of the same shape.
        weights: tensor of shape `(a.shape[axis],)`.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the weighted norms.

    Returns:
        The correlations, with `axis` removed.
    """
    shape = [1] * len(a.shape)
    shape[axis] = -1

    def weights_like(x):
        return ops.reshape(ops.cast(weights, x.dtype), shape)

    def centre(x):
        w = weights_like(x)
        total = ops.sum(w, axis=axis, keepdims=True)
        mean = ops.divide_no_nan(
            ops.sum(w * x, axis=axis, keepdims=True), total
        )
        return x - mean

    def weighted_sum(x, axis):
        return ops.sum(weights_like(x) * x, axis=axis)

    return _correlation(
        a, b, centre, weighted_sum, axis, epsilon, _length(a, axis)
    )


def _length(x, axis):
    """The number of entries of `x` along `axis` (static when known)."""
    n = x.shape[axis]
    return ops.shape(x)[axis] if n is None else n


# Rounding of the values themselves (a softmax, a division by C), in units
# of their dtype's machine epsilon; see `_correlation`.
_VALUE_ROUNDING = 4.0


def _correlation(a, b, centre, total, axis, epsilon, mean_terms):
    """Cosine similarity of `centre(a)` and `centre(b)` under the sum
    `total`, with the product of the norms floored at `epsilon` and rows at
    rounding level counted as constant.

    Args:
        a: tensor, not centred.
        b: tensor of the same shape, not centred.
        centre: function subtracting the (weighted) mean along `axis`.
        total: function `(x, axis)` summing (with the weights) along `axis`.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the norms.
        mean_terms: how many values `centre` sums to get the mean (0 when
            the mean is known without a sum); the rounding error of that
            mean grows with it.

    Returns:
        The correlations, with `axis` removed, in the dtype of `a`.
    """
    dtype = keras.backend.standardize_dtype(a.dtype)
    value_eps = _machine_epsilon(dtype)
    if dtype in ("float16", "bfloat16"):
        # Sums of squared deviations of probabilities (~1e-7) and their
        # products underflow in half precision: centre and compute in
        # float32.
        a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    sum_eps = _machine_epsilon(keras.backend.standardize_dtype(a.dtype))
    a_c, b_c = centre(a), centre(b)
    covariance = total(a_c * b_c, axis=axis)
    # A constant row (the all-zero logits of a zero-initialized head, their
    # softmax, their ranks) should centre to exactly 0, but its centred
    # values keep the rounding of the values (a softmax, 1 / C) and of a
    # computed mean: the mean of B equal values is off by up to about B / 2
    # machine epsilons of the value in recursive summation (measured: up to
    # B / 13 for TensorFlow's eager mean). With a norm of that residue
    # (~1e-9 for probabilities) the row's gradient is the other row's
    # direction divided by the residue or by the 1e-8 floor (measured up to
    # about 4e6 for a zero-initialized head). So a row counts as constant
    # when the root mean square of its centred values is at most
    # `tolerance` times that of its values: 4 epsilons of the values' dtype
    # plus `mean_terms` epsilons of the dtype the sums run in. Its norm
    # then counts as 1, so its gradient is the other row's direction. A
    # real spread that small is lost in the rounding of the mean anyway.
    tolerance = _VALUE_ROUNDING * value_eps + ops.cast(
        mean_terms, a.dtype
    ) * sum_eps
    squares_a = _squares_or_one(a, a_c, total, axis, tolerance)
    squares_b = _squares_or_one(b, b_c, total, axis, tolerance)
    norms = ops.sqrt(ops.maximum(squares_a * squares_b, epsilon**2))
    return ops.cast(covariance / norms, dtype)


def _machine_epsilon(dtype):
    if not keras.backend.is_float_dtype(dtype):
        return float(np.finfo("float32").eps)
    if dtype == "bfloat16":
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def _squares_or_one(x, x_c, total, axis, tolerance):
    """The (weighted) sum of squares of the centred `x_c`, or 1 where it is
    at most `tolerance^2` times that of `x` (a constant row, 0 <= 0
    included)."""
    squares = total(x_c * x_c, axis=axis)
    scale = total(x * x, axis=axis)
    constant = squares <= ops.square(tolerance) * scale
    return ops.where(constant, 1.0, squares)


def _softened(logits, temperature):
    return ops.softmax(logits / temperature, axis=-1)


def pearson_loss(teacher_logits, student_logits, temperature=1.0):
    """Per-sample Pearson loss across classes (inter-class relations).

    `1 - rho(p_s[i, :], p_t[i, :])` with `p = softmax(z / tau)`.

    Args:
        teacher_logits: tensor of shape `(batch, classes)`; not
            differentiated.
        student_logits: tensor of shape `(batch, classes)`.
        temperature: softening temperature `tau`.

    Returns:
        A tensor of shape `(batch,)` with values in `[0, 2]`.
    """
    teacher_logits = ops.stop_gradient(ops.convert_to_tensor(teacher_logits))
    return 1.0 - _probability_correlation(
        _softened(student_logits, temperature),
        _softened(teacher_logits, temperature),
    )


def _probability_correlation(a, b):
    """`pearson_correlation` of two probability vectors (last axis): each
    sums to 1, so both have mean `1 / C`."""

    def mean(x):
        return 1.0 / ops.cast(ops.shape(x)[-1], x.dtype)  # may be dynamic

    return _correlation_with_known_mean(a, b, mean)


def _correlation_with_known_mean(a, b, mean):
    """`pearson_correlation` along the last axis of two vectors whose mean
    is known: `mean(x)` gives it in the dtype of `x`. Centring by it gives
    the same value without two reductions and their gradients (and without
    the rounding of a computed mean)."""

    def centre(x):
        return x - mean(x)

    return _correlation(a, b, centre, ops.sum, -1, EPSILON, 0)


def intra_class_loss(
    teacher_logits, student_logits, temperature=1.0, sample_weight=None
):
    """DIST's intra-class loss: Pearson across the batch, per class.

    `1 - mean_c rho(p_s[:, c], p_t[:, c])`, a single value for the batch.
    With `sample_weight` each per-class correlation is a weighted
    correlation (see `weighted_pearson_correlation`), so a sample of
    weight 0 does not influence it.

    Args:
        teacher_logits: tensor of shape `(batch, classes)`; not
            differentiated.
        student_logits: tensor of shape `(batch, classes)`.
        temperature: softening temperature `tau`.
        sample_weight: optional tensor of shape `(batch,)` or `(batch, 1)`,
            or a scalar.

    Returns:
        A scalar tensor.
    """
    teacher_logits = ops.stop_gradient(ops.convert_to_tensor(teacher_logits))
    p_t = _softened(teacher_logits, temperature)
    p_s = _softened(student_logits, temperature)
    if sample_weight is None:
        correlation = pearson_correlation(p_s, p_t, axis=0)
    else:
        weights = _per_sample_weights(sample_weight, p_s)
        correlation = weighted_pearson_correlation(p_s, p_t, weights, axis=0)
    return 1.0 - ops.mean(correlation)


def _per_sample_weights(sample_weight, reference):
    """`sample_weight` as a vector of shape `(batch,)`."""
    weights = ops.cast(ops.convert_to_tensor(sample_weight), reference.dtype)
    batch_ones = ops.ones_like(reference[:, 0])
    if len(weights.shape) == 0:
        return weights * batch_ones
    return ops.reshape(weights, (-1,)) * batch_ones


def spearman_loss(
    teacher_logits,
    student_logits,
    temperature=1.0,
    regularization_strength=DEFAULT_STRENGTH,
    window=DEFAULT_WINDOW,
):
    """Per-sample Spearman loss across classes (rank relations).

    `1 - rho(soft_rank(z_s[i, :] / tau), rank(z_t[i, :]))`: the Pearson
    correlation of the student's soft ranks with the teacher's exact ranks
    (ties averaged). The teacher is never differentiated, so its ranks are
    exact; the student's are `keras_kd.ops.rank.soft_rank` with strength
    `regularization_strength` applied to `z_s / tau` (so the sigmoid width
    is `regularization_strength * tau` in logit units), computed in sorted
    order with `sort_and_soft_rank`. As the strength goes to 0 this is
    `1 - scipy.stats.spearmanr`. The number of classes must be static.
    Half-precision logits are ranked and correlated in float32 (the result
    has the student's dtype).

    Args:
        teacher_logits: tensor of shape `(batch, classes)`.
        student_logits: tensor of shape `(batch, classes)`.
        temperature: `tau`, divides the student logits before soft ranking.
        regularization_strength: `eps > 0` of `soft_rank`.
        window: neighbours on each side compared softly by `soft_rank`.

    Returns:
        A tensor of shape `(batch,)` with values in `[0, 2]`.
    """
    teacher_logits, student_logits, dtype = _rank_precision(
        teacher_logits, student_logits
    )
    _, student_ranks, order = sort_and_soft_rank(
        student_logits / temperature, regularization_strength, window
    )
    loss = _spearman_in_order(teacher_logits, student_ranks, order)
    return ops.cast(loss, dtype)


def _rank_precision(teacher_logits, student_logits):
    """Both logits in float32 if the student's are half precision, and the
    student's dtype (the dtype of the result). Ranks run up to C and their
    squared deviations sum to about C^3 / 12 (the product of two such sums
    passes the float16 range from C = 15 on); float16 cannot even tell
    1000.25 from 1000."""
    student_logits = ops.convert_to_tensor(student_logits)
    dtype = keras.backend.standardize_dtype(student_logits.dtype)
    if dtype in ("float16", "bfloat16"):
        student_logits = ops.cast(student_logits, "float32")
        teacher_logits = ops.cast(teacher_logits, "float32")
    return teacher_logits, student_logits, dtype


def _spearman_in_order(teacher_logits, student_ranks, order):
    """`1 - rho` of soft ranks left in the student's sorted order (`order`)
    and the teacher's exact ranks gathered into that order. The correlation
    is unchanged when both vectors are permuted alike, and gathering the
    teacher's ranks is cheaper than un-sorting the soft ranks."""
    teacher_ranks = exact_rank(teacher_logits, axis=-1)  # no gradient
    teacher_ranks = ops.take_along_axis(teacher_ranks, order, axis=-1)
    # Ranks of n entries, exact or soft, always have mean (n + 1) / 2.
    mean_rank = 0.5 * (student_ranks.shape[-1] + 1)
    return 1.0 - _correlation_with_known_mean(
        student_ranks, teacher_ranks, lambda x: mean_rank
    )


def dist_loss(
    teacher_logits,
    student_logits,
    temperature=4.0,
    beta=1.0,
    gamma=1.0,
    sample_weight=None,
):
    """Per-sample DIST loss (Huang et al., 2022).

    `tau^2 * (beta * inter_i + gamma * intra)` with
    `inter_i = 1 - rho(p_s[i, :], p_t[i, :])` (`pearson_loss`) and
    `intra = 1 - mean_c rho(p_s[:, c], p_t[:, c])` (`intra_class_loss`, one
    value for the whole batch, added to every sample). The batch mean of the
    result is DIST's `tau^2 * (beta * mean_i inter_i + gamma * intra)`.

    Args:
        teacher_logits: tensor of shape `(batch, classes)`.
        student_logits: tensor of shape `(batch, classes)`.
        temperature: `tau`.
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        sample_weight: optional per-sample weights used for the intra-class
            correlations (a weight-0 sample does not influence them).

    Returns:
        A tensor of shape `(batch,)`.
    """
    inter = pearson_loss(teacher_logits, student_logits, temperature)
    loss = beta * inter
    if gamma:
        intra = intra_class_loss(
            teacher_logits, student_logits, temperature, sample_weight
        )
        loss = loss + gamma * intra
    return (temperature**2) * loss


def entropy_weights(teacher_logits, temperature=1.0):
    """Normalized entropy of the teacher's softened output, per sample.

    `w_i = H(softmax(z_t[i] / tau)) / log(C)`, in `[0, 1]`: 0 for a one-hot
    (easy, confident) sample, 1 for a uniform (hard) one. Not differentiated.

    Args:
        teacher_logits: tensor of shape `(batch, classes)`.
        temperature: `tau`.

    Returns:
        A tensor of shape `(batch,)`.
    """
    teacher_logits = ops.stop_gradient(ops.convert_to_tensor(teacher_logits))
    log_p = ops.log_softmax(teacher_logits / temperature, axis=-1)
    return _normalized_entropy(ops.exp(log_p), log_p)


def _normalized_entropy(p, log_p):
    """`H(p) / log(C)` per row, from probabilities and their logarithms."""
    num_classes = p.shape[-1]
    # p log p -> 0 as p -> 0; masked (-inf) logits give exactly 0 * -inf.
    entropy = -ops.sum(ops.where(p > 0, p * log_p, 0.0), axis=-1)
    if num_classes is None:  # known only when the step runs
        # One class has entropy 0: the maximum only avoids 0 / log(1).
        classes = ops.cast(ops.shape(p)[-1], entropy.dtype)
        normalized = entropy / ops.log(ops.maximum(classes, 2.0))
        return ops.clip(normalized, 0.0, 1.0)
    if num_classes < 2:
        return ops.zeros_like(entropy)
    return ops.clip(entropy / math.log(num_classes), 0.0, 1.0)


def cmkd_loss(
    teacher_logits,
    student_logits,
    temperature=4.0,
    regularization_strength=DEFAULT_STRENGTH,
    window=DEFAULT_WINDOW,
    hard_samples="spearman",
    standardize=False,
    intra_weight=0.0,
    sample_weight=None,
):
    """Per-sample CMKD loss (library reading, see `CMKD`).

    `L_i = tau^2 * [(1 - w_i) * L_P,i + w_i * L_S,i]` for
    `hard_samples="spearman"`, or with `w_i` and `1 - w_i` swapped for
    `hard_samples="pearson"`, where `w_i = entropy_weights(z_t, tau)`,
    `L_P,i = pearson_loss(z_t, z_s, tau) + intra_weight * intra_class_loss`
    and `L_S,i = spearman_loss(z_t, z_s, tau, ...)`. With
    `standardize=True` both logits are first z-scored per sample
    (`keras_kd.losses.logits.standardize_logits`), and every term, the
    weights included, uses the standardized logits. Half-precision logits
    are used in float32 (the result has the student's dtype).

    Args:
        teacher_logits: tensor of shape `(batch, classes)`.
        student_logits: tensor of shape `(batch, classes)`.
        temperature: `tau`.
        regularization_strength: `eps` of the student's soft ranks (applied
            to `z_s / tau`).
        window: neighbours on each side compared softly by `soft_rank`.
        hard_samples: `"spearman"` or `"pearson"`, the term that high-entropy
            (hard) samples lean to.
        standardize: z-score the logits first.
        intra_weight: weight of DIST's intra-class term inside `L_P` (0
            leaves it out).
        sample_weight: optional per-sample weights used for the intra-class
            correlations.

    Returns:
        A tensor of shape `(batch,)`.
    """
    _check_hard_samples(hard_samples)
    teacher_logits = ops.stop_gradient(ops.convert_to_tensor(teacher_logits))
    teacher_logits, student_logits, dtype = _rank_precision(
        teacher_logits, student_logits
    )
    if standardize:
        teacher_logits = standardize_logits(teacher_logits)
        student_logits = standardize_logits(student_logits)
    # Every per-sample term is unchanged when the classes of a sample are
    # permuted alike, so all of them are computed in the order of the
    # student's sorted logits, from the one sort the soft ranks need (the
    # softmax gradient then shares the sort's gradient). This also leaves
    # nothing for XLA's CPU runtime to run before the two sorts, which it
    # then runs at the same time more often (docs/ops.md).
    scaled, student_ranks, order = sort_and_soft_rank(
        student_logits / temperature, regularization_strength, window
    )
    teacher_scaled = ops.take_along_axis(
        teacher_logits / temperature, order, axis=-1
    )
    # The teacher's probabilities serve both the weights and L_P.
    log_p_t = ops.log_softmax(teacher_scaled, axis=-1)
    p_t = ops.exp(log_p_t)
    weights = _normalized_entropy(p_t, log_p_t)
    pearson = 1.0 - _probability_correlation(
        ops.softmax(scaled, axis=-1), p_t
    )
    if intra_weight:  # across the batch, per class: in class order
        pearson = pearson + intra_weight * intra_class_loss(
            teacher_logits, student_logits, temperature, sample_weight
        )
    spearman = _spearman_in_order(teacher_logits, student_ranks, order)
    if hard_samples == "pearson":
        weights = 1.0 - weights
    loss = (temperature**2) * ((1.0 - weights) * pearson + weights * spearman)
    return ops.cast(loss, dtype)


# --------------------------------------------------------------------------
# Loss classes
# --------------------------------------------------------------------------


def _check_positive(name, value):
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"`{name}` must be positive and finite, got {value}.")
    return value


def _check_non_negative(name, value):
    value = float(value)
    if not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    return value


class _CorrelationLoss(DistillationLoss):
    """Shared `get_config` plumbing: the dtype is part of the config."""

    def get_config(self):
        config = super().get_config()
        config["dtype"] = self.dtype
        return config


class _BatchCoupledLoss(_CorrelationLoss):
    """A loss whose per-sample values contain a batch statistic.

    `keras.losses.Loss.__call__` hands `call` only the two tensors; these
    losses also need the sample weights to weight the batch statistic (the
    intra-class correlations), so `__call__` makes them available to `call`
    for the duration of the call and then defers to the standard Keras
    machinery (dtype conversion, masks, weighting, reduction). One instance
    should therefore not be called from several Python threads at once.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._batch_weights = None

    def __call__(self, y_true, y_pred, sample_weight=None):
        self._batch_weights = sample_weight
        try:
            return super().__call__(
                y_true, y_pred, sample_weight=sample_weight
            )
        finally:
            self._batch_weights = None


@keras.saving.register_keras_serializable(package="keras_kd")
class PearsonCorrelation(_CorrelationLoss):
    """Pearson (inter-class) correlation loss on softened outputs.

    Per sample: `1 - rho(softmax(z_s / tau), softmax(z_t / tau))`, the
    Pearson correlation across classes; then the Keras reduction (batch mean
    by default). 0 when the student's probabilities are an increasing affine
    function of the teacher's; insensitive to their scale and shift, unlike
    KL divergence. No `tau^2` factor.

    Args:
        temperature: softening temperature `tau`. Defaults to 1.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: dtype of the loss computation.

    Example:

    >>> loss = keras_kd.losses.PearsonCorrelation(temperature=4.0)
    >>> teacher_logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    >>> float(loss(teacher_logits, teacher_logits))  # identical: 0
    0.0
    """

    def __init__(
        self,
        temperature=1.0,
        name="pearson_correlation",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _check_positive("temperature", temperature)

    def call(self, teacher_output, student_output):
        return pearson_loss(teacher_output, student_output, self.temperature)

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class SpearmanCorrelation(_CorrelationLoss):
    """Spearman (rank) correlation loss between student and teacher logits.

    Per sample: `1 - rho(soft_rank(z_s / tau), rank(z_t))`, the Pearson
    correlation of the student's differentiable ranks with the teacher's
    exact ranks (ties averaged; the teacher is not differentiated). At small
    `regularization_strength` it equals `1 - scipy.stats.spearmanr`.

    Soft ranks only equal exact ranks when the student's logits are several
    `regularization_strength * tau` apart; logits closer than that blur
    into each other, so the loss of a student identical to its teacher is
    then slightly above 0 and its gradient pushes such logits apart. This is
    the usual behaviour of soft ranks against hard target ranks; lower the
    strength to make it negligible.

    Ranks come from `keras_kd.ops.rank`: each row is sorted once and the
    student's soft ranks are the exact ranks plus sigmoid corrections from
    the `window` nearest neighbours on each side in sorted order (pairs
    further apart count as hard 0/1 comparisons). Cost per row is
    O(C (log C + window)) time and O(C) memory instead of the O(C^2) of an
    all-pairs soft rank, so large vocabularies (C = 32000) fit easily. The
    sort itself dominates the cost; see `docs/losses/spearman.md` for
    measured timings.

    Args:
        temperature: `tau`; the student logits are divided by it before soft
            ranking, so `regularization_strength` is in units of `z / tau`.
            Defaults to 1.
        regularization_strength: `eps > 0`, the sigmoid width of the soft
            ranks. Smaller is closer to exact ranks but gives more local
            gradients. Defaults to 0.1.
        window: neighbours on each side compared softly. Defaults to 16.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: dtype of the loss computation.

    Example:

    >>> loss = keras_kd.losses.SpearmanCorrelation(
    ...     regularization_strength=0.01)
    >>> teacher_logits = np.array([[2.0, 0.5, -1.0, 0.1]])
    >>> float(loss(teacher_logits, 3.0 * teacher_logits + 1.0))  # same order
    0.0
    >>> float(loss(teacher_logits, -teacher_logits))  # reversed order
    2.0
    """

    def __init__(
        self,
        temperature=1.0,
        regularization_strength=DEFAULT_STRENGTH,
        window=DEFAULT_WINDOW,
        name="spearman_correlation",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _check_positive("temperature", temperature)
        self.regularization_strength = _check_positive(
            "regularization_strength", regularization_strength
        )
        self.window = _check_window(window)

    def call(self, teacher_output, student_output):
        return spearman_loss(
            teacher_output,
            student_output,
            self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
        )
        return config


def _check_hard_samples(hard_samples):
    if hard_samples not in HARD_SAMPLE_TERMS:
        raise ValueError(
            f"`hard_samples` must be one of {HARD_SAMPLE_TERMS}, got "
            f"{hard_samples!r}."
        )
    return hard_samples


def _check_window(window):
    if int(window) != window or window < 1:
        raise ValueError(f"`window` must be an integer >= 1, got {window}.")
    return int(window)


@keras.saving.register_keras_serializable(package="keras_kd")
class DIST(_BatchCoupledLoss):
    """DIST: inter- and intra-class Pearson correlation (Huang et al. 2022).

    `tau^2 * (beta * inter + gamma * intra)` with
    `inter = 1 - mean_i rho(p_s[i, :], p_t[i, :])` (per sample, across
    classes) and `intra = 1 - mean_c rho(p_s[:, c], p_t[:, c])` (per class,
    across the batch), `p = softmax(z / tau)`.

    The intra-class term is a property of the whole batch. To keep Keras
    semantics, the loss is returned per sample as
    `tau^2 * (beta * inter_i + gamma * intra)` and then reduced by Keras, so
    with all weights 1 and the default reduction the result is exactly the
    formula above. Sample weights: `__call__` computes the intra-class
    correlations as *weighted* correlations with the sample weights, and
    the Keras reduction weights each per-sample value. A sample of weight 0
    therefore contributes nothing: the loss equals the loss of the batch
    without it, times `(batch - 1) / batch` for `"sum_over_batch_size"`
    (Keras divides by the full batch size). Keras masks on the inputs are
    applied by the reduction only, not to the intra-class correlations.

    Args:
        temperature: `tau`. Defaults to 4 (the published CIFAR setting).
        beta: weight of the inter-class term. Defaults to 1.
        gamma: weight of the intra-class term. Defaults to 1.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: dtype of the loss computation.

    Example:

    >>> loss = keras_kd.losses.DIST(temperature=4.0)
    >>> teacher_logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    >>> float(loss(teacher_logits, teacher_logits))
    0.0
    >>> student_logits = np.array([[1.0, 1.5, -0.5], [0.5, 0.2, 2.0]])
    >>> # Weight 0 removes the second sample, from the intra-class term too:
    >>> weighted = loss(teacher_logits, student_logits, sample_weight=[1, 0])
    """

    def __init__(
        self,
        temperature=4.0,
        beta=1.0,
        gamma=1.0,
        name="dist",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _check_positive("temperature", temperature)
        self.beta = _check_non_negative("beta", beta)
        self.gamma = _check_non_negative("gamma", gamma)

    def call(self, teacher_output, student_output):
        return dist_loss(
            teacher_output,
            student_output,
            temperature=self.temperature,
            beta=self.beta,
            gamma=self.gamma,
            sample_weight=self._batch_weights,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature, beta=self.beta, gamma=self.gamma
        )
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class CMKD(_BatchCoupledLoss):
    """Correlation matching KD: entropy-weighted Pearson + Spearman losses.

    CMKD (Niu et al., 2024, arXiv:2410.06561) combines a Pearson-based and a
    Spearman-based loss whose weights change per sample with the difficulty
    of the sample, measured by the entropy of the teacher's output. That is
    all the source the project has (a summary of the paper written from its
    abstract) says about the loss; its full text was not available. The
    formulas below are the library's own reading (`docs/losses/cmkd.md`
    lists what comes from the source and what does not):

        w_i   = H(p_t,i) / log C                 (in [0, 1], no gradient)
        L_P,i = 1 - rho(p_s,i, p_t,i)  [+ intra_weight * DIST intra term]
        L_S,i = 1 - rho(soft_rank(z_s,i / tau), rank(z_t,i))
        L_i   = tau^2 * [(1 - w_i) * L_P,i + w_i * L_S,i]

    with `p = softmax(z / tau)`. By default hard (high-entropy) samples lean
    to the Spearman term and easy (confident) samples to the Pearson term;
    `hard_samples="pearson"` swaps `w_i` and `1 - w_i`. The teacher's ranks
    are exact (it needs no gradient); the student's are
    `keras_kd.ops.rank.soft_rank` (sort once, sigmoid comparisons with
    `window` sorted neighbours on each side, O(C (log C + window))).
    `standardize=True` adds a z-score step (the library's option, not from
    the source): both logits become `(z - mean) / (std * sqrt(C / (C - 1))
    + 1e-7)` per sample before everything else (weights included); a base
    temperature around 2 is then usual.

    As for `SpearmanCorrelation`, the loss of a student identical to its
    teacher is exactly 0 only when the logits are several
    `regularization_strength * tau` apart (the soft ranks are then exact);
    otherwise it is slightly positive.

    Sample weights: as in `DIST`, a sample of weight 0 contributes nothing,
    including to the optional intra-class term (weighted correlations).

    Args:
        temperature: `tau`. Defaults to 4.
        regularization_strength: `eps > 0` of the student's soft ranks, in
            units of `z / tau`. Defaults to 0.1.
        window: neighbours on each side compared softly. Defaults to 16.
        hard_samples: `"spearman"` (default) or `"pearson"`: which term
            high-entropy samples lean to.
        standardize: z-score the logits first. Defaults to False.
        intra_weight: weight of DIST's intra-class term added to `L_P,i`.
            Defaults to 0 (left out).
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: dtype of the loss computation.

    Example:

    >>> loss = keras_kd.losses.CMKD(temperature=4.0, hard_samples="spearman")
    >>> teacher_logits = np.array([[8.0, 2.0, -4.0, 14.0],
    ...                            [4.0, -6.0, 12.0, -14.0]])
    >>> float(loss(teacher_logits, teacher_logits))  # well separated: 0
    0.0
    >>> term = keras_kd.Term(loss, weight=1.0)  # in a Distiller
    """

    def __init__(
        self,
        temperature=4.0,
        regularization_strength=DEFAULT_STRENGTH,
        window=DEFAULT_WINDOW,
        hard_samples="spearman",
        standardize=False,
        intra_weight=0.0,
        name="cmkd",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _check_positive("temperature", temperature)
        self.regularization_strength = _check_positive(
            "regularization_strength", regularization_strength
        )
        self.window = _check_window(window)
        self.hard_samples = _check_hard_samples(hard_samples)
        self.standardize = bool(standardize)
        self.intra_weight = _check_non_negative("intra_weight", intra_weight)

    def call(self, teacher_output, student_output):
        return cmkd_loss(
            teacher_output,
            student_output,
            temperature=self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
            hard_samples=self.hard_samples,
            standardize=self.standardize,
            intra_weight=self.intra_weight,
            sample_weight=self._batch_weights,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
            hard_samples=self.hard_samples,
            standardize=self.standardize,
            intra_weight=self.intra_weight,
        )
        return config


__all__ = [
    "CMKD",
    "DIST",
    "PearsonCorrelation",
    "SpearmanCorrelation",
    "cmkd_loss",
    "dist_loss",
    "entropy_weights",
    "intra_class_loss",
    "pearson_correlation",
    "pearson_loss",
    "spearman_loss",
    "weighted_pearson_correlation",
]

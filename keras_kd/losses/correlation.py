"""Correlation losses on logits: Pearson (inter-class, on softened
outputs) and Spearman (on ranks).

Each loss is a pure function of tensors (`pearson_loss`, `spearman_loss`)
plus a thin `DistillationLoss` class around it. Notation: `z` are logits of
shape `(batch, classes)`, `tau` the temperature, `p = softmax(z / tau)` and
`rho(a, b)` the Pearson correlation of two vectors
(`keras_kd.ops.correlation.pearson_correlation`).

Spearman terms rank the student's logits with
`keras_kd.ops.rank.sort_and_soft_rank` (the soft ranks of `soft_rank`: sort
once, smooth comparisons with a fixed window of sorted neighbours, left in
sorted order) and the teacher's with `keras_kd.ops.rank.exact_rank`; both
are pure `keras.ops`, so every loss here runs on any backend and inside
compiled (XLA) training steps. The per-sample terms are computed in the
student's sorted order, into which the teacher's values are gathered.
`DIST` (`keras_kd.losses.dist`) and `CMKD` (`keras_kd.losses.cmkd`) build
on these terms.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.losses.base import DistillationLoss
from keras_kd.ops.correlation import correlation_with_known_mean
from keras_kd.ops.correlation import probability_correlation
from keras_kd.ops.probabilities import as_logits, softened
from keras_kd.ops.rank import DEFAULT_STRENGTH
from keras_kd.ops.rank import DEFAULT_WINDOW
from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import sort_and_soft_rank
from keras_kd.ops.scatter import gather_rows
from keras_kd._typing import Config, Tensor


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
    return 1.0 - probability_correlation(
        softened(student_logits, temperature),
        softened(teacher_logits, temperature),
    )


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
    teacher_logits, student_logits, dtype = rank_precision(
        teacher_logits, student_logits
    )
    if not (isinstance(temperature, (int, float)) and temperature == 1):
        student_logits = student_logits / temperature
    _, student_ranks, order = sort_and_soft_rank(
        student_logits, regularization_strength, window, index_dtype=None
    )
    loss = spearman_in_order(teacher_logits, student_ranks, order)
    return ops.cast(loss, dtype)


def rank_precision(teacher_logits, student_logits):
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


def spearman_in_order(teacher_logits, student_ranks, order):
    """`1 - rho` of soft ranks left in the student's sorted order (`order`)
    and the teacher's exact ranks gathered into that order. The correlation
    is unchanged when both vectors are permuted alike, and gathering the
    teacher's ranks is cheaper than un-sorting the soft ranks."""
    teacher_ranks = exact_rank(teacher_logits, axis=-1)  # no gradient
    teacher_ranks = gather_rows(teacher_ranks, order)
    # Ranks of n entries, exact or soft, always have mean (n + 1) / 2.
    mean_rank = 0.5 * (student_ranks.shape[-1] + 1)
    return 1.0 - correlation_with_known_mean(
        student_ranks, teacher_ranks, mean_rank
    )


def check_window(window):
    if int(window) != window or window < 1:
        raise ValueError(f"`window` must be an integer >= 1, got {window}.")
    return int(window)


@keras.saving.register_keras_serializable(package="keras_kd")
class PearsonCorrelation(DistillationLoss):
    """Pearson (inter-class) correlation loss on softened outputs.

    Per sample: `1 - rho(softmax(z_s / tau), softmax(z_t / tau))`, the
    Pearson correlation across classes; then the Keras reduction (batch mean
    by default). 0 when the student's probabilities are an increasing affine
    function of the teacher's; insensitive to their scale and shift, unlike
    KL divergence. No `tau^2` factor.

    Args:
        temperature: softening temperature `tau`. Defaults to 1.
        from_logits: `True` (default) when the teacher and student outputs
            are logits; `False` when they are probabilities (e.g. a softmax
            output), read as `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`): the loss is then that
            of the logits.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: dtype of the loss computation.

    Example:

    >>> loss = keras_kd.losses.PearsonCorrelation(temperature=4.0)
    >>> teacher_logits = np.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    >>> float(loss(teacher_logits, teacher_logits))  # identical: 0
    0.0
    """

    reads_distribution = True

    def __init__(
        self,
        temperature: float = 1.0,
        from_logits: bool = True,
        name: str = "pearson_correlation",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _checks.positive("temperature", temperature)
        self.from_logits = bool(from_logits)

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return pearson_loss(
            as_logits(teacher_output, self.from_logits),
            as_logits(student_output, self.from_logits),
            self.temperature,
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(temperature=self.temperature)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class SpearmanCorrelation(DistillationLoss):
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
        from_logits: `True` (default) when the teacher and student outputs
            are logits; `False` when they are probabilities (e.g. a softmax
            output), read as `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`): the loss is then that
            of the logits.
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

    reads_distribution = True

    def __init__(
        self,
        temperature: float = 1.0,
        regularization_strength: float = DEFAULT_STRENGTH,
        window: int | None = DEFAULT_WINDOW,
        from_logits: bool = True,
        name: str = "spearman_correlation",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _checks.positive("temperature", temperature)
        self.regularization_strength = _checks.positive(
            "regularization_strength", regularization_strength
        )
        self.window = check_window(window)
        self.from_logits = bool(from_logits)

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return spearman_loss(
            as_logits(teacher_output, self.from_logits),
            as_logits(student_output, self.from_logits),
            self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            temperature=self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
        )
        return config


__all__ = [
    "PearsonCorrelation",
    "SpearmanCorrelation",
    "pearson_loss",
    "spearman_loss",
]

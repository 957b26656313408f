"""CMKD: correlation matching knowledge distillation, entropy-weighted
Pearson and Spearman losses (Niu et al., arXiv:2410.06561), as the library
reads it (see `CMKD` and `docs/losses/cmkd.md`)."""

from __future__ import annotations

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.losses.base import BatchCoupledLoss
from keras_kd.losses.correlation import check_window, rank_precision
from keras_kd.losses.correlation import spearman_in_order
from keras_kd.losses.dist import intra_class_loss
from keras_kd.losses.logits import standardize_logits
from keras_kd.ops.correlation import probability_correlation
from keras_kd.ops.probabilities import as_logits, normalized_entropy
from keras_kd.ops.rank import DEFAULT_STRENGTH
from keras_kd.ops.rank import DEFAULT_WINDOW
from keras_kd.ops.rank import sort_and_soft_rank
from keras_kd.ops.scatter import gather_rows
from keras_kd._typing import Config, Tensor

HARD_SAMPLE_TERMS = ("spearman", "pearson")


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
    return normalized_entropy(ops.exp(log_p), log_p)


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
    teacher_logits, student_logits, dtype = rank_precision(
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
        student_logits / temperature, regularization_strength, window,
        index_dtype=None,
    )
    teacher_scaled = gather_rows(teacher_logits / temperature, order)
    # The teacher's probabilities serve both the weights and L_P.
    log_p_t = ops.log_softmax(teacher_scaled, axis=-1)
    p_t = ops.exp(log_p_t)
    weights = normalized_entropy(p_t, log_p_t)
    pearson = 1.0 - probability_correlation(
        ops.softmax(scaled, axis=-1), p_t
    )
    if intra_weight:  # across the batch, per class: in class order
        pearson = pearson + intra_weight * intra_class_loss(
            teacher_logits, student_logits, temperature, sample_weight
        )
    spearman = spearman_in_order(teacher_logits, student_ranks, order)
    if hard_samples == "pearson":
        weights = 1.0 - weights
    loss = (temperature**2) * ((1.0 - weights) * pearson + weights * spearman)
    return ops.cast(loss, dtype)


def _check_hard_samples(hard_samples):
    if hard_samples not in HARD_SAMPLE_TERMS:
        raise ValueError(
            f"`hard_samples` must be one of {HARD_SAMPLE_TERMS}, got "
            f"{hard_samples!r}."
        )
    return hard_samples


@keras.saving.register_keras_serializable(package="keras_kd")
class CMKD(BatchCoupledLoss):
    """Correlation matching KD: entropy-weighted Pearson + Spearman losses.

    CMKD (Niu et al., 2024, arXiv:2410.06561) combines a Pearson-based and a
    Spearman-based loss whose weights change per sample with the difficulty
    of the sample, measured by the entropy of the teacher's output. That is
    all the paper's abstract says about the loss; its full text was not
    available. The formulas below are the library's own reading
    (`docs/losses/cmkd.md` lists what comes from the source and what does
    not):

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
        from_logits: `True` (default) when the teacher and student outputs
            are logits; `False` when they are probabilities (e.g. a softmax
            output), read as `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`): the loss is then that
            of the logits.
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

    reads_distribution = True

    def __init__(
        self,
        temperature: float = 4.0,
        regularization_strength: float = DEFAULT_STRENGTH,
        window: int | None = DEFAULT_WINDOW,
        hard_samples: str = "spearman",
        standardize: bool = False,
        intra_weight: float = 0.0,
        from_logits: bool = True,
        name: str = "cmkd",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _checks.positive("temperature", temperature)
        self.regularization_strength = _checks.positive(
            "regularization_strength", regularization_strength
        )
        self.window = check_window(window)
        self.hard_samples = _check_hard_samples(hard_samples)
        self.standardize = bool(standardize)
        self.intra_weight = _checks.non_negative("intra_weight", intra_weight)
        self.from_logits = bool(from_logits)

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return cmkd_loss(
            as_logits(teacher_output, self.from_logits),
            as_logits(student_output, self.from_logits),
            temperature=self.temperature,
            regularization_strength=self.regularization_strength,
            window=self.window,
            hard_samples=self.hard_samples,
            standardize=self.standardize,
            intra_weight=self.intra_weight,
            sample_weight=self._batch_weights,
        )

    def get_config(self) -> Config:
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


__all__ = ["CMKD", "cmkd_loss", "entropy_weights"]

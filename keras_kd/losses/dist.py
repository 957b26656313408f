"""DIST: inter- and intra-class Pearson correlation of softened outputs
(Huang et al., "Knowledge Distillation from A Stronger Teacher",
arXiv:2205.10536).

The inter-class term is `keras_kd.losses.correlation.pearson_loss`'s
formula, computed from the same softened outputs as the other term; the
intra-class term (`intra_class_loss`) correlates each class's
probabilities across the batch, so the loss couples the samples of a batch
(`keras_kd.losses.base.BatchCoupledLoss`).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.losses.base import BatchCoupledLoss
from keras_kd.ops.correlation import pearson_correlation
from keras_kd.ops.correlation import probability_correlation
from keras_kd.ops.correlation import weighted_pearson_correlation
from keras_kd.ops.probabilities import as_logits, softened
from keras_kd._typing import Config, Tensor


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
    p_t, p_s = _softened_pair(teacher_logits, student_logits, temperature)
    return _intra_class_loss(p_t, p_s, sample_weight)


def _softened_pair(teacher_logits, student_logits, temperature):
    """The teacher's (not differentiated) and the student's softened
    probabilities."""
    teacher_logits = ops.stop_gradient(ops.convert_to_tensor(teacher_logits))
    return (softened(teacher_logits, temperature),
            softened(student_logits, temperature))


def _intra_class_loss(p_t, p_s, sample_weight):
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
    # Both terms read the same softened outputs: one softmax each (on an
    # eager backend every op is a pass over the batch).
    p_t, p_s = _softened_pair(teacher_logits, student_logits, temperature)
    loss = beta * (1.0 - probability_correlation(p_s, p_t))
    if gamma:
        loss = loss + gamma * _intra_class_loss(p_t, p_s, sample_weight)
    return (temperature**2) * loss


@keras.saving.register_keras_serializable(package="keras_kd")
class DIST(BatchCoupledLoss):
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
        from_logits: `True` (default) when the teacher and student outputs
            are logits; `False` when they are probabilities (e.g. a softmax
            output), read as `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`): the loss is then that
            of the logits.
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

    reads_distribution = True

    def __init__(
        self,
        temperature: float = 4.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        from_logits: bool = True,
        name: str = "dist",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _checks.positive("temperature", temperature)
        self.beta = _checks.non_negative("beta", beta)
        self.gamma = _checks.non_negative("gamma", gamma)
        self.from_logits = bool(from_logits)

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return dist_loss(
            as_logits(teacher_output, self.from_logits),
            as_logits(student_output, self.from_logits),
            temperature=self.temperature,
            beta=self.beta,
            gamma=self.gamma,
            sample_weight=self._batch_weights,
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            temperature=self.temperature, beta=self.beta, gamma=self.gamma
        )
        return config


__all__ = ["DIST", "dist_loss", "intra_class_loss"]

"""Losses on logits: Hinton knowledge distillation, with optional z-score
logit standardization."""

from __future__ import annotations

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.losses.base import DistillationLoss
from keras_kd.ops.probabilities import as_logits
from keras_kd._typing import Config, Tensor


def standardize_logits(logits: Tensor, epsilon: float = 1e-7) -> Tensor:
    """Z-score logits per sample over the class axis.

    `(z - mean(z)) / (std(z) + epsilon)`, with the unbiased (N - 1) standard
    deviation so that the result matches the reference implementation of
    logit standardization (Sun et al., CVPR 2024). `keras.ops.std` is the
    population standard deviation; it is rescaled by `sqrt(C / (C - 1))`.

    Args:
        logits: tensor of shape `(..., classes)`.
        epsilon: added to the standard deviation.

    Returns:
        A tensor of the same shape as `logits`.
    """
    logits = ops.convert_to_tensor(logits)  # NumPy minus a torch tensor fails
    num_classes = ops.shape(logits)[-1]
    mean = ops.mean(logits, axis=-1, keepdims=True)
    correction = ops.sqrt(
        ops.cast(num_classes, logits.dtype)
        / ops.cast(num_classes - 1, logits.dtype)
    )
    centred = logits - mean
    variance = ops.mean(ops.square(centred), axis=-1, keepdims=True)
    # sqrt has an infinite derivative at 0, so a row with exactly zero
    # variance (e.g. the all-zero output of a zero-initialized head) would get
    # a NaN gradient (0 * inf) under XLA. Its standard
    # deviation is taken as 1 instead: it standardizes to 0 either way.
    variance = ops.where(variance > 0, variance, 1.0)
    std = ops.sqrt(variance) * correction
    return centred / (std + epsilon)


def kd_loss(teacher_logits: Tensor, student_logits: Tensor,
            temperature: float = 4.0, standardize: bool = False) -> Tensor:
    """Per-sample Hinton distillation loss.

    `tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))`, computed from
    log-softmax for numerical stability.

    Args:
        teacher_logits: tensor of shape `(batch, classes)`.
        student_logits: tensor of shape `(batch, classes)`.
        temperature: softening temperature `tau`.
        standardize: apply `standardize_logits` to both inputs first.

    Returns:
        A tensor of shape `(batch,)`.
    """
    teacher_logits = ops.stop_gradient(ops.convert_to_tensor(teacher_logits))
    if standardize:
        teacher_logits = standardize_logits(teacher_logits)
        student_logits = standardize_logits(student_logits)
    log_p_t = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = ops.log_softmax(student_logits / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return (temperature**2) * kl


@keras.saving.register_keras_serializable(package="keras_kd")
class KD(DistillationLoss):
    """Hinton knowledge distillation (KL divergence of softened outputs).

    Computes `tau^2 * KL(p_teacher || p_student)` per sample with
    `p = softmax(logits / tau)`, then the mean over the batch. With
    `standardize=True` both logits are first z-scored per sample
    (logit standardization, Sun et al. 2024), in which case `temperature`
    acts as the base temperature (2 is the published default).

    Args:
        temperature: softening temperature `tau`. Defaults to 4.
        standardize: z-score the logits of teacher and student first.
        from_logits: `True` (default) when the teacher and student outputs
            are logits; `False` when they are probabilities (e.g. a softmax
            output), read as `log(clip(p, epsilon, 1 - epsilon))`
            (`keras_kd.ops.probabilities.as_logits`): the loss is then that
            of the logits.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction. Defaults to `"sum_over_batch_size"`.
        dtype: dtype of the loss computation.

    Example:

    >>> loss = keras_kd.losses.KD(temperature=4.0)
    >>> teacher_logits = np.array([[2.0, 0.5, -1.0]])
    >>> loss(teacher_logits, teacher_logits + 3.0)  # shift invariant: 0
    """

    matches_channels = False
    reads_distribution = True

    def __init__(
        self,
        temperature: float = 4.0,
        standardize: bool = False,
        from_logits: bool = True,
        name: str = "kd",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _checks.positive("temperature", temperature)
        self.standardize = bool(standardize)
        self.from_logits = bool(from_logits)

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return kd_loss(
            as_logits(teacher_output, self.from_logits),
            as_logits(student_output, self.from_logits),
            temperature=self.temperature,
            standardize=self.standardize,
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            temperature=self.temperature, standardize=self.standardize
        )
        return config

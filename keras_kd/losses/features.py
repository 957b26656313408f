"""Losses on intermediate features: attention transfer and FitNet hints."""

from __future__ import annotations

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.losses.base import DistillationLoss
from keras_kd.ops.energy import channel_energy
from keras_kd._typing import Config, Shape, Tensor


def match_spatial(teacher_feature, student_feature):
    """Average-pool the larger of two feature maps to the smaller size.

    Works on channels-last maps of rank 3 (`(batch, steps, channels)`) or
    rank 4 (`(batch, height, width, channels)`); other ranks are returned
    unchanged. Each spatial size must divide the other.

    Returns:
        `(teacher_feature, student_feature)` with equal spatial sizes.
    """
    rank = len(teacher_feature.shape)
    if rank not in (3, 4) or len(student_feature.shape) != rank:
        return teacher_feature, student_feature
    t_size = tuple(teacher_feature.shape[1:-1])
    s_size = tuple(student_feature.shape[1:-1])
    if t_size == s_size:
        return teacher_feature, student_feature
    target = tuple(min(t, s) for t, s in zip(t_size, s_size))

    def pool(x, size):
        factors = []
        for big, small in zip(size, target):
            if big % small:
                raise ValueError(
                    "Cannot pool feature maps of spatial size "
                    f"{t_size} (teacher) and {s_size} (student) to a common "
                    "size: each size must divide the other."
                )
            factors.append(big // small)
        if all(f == 1 for f in factors):
            return x
        return ops.average_pool(x, tuple(factors), strides=tuple(factors))

    return pool(teacher_feature, t_size), pool(student_feature, s_size)


def check_poolable(teacher_shape, student_shape, where):
    """Raises a `ValueError` unless two feature shapes have the same rank and
    spatial sizes that `match_spatial` can pool to a common size.

    Args:
        teacher_shape: static shape of the teacher feature.
        student_shape: static shape of the student feature.
        where: description of the pair used in the error message.
    """
    if len(teacher_shape) != len(student_shape):
        raise ValueError(f"Feature ranks differ for {where}.")
    for t, s in zip(teacher_shape[1:-1], student_shape[1:-1]):
        if t and s and max(t, s) % min(t, s):
            raise ValueError(
                f"Spatial sizes cannot be pooled to a common size for "
                f"{where}: each size must divide the other."
            )


def attention_map(feature, p=2):
    """Spatial attention of a channels-last feature map.

    `normalize(flatten(mean_c |F|^p))`, L2-normalised per sample.

    Args:
        feature: tensor of shape `(batch, ..., channels)`.
        p: power applied to the absolute activations.

    Returns:
        A tensor of shape `(batch, positions)`.
    """
    if p == 2:
        # |F|^2 is F^2, values and gradients alike: `channel_energy` is
        # one pass over the feature map each way on PyTorch, where
        # `power(abs(F), p)` then a mean is several (and `ops.power`, a
        # tensor exponent, is slow there).
        att = channel_energy(feature)
    else:
        att = ops.mean(ops.power(ops.abs(feature), p), axis=-1)
    att = ops.reshape(att, (ops.shape(att)[0], -1))
    return att / (ops.norm(att, axis=-1, keepdims=True) + 1e-12)


def check_spatial(teacher_shape, student_shape, where):
    """Raises a `ValueError` unless both shapes are channels-last feature
    maps with a spatial axis (rank 3 or more): the attention map of a
    vector `(batch, channels)` is one value per sample, which the L2
    normalisation turns into 1, so attention transfer on vectors would be
    identically 0."""
    for role, shape in (("teacher", teacher_shape),
                        ("student", student_shape)):
        if len(shape) < 3:
            raise ValueError(
                "Attention transfer compares spatial attention maps: it "
                "needs channels-last feature maps with a spatial axis, "
                f"`(batch, ..., channels)`, but the {role} value of {where} "
                f"has shape {tuple(shape)}. On vectors the loss would be "
                "identically 0; read a convolutional layer, or use "
                "`FeatureMSE` for vectors."
            )


def attention_transfer_loss(teacher_feature, student_feature, p=2):
    """Per-sample attention transfer loss (Zagoruyko & Komodakis 2017).

    `mean((at(F_s) - at(F_t))^2)` over spatial positions, with the larger
    map average-pooled to the smaller first.

    Raises:
        ValueError: a feature without a spatial axis (rank 2).

    Returns:
        A tensor of shape `(batch,)`.
    """
    check_spatial(teacher_feature.shape, student_feature.shape,
                  "attention transfer")
    teacher_feature = ops.stop_gradient(
        ops.convert_to_tensor(teacher_feature))
    teacher_feature, student_feature = match_spatial(
        teacher_feature, student_feature
    )
    diff = attention_map(student_feature, p) - attention_map(teacher_feature, p)
    return ops.mean(ops.square(diff), axis=-1)


def feature_mse_loss(teacher_feature, student_feature):
    """Per-sample mean squared error between two feature maps.

    Returns:
        A tensor of shape `(batch,)`.
    """
    teacher_feature = ops.stop_gradient(
        ops.convert_to_tensor(teacher_feature))
    teacher_feature, student_feature = match_spatial(
        teacher_feature, student_feature
    )
    sq = ops.square(student_feature - teacher_feature)
    return ops.mean(ops.reshape(sq, (ops.shape(sq)[0], -1)), axis=-1)


@keras.saving.register_keras_serializable(package="keras_kd")
class AttentionTransfer(DistillationLoss):
    """Attention transfer: match the spatial attention of two feature maps.

    The attention of a channels-last feature map `F` is the L2-normalised
    map of `mean_c |F|^p`; the loss is the mean squared difference of the
    teacher and student attentions. Channel counts may differ (no adapter
    is needed); when spatial sizes differ the larger map is average-pooled
    to the smaller. The usual weight in a `Term` is 1000. Features
    without a spatial axis (vectors, `(batch, channels)`) are refused: their
    attention map is a single value per sample and the loss would be
    identically 0.

    Args:
        p: power applied to the activations. Defaults to 2.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction.
        dtype: dtype of the loss computation.

    Example:

    >>> term = keras_kd.Term(
    ...     keras_kd.losses.AttentionTransfer(), weight=1000.0,
    ...     teacher_layer="t_stage2", student_layer="s_stage2")
    """

    matches_channels = False

    def __init__(
        self, p: float = 2, name: str = "attention_transfer",
        reduction: str = "sum_over_batch_size", dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _checks.positive("p", p)
        self.p = p

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return attention_transfer_loss(teacher_output, student_output, self.p)

    def check_shapes(self, teacher_shape: Shape, student_shape: Shape,
                     where: str) -> None:
        check_spatial(teacher_shape, student_shape, where)

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(p=self.p)
        return config


@keras.saving.register_keras_serializable(package="keras_kd")
class FeatureMSE(DistillationLoss):
    """FitNet hint: mean squared error between teacher and student features.

    When the channel counts differ, the `Distiller` maps the student
    feature to the teacher's channels with a trainable adapter (an affine
    map on the channel axis, a 1x1 convolution on images) that trains with
    the student and is never exported. When spatial sizes differ the larger map is
    average-pooled to the smaller.

    Args:
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction.
        dtype: dtype of the loss computation.

    Example:

    >>> term = keras_kd.Term(
    ...     keras_kd.losses.FeatureMSE(), weight=1.0,
    ...     teacher_layer="t_stage2", student_layer="s_stage2")
    """

    def __init__(
        self, name: str = "feature_mse",
        reduction: str = "sum_over_batch_size", dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return feature_mse_loss(teacher_output, student_output)

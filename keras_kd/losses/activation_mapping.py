"""Non-directional activation mapping (NDAM, the feature loss of LAKD).

A spatial map built from the teacher's feature says where the teacher's
activations are strong; it weights the squared difference between the
student and teacher features. The complement of the map weights a second
term, so that how tightly the student is held to the teacher where the
teacher is *not* active is a separate knob.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.losses.base import DistillationLoss
from keras_kd.losses.features import match_spatial
from keras_kd._typing import Config, Tensor

POOLINGS = ("avg_max", "avg", "max")
NORMALIZATIONS = ("sigmoid", "minmax")


def _check_choice(value, choices, argument):
    if value not in choices:
        raise ValueError(
            f"`{argument}` must be one of {choices}, got {value!r}."
        )


def _check_feature_rank(feature, role):
    if len(feature.shape) < 3:
        raise ValueError(
            "ActivationMapping needs channels-last feature maps with at "
            "least one spatial axis, `(batch, ..., channels)`; the "
            f"{role} feature has shape {tuple(feature.shape)}."
        )


def activation_map(feature, pooling="avg_max", normalize="sigmoid"):
    """Spatial attention map of a channels-last feature map, in [0, 1].

    The channels are pooled at every position, by their mean
    (`"avg"`), their maximum (`"max"`) or the sum of the two (`"avg_max"`,
    the default). The pooled map is then brought into [0, 1] per sample:

    - `"sigmoid"`: `sigmoid((m - mean(m)) / (std(m) + 1e-6))`, the
      sigmoid of the map standardised over its positions (so that the
      result does not depend on the scale of the activations, and a
      non-negative ReLU feature does not saturate at 0.5 or above);
    - `"minmax"`: `(m - min(m)) / (max(m) - min(m) + 1e-6)`.

    Args:
        feature: tensor of shape `(batch, ..., channels)` with at least
            one spatial axis.
        pooling: `"avg_max"`, `"avg"` or `"max"`.
        normalize: `"sigmoid"` or `"minmax"`.

    Returns:
        A tensor of shape `(batch, positions)` with values in [0, 1].

    Example:

    >>> a = activation_map(np.random.rand(2, 8, 8, 16).astype("float32"))
    >>> a.shape
    TensorShape([2, 64])
    """
    _check_choice(pooling, POOLINGS, "pooling")
    _check_choice(normalize, NORMALIZATIONS, "normalize")
    _check_feature_rank(feature, "input")
    if pooling == "avg":
        pooled = ops.mean(feature, axis=-1)
    elif pooling == "max":
        pooled = ops.max(feature, axis=-1)
    else:
        pooled = ops.mean(feature, axis=-1) + ops.max(feature, axis=-1)
    pooled = ops.reshape(pooled, (ops.shape(pooled)[0], -1))
    if normalize == "sigmoid":
        centred = pooled - ops.mean(pooled, axis=-1, keepdims=True)
        scale = ops.std(pooled, axis=-1, keepdims=True) + 1e-6
        return ops.sigmoid(centred / scale)
    low = ops.min(pooled, axis=-1, keepdims=True)
    high = ops.max(pooled, axis=-1, keepdims=True)
    return (pooled - low) / (high - low + 1e-6)


def _after(tensor, *tensors):
    """`tensor`, read only once `tensors` are computed (TensorFlow graphs;
    unchanged otherwise)."""
    if keras.backend.backend() != "tensorflow":
        return tensor
    import tensorflow as tf

    if tf.executing_eagerly():
        return tensor
    with tf.control_dependencies(list(tensors)):
        return tf.identity(tensor)


def _channel_sum_of_squares(x):
    """`sum(x ** 2, axis=-1)` as a contraction of `x` with itself, without
    the full-size temporary of `sum(square(x))`. (TensorFlow's
    `reduce_euclidean_norm` would also avoid it but has no XLA kernel.)"""
    return ops.einsum("...c,...c->...", x, x)


def _channel_mean_squared_error(student_feature, teacher_feature):
    """`mean_c((student - teacher) ** 2)`, differentiable in the student
    feature only (the teacher's is a constant here).

    Written for memory: the forward pass reduces the difference over the
    channels without a full-size tensor of squares, and the
    gradient is written out, `(2 / C) * (student - teacher) * upstream`,
    so that the backward pass keeps one full-size tensor (the difference)
    from the forward pass and creates one (the gradient). Differentiating
    `mean(square(d))` op by op also materialises the broadcast upstream
    gradient and `2 * d` at full size; on a large early feature map these
    temporaries set the peak memory of the loss. The upstream gradient of
    this loss does not depend on its value, so in a graph the gradient
    could be computed before the value; it is made to wait for the value,
    which frees the difference as soon as the gradient has read it (and
    lets TensorFlow write the gradient into the difference's buffer).
    """
    channels = student_feature.shape[-1]

    @ops.custom_gradient
    def squared_error(student):
        diff = student - teacher_feature
        value = _channel_sum_of_squares(diff) / channels

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            scale = ops.expand_dims(upstream, -1) * (2.0 / channels)
            return _after(diff, value) * ops.cast(scale, diff.dtype)

        return value, grad

    return squared_error(student_feature)


def activation_mapping_loss(
    teacher_feature, student_feature, alpha=1.0, beta=0.1,
    pooling="avg_max", normalize="sigmoid",
):
    """Per-sample NDAM loss.

    With `A = activation_map(F_t)` and `D` the squared difference of the
    two features averaged over channels, both of shape `(batch,
    positions)`:
    `alpha * mean_p(A * D) + beta * mean_p((1 - A) * D)`. The larger map is
    average-pooled to the smaller spatial size first; the map is built
    from the (pooled) teacher feature and carries no gradient.

    Returns:
        A tensor of shape `(batch,)`.
    """
    _check_feature_rank(teacher_feature, "teacher")
    _check_feature_rank(student_feature, "student")
    if teacher_feature.shape[-1] != student_feature.shape[-1]:
        raise ValueError(
            "ActivationMapping compares features with the same number of "
            f"channels; got teacher shape {tuple(teacher_feature.shape)} "
            f"and student shape {tuple(student_feature.shape)}. Map the "
            "student feature to the teacher's channels first (the Distiller "
            "and LocalModules insert an adapter for this)."
        )
    teacher_feature = ops.stop_gradient(
        ops.convert_to_tensor(teacher_feature))
    teacher_feature, student_feature = match_spatial(
        teacher_feature, student_feature
    )
    attention = activation_map(teacher_feature, pooling, normalize)
    diff = _channel_mean_squared_error(student_feature, teacher_feature)
    diff = ops.reshape(diff, (ops.shape(diff)[0], -1))
    attended = ops.mean(attention * diff, axis=-1)
    missed = ops.mean((1.0 - attention) * diff, axis=-1)
    return alpha * attended + beta * missed


@keras.saving.register_keras_serializable(package="keras_kd")
class ActivationMapping(DistillationLoss):
    """Non-directional activation mapping (NDAM), the feature loss of LAKD.

    A spatial map `A` in [0, 1] is built from the teacher feature by
    pooling its channels with both their mean and their maximum and
    normalising per sample (see `activation_map`). It weights the squared
    difference `D` between student and teacher features:

    `loss = alpha * mean(A * D) + beta * mean((1 - A) * D)`

    The first term aligns the student where the teacher is active; the
    second, on the complement of the map, is the term for what the teacher
    misses: with `beta < alpha` the student is held only loosely there and
    its other losses (in the last module, the task loss) decide what it
    learns. `beta = 0` leaves those regions free; `alpha = beta` is plain
    feature MSE scaled by `alpha`.

    This is the library's reading of LAKD (Zhang et al., 2024,
    arXiv:2408.11478), whose full text was not available: the paper states
    that the map comes from teacher features with average and max pooling,
    that it weights the student's feature, and that a term weighted by
    beta lets the student learn what the teacher misses. The exact form of
    the map and of that term are this library's choices and are
    parameters here; a map produced by a learned convolution (one reading
    of the paper) is not provided, since a map trained by this same loss
    can shrink towards regions where the error is already small.

    Teacher and student features must have the same channel count (the
    `Distiller` and `LocalModules` add a trainable adapter on the student
    side when they differ); when spatial sizes differ the larger map is
    average-pooled to the smaller.

    Args:
        alpha: weight of the alignment where the teacher attends.
        beta: weight of the alignment on the complement of the map.
        pooling: channel pooling of the teacher feature: `"avg_max"`
            (mean plus max, the default), `"avg"` or `"max"`.
        normalize: how the pooled map is brought into [0, 1]: `"sigmoid"`
            (of the per-sample standardised map, the default) or
            `"minmax"`.
        name: name of the loss; also the default `Term` name.
        reduction: Keras loss reduction.
        dtype: dtype of the loss computation.

    Example:

    >>> term = keras_kd.Term(
    ...     keras_kd.losses.ActivationMapping(alpha=1.0, beta=0.1),
    ...     teacher_layer="t_stage2", student_layer="s_stage2")
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.1,
        pooling: str = "avg_max",
        normalize: str = "sigmoid",
        name: str = "activation_mapping",
        reduction: str = "sum_over_batch_size",
        dtype: str | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        alpha = _checks.non_negative("alpha", alpha)
        beta = _checks.non_negative("beta", beta)
        _check_choice(pooling, POOLINGS, "pooling")
        _check_choice(normalize, NORMALIZATIONS, "normalize")
        self.alpha = alpha
        self.beta = beta
        self.pooling = pooling
        self.normalize = normalize

    def call(self, teacher_output: Tensor,
             student_output: Tensor) -> Tensor:
        return activation_mapping_loss(
            teacher_output, student_output, alpha=self.alpha,
            beta=self.beta, pooling=self.pooling, normalize=self.normalize,
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            alpha=self.alpha, beta=self.beta, pooling=self.pooling,
            normalize=self.normalize,
        )
        return config

"""Channel adapters: the trainable layer a distiller puts on the student
side of a feature comparison whose channel counts differ.

An adapter (`ChannelAdapter`) is an affine map on the channel axis (a 1x1
convolution for images) from the student's channels to the teacher's. It
belongs to the distiller, trains with the student and is never exported.
"""

import keras

from keras_kd.losses.base import DistillationLoss
from keras_kd.losses.features import check_poolable
from keras_kd.ops.affine import channel_affine


@keras.saving.register_keras_serializable(package="keras_kd")
class ChannelAdapter(keras.layers.Layer):
    """An affine map on the last (channel) axis: `x @ kernel + bias`.

    The same map and weights (`kernel` of shape `(in_channels, units)`,
    Glorot-uniform, and `bias`, zeros) as `keras.layers.Dense(units)` on a
    channels-last feature map, computed as `keras_kd.ops.channel_affine`
    computes it, which XLA runs several times faster on CPU on large feature
    maps.

    Args:
        units: the number of output channels.
        use_bias: whether to add a bias.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:

    >>> adapter = ChannelAdapter(16, name="fit_adapter")
    >>> tuple(adapter(np.ones((2, 8, 8, 4), "float32")).shape)
    (2, 8, 8, 16)
    """

    def __init__(self, units, use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.units),
            initializer="glorot_uniform")
        self.bias = self.add_weight(
            name="bias", shape=(self.units,),
            initializer="zeros") if self.use_bias else None

    def call(self, inputs):
        return channel_affine(inputs, self.kernel, self.bias)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, use_bias=self.use_bias)
        return config


def channel_adapter(teacher_shape, student_shape, name):
    """A built `ChannelAdapter` from the student's channel count to the
    teacher's, or `None` when they are equal.

    Args:
        teacher_shape: the teacher feature's shape, channels last.
        student_shape: the student feature's shape, channels last.
        name: the adapter's name.

    Example:

    >>> channel_adapter((None, 8, 8, 16), (None, 8, 8, 4), "fit_adapter")
    <ChannelAdapter name=fit_adapter, built=True>
    """
    if teacher_shape[-1] == student_shape[-1]:
        return None
    adapter = ChannelAdapter(teacher_shape[-1], name=name)
    adapter.build(student_shape)
    return adapter


def check_loss_shapes(bound, teacher_shape, student_shape, where):
    """The term's loss check of the shapes it compares, when both are
    known (a plain `keras.losses.Loss` has none)."""
    if isinstance(bound.loss, DistillationLoss) and \
            None not in (teacher_shape, student_shape):
        bound.loss.check_shapes(teacher_shape, student_shape, where)


def feature_adapters(feature_terms, teacher_shapes, student_shapes):
    """Checks each feature term's shapes and gives it an adapter where its
    loss needs equal channel counts that differ (a plain
    `keras.losses.Loss` counts as needing them).

    Args:
        feature_terms: the `keras_kd.step.BoundTerm`s that read layers;
            each gets its `adapter`.
        teacher_shapes: per term, the teacher feature's shape.
        student_shapes: per term, the student feature's shape.

    Returns:
        `{term log name: adapter}`.

    Raises:
        ValueError: features that cannot be pooled to one size, shapes
            the loss refuses, or a plain Keras loss on features of
            different spatial sizes.
    """
    adapters = {}
    for bound, t_shape, s_shape in zip(feature_terms, teacher_shapes,
                                       student_shapes):
        where = (
            f"term '{bound.name}' (teacher layer '{bound.teacher_layer}' "
            f"{t_shape}, student layer '{bound.student_layer}' {s_shape})"
        )
        check_poolable(t_shape, s_shape, where)
        check_loss_shapes(bound, t_shape, s_shape, where)
        plain = not isinstance(bound.loss, DistillationLoss)
        if plain and tuple(t_shape[1:-1]) != tuple(s_shape[1:-1]):
            raise ValueError(
                f"The loss {type(bound.loss).__name__} of {where} is a "
                "plain `keras.losses.Loss`, which compares the features "
                "element by element: their spatial sizes must be equal "
                "(the distillation losses of `keras_kd.losses` pool the "
                "larger map instead)."
            )
        if plain or bound.loss.matches_channels:
            adapter = channel_adapter(t_shape, s_shape,
                                      f"{bound.name}_adapter")
            if adapter is not None:
                adapters[bound.name] = bound.adapter = adapter
    return adapters

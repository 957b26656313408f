"""Maps, divergences and learning-rate scales of layer-wise learning rates:
pure `keras.ops` functions, the same on every backend."""

from keras import ops

from keras_kd.losses.features import match_spatial

_TINY = 1e-30


def collapse_channels(signal, p=2):
    """The per-position map `mean_c |signal|^p` of a channels-last tensor.

    Args:
        signal: activations (attention), a gradient (Jacobian) or a Hessian
            diagonal estimate, of shape `(batch, ..., channels)`. Rank-2
            tensors `(batch, units)` have no spatial axis: every unit is a
            position and nothing is collapsed.
        p: power applied to the absolute values.

    Returns:
        A float32 tensor of shape `(batch, ..., 1)` for rank 3 and 4 inputs,
        `(batch, units)` for rank 2.

    Example:

    >>> collapse_channels(np.ones((2, 4, 4, 8)), p=2).shape
    (2, 4, 4, 1)
    """
    signal = ops.cast(signal, "float32")
    values = ops.power(ops.abs(signal), p)
    if len(signal.shape) >= 3:
        values = ops.mean(values, axis=-1, keepdims=True)
    return values


def normalize_map(values):
    """Flatten a non-negative map per sample and scale it to sum to one.

    A sample whose map is all zeros becomes the uniform distribution.

    Args:
        values: non-negative tensor of shape `(batch, ...)`.

    Returns:
        A tensor of shape `(batch, positions)` whose rows sum to one.
    """
    values = ops.cast(values, "float32")
    values = ops.reshape(values, (ops.shape(values)[0], -1))
    total = ops.sum(values, axis=-1, keepdims=True)
    uniform = ops.ones_like(values) / ops.cast(ops.shape(values)[-1], "float32")
    return ops.where(total > _TINY, values / ops.maximum(total, _TINY),
                     uniform)


def js_divergence(p, q):
    """Per-sample Jensen-Shannon divergence of two distributions, in nats.

    `JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2` with `m = (p + q) / 2`;
    zero entries contribute nothing. The result lies in `[0, ln 2]`.

    Args:
        p: tensor of shape `(batch, positions)`, rows summing to one.
        q: tensor of the same shape.

    Returns:
        A tensor of shape `(batch,)`.

    Example:

    >>> js_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    [0.6931472]  # ln 2
    """
    p = ops.cast(p, "float32")
    q = ops.cast(q, "float32")
    m = 0.5 * (p + q)

    def kl_to_m(a):
        ratio = ops.maximum(a, _TINY) / ops.maximum(m, _TINY)
        return ops.sum(a * ops.log(ratio), axis=-1)

    return 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)


def map_divergence(teacher_map, student_map):
    """Batch-mean JS divergence of two collapsed maps.

    The larger map is average-pooled to the smaller spatial size first (each
    size must divide the other), then both are normalized per sample.

    Args:
        teacher_map: output of `collapse_channels` for the teacher.
        student_map: output of `collapse_channels` for the student.

    Returns:
        A float32 scalar.
    """
    teacher_map, student_map = match_spatial(teacher_map, student_map)
    return ops.mean(
        js_divergence(normalize_map(student_map), normalize_map(teacher_map))
    )


def divergence_scales(divergences, min_scale, max_scale):
    """`clip(d_l / mean_k d_k, min_scale, max_scale)` for every layer.

    When every divergence is zero (the maps agree everywhere) all scales
    are one.

    Args:
        divergences: tensor of shape `(layers,)`, non-negative.
        min_scale: lower bound of a scale.
        max_scale: upper bound of a scale.

    Returns:
        A float32 tensor of shape `(layers,)`.

    Example:

    >>> divergence_scales(np.array([0.1, 0.3]), 0.5, 2.0)
    [0.5, 1.5]
    """
    divergences = ops.cast(divergences, "float32")
    mean = ops.mean(divergences)
    ratio = ops.where(
        mean > _TINY, divergences / ops.maximum(mean, _TINY),
        ops.ones_like(divergences),
    )
    return ops.clip(ratio, min_scale, max_scale)

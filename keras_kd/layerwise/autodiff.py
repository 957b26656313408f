"""Gradients with respect to intermediate activations for the Jacobian and
Hessian signals, written with `tf.GradientTape` (nested for the Hessian).

TensorFlow only: `LayerwiseLearningRate` refuses other backends before
training starts, so TensorFlow is imported when a function runs.
"""

import keras
from keras import ops


def single_output(outputs, role, model):
    flat = keras.tree.flatten(outputs)
    if len(flat) != 1:
        raise ValueError(
            f"The {role} model '{model.name}' has {len(flat)} outputs; the "
            "Jacobian and Hessian signals need a single output of shape "
            "(batch, classes)."
        )
    return ops.cast(flat[0], "float32")


def _watch_inputs(tape, model, x):
    """Make the tape record the forward pass even when the model is frozen
    (its variables are then not watched automatically)."""
    import tensorflow as tf

    for leaf in keras.tree.flatten(x):
        if hasattr(leaf, "dtype") and tf.as_dtype(leaf.dtype).is_floating:
            tape.watch(leaf)
    for variable in model.weights:
        if not variable.trainable and "float" in str(variable.dtype):
            tape.watch(variable.value)


def _class_outputs(outputs, classes):
    """`outputs[i, classes[i]]` for every sample."""
    index = ops.expand_dims(ops.cast(classes, "int32"), -1)
    return ops.squeeze(ops.take_along_axis(outputs, index, axis=-1), -1)


def _check_connected(gradients, names, role):
    for gradient, name in zip(gradients, names):
        if gradient is None:
            raise ValueError(
                f"The output of the {role} model does not depend on its "
                f"layer '{name}' through differentiable operations, so no "
                "Jacobian or Hessian map can be computed there. Pair layers "
                "that lie on the path to the model's output."
            )


def top_logit_gradients(tap, x, classes=None, role="student"):
    """Gradient of the top logit with respect to tapped activations.

    Args:
        tap: a `keras_kd.taps.Tap` over the model and its paired layers.
        x: a batch of inputs.
        classes: integer class per sample whose logit is differentiated;
            `None` for the model's own argmax.
        role: `"teacher"` or `"student"`, for error messages.

    Returns:
        `(classes, gradients)`: the classes used and one gradient per tapped
        layer, each shaped like that layer's output.
    """
    import tensorflow as tf

    with tf.GradientTape() as tape:
        _watch_inputs(tape, tap.model, x)
        outputs, features = tap(x, training=False)
        outputs = single_output(outputs, role, tap.model)
        if classes is None:
            classes = ops.stop_gradient(ops.argmax(outputs, axis=-1))
        target = ops.sum(_class_outputs(outputs, classes))
    gradients = tape.gradient(target, features)
    _check_connected(gradients, tap.layer_names, role)
    return classes, gradients


def _cross_entropy_at(outputs, classes):
    return -ops.sum(_class_outputs(ops.log_softmax(outputs, axis=-1),
                                   classes))


def hessian_vector_products(tap, x, classes, probes, role="student"):
    """Hessian-vector products of the cross-entropy of `classes` with
    respect to tapped activations.

    The Hessian is taken jointly over all tapped layers: for probes
    `v = (v_1, ..., v_L)` the result for layer `l` is `sum_k H_lk v_k`.

    Args:
        tap: a `keras_kd.taps.Tap` over the model and its paired layers.
        x: a batch of inputs.
        classes: integer class per sample.
        probes: a list with one list per probe, each holding one tensor per
            tapped layer, shaped like that layer's output (see
            `rademacher_probes`).
        role: `"teacher"` or `"student"`, for error messages.

    Returns:
        One list per probe of one tensor per tapped layer.
    """
    import tensorflow as tf

    with tf.GradientTape(persistent=len(probes) > 1) as outer:
        with tf.GradientTape() as inner:
            _watch_inputs(inner, tap.model, x)
            _watch_inputs(outer, tap.model, x)
            outputs, features = tap(x, training=False)
            outputs = single_output(outputs, role, tap.model)
            target = _cross_entropy_at(outputs, classes)
        gradients = inner.gradient(target, features)
        _check_connected(gradients, tap.layer_names, role)
        dots = [
            sum(ops.sum(ops.cast(g, "float32") * v)
                for g, v in zip(gradients, probe))
            for probe in probes
        ]
    products = [
        outer.gradient(dot, features,
                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
        for dot in dots
    ]
    del outer
    return products


def rademacher_probes(shapes, samples, step, salt):
    """`samples` lists of +-1 tensors of the given (dynamic) shapes, drawn
    from a stateless generator seeded by `(step, salt, probe, layer)`."""
    import tensorflow as tf

    step = ops.cast(step, "int64")
    probes = []
    for k in range(samples):
        probe = []
        for index, shape in enumerate(shapes):
            seed = tf.stack([step, tf.constant(
                salt * 1_000_003 + k * 1009 + index, tf.int64)])
            uniform = tf.random.stateless_uniform(shape, seed=seed)
            probe.append(ops.where(uniform < 0.5, -1.0, 1.0))
        probes.append(probe)
    return probes


def hutchinson_diagonals(tap, x, classes, samples, step, salt, role):
    """Hutchinson estimates `mean_k v_k * (H v_k)` of the Hessian diagonal
    at every tapped layer (see `hessian_vector_products`)."""
    shapes = tap_shapes(tap, x)
    probes = rademacher_probes(shapes, samples, step, salt)
    products = hessian_vector_products(tap, x, classes, probes, role)
    diagonals = []
    for index in range(len(shapes)):
        total = sum(probe[index] * ops.cast(product[index], "float32")
                    for probe, product in zip(probes, products))
        diagonals.append(total / float(samples))
    return diagonals


def tap_shapes(tap, x):
    """Dynamic shapes of the tapped features for the batch `x`."""
    import tensorflow as tf

    batch = tf.shape(keras.tree.flatten(x)[0])[0]
    return [
        tf.concat([[batch], tf.constant(shape[1:], tf.int32)], axis=0)
        for shape in tap.feature_shapes
    ]

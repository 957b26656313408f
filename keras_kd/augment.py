"""Data augmentation for distillation: weak and strong presets built from
Keras preprocessing layers, applying an augmentation, and its affinity."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from keras_kd.taps import static_shape
from keras_kd._typing import Augmentation, Tensor


def weak(flip: bool = True, translation: float = 0.125,
         seed: int | None = None,
         name: str = "weak_augmentation") -> keras.Sequential:
    """The weak preset: random translation (pad-and-crop) and horizontal flip.

    Args:
        flip: add a random horizontal flip (turn it off for digits or text).
        translation: largest shift as a fraction of height and width
            (0.125 is the usual 4-pixel shift on 32x32 images).
        seed: seed of the random layers.
        name: name of the returned model.

    Returns:
        A `keras.Sequential` of Keras preprocessing layers, active only when
        called with `training=True`.

    Example:

    >>> distiller = keras_kd.Distiller(
    ...     [t1, t2], student,
    ...     teacher_augmentation=[keras_kd.augment.weak(),
    ...                           keras_kd.augment.strong()],
    ...     student_augmentation=keras_kd.augment.strong())
    """
    layers: list[Any] = []
    if translation:
        layers.append(keras.layers.RandomTranslation(
            translation, translation, fill_mode="constant", seed=seed))
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    return keras.Sequential(layers, name=name)


def strong(flip: bool = True, translation: float = 0.125,
           rotation: float = 0.08, zoom: float = 0.2,
           erasing: tuple[float, float] | None = (0.05, 0.2),
           value_range: tuple[float, float] = (0.0, 1.0),
           seed: int | None = None,
           name: str = "strong_augmentation") -> keras.Sequential:
    """The strong preset: the weak preset plus rotation, zoom and random
    erasing (cutout).

    Args:
        flip: add a random horizontal flip.
        translation: largest shift, as a fraction of height and width.
        rotation: largest rotation as a fraction of a full turn (0.08 is
            about 29 degrees); 0 to skip.
        zoom: largest zoom in or out, as a fraction; 0 to skip.
        erasing: `(min, max)` fraction of the image area erased by one
            rectangle per image (`keras.layers.RandomErasing`), or `None` to
            skip.
        value_range: range of the pixel values, used by the erasing fill.
        seed: seed of the random layers.
        name: name of the returned model.

    Returns:
        A `keras.Sequential` of Keras preprocessing layers, active only when
        called with `training=True`.

    Example:

    >>> keras_kd.augment.strong(flip=False, value_range=(0, 255))
    """
    layers = list(weak(flip=flip, translation=translation, seed=seed).layers)
    if rotation:
        layers.append(keras.layers.RandomRotation(
            rotation, fill_mode="constant", seed=seed))
    if zoom:
        layers.append(keras.layers.RandomZoom(
            zoom, fill_mode="constant", seed=seed))
    if erasing:
        layers.append(keras.layers.RandomErasing(
            factor=1.0, scale=tuple(erasing), fill_value=value_range[0],
            value_range=tuple(value_range), seed=seed))
    return keras.Sequential(layers, name=name)


def check_augmentation(augmentation: Augmentation | None,
                       what: str) -> Augmentation | None:
    """Raises a `TypeError` unless `augmentation` is `None`, a Keras layer
    or a callable."""
    if augmentation is None or isinstance(augmentation, keras.layers.Layer):
        return augmentation
    if callable(augmentation):
        return augmentation
    raise TypeError(
        f"{what} must be a Keras layer (e.g. `keras_kd.augment.weak()`), a "
        f"callable taking a batch of inputs, or None; got {augmentation!r}."
    )


def check_augmentation_shape(augmentation: Augmentation | None,
                             model: keras.Model, what: str) -> None:
    """Raises a `ValueError` when a Keras-layer augmentation maps the
    model's input shape to a shape the model does not accept.

    Callables other than Keras layers, and models without a static input
    shape, are not checked.
    """
    if not isinstance(augmentation, keras.layers.Layer):
        return
    in_shape = static_shape(model, "inputs")
    if in_shape is None:
        return
    try:
        out_shape = tuple(augmentation.compute_output_shape(in_shape))
    except Exception:  # noqa: BLE001 - not every layer implements it
        return
    same = len(out_shape) == len(in_shape) and all(
        a is None or b is None or a == b
        for a, b in zip(in_shape[1:], out_shape[1:])
    )
    if not same:
        raise ValueError(
            f"{what} '{augmentation.name}' maps the input shape {in_shape} "
            f"of the model '{model.name}' to {out_shape}; the model expects "
            f"{in_shape}."
        )


def apply_augmentation(augmentation: Augmentation | None,
                       x: Tensor) -> Tensor:
    """Applies an augmentation to a batch: a Keras layer is called with
    `training=True` (so random layers are active), any other callable is
    called as `augmentation(x)`; `None` returns `x`.

    Args:
        augmentation: a Keras layer, a callable, or `None`.
        x: a batch of inputs.

    Returns:
        The augmented batch.
    """
    if augmentation is None:
        return x
    if isinstance(augmentation, keras.layers.Layer):
        return augmentation(x, training=True)
    return augmentation(x)


def augmentation_name(augmentation: Augmentation) -> str:
    """The name of an augmentation, for messages: a layer's `name`, a
    function's `__name__`, or the callable's class name."""
    if isinstance(augmentation, keras.layers.Layer):
        return augmentation.name
    return getattr(augmentation, "__name__", type(augmentation).__name__)


def apply_checked(augmentation: Augmentation | None, x: Tensor,
                  what: str) -> Tensor:
    """`apply_augmentation`, refusing an augmentation that changes the
    batch size or the shape of the inputs (the teachers and the student
    would then see different batches, or inputs the model was not built
    for).

    The shapes are compared where they are static, that is when the step is
    traced, at the first batch, on every backend. In a TensorFlow graph the
    batch size is not static; it is then checked by an assertion when the
    batch runs (not under XLA, where assertions are dropped).

    Args:
        augmentation: a Keras layer, a callable, or `None`.
        x: a batch of inputs.
        what: the owner of the augmentation, for the message (e.g. `"the
            student augmentation"`).

    Raises:
        ValueError: the augmented batch has another static shape.
    """
    out = apply_augmentation(augmentation, x)
    if augmentation is None:
        return out
    before, after = keras.tree.flatten(x), keras.tree.flatten(out)
    shapes = ([tuple(t.shape) for t in before],
              [tuple(t.shape) for t in after])
    message = (
        f"{what} '{augmentation_name(augmentation)}' maps a batch of shape "
        f"{_show(shapes[0])} to {_show(shapes[1])}; an augmentation must "
        "keep the batch size and the input shape."
    )
    if len(before) != len(after) or not all(
        len(a) == len(b) and all(
            i is None or j is None or i == j for i, j in zip(a, b))
        for a, b in zip(*shapes)
    ):
        raise ValueError(message)
    if any(a[0] is None or b[0] is None for a, b in zip(*shapes)):
        out = _assert_same_batch(before, after, out, message)
    return out


def _show(shapes):
    return shapes[0] if len(shapes) == 1 else shapes


def _assert_same_batch(before, after, out, message):
    """`out`, computed after a run-time check that each augmented input
    keeps its batch size (TensorFlow graphs, where it is not static)."""
    if keras.backend.backend() != "tensorflow":
        return out
    import tensorflow as tf

    checks = [tf.debugging.assert_equal(tf.shape(a)[0], tf.shape(b)[0],
                                        message=message)
              for a, b in zip(before, after)]
    with tf.control_dependencies(checks):
        return tf.nest.map_structure(tf.identity, out)


def _batches(data, batch_size):
    """Yields `(x, y)` NumPy batches from a `(x, y)` tuple or an iterable of
    `(x, y)` batches (e.g. a `tf.data.Dataset`)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and not hasattr(
        data, "element_spec"
    ):
        x, y = data
        x = np.asarray(x)
        y = np.asarray(y)
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(
                "`dataset` must yield `(x, y)` batches; got an element of "
                f"type {type(batch).__name__}."
            )
        yield batch[0], batch[1]


def _accuracy(model, data, augmentation, batch_size):
    correct = 0.0
    count = 0.0
    for x, y in _batches(data, batch_size):
        x = apply_augmentation(augmentation, ops.convert_to_tensor(x))
        logits = model(x, training=False)
        predicted = ops.convert_to_numpy(ops.argmax(logits, axis=-1))
        y = np.asarray(ops.convert_to_numpy(y))
        if y.ndim == 2 and y.shape[-1] > 1:
            y = y.argmax(axis=-1)  # one-hot labels
        correct += float(np.sum(predicted == y.reshape(-1)))
        count += float(len(predicted))
    if count == 0:
        raise ValueError("`dataset` is empty.")
    return correct / count


def affinity(model: keras.Model, dataset: Any,
             augmentation: Augmentation,
             batch_size: int = 256) -> float:
    """Affinity of an augmentation: accuracy on augmented data over accuracy
    on clean data.

    The model is run in inference mode on the same data twice, once clean
    and once through `augmentation` (applied with `training=True`); lower
    affinity means a stronger distribution shift (Gontijo-Lopes et al. 2020).
    With random augmentations the value varies with the draw; seed with
    `keras.utils.set_random_seed` to repeat it.

    Args:
        model: a trained classifier returning logits or probabilities.
        dataset: `(x, y)` arrays, or an iterable of `(x, y)` batches such as
            a `tf.data.Dataset`; labels sparse or one-hot.
        augmentation: a Keras layer or callable, e.g.
            `keras_kd.augment.strong()`.
        batch_size: batch size when `dataset` is a pair of arrays.

    Returns:
        A Python float (1.0 for an augmentation that changes nothing).

    Example:

    >>> keras_kd.affinity(student, (x_val, y_val), keras_kd.augment.strong())
    0.83
    """
    clean = _accuracy(model, dataset, None, batch_size)
    if clean == 0:
        raise ValueError(
            f"The model '{model.name}' has zero accuracy on the clean data; "
            "affinity (augmented / clean accuracy) is undefined."
        )
    return _accuracy(model, dataset, augmentation, batch_size) / clean


def distinct_layers(
    teacher_augmentations: Augmentation | list[Augmentation | None] | None,
    student_augmentation: Augmentation | None,
) -> list[keras.layers.Layer]:
    """The distinct Keras-layer augmentations, teachers' then student's."""
    if not isinstance(teacher_augmentations, list):
        teacher_augmentations = [teacher_augmentations]
    layers: list[Any] = []
    for item in teacher_augmentations + [student_augmentation]:
        if isinstance(item, keras.layers.Layer) and not any(
                item is seen for seen in layers):
            layers.append(item)
    return layers

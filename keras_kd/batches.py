"""Sample weights without labels: carried in the inputs, so that Keras
keeps them.

Keras' array data adapter packs `(x, y, sample_weight)` only when `y` is
given: `fit(x, sample_weight=w)` silently drops `w`. Distillation without
labels is the `Distiller`'s main use (`fit(x)`), and its sample weights
(padding tokens at 0) must be honoured. So `Distiller.fit` and `evaluate`
pass such weights inside the inputs, as
`{UNLABELLED_INPUTS: x, UNLABELLED_WEIGHTS: w}`, which Keras slices,
shuffles and batches like any dict of arrays; `unpack` takes them out again
at the start of each step.
"""

import inspect

import keras

UNLABELLED_INPUTS = "keras_kd_unlabelled_inputs"
UNLABELLED_WEIGHTS = "keras_kd_unlabelled_sample_weight"


def _is_array_data(x):
    """Whether `x` is arrays or tensors (possibly nested in a dict, list or
    tuple), as opposed to a dataset, generator or `PyDataset`."""
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(
        hasattr(leaf, "shape") and hasattr(leaf, "dtype") for leaf in leaves)


def carry_weights(x, sample_weight):
    """`x` with `sample_weight` inside it, for arrays without labels.

    Args:
        x: the inputs (arrays, tensors, or a dict or list of them).
        sample_weight: per-sample (or per-token) weights, or `None`.

    Returns:
        `x` itself when `sample_weight` is `None` or `x` is not array data,
        else `{UNLABELLED_INPUTS: x, UNLABELLED_WEIGHTS: sample_weight}`.
    """
    if sample_weight is None or not _is_array_data(x):
        return x
    return {UNLABELLED_INPUTS: x, UNLABELLED_WEIGHTS: sample_weight}


def carries_weights(x):
    """Whether `x` was made by `carry_weights` with weights in it."""
    return isinstance(x, dict) and UNLABELLED_WEIGHTS in x and \
        UNLABELLED_INPUTS in x


def unpack(data):
    """`(x, y, sample_weight)` of a batch, as tensors of the backend (a
    batch given to `train_on_batch` may still hold NumPy arrays), with the
    unlabelled sample weights that `carry_weights` put in `x` taken out."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if carries_weights(x):
        x, sample_weight = x[UNLABELLED_INPUTS], x[UNLABELLED_WEIGHTS]

    def tensor(value):
        return None if value is None else keras.ops.convert_to_tensor(value)

    return keras.tree.map_structure(tensor, (x, y, sample_weight))


def without_weights(x):
    """`x` without the unlabelled sample weights `carry_weights` put in
    it."""
    return x[UNLABELLED_INPUTS] if carries_weights(x) else x


def carry_call_weights(method, args, kwargs):
    """The arguments of a `keras.Model.fit` or `evaluate` call, rewritten
    so that unlabelled sample weights reach the step: array `x` with
    `y=None` and a `sample_weight`, and a `validation_data` tuple
    `(x, None, sample_weight)`.

    Args:
        method: `"fit"` or `"evaluate"`.
        args, kwargs: the call's arguments, without the model.

    Returns:
        `(args, kwargs)` to call Keras with.
    """
    try:
        bound = inspect.signature(getattr(keras.Model, method)).bind(
            None, *args, **kwargs)
    except TypeError:
        return args, kwargs  # Keras reports the wrong call.
    arguments = bound.arguments
    if arguments.get("y") is None and \
            arguments.get("sample_weight") is not None and \
            _is_array_data(arguments.get("x")):
        arguments["x"] = carry_weights(arguments["x"],
                                       arguments.pop("sample_weight"))
    validation = arguments.get("validation_data")
    if isinstance(validation, (tuple, list)) and len(validation) == 3 and \
            validation[1] is None and validation[2] is not None and \
            _is_array_data(validation[0]):
        arguments["validation_data"] = (
            carry_weights(validation[0], validation[2]),)
    return bound.args[1:], bound.kwargs

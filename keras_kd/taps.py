"""Reading intermediate features: one multi-output forward per model."""

from __future__ import annotations

import difflib

import keras

from keras_kd import _keras_compat as compat
from keras_kd._untracked import Untracked
from keras_kd._typing import Shape


def graph_endpoints(model, role):
    """The symbolic input and output of a Functional or Sequential model."""
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if inputs and len(inputs) == 1:
        inputs = inputs[0]
    if outputs and len(outputs) == 1:
        outputs = outputs[0]
    if inputs is None or outputs is None:
        raise ValueError(
            f"Cannot read intermediate layers of the {role} model "
            f"'{model.name}' ({type(model).__name__}): only Functional and "
            "built Sequential models have named layer outputs to tap. Build "
            "the model with the Functional API, or make the subclassed "
            "model's `call` return the feature as an extra output and wrap "
            "it in a Functional model, e.g. `keras.Model(inputs, "
            "[logits, feature])`, then tap that model's layer."
        )
    return inputs, outputs


def static_shape(model: keras.Model, which: str) -> Shape | None:
    """The static shape of a model's single input (`which="inputs"`) or
    output (`"outputs"`), or `None` when unknown (subclassed or unbuilt
    models, several inputs or outputs)."""
    try:
        tensors = getattr(model, which)
    except (AttributeError, ValueError):
        return None
    if not tensors or len(tensors) != 1:
        return None
    return tuple(tensors[0].shape)


def find_layer(model, layer_name, role):
    """Return `model.get_layer(layer_name)` or raise a helpful `ValueError`."""
    names = [layer.name for layer in model.layers]
    if layer_name in names:
        return model.get_layer(layer_name)
    close = difflib.get_close_matches(layer_name, names, n=3, cutoff=0.0)
    raise ValueError(
        f"Layer '{layer_name}' not found in the {role} model "
        f"'{model.name}'. Closest layer names: {close}."
    )


class Tap:
    """Runs a model once and returns its outputs and the tapped features.

    With no layer to tap it calls the model itself; otherwise it builds,
    once, a Functional model over the same layers whose outputs are the
    model's outputs followed by the tapped layer outputs, so that a single
    forward pass produces both (batch-norm statistics move once).

    A tapped layer must be called once in the model: the output of a layer
    called several times (a shared layer) would be ambiguous, so it is
    refused.

    Args:
        model: the teacher or student `keras.Model`.
        layer_names: names of the layers to read, in order (may repeat).
        role: `"teacher"` or `"student"`, for error messages.
    """

    def __init__(self, model, layer_names, role):
        self.model = model
        self.layer_names = list(layer_names)
        self.feature_shapes = []
        self._extractor = None
        if not self.layer_names:
            return
        inputs, outputs = graph_endpoints(model, role)
        features = []
        for name in self.layer_names:
            layer = find_layer(model, name, role)
            calls = compat.call_count(layer)
            if calls > 1:
                raise ValueError(
                    f"Layer '{name}' is called {calls} times in the {role} "
                    f"model '{model.name}', so which of its outputs to read "
                    "is ambiguous. Read a layer that is called once, e.g. "
                    "add `keras.layers.Identity(name=...)` after the call "
                    "you mean and read that layer."
                )
            feature = layer.output
            features.append(feature)
            self.feature_shapes.append(tuple(feature.shape))
        self._extractor = keras.Model(
            inputs, (outputs, features), name=f"{model.name}_taps"
        )

    @property
    def extractor(self):
        """The Functional model over the model's layers whose outputs are
        `(model outputs, tapped features)`, or `None` without a layer to
        tap."""
        return self._extractor

    def __call__(self, x, training):
        if self._extractor is None:
            return self.model(x, training=training), []
        outputs, features = self._extractor(x, training=training)
        return outputs, list(features)


class CallInLayer(keras.layers.Layer):
    """Runs a function of a model's own graph (such as a `keras.Function`
    over its symbolic tensors) inside one Keras layer call, so that the
    call's `training` reaches every layer called within it (Keras passes an
    outer call's `training` on to the layers it calls). A layer whose call
    in the model fixed `training` (passed explicitly, or a non-`None`
    default of its `call`, which Keras stores with the call) keeps that
    value.

    Inputs are passed as they are (no autocast): the model's own layers
    cast them.

    Args:
        function: the function to run; its arguments are the call's
            positional arguments.
        name: the layer's name.

    Example:

    >>> part = keras.Function(model.get_layer("pool").output, model.output)
    >>> CallInLayer(part, "head")(features, training=True)
    """

    def __init__(self, function, name):
        super().__init__(name=name, autocast=False)
        self._hidden = Untracked(function=function)
        self.built = True

    def call(self, *inputs, training=None):
        del training  # reaches the layers through the call context
        return self._hidden.function(*inputs)

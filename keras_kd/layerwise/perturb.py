"""Running a model with a tensor added to the output of some of its layers.

A model's activations at its paired layers are not inputs, and JAX can only
differentiate a function with respect to its arguments. So the model is run
with a tensor `eps_k` added to the output of each tapped layer `k` (zeros of
the activation's shape): the derivative of the output with respect to
`eps_k` at zero is its derivative with respect to the activation.

Only public Keras API is used, and the model and its layers are left as
they are (no layer is called on new symbolic tensors, which would add call
nodes to the user's layers). The graph is cut at the tapped outputs into
`keras.Function`s over the model's own symbolic tensors, a `keras.Function`
taking intermediate tensors as inputs:

- segment `i` computes tapped output `i` from the model's inputs and the
  tapped outputs before it (in graph order);
- the head computes the model's outputs from the inputs and every tapped
  output.

Each segment's result gets its `eps` before the next segment reads it, so
everything downstream of a tapped layer sees the perturbed value. A layer
that lies on paths avoiding the tapped outputs may run in more than one
segment; in inference mode it computes the same values each time.
"""

import weakref
from typing import Any

import keras
from keras import ops

from keras_kd.taps import CallInLayer, graph_endpoints


class Segments:
    """The `keras.Function`s that run a tap's model with perturbed tapped
    outputs (see the module docstring).

    Args:
        tap: a `keras_kd.taps.Tap` over a Functional or Sequential model,
            with at least one tapped layer.

    Example:

    ```python
    segments = Segments(tap)
    outputs, features = segments(x, [ops.zeros(s) for s in shapes])
    ```
    """

    def __init__(self, tap):
        model = tap.model
        inputs, outputs = graph_endpoints(model, "tapped")
        inputs = keras.tree.flatten(inputs)
        order = {id(op): i for i, op in enumerate(tap.extractor.operations)}
        layers = [model.get_layer(name) for name in tap.layer_names]
        unique = list({id(layer): layer for layer in layers}.values())
        unique.sort(key=lambda layer: order[id(layer)])
        tensors = [layer.output for layer in unique]
        # Per unique tapped layer, the slots of `eps` added to its output;
        # per slot, the unique layer whose output it reads.
        self.slots = [[k for k, layer in enumerate(layers) if layer is u]
                      for u in unique]
        self.reads = [next(i for i, u in enumerate(unique) if u is layer)
                      for layer in layers]
        self.steps = [keras.Function(inputs + tensors[:i], tensors[i])
                      for i in range(len(tensors))]
        self.head = keras.Function(inputs + tensors, outputs)
        # Inference mode reaches every layer of the segments.
        self._call = CallInLayer(self.run, "perturbed_call")

    def run(self, x, eps):
        x = list(keras.tree.flatten(x))
        values = []
        for step, slots in zip(self.steps, self.slots):
            value = step(x + values)
            for k in slots:
                value = value + ops.cast(eps[k], value.dtype)
            values.append(value)
        outputs = self.head(x + values)
        return outputs, [values[i] for i in self.reads]

    def __call__(self, x, eps):
        """`(outputs, features)` of the model on `x` in inference mode,
        with `eps[k]` added to the output of tapped layer `k`."""
        return self._call(x, list(eps), training=False)


_SEGMENTS: weakref.WeakKeyDictionary[Any, Any] = (
    weakref.WeakKeyDictionary())


def segments_for(tap):
    """The `Segments` of a tap, built on first use and kept while the tap
    lives."""
    if tap not in _SEGMENTS:
        _SEGMENTS[tap] = Segments(tap)
    return _SEGMENTS[tap]


def perturbed_call(tap, x, eps):
    """The tap's `(outputs, features)` on `x` in inference mode, with
    `eps[k]` added to the output of tapped layer `k`.

    Args:
        tap: a `keras_kd.taps.Tap` over a Functional or Sequential model.
        x: a batch of inputs.
        eps: one tensor per tapped layer, shaped like its output.

    Returns:
        `(outputs, features)`, the features including their `eps`.
    """
    if tap.extractor is None:
        return tap.model(x, training=False), []
    return segments_for(tap)(x, eps)

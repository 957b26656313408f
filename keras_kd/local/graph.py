"""Cutting a Functional model into a chain of parts at named layers.

Backend-free: only the symbolic graph of the model is read.
"""

import keras

from keras_kd import _keras_compat as compat
from keras_kd.taps import CallInLayer, graph_endpoints, find_layer


def _walk_back(outputs, stops, earlier):
    """Layers that compute `outputs` from the `stops` tensors.

    Returns `(layers, leak)`: the layers in discovery order, and the first
    tensor reached that is neither a stop nor computed inside (a model
    input or the output of a layer in `earlier`), as
    `(consumer_layer, producer_layer)`, or `None`.
    """
    stop_ids = {id(t) for t in stops}
    layers, layer_ids, seen = [], set(), set()
    queue = [(None, t) for t in keras.tree.flatten(outputs)]
    while queue:
        consumer, tensor = queue.pop(0)
        if id(tensor) in stop_ids or id(tensor) in seen:
            continue
        layer, node = compat.producer(tensor)
        if compat.node_is_input(node) or id(layer) in earlier:
            return layers, (consumer, layer)
        seen.add(id(tensor))
        if id(layer) not in layer_ids:
            layer_ids.add(id(layer))
            layers.append(layer)
        queue.extend((layer, t) for t in compat.node_inputs(node))
    return layers, None


def cut_tensor(model, name, role, argument):
    """The output of the layer `name`, where `model` is cut."""
    layer = find_layer(model, name, role)
    if isinstance(layer, keras.layers.InputLayer):
        raise ValueError(
            f"'{name}' in `{argument}` is an input layer of the {role} "
            f"'{model.name}'; a module must hold at least one layer, so split "
            "at a layer after the input."
        )
    calls = compat.call_count(layer)
    if calls != 1:
        raise ValueError(
            f"Layer '{name}' in `{argument}` is called {calls} times in the "
            f"{role} '{model.name}'; split at a layer that is called once."
        )
    output = layer.output
    if len(keras.tree.flatten(output)) != 1:
        raise ValueError(
            f"Layer '{name}' in `{argument}` of the {role} '{model.name}' "
            "has several outputs; split at a layer with a single output."
        )
    return output


def split_chain(model, names, role, argument):
    """Cuts a Functional model at the outputs of the named layers.

    Returns:
        `(starts, ends, parts)`: for each of the `len(names) + 1` parts,
        its input(s), its output(s) and its layers.

    Raises:
        ValueError: when the cut is not a chain of parts in that order.
    """
    inputs, outputs = graph_endpoints(model, role)
    cuts = [cut_tensor(model, name, role, argument) for name in names]
    starts, ends = [inputs] + cuts, cuts + [outputs]
    parts, earlier = [], set()
    for k in range(len(names) + 1):
        if 0 < k < len(names):
            if id(model.get_layer(names[k])) in earlier:
                raise ValueError(
                    f"`{argument}` must list layers from input to output: "
                    f"'{names[k]}' comes before '{names[k - 1]}' in the "
                    f"{role} '{model.name}'."
                )
        layers, leak = _walk_back(ends[k], keras.tree.flatten(starts[k]),
                                  earlier)
        if leak is not None:
            consumer, producer = leak
            where = (f"after '{names[k - 1]}'" if k > 0
                     else f"before '{names[0]}'")
            reader = consumer.name if consumer is not None else "the output"
            raise ValueError(
                f"`{argument}`={list(names)} does not cut the {role} "
                f"'{model.name}' into a chain of modules: layer '{reader}' "
                f"(in module {k + 1}, {where}) reads the output of "
                f"'{producer.name}', which lies in an earlier module or is "
                "a model input. A connection (e.g. a residual or a "
                "parallel branch) jumps over the split point; split at a "
                "layer that every path from the input passes through, such "
                "as the layer after the merge."
            )
        if not layers:
            raise ValueError(
                f"Module {k + 1} of the {role} '{model.name}' would hold no "
                f"layer: '{names[k - 1]}' in `{argument}` gives the "
                f"{role}'s output or repeats a split. Split at an earlier "
                "layer."
            )
        parts.append(layers)
        earlier.update(id(layer) for layer in layers)
    return starts, ends, parts


def owner_of_layers(parts):
    """`{id(layer): index of the part that holds it}`."""
    return {id(layer): k for k, layers in enumerate(parts) for layer in layers}


class Part:
    """A sub-graph of a model from `start` to `(end, features)`, run with
    the model's own layers (shared weights) and without changing the model.

    Repeated feature tensors are output once.

    Args:
        start: the symbolic input(s) of the part (a model input or the
            output of an inner layer).
        end: the symbolic output(s) of the part.
        features: further symbolic tensors inside the part to return.
        layers: the layers of the part (their weights and losses are the
            part's).
        name: a name for messages.
    """

    def __init__(self, start, end, features, layers, name):
        single_end = not isinstance(end, (list, tuple, dict))
        extras, self.index = [], []
        for feature in features:
            if single_end and feature is end:
                self.index.append(0)
                continue
            if not any(feature is e for e in extras):
                extras.append(feature)
            self.index.append(
                1 + next(i for i, e in enumerate(extras) if e is feature)
            )
        self.layers = list(layers)
        self.name = name
        # A `keras.Function` reuses the model's call nodes: unlike a
        # `keras.Model` built on an inner tensor, it adds no node to the
        # model's layers, so the user's model is left as it was.
        self._run = CallInLayer(
            keras.Function(start, (end, extras), name=name), name=name)

    @property
    def trainable_variables(self):
        """The trainable variables of the part's layers."""
        return [v for layer in self.layers for v in layer.trainable_variables]

    @property
    def losses(self):
        """The regularization losses of the part's layers."""
        return [loss for layer in self.layers for loss in layer.losses]

    def __call__(self, x, training):
        end, extras = self._run(x, training=training)
        outputs = [end] + list(extras)
        return end, [outputs[i] for i in self.index]

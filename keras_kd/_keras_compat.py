"""The few private Keras attributes keras-kd reads, each behind one function.

Keras has no public accessor for these. Each was checked on Keras 3.12 to
3.15; if a Keras release moves one, only this file changes.
"""

import keras


def compiled_loss(model):
    """The loss object that `model.compile(loss=...)` built (Keras'
    `CompileLoss`), or `None` before `compile` or without a loss."""
    return getattr(model, "_compile_loss", None)


def producer(tensor):
    """The operation (layer) that produced a symbolic `KerasTensor`, and the
    call node of that operation."""
    history = tensor._keras_history
    operation = history.operation
    return operation, operation._inbound_nodes[history.node_index]


def producer_layer(tensor):
    """The layer that produced a symbolic `KerasTensor`, or `None` for
    anything else (a computed tensor, `None`)."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def node_is_input(node):
    """Whether a call node is a model input."""
    return node.is_input


def node_inputs(node):
    """The symbolic tensors a call node consumed."""
    return node.input_tensors


def call_count(layer):
    """How many times a layer was called on symbolic tensors (the number
    of its call nodes in the graphs it belongs to)."""
    return len(layer._inbound_nodes)


def keras_mask(tensor):
    """The Keras mask a tensor carries (`_keras_mask`, set by layers such as
    `Embedding(mask_zero=True)` and propagated to a functional model's
    outputs), or `None`. Keras 3.12 to 3.15 keep it as an attribute, or in a
    table keyed by the tensor's id where the tensor takes no attribute
    (JAX arrays); `keras.src.backend.get_keras_mask` reads both."""
    try:
        from keras.src.backend import get_keras_mask
    except ImportError:  # pragma: no cover - a Keras that moved it
        return getattr(tensor, "_keras_mask", None)
    return get_keras_mask(tensor)


def public_optimizer(config):
    """A serialized built-in optimizer under `keras.optimizers`: Keras
    saves the backend's own subclass (`keras.src.backend.torch.optimizers.
    torch_adam` on PyTorch, checked on Keras 3.15), which runs on that
    backend only."""
    if isinstance(config, dict) and str(config.get("module", "")).startswith(
            "keras.src.backend.") and hasattr(
            keras.optimizers, str(config.get("class_name"))):
        config = dict(config, module="keras.optimizers")
    return config

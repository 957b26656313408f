"""Loading PyTorch checkpoints of the CIFAR models into their Keras form.

The builders of `keras_kd.models.cifar` name every layer that holds weights
after the PyTorch module that holds the same weights in the reference
definitions (mdistiller's `mdistiller/models/cifar/`): its module path with
`_` for `.`, so the convolution that PyTorch calls `layer1.0.conv1` is the
Keras layer `"layer1_0_conv1"` (Keras' PyTorch backend cannot hold a
variable whose layer name has a `.`). So one rule per layer type maps a
state dict onto a model, and this file knows nothing of any particular
architecture.
"""

import os

import keras
import numpy as np

from keras_kd.models.cifar._layers import keras_name

# State-dict entries that hold no weight of the Keras model.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _torch():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the env
        raise ImportError(
            "Reading a PyTorch checkpoint file needs PyTorch. Install it "
            "(a CPU build is enough: `pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu`), or read the file "
            "elsewhere and pass `load_torch_weights` a state dict of NumPy "
            "arrays."
        ) from error
    return torch


def _read(checkpoint):
    """Returns the state dict that `checkpoint` holds, as NumPy arrays."""
    source = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        torch = _torch()
        try:
            checkpoint = torch.load(os.fspath(checkpoint), map_location="cpu",
                                    weights_only=True)
        except Exception as error:
            raise ValueError(
                f"Could not read the PyTorch checkpoint {source!r} with "
                "`torch.load(..., weights_only=True)`: {error}. If the file "
                "comes from a source you trust and holds more than tensors, "
                "read it yourself with `torch.load(path, weights_only=False)` "
                "and pass the resulting dict."
            ) from error
    if not isinstance(checkpoint, dict):
        raise TypeError(
            "`checkpoint` must be a path to a PyTorch checkpoint, a state "
            "dict, or a dict holding one under 'model' or 'state_dict'; got "
            f"{type(checkpoint).__name__}."
        )
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {}
    for key, value in checkpoint.items():
        # nn.DataParallel saves every key under "module.".
        if key.startswith("module."):
            key = key[len("module."):]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        state[key] = np.asarray(value)
    return state


def _conv_kernel(array):
    # PyTorch (out, in / groups, kh, kw) -> Keras (kh, kw, in / groups, out).
    return array.transpose(2, 3, 1, 0)


def _depthwise_kernel(array, multiplier):
    # PyTorch (in * m, 1, kh, kw), channel c * m + j -> Keras (kh, kw, in, m).
    out, _, kh, kw = array.shape
    return array.reshape(out // multiplier, multiplier, kh, kw).transpose(
        2, 3, 0, 1)


def _targets(layer):
    """(PyTorch key suffix, Keras variable, converter) for each weight."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        m = layer.depth_multiplier
        pairs = [("weight", layer.kernel,
                  lambda a: _depthwise_kernel(a, m))]
    elif isinstance(layer, keras.layers.Conv2D):
        pairs = [("weight", layer.kernel, _conv_kernel)]
    elif isinstance(layer, keras.layers.Dense):
        pairs = [("weight", layer.kernel, np.transpose)]
    elif isinstance(layer, keras.layers.BatchNormalization):
        pairs = []
        if layer.scale:
            pairs.append(("weight", layer.gamma, None))
        if layer.center:
            pairs.append(("bias", layer.beta, None))
        pairs += [("running_mean", layer.moving_mean, None),
                  ("running_var", layer.moving_variance, None)]
        return pairs
    else:
        raise ValueError(
            f"load_torch_weights does not know how to load layer "
            f"'{layer.name}' of type {type(layer).__name__}: it loads "
            "Conv2D, DepthwiseConv2D, Dense and BatchNormalization layers."
        )
    if getattr(layer, "use_bias", False):
        pairs.append(("bias", layer.bias, None))
    return pairs


def _weighted_layers(model):
    for layer in _walk(model):
        if layer.weights:
            yield layer


def _walk(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer)
        else:
            yield layer


def load_torch_weights(model, checkpoint, *, strict=True):
    """Loads a PyTorch checkpoint of a CIFAR model into its Keras form.

    Every Keras layer that holds weights is named after the PyTorch module
    that holds them in the reference definition: the module path with `_`
    for `.`. So the Keras layer `"layer1_0_bn1"` reads the state-dict
    entries `"layer1.0.bn1.weight"`, `.bias`, `.running_mean` and
    `.running_var`. Convolution and dense kernels are transposed from
    PyTorch's layout to Keras'.

    Args:
        model: a model built by a `keras_kd.models.cifar` builder (or any
            model whose weighted layers follow the same naming).
        checkpoint: a path to a file written by `torch.save`, either a state
            dict or a dict that holds one under `"model"` (as mdistiller
            saves its teachers) or `"state_dict"`; or such a dict itself,
            with PyTorch tensors or NumPy arrays as values. Keys under
            `"module."` (from `nn.DataParallel`) are accepted.
        strict: if True (the default), a state-dict entry that no layer
            reads is an error.

    Returns:
        `model`, with its weights replaced.

    Raises:
        ImportError: `checkpoint` is a path and PyTorch is not installed.
        KeyError: a weight of the model has no entry in the state dict.
        ValueError: an entry's shape does not fit, (with `strict`) an
            entry is left unused, or two entries' module paths differ only
            by `.` and `_`.

    Example:

    ```python
    from keras_kd.models import cifar

    teacher = cifar.resnet32x4()
    cifar.load_torch_weights(
        teacher, "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
    ```
    """
    state = _read(checkpoint)
    keys = _keys_by_layer_name(state)
    used = set()
    # Check every entry before assigning any, so that a bad checkpoint
    # leaves the model as it was.
    assignments = []
    for layer in _weighted_layers(model):
        entries = keys.get(layer.name, {})
        for suffix, variable, convert in _targets(layer):
            key = entries.get(suffix)
            if key is None:
                near = sorted(entries.values())
                # The module path: from the module's other entries, else
                # the layer name read back (exact where the path has no
                # `_` of its own).
                module = (near[0].rpartition(".")[0] if near
                          else layer.name.replace("_", "."))
                hint = f" Entries of that module: {near}." if near else ""
                raise KeyError(
                    f"The checkpoint has no entry '{module}.{suffix}' for "
                    f"the weight '{variable.path}' of layer '{layer.name}' "
                    "(the layer for PyTorch module path P is named P with "
                    f"'_' for '.').{hint}")
            value = state[key]
            if convert is not None:
                expected = _torch_shape(layer, suffix, tuple(variable.shape))
                if tuple(value.shape) != expected:
                    raise ValueError(
                        f"The checkpoint entry '{key}' has shape "
                        f"{tuple(value.shape)}, but layer '{layer.name}' "
                        f"expects {expected} (PyTorch layout; "
                        f"{tuple(variable.shape)} in Keras' layout).")
                value = convert(value)
            elif tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"The checkpoint entry '{key}' has shape "
                    f"{tuple(value.shape)}, but layer '{layer.name}' expects "
                    f"{tuple(variable.shape)}.")
            assignments.append((variable, value))
            used.add(key)
    unused = sorted(k for k in state if k not in used
                    and not k.endswith(_IGNORED_SUFFIXES))
    if strict and unused:
        raise ValueError(
            f"{len(unused)} checkpoint entries fit no layer of model "
            f"'{model.name}': {unused[:10]}. Is it a checkpoint of another "
            "architecture? Pass `strict=False` to ignore them.")
    for variable, value in assignments:
        variable.assign(value.astype(variable.dtype))
    return model


def _keys_by_layer_name(state):
    """`{Keras layer name: {parameter name: state-dict key}}`."""
    keys = {}
    for key in state:
        path, _, suffix = key.rpartition(".")
        entries = keys.setdefault(keras_name(path), {})
        if suffix in entries:
            raise ValueError(
                f"The checkpoint entries '{entries[suffix]}' and '{key}' "
                f"would both load into the layer '{keras_name(path)}': "
                "module paths that differ only by '.' and '_' cannot be "
                "told apart.")
        entries[suffix] = key
    return keys


def _torch_shape(layer, suffix, keras_shape):
    """The PyTorch shape of a kernel whose Keras shape is `keras_shape`."""
    if suffix != "weight":
        return keras_shape
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, c, m = keras_shape
        return (c * m, 1, kh, kw)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, cin, cout = keras_shape
        return (cout, cin, kh, kw)
    return keras_shape[::-1]  # Dense

"""The PyTorch conventions that the CIFAR models keep, as Keras layers.

- A PyTorch convolution pads `padding` pixels on every side. Keras'
  `padding="same"` with stride 2 on an even input pads only the bottom and
  right, which shifts every window; so a convolution here pads explicitly
  (`ZeroPadding2D`) and then convolves with `padding="valid"`.
- PyTorch's BatchNorm2d has epsilon 1e-5 and momentum 0.1 (the weight of the
  new batch); Keras' momentum is the weight of the running value, 0.9.

Each weighted layer is named after the PyTorch module that holds the same
weights, which is what `load_torch_weights` relies on: its module path with
`_` for `.` (`keras_name("layer1.0.conv1")` is `"layer1_0_conv1"`). The
PyTorch backend of Keras cannot hold a variable whose layer name has a
`.`, so the path itself cannot be the name. The helpers below take the
module path as `name` and name their layers `keras_name(name)`.
"""

import keras


def keras_name(path):
    """The Keras layer name for the PyTorch module path `path`."""
    return path.replace(".", "_")


def conv(x, filters, kernel_size, *, name, strides=1, padding=0, groups=1,
         use_bias=False):
    """A PyTorch-style `Conv2d` on `x`: zero padding on every side, then a
    valid convolution, for the PyTorch module `name`."""
    name = keras_name(name)
    if padding:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="valid",
        groups=groups, use_bias=use_bias, name=name)(x)


def depthwise_conv(x, kernel_size, *, name, strides=1, padding=0,
                   use_bias=False):
    """A PyTorch `Conv2d` with `groups` equal to its input channels and one
    output channel per input channel."""
    name = keras_name(name)
    if padding:
        x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
    return keras.layers.DepthwiseConv2D(
        kernel_size, strides=strides, padding="valid", use_bias=use_bias,
        name=name)(x)


def batch_norm(x, *, name):
    """PyTorch's `BatchNorm2d` / `BatchNorm1d` defaults: epsilon 1e-5,
    running averages that keep 0.9 of their value each step."""
    return keras.layers.BatchNormalization(
        epsilon=1e-5, momentum=0.9, name=keras_name(name))(x)


def relu(x, *, name=None):
    return keras.layers.ReLU(name=name and keras_name(name))(x)

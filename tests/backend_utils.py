"""What the tests need to run under every Keras backend.

The suite runs under the backend that `KERAS_BACKEND` names (TensorFlow when
unset). A test that only makes sense on some backends is marked
`@pytest.mark.backends("tensorflow", ...)`; `conftest.py` skips it
elsewhere. The helpers below let one test body differentiate and compile on
any backend, so that a test imports a backend only for what it tests.
"""

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()
BACKENDS = ("tensorflow", "jax", "torch")


def value_and_grad(fn, *args):
    """`fn(*args)` (a scalar) and its gradients with respect to every
    argument, as NumPy arrays, on the current backend.

    Args:
        fn: a function of tensors built from `keras.ops`, returning a scalar.
        *args: array-likes; each is converted to a float tensor.

    Returns:
        `(value, [gradient per argument])`; a gradient that does not exist
        (no dependence) is returned as zeros.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
    elif BACKEND == "jax":
        import jax

        tensors = [ops.convert_to_tensor(a) for a in args]
        value, grads = jax.value_and_grad(
            fn, argnums=tuple(range(len(tensors))))(*tensors)
    elif BACKEND == "torch":
        import torch

        tensors = [ops.convert_to_tensor(a).detach().requires_grad_(True)
                   for a in args]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
    else:  # pragma: no cover
        raise NotImplementedError(BACKEND)
    grads = [np.zeros(np.shape(a)) if g is None else to_numpy(g)
             for a, g in zip(args, grads)]
    return to_numpy(value), grads


def jit(fn):
    """`fn` compiled with XLA where the backend has it (TensorFlow
    `jit_compile=True`, `jax.jit`); PyTorch runs it eagerly."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn


def to_numpy(x):
    """A tensor of any backend (or a nested structure of them) as NumPy."""
    if BACKEND == "torch" and hasattr(x, "detach"):
        x = x.detach()
    return np.asarray(ops.convert_to_numpy(x))

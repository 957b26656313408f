"""What the tests need to run under every Keras backend.

The suite runs under the backend that `KERAS_BACKEND` names (TensorFlow when
unset). A test that only makes sense on some backends is marked
`@pytest.mark.backends("tensorflow", ...)`; `conftest.py` skips it
elsewhere. The helpers below let one test body differentiate and compile on
any backend, so that a test imports a backend only for what it tests:
`value_and_grad` evaluates eagerly and returns NumPy; `value_and_grad_fn`
returns the differentiated function itself, which `jit` can compile.
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
    value, grads = value_and_grad_fn(fn, range(len(args)))(*args)
    return to_numpy(value), [to_numpy(g) for g in grads]


def value_and_grad_fn(fn, argnums=(0,)):
    """`g(*args) = (fn(*args), (d fn / d args[i] for i in argnums))`.

    Args:
        fn: a function of tensors built from `keras.ops`, returning a scalar.
        argnums: indices of the arguments to differentiate with respect to.

    Returns:
        A function of array-likes or tensors returning the value and a tuple
        of gradients as backend tensors; a gradient that does not exist (no
        dependence) is zeros.
    """
    argnums = tuple(argnums)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def g(*args):
            args = [tf.convert_to_tensor(a) for a in args]
            with tf.GradientTape() as tape:
                for i in argnums:
                    tape.watch(args[i])
                value = fn(*args)
            grads = tape.gradient(
                value, [args[i] for i in argnums],
                unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return value, tuple(grads)

        return g
    if BACKEND == "jax":
        import jax

        def g(*args):
            args = [ops.convert_to_tensor(a) for a in args]
            return jax.value_and_grad(fn, argnums=argnums)(*args)

        return g
    if BACKEND == "torch":
        import torch

        def g(*args):
            args = [ops.convert_to_tensor(a) for a in args]
            for i in argnums:
                args[i] = args[i].detach().requires_grad_(True)
            value = fn(*args)
            grads = torch.autograd.grad(value, [args[i] for i in argnums],
                                        allow_unused=True)
            grads = tuple(torch.zeros_like(args[i]) if grad is None else grad
                          for i, grad in zip(argnums, grads))
            return value.detach(), grads

        return g
    raise NotImplementedError(BACKEND)  # pragma: no cover


def evaluate(result):
    """A tensor, or a (nested) tuple or list of them, as NumPy arrays."""
    if isinstance(result, (tuple, list)):
        return type(result)(evaluate(r) for r in result)
    return to_numpy(result)


def float64_context(enabled=True):
    """A context in which float64 tensors stay float64: JAX makes them
    float32 unless its 64-bit types are enabled, which this does (when
    `enabled`) until the context exits; other backends need nothing."""
    if enabled and BACKEND == "jax":
        import jax

        return jax.enable_x64(True)
    import contextlib

    return contextlib.nullcontext()


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


def count_aten_ops(fn):
    """Runs `fn()` on the PyTorch backend and returns how many ATen ops it
    dispatched (every op that reaches PyTorch's dispatcher, backward ops
    included when `fn` differentiates)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        fn()
    return count.calls

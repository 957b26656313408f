"""Gradients as functions of tensors, for tests that differentiate inside a
compiled step.

`backend_utils.value_and_grad` evaluates eagerly and returns NumPy, so it
cannot run inside `backend_utils.jit`. `value_and_grad_fn(fn)` returns the
differentiated function itself, on the current backend, which `jit` can
compile (or which can be called as it is, eagerly); `evaluate` turns what it
returns into NumPy.
"""

from keras import ops

from backend_utils import BACKEND
from backend_utils import to_numpy


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


__all__ = ["evaluate", "float64_context", "value_and_grad_fn"]

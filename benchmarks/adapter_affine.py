"""Forward and backward of one channel adapter on a large feature map.

The adapter of a feature loss maps the student's channels to the
teacher's at every position. This times, on one backend, a squared error
against a fixed target through four forms of that affine map, with the
gradients with respect to the input, the kernel and the bias:

- `dense`: `keras.layers.Dense(units)` on the 4-D feature map;
- `channel_affine`: `keras_kd.ops.channel_affine` (what
  `keras_kd.adapters.ChannelAdapter` runs);
- `matmul_4d`: `matmul(x, kernel) + bias` on the 4-D map;
- `flat_no_bias`: the product on the flattened map, without the bias (a
  lower bound of the matrix products alone).

Each is compiled (`jit_compile=True` on TensorFlow, `jax.jit`; PyTorch
runs eagerly) and timed round-robin, one call each per round, after a
warm-up; the script prints each form's median time and its ratio to
`channel_affine`.

Usage:
    python benchmarks/adapter_affine.py --backend tensorflow [--rounds 15]
        [--shape 128 32 32 16] [--units 64]
"""

import argparse
import os
import statistics
import sys
import time

from _common import backend_from_argv

if backend_from_argv(sys.argv[1:]):
    os.environ["KERAS_BACKEND"] = backend_from_argv(sys.argv[1:])
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import keras  # noqa: E402
from keras import ops  # noqa: E402

from keras_kd.ops.affine import channel_affine  # noqa: E402


def forms(units):
    """`{name: f(x, kernel, bias)}`, the affine maps compared."""
    dense = keras.layers.Dense(units)

    def with_dense(x, kernel, bias):
        # The layer's own call on the given weights (stateless).
        if not dense.built:
            dense.build(tuple(x.shape))
        out, _ = dense.stateless_call([kernel, bias], [], x)
        return out

    def matmul_4d(x, kernel, bias):
        return ops.matmul(x, kernel) + bias

    def flat_no_bias(x, kernel, bias):
        shape = ops.shape(x)
        rows = ops.matmul(ops.reshape(x, (-1, shape[-1])), kernel)
        return ops.reshape(rows, tuple(shape[:-1]) + (units,))

    return {"dense": with_dense, "channel_affine": channel_affine,
            "matmul_4d": matmul_4d, "flat_no_bias": flat_no_bias}


def gradient_function(form, target):
    """The compiled `(x, kernel, bias) -> gradients` of the squared error
    of `form` against `target`."""
    backend = keras.backend.backend()

    def loss(x, kernel, bias):
        return ops.mean(ops.square(form(x, kernel, bias) - target))

    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def grads(x, kernel, bias):
            with tf.GradientTape() as tape:
                tape.watch([x, kernel, bias])
                value = loss(x, kernel, bias)
            return tape.gradient(value, [x, kernel, bias])

        return grads
    if backend == "jax":
        import jax

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    import torch

    def grads(x, kernel, bias):
        args = [a.detach().requires_grad_(True) for a in (x, kernel, bias)]
        return torch.autograd.grad(loss(*args), args, allow_unused=True)

    return grads


def block(result):
    """Waits for the result (host copy of its first gradient)."""
    first = result[0]
    if hasattr(first, "detach"):
        first = first.detach()
    return np.asarray(ops.convert_to_numpy(first)).flat[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shape", type=int, nargs="+",
                        default=[128, 32, 32, 16])
    parser.add_argument("--units", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = tuple(args.shape)
    x = ops.convert_to_tensor(rng.normal(size=shape).astype("float32"))
    kernel = ops.convert_to_tensor(
        0.1 * rng.normal(size=(shape[-1], args.units)).astype("float32"))
    bias = ops.convert_to_tensor(np.zeros(args.units, "float32"))
    target = ops.convert_to_tensor(rng.normal(
        size=shape[:-1] + (args.units,)).astype("float32"))
    functions = {name: gradient_function(form, target)
                 for name, form in forms(args.units).items()}
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, "
          f"input {shape} -> {args.units} channels, forward + backward "
          f"(input, kernel, bias), {args.rounds} interleaved rounds")
    for fn in functions.values():
        for _ in range(2):
            block(fn(x, kernel, bias))
    names = list(functions)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            block(functions[name](x, kernel, bias))
            times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["channel_affine"])
    for name in names:
        median = statistics.median(times[name])
        print(f"  {name:15s} {1e3 * median:8.1f} ms "
              f"({median / reference:.2f}x channel_affine)")


if __name__ == "__main__":
    main()

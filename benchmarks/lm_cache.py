"""A per-token top-k teacher cache for a causal LM: its size on disk, and
reading it against recomputing the teacher.

A teacher cache pays off only if reading a batch of stored teacher outputs
is faster than running the teacher on that batch again. This script builds
causal-LM teachers of two sizes (plain Keras: token embedding, pre-norm
transformer blocks with causal self-attention, an LM head over a
vocabulary of `--vocab` tokens), caches their outputs on
`--samples` random token sequences of length `--time`, and measures, in one
process:

  (r) recompute: one teacher forward pass on a batch (`predict_on_batch`'s
      compiled function, XLA on TensorFlow and JAX), waited for;
  (w) read, warm: one batch of the top-k cache from disk through
      `TeacherCache.dataset` (memory-mapped `.npy` files), converted to
      backend tensors, with the files in the page cache;
  (c) read, cold: the same after evicting the cache's files from the page
      cache (`posix_fadvise(DONTNEED)` before each batch);
  (d) the same two reads of a full-precision cache (float32 logits), for
      the smaller sample count `--dense-samples` (the file is
      `time * vocab * 4` bytes per sequence).

The reads do not depend on the teacher, so they are timed once; the
teacher forward is timed per teacher. Each configuration is timed over
whole passes of the data, in interleaved rounds (order rotating), and the
median per-batch time is printed with each read's ratio to each teacher's
forward pass (below 1: reading wins).

Also printed: the cache's size on disk per token and in total, full and
top-k, and the one-time cost of building each cache.

Usage:
    python benchmarks/lm_cache.py --backend jax           # recorded figures
    python benchmarks/lm_cache.py --backend jax --quick   # smoke run
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

from _common import backend_from_argv

FULL = dict(samples=256, dense_samples=32, time=128, vocab=32000, batch=8,
            top_k=10, rounds=5,
            teachers={"small": (256, 2), "large": (768, 6)})
QUICK = dict(samples=16, dense_samples=8, time=16, vocab=500, batch=4,
             top_k=5, rounds=2, teachers={"small": (32, 1), "large": (64, 2)})


def causal_lm(name, vocab, width, depth, time_steps, seed):
    """A GPT-style causal LM in plain Keras: (batch, time) token ids to
    (batch, time, vocab) logits."""
    import keras

    keras.utils.set_random_seed(seed)
    tokens = keras.Input((time_steps,), dtype="int32", name=f"{name}_tokens")
    x = keras.layers.Embedding(vocab, width, name=f"{name}_embed")(tokens)
    heads = max(1, width // 64)
    for block in range(depth):
        h = keras.layers.LayerNormalization(name=f"{name}_ln{block}a")(x)
        h = keras.layers.MultiHeadAttention(
            heads, width // heads, name=f"{name}_attn{block}")(
                h, h, use_causal_mask=True)
        x = x + h
        h = keras.layers.LayerNormalization(name=f"{name}_ln{block}b")(x)
        h = keras.layers.Dense(4 * width, activation="gelu",
                               name=f"{name}_mlp{block}a")(h)
        x = x + keras.layers.Dense(width, name=f"{name}_mlp{block}b")(h)
    x = keras.layers.LayerNormalization(name=f"{name}_ln_out")(x)
    logits = keras.layers.Dense(vocab, name=f"{name}_head")(x)
    return keras.Model(tokens, logits, name=name)


def forward_function(model, backend):
    """`x -> logits`: the model in inference mode, compiled with XLA on
    TensorFlow and JAX; eager, without gradients, on PyTorch."""
    if backend == "jax":
        import jax

        state = ([v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables])
        compiled = jax.jit(lambda trainable, non_trainable, x:
                           model.stateless_call(trainable, non_trainable, x,
                                                training=False)[0])
        return lambda x: compiled(*state, x)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: model(x, training=False),
                           jit_compile=True)
    import torch

    def forward(x):
        with torch.no_grad():
            return model(x, training=False)

    return forward


def evict(directory):
    """Drops the files of `directory` from the page cache (clean pages
    only; no privileges needed)."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f))
               for f in os.listdir(path))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    backend = backend_from_argv(argv)
    if backend:
        os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        default=None)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, to check that the script runs")
    parser.add_argument("--dir", default=None,
                        help="where the caches are written (default: a "
                             "temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    import numpy as np
    import keras
    from keras import ops

    import keras_kd

    name = keras.backend.backend()
    if name == "jax":
        import jax

        def wait(value):
            jax.block_until_ready(value)
    else:
        def wait(value):
            # TensorFlow and PyTorch on a CPU return computed tensors; one
            # element read back makes sure of it on an accelerator too.
            keras.tree.map_structure(
                lambda v: ops.convert_to_numpy(ops.reshape(v, (-1,))[:1]),
                value)

    print(f"backend {name}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; {sizes['samples']} sequences of "
          f"{sizes['time']} tokens, vocabulary {sizes['vocab']}, batch "
          f"{sizes['batch']}, top_k {sizes['top_k']}")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, sizes["vocab"],
                          (sizes["samples"], sizes["time"])).astype("int32")
    dense_tokens = tokens[:sizes["dense_samples"]]
    root = args.dir or tempfile.mkdtemp(prefix="lm_cache_")
    os.makedirs(root, exist_ok=True)
    batch = sizes["batch"]
    try:
        teachers = {
            label: causal_lm(f"teacher_{label}", sizes["vocab"], width, depth,
                             sizes["time"], seed)
            for seed, (label, (width, depth)) in enumerate(
                sizes["teachers"].items())}
        for label, model in teachers.items():
            print(f"teacher {label}: {model.count_params():,} parameters")
        reference = teachers["small"]

        # The caches, built once (each build is timed).
        caches, build = {}, {}
        for label, count, top_k in (("top_k", len(tokens), sizes["top_k"]),
                                    ("dense", len(dense_tokens), None)):
            directory = os.path.join(root, label)
            start = time.perf_counter()
            caches[label] = keras_kd.cache_teacher_outputs(
                reference, tokens[:count], batch_size=batch, top_k=top_k,
                directory=directory, overwrite=True, verbose=0)
            build[label] = time.perf_counter() - start

        # The runners: one pass over the data each; per-batch times.
        def read_pass(cache, data, cold):
            def run():
                dataset = cache.dataset(data, batch_size=batch,
                                        shuffle=False)
                times = []
                for index in range(len(dataset)):
                    if cold:
                        evict(cache.directory)
                    start = time.perf_counter()
                    x = dataset[index][0]
                    wait(keras.tree.map_structure(ops.convert_to_tensor, x))
                    times.append(time.perf_counter() - start)
                return times
            return run

        def forward_pass(forward):
            def run():
                times = []
                for start_row in range(0, len(tokens), batch):
                    x = ops.convert_to_tensor(
                        tokens[start_row:start_row + batch])
                    wait(x)
                    start = time.perf_counter()
                    wait(forward(x))
                    times.append(time.perf_counter() - start)
                return times
            return run

        runners = {"read top-k, warm": read_pass(caches["top_k"], tokens,
                                                 False),
                   "read top-k, cold": read_pass(caches["top_k"], tokens,
                                                 True),
                   "read full, warm": read_pass(caches["dense"],
                                                dense_tokens, False),
                   "read full, cold": read_pass(caches["dense"],
                                                dense_tokens, True)}
        for label, model in teachers.items():
            runners[f"teacher {label} forward"] = forward_pass(
                forward_function(model, name))
        for run in runners.values():  # warm-up (compiles)
            run()
        samples = {key: [] for key in runners}
        names = list(runners)
        for r in range(sizes["rounds"]):
            k = r % len(names)
            for key in names[k:] + names[:k]:
                samples[key].extend(runners[key]())
        medians = {key: statistics.median(v) for key, v in samples.items()}

        tokens_count = {"top_k": tokens.size, "dense": dense_tokens.size}
        print("\nsize on disk (all files of the cache directory):")
        for label, cache in caches.items():
            size = directory_bytes(cache.directory)
            print(f"  {label:<6} {size / 2**20:10.2f} MiB for "
                  f"{tokens_count[label]:,} tokens: "
                  f"{size / tokens_count[label]:10.1f} bytes per token; "
                  f"built in {build[label]:.2f} s")
        print(f"\nmedian ms per batch of {batch} sequences "
              f"({batch * sizes['time']:,} tokens), over "
              f"{sizes['rounds']} interleaved passes:")
        for key, value in medians.items():
            print(f"  {key:<26}{1000 * value:10.2f}")
        print("\nread / recompute (below 1: reading the cache wins):")
        for read in [k for k in names if k.startswith("read")]:
            ratios = ", ".join(
                f"{label} teacher {medians[read] / medians[f'teacher {label} forward']:.3f}"
                for label in teachers)
            print(f"  {read:<20} {ratios}")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

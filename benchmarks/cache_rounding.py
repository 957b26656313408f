"""How far training from a full-precision teacher cache drifts from training
with the live teacher, through floating-point rounding alone.

The configuration of `tests/test_cache.py::test_full_cache_trains_as_the_live_teacher`:
two small CNNs (a width-8 teacher, a width-4 student) on 32 random 8x8
images of 5 classes, the five logit losses KD, DIST, Pearson, Spearman and
CMKD together, sample weights, 2 epochs of 4 steps of 8 samples, SGD with
momentum. For each step compilation (XLA off, XLA on; PyTorch runs eagerly
only) and each batch size the cache is built at, it prints:

- the largest difference between a cached teacher output and the teacher's
  output computed as the live step computes it (eagerly with XLA off);
- the largest difference of any student weight after training from the
  cache and with the live teacher, and the student's largest change from
  its initial weights (what the difference compares with).

Then, for scale, the same weight difference when the cache is wrong: its
outputs rolled by one sample (a misaligned cache), or shifted by Gaussian
noise of standard deviation 1e-4 (XLA off, cache at the training batch
size).

No timing; about a minute per backend on a 2-core CPU.

Usage:

    python benchmarks/cache_rounding.py --backend jax
"""

import argparse
import os
import sys
from importlib import metadata

from _common import backend_from_argv

os.environ["KERAS_BACKEND"] = backend_from_argv(sys.argv) or os.environ.get(
    "KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kd  # noqa: E402
from keras_kd import Distiller, Term  # noqa: E402
from keras_kd.losses import (CMKD, DIST, KD, PearsonCorrelation,  # noqa: E402
                             SpearmanCorrelation)

CLASSES, BATCH = 5, 8


def cnn(prefix, width):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(
        inputs)
    x = keras.layers.BatchNormalization(momentum=0.5)(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(width * 2, 3, padding="same",
                            activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name=prefix)


def trained(teacher, student, x, y, sample_weight, jit_compile):
    copy = keras.models.clone_model(student)
    copy.set_weights(student.get_weights())
    terms = [Term(KD(temperature=4.0), weight=0.5), Term(DIST()),
             Term(PearsonCorrelation()), Term(SpearmanCorrelation()),
             Term(CMKD())]
    distiller = Distiller(teacher, copy, terms=terms,
                          student_loss_weight=0.1)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile)
    distiller.fit(x, y, sample_weight=sample_weight, batch_size=BATCH,
                  epochs=2, shuffle=False, verbose=0)
    return copy


def largest_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(a.get_weights(), b.get_weights()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: $KERAS_BACKEND, else "
                             "tensorflow)")
    parser.parse_args()
    backend = keras.backend.backend()
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, CLASSES, size=32)
    sample_weight = np.random.default_rng(2).uniform(size=len(x))
    teacher, student = cnn("t", 8), cnn("s", 4)
    eager = np.concatenate([
        keras.ops.convert_to_numpy(teacher(x[i:i + BATCH], training=False))
        for i in range(0, len(x), BATCH)])

    package = {"jax": "jaxlib"}.get(backend, backend)
    print(f"{package} {metadata.version(package)}, keras {keras.__version__}"
          f", numpy {np.__version__}")
    def is_output(a):
        return getattr(a, "shape", None) == eager.shape

    print("| step | cache batch size | output difference from eager "
          "| weight difference | student's change |")
    print("|---|---|---|---|---|")
    lives = {}
    for jit_compile in ([False] if backend == "torch" else [False, True]):
        live = lives[jit_compile] = trained(teacher, student, x, y,
                                            sample_weight, jit_compile)
        change = largest_difference(live, student)
        for cache_batch in (BATCH, 2 * BATCH):
            cache = keras_kd.cache_teacher_outputs(
                teacher, x, batch_size=cache_batch, verbose=0)
            inputs = cache.inputs(x)
            output = next(a for a in keras.tree.flatten(inputs)
                          if is_output(a))
            output_difference = float(np.max(np.abs(
                np.asarray(output) - eager)))
            cached = trained(teacher, student, inputs, y, sample_weight,
                             jit_compile)
            step = "XLA" if jit_compile else "`jit_compile=False`"
            print(f"| {step} | {cache_batch} | {output_difference:.2g} "
                  f"| {largest_difference(live, cached):.2g} "
                  f"| {change:.3g} |")

    noise = np.random.default_rng(5).normal(size=eager.shape)
    wrong = {"rolled by one sample": lambda o: np.roll(o, 1, axis=0),
             "noise of 1e-4": lambda o: o + (1e-4 * noise).astype(o.dtype)}
    for name, corrupt in wrong.items():
        inputs = keras_kd.cache_teacher_outputs(
            teacher, x, batch_size=BATCH, verbose=0).inputs(x)
        inputs = keras.tree.map_structure(
            lambda a: corrupt(np.asarray(a)) if is_output(a) else a, inputs)
        cached = trained(teacher, student, inputs, y, sample_weight, False)
        print(f"cache {name}: weight difference "
              f"{largest_difference(lives[False], cached):.2g}")


if __name__ == "__main__":
    main()

"""Step time of LAKD local modules against an end-to-end KD step.

The setting is CIFAR-100-shaped: 32x32x3 images, 100 classes, batch 128, a
VGG-style CNN teacher of width 64 (stages 64/128/256) and a student of
width 16 (16/32/64), two conv-BN-ReLU blocks per stage, max-pooling between
stages. Three distillers train the same student from the same teacher:

- `kd`: end-to-end, 0.1 * cross-entropy + 0.9 * KD (T=4) on the logits;
- `kd_features`: the same, plus one `ActivationMapping` (NDAM) term at
  each split point (the LAKD losses, trained end-to-end);
- `lakd`: `LocalModules` split at those points, with the same NDAM losses,
  and KD plus cross-entropy on the last module.

`--split stages` (the default) cuts the student at the outputs of its
first two stages (3 modules); `--split blocks` after every conv block but
the last (6 modules).

`lakd / kd_features` compares the same losses trained with per-module
gradients and end-to-end: it is what the local modules themselves cost
(the project's target is <= 1.10x). `lakd / kd` adds the cost of the
feature losses.

Every distiller is compiled with `jit_compile=True` on TensorFlow and JAX
(XLA) and Keras' default on PyTorch (eager). After a warm-up that compiles
every step, the configurations run round-robin, one step each per round,
with the order rotated every round, so that slow drift of the machine's
load hits all of them alike. Each step is `train_on_batch` on one fixed
batch. The script prints every configuration's own median step time, the
ratio of the medians and the median of the per-round ratios.

Usage:
    python benchmarks/lakd_step.py --backend tensorflow [--rounds 15]
                                   [--split stages|blocks]
    python benchmarks/lakd_step.py --backend jax
    python benchmarks/lakd_step.py --backend torch
"""

import argparse
import os
import platform
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

import keras_kd  # noqa: E402

BATCH = 128
CLASSES = 100
TEACHER_WIDTH = 64
STUDENT_WIDTH = 16
# Layers (suffixes after "s_" / "t_") at whose outputs the student is cut.
SPLITS = {
    "stages": ["stage1", "stage2"],
    "blocks": ["s1_relu0", "stage1", "s2_relu0", "stage2", "s3_relu0"],
}
CONFIGS = ("kd", "kd_features", "lakd")


def make_cnn(prefix, width, seed):
    """Three stages of two conv-BN-ReLU blocks (widths `width * (1, 2,
    4)`), max-pooling between stages, global average pooling and a dense
    classifier. The last activation of stage `i` is `<prefix>_stage<i>`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name=f"{prefix}_input")
    x = inputs
    for stage in (1, 2, 3):
        if stage > 1:
            x = keras.layers.MaxPooling2D(name=f"{prefix}_pool{stage}")(x)
        for block in (0, 1):
            x = keras.layers.Conv2D(width * 2 ** (stage - 1), 3,
                                    padding="same", use_bias=False,
                                    name=f"{prefix}_s{stage}_conv{block}")(x)
            x = keras.layers.BatchNormalization(
                name=f"{prefix}_s{stage}_bn{block}")(x)
            x = keras.layers.ReLU(
                name=f"{prefix}_stage{stage}" if block
                else f"{prefix}_s{stage}_relu{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_gap")(x)
    outputs = keras.layers.Dense(CLASSES, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=f"{prefix}_cnn")


def build(config, teacher, student, split):
    kd = keras_kd.Term(keras_kd.losses.KD(temperature=4.0), weight=0.9)
    terms, local = [kd], None
    if config == "kd_features":
        terms += [keras_kd.Term(keras_kd.losses.ActivationMapping(),
                                teacher_layer=f"t_{layer}",
                                student_layer=f"s_{layer}",
                                name=f"ndam_{layer}")
                  for layer in SPLITS[split]]
    elif config == "lakd":
        local = keras_kd.LocalModules(
            split_at=[f"s_{layer}" for layer in SPLITS[split]],
            teacher_layers=[f"t_{layer}" for layer in SPLITS[split]])
    distiller = keras_kd.Distiller(teacher=teacher, student=student,
                                   terms=terms, student_loss_weight=0.1,
                                   local_modules=local, name=config)
    # XLA on TensorFlow and JAX; Keras' default (eager) on PyTorch.
    xla = keras.backend.backend() != "torch"
    distiller.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True if xla else "auto")
    return distiller


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None,
                        help="tensorflow, jax or torch (read before Keras "
                        "is imported; default KERAS_BACKEND)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--split", choices=sorted(SPLITS), default="stages",
                        help="cut at the first two stages' outputs (3 "
                        "modules) or after every conv block but the last "
                        "(6 modules)")
    args = parser.parse_args()

    backend = keras.backend.backend()
    print(f"backend {backend}, keras {keras.__version__}, "
          f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; batch {BATCH}, {CLASSES} classes, "
          f"teacher width {TEACHER_WIDTH}, student width {STUDENT_WIDTH}, "
          f"split at {args.split}: {SPLITS[args.split]}")
    teacher = make_cnn("t", TEACHER_WIDTH, seed=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 32, 32, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=(BATCH,)).astype("int32")
    distillers = {}
    for config in CONFIGS:
        student = make_cnn("s", STUDENT_WIDTH, seed=1)
        distillers[config] = build(config, teacher, student, args.split)
    for config, distiller in distillers.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            distiller.train_on_batch(x, y)
        print(f"warm-up {config}: {time.perf_counter() - start:.1f} s "
              f"({args.warmup} steps, compilation included)")

    times = {config: [] for config in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS[r % 3:] + CONFIGS[:r % 3]
        for config in order:
            start = time.perf_counter()
            distillers[config].train_on_batch(x, y)
            times[config].append(time.perf_counter() - start)

    medians = {c: statistics.median(t) for c, t in times.items()}
    print(f"\n{args.rounds} interleaved rounds, one step per "
          "configuration each; median step time:")
    for config in CONFIGS:
        t = times[config]
        print(f"  {config:12s} {1e3 * medians[config]:8.1f} ms "
              f"(min {1e3 * min(t):.1f}, max {1e3 * max(t):.1f})")
    for num, den in (("lakd", "kd"), ("lakd", "kd_features"),
                     ("kd_features", "kd")):
        paired = statistics.median(
            a / b for a, b in zip(times[num], times[den]))
        print(f"ratio {num} / {den}: {medians[num] / medians[den]:.3f} "
              f"(ratio of medians), {paired:.3f} (median per-round ratio)")


if __name__ == "__main__":
    main()

"""Offline distillation: an epoch trained from a teacher cache against an
epoch of the student trained alone.

For a CNN teacher about four times the student's size (widths doubled:
3.9x the parameters, about 4x the multiply-adds) this measures, on one
process and one data set of random 32x32x3 images with 100 classes:

  (s) one epoch of the student trained alone on the labels (its own
      `fit`, the same optimizer and loss): the baseline;
  (c) one epoch of `keras_kd.Distiller` trained from a full-precision
      teacher cache (`cache_teacher_outputs`, `cache.inputs(x)`);
  (k) the same from a top-10 cache;
  (l) one epoch of the same distiller with the live teacher, for
      comparison;

each as one `fit(..., epochs=1)` call (so each includes Keras' per-call
set-up of the data, the same for all), plus, once:

  - the one-time cost of building each cache, twice, in seconds and in
    student epochs: each build is one `cache_teacher_outputs` call, which
    compiles the teacher's inference function anew; the first build also
    pays the process's first use of these shapes;
  - the size of each cache on disk (all files of its directory).

The distiller's terms read final outputs only: `0.5 * cross-entropy +
0.5 * KD(T=4)`. On TensorFlow and JAX all models use `jit_compile=True`
(XLA); on PyTorch, Keras' default (eager). The configurations are timed round-robin (the order rotates every
round) after one warm-up epoch each; for wall time and process CPU time it
prints the median epoch of each configuration, the ratios of the medians,
the medians of the per-round ratios (paired within a round, which cancels
slow load drift) and the ratios of the minima, and checks the target
(c/s <= 1.10) against each.

Usage:
    python benchmarks/teacher_cache.py            # full run: 10,240 samples,
                                                  # batch 256, 5 rounds
    python benchmarks/teacher_cache.py --quick    # smoke run (tiny models)
    KERAS_BACKEND=jax python benchmarks/teacher_cache.py
"""

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import keras  # noqa: E402

import keras_kd  # noqa: E402

TEMPERATURE = 4.0
JIT_COMPILE = keras.backend.backend() != "torch"
STUDENT_LOSS_WEIGHT = 0.5
NUM_CLASSES = 100


def make_cnn(prefix, widths, blocks_per_stage, seed):
    """A VGG-style CNN on 32x32x3 (as in step_overhead.py): conv-BN-ReLU
    blocks, one stage per width, max-pooling between stages, global average
    pooling and a dense classifier."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name=f"{prefix}_input")
    x = inputs
    for stage, width in enumerate(widths, start=1):
        if stage > 1:
            x = keras.layers.MaxPooling2D(name=f"{prefix}_pool{stage}")(x)
        for block in range(blocks_per_stage):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                    name=f"{prefix}_s{stage}_conv{block}")(x)
            x = keras.layers.BatchNormalization(
                name=f"{prefix}_s{stage}_bn{block}")(x)
            x = keras.layers.ReLU(name=f"{prefix}_s{stage}_relu{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_gap")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=f"{prefix}_cnn")


def clone_with_weights(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def student_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def optimizer():
    return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)


def build_distiller(teacher, student):
    distiller = keras_kd.Distiller(
        teacher=teacher, student=student,
        terms=[keras_kd.Term(keras_kd.losses.KD(temperature=TEMPERATURE),
                             weight=1.0 - STUDENT_LOSS_WEIGHT)],
        student_loss_weight=STUDENT_LOSS_WEIGHT,
    )
    distiller.compile(optimizer=optimizer(), loss=student_loss(),
                      jit_compile=JIT_COMPILE)
    return distiller


def build_student_alone(student):
    student.compile(optimizer=optimizer(), loss=student_loss(),
                    jit_compile=JIT_COMPILE)
    return student


class Epoch:
    """One `fit(epochs=1)` of a compiled model on fixed data."""

    def __init__(self, model, x, y, batch):
        self.model, self.x, self.y, self.batch = model, x, y, batch

    def __call__(self):
        self.model.fit(self.x, self.y, batch_size=self.batch, epochs=1,
                       shuffle=True, verbose=0)


def time_round_robin(runners, rounds):
    """Wall-clock and process CPU seconds of one epoch of each runner,
    `rounds` samples each; the order rotates every round."""
    names = list(runners)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f))
               for f in os.listdir(path))


def mib(nbytes):
    return nbytes / 2**20


def print_times(title, samples, labels):
    base = samples["s"]
    print(title)
    print(f"  {'configuration':<34}{'median s':>10}{'min s':>9}"
          f"{'x/s med':>9}{'paired':>8}{'min':>7}")
    for key, label in labels.items():
        values = samples[key]
        ratio = statistics.median(values) / statistics.median(base)
        paired = statistics.median(v / b for v, b in zip(values, base))
        low = min(values) / min(base)
        print(f"  {label:<34}{statistics.median(values):10.3f}"
              f"{min(values):9.3f}{ratio:9.3f}{paired:8.3f}{low:7.3f}")
    return {
        "ratio of medians": statistics.median(samples["c"])
        / statistics.median(base),
        "median of per-round ratios": statistics.median(
            v / b for v, b in zip(samples["c"], base)),
        "ratio of minima": min(samples["c"]) / min(base),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny models, 512 samples, 2 rounds")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per epoch (default 10240; 512 quick)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default 256; 64 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dir", default=None,
                        help="where to write the caches (default: a "
                        "temporary directory, removed at the end)")
    args = parser.parse_args(argv)
    quick = args.quick
    samples = args.samples or (512 if quick else 10240)
    batch = args.batch or (64 if quick else 256)
    rounds = args.rounds or (2 if quick else 5)
    if quick:
        teacher_widths, student_widths, blocks = (8, 16, 32), (4, 8, 16), 1
    else:
        teacher_widths, student_widths, blocks = (64, 128, 256), \
            (32, 64, 128), 2

    print(f"python {platform.python_version()}, keras {keras.__version__}, "
          f"keras_kd {keras_kd.__version__}, backend "
          f"{keras.backend.backend()}, {os.cpu_count()} CPUs")
    print(f"{samples} samples of 32x32x3, {NUM_CLASSES} classes, batch "
          f"{batch}; {rounds} rounds of one epoch per configuration "
          "(round-robin) after one warm-up epoch each; jit_compile="
          f"{JIT_COMPILE}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, 32, 32, 3), "float32")
    y = rng.integers(0, NUM_CLASSES, (samples,))
    teacher = make_cnn("t", teacher_widths, blocks, 1)
    student = make_cnn("s", student_widths, blocks, 2)
    print(f"teacher widths {teacher_widths}, {teacher.count_params():,} "
          f"params; student widths {student_widths}, "
          f"{student.count_params():,} params "
          f"({teacher.count_params() / student.count_params():.2f}x)")

    root = args.dir or tempfile.mkdtemp(prefix="teacher_cache_bench_")
    full_dir = os.path.join(root, "full")
    top_dir = os.path.join(root, f"top{args.top_k}")
    try:
        # The one-time cost: each build compiles the teacher's inference
        # function (a new one per call); the second reuses the process.
        build = {}
        for label, kwargs in (("full", {}), (f"top-{args.top_k}",
                                             {"top_k": args.top_k})):
            times = []
            for _ in range(2):
                start = time.perf_counter()
                cache = keras_kd.cache_teacher_outputs(
                    teacher, x, batch_size=batch, verbose=0,
                    directory=full_dir if label == "full" else top_dir,
                    overwrite=True, **kwargs)
                times.append(time.perf_counter() - start)
            build[label] = (times, cache)
        full_cache = keras_kd.cache.TeacherCache.load(full_dir)
        top_cache = keras_kd.cache.TeacherCache.load(top_dir)
        in_memory_full = keras_kd.cache_teacher_outputs(
            teacher, x, batch_size=batch, verbose=0)
        in_memory_top = keras_kd.cache_teacher_outputs(
            teacher, x, batch_size=batch, verbose=0, top_k=args.top_k)

        runners = {
            "s": Epoch(build_student_alone(clone_with_weights(student)),
                       x, y, batch),
            "c": Epoch(build_distiller(clone_with_weights(teacher),
                                       clone_with_weights(student)),
                       in_memory_full.inputs(x), y, batch),
            "k": Epoch(build_distiller(clone_with_weights(teacher),
                                       clone_with_weights(student)),
                       in_memory_top.inputs(x), y, batch),
            "l": Epoch(build_distiller(clone_with_weights(teacher),
                                       clone_with_weights(student)),
                       x, y, batch),
        }
        start = time.perf_counter()
        for runner in runners.values():
            runner()  # compiles
        print(f"compile + warm-up epochs: "
              f"{time.perf_counter() - start:.1f} s")
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        wall, cpu = time_round_robin(runners, rounds)
        print(f"timed rounds: {time.perf_counter() - start:.1f} s; load "
              f"average before/after: {load_before:.1f} / "
              f"{os.getloadavg()[0]:.1f}")
        print()

        labels = {
            "s": "(s) student alone, labels",
            "c": "(c) distiller, full cache",
            "k": f"(k) distiller, top-{args.top_k} cache",
            "l": "(l) distiller, live teacher",
        }
        wall_ratios = print_times(
            "wall-clock seconds per epoch; x/s: ratio of medians, median "
            "of per-round ratios, ratio of minima", wall, labels)
        cpu_ratios = print_times(
            "process CPU seconds per epoch (all threads), same statistics",
            cpu, labels)
        print()
        student_epoch = statistics.median(wall["s"])
        print("building the cache (one time; each build compiles the "
              "teacher's inference function, the first in a fresh process):")
        for label, (times, _) in build.items():
            print(f"  {label:<8} first {times[0]:.2f} s, again "
                  f"{times[1]:.2f} s = {times[1] / student_epoch:.2f} "
                  "student epochs")
        print("cache size on disk:")
        for label, cache, path in (("full", full_cache, full_dir),
                                   (f"top-{args.top_k}", top_cache,
                                    top_dir)):
            print(f"  {label:<8} {directory_bytes(path):,} bytes "
                  f"({mib(directory_bytes(path)):.2f} MiB; arrays "
                  f"{cache.nbytes:,} bytes, "
                  f"{cache.nbytes / len(cache):.0f} per sample)")
        print()
        for title, ratios in (("wall", wall_ratios), ("CPU", cpu_ratios)):
            for estimator, value in ratios.items():
                met = "met" if value <= 1.10 else "NOT met"
                print(f"{title}, {estimator + ':':<28} c/s = {value:.3f} "
                      f"(target <= 1.10: {met})")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

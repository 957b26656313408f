"""Step time of distillation with layer-wise learning rates, relative to the
same distillation without them, measured in one process.

Every configuration trains the same teacher/student pair (three-stage CNNs on
synthetic 32x32x3 images, KD + attention transfer) with `fit`. Configurations
are timed in interleaved rounds of `--steps` training steps each (after one
warm-up round that traces the functions). Each round's time is divided by the
baseline's time in the same round. Three ratios are printed: of the median
process CPU time per step (all threads; the least disturbed by other jobs on
a shared machine), of the fastest rounds' wall time (other jobs only ever add
time), and the median of the per-round wall-time ratios.

Printed:
- `ratio <signal>`: step time with `LayerwiseLearningRate(signal=...)` at the
  default `update_every` over the step time without it (target <= 1.10 for
  attention and Jacobian).
- `per-update cost <signal>`: with `update_every=1` every step re-estimates
  the scales; the extra time per step over the baseline is the cost of one
  update, in baseline steps (and in milliseconds at the median baseline
  step).

Usage:
    python benchmarks/layerwise.py [--steps 50] [--rounds 9] [--jit]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kd  # noqa: E402

CLASSES = 10
PAIRS = [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2"),
         ("s_stage3", "t_stage3")]


def cnn(prefix, width):
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for stage in (1, 2, 3):
        x = keras.layers.Conv2D(width * stage, 3, padding="same",
                                name=f"{prefix}_stage{stage}")(x)
        x = keras.layers.BatchNormalization(name=f"{prefix}_bn{stage}")(x)
        x = keras.layers.ReLU()(x)
        if stage < 3:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name=prefix)


def build(teacher, layerwise, jit):
    keras.utils.set_random_seed(1)
    student = cnn("s", 8)
    distiller = keras_kd.Distiller(
        teacher, student,
        terms=[keras_kd.Term(keras_kd.losses.KD(4.0), weight=0.9),
               keras_kd.Term(keras_kd.losses.AttentionTransfer(),
                             weight=1000.0, teacher_layer="t_stage3",
                             student_layer="s_stage3")],
        student_loss_weight=0.1, layerwise_lr=layerwise)
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit)
    return distiller


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50,
                        help="steps per round; a multiple of update_every "
                        "so that every round holds the same updates")
    parser.add_argument("--update-steps", type=int, default=10,
                        help="steps per round with update_every=1")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--jit", action="store_true")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = max(args.steps, args.update_steps) * args.batch
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=n)
    teacher = cnn("t", 32)

    default_every = keras_kd.LayerwiseLearningRate(PAIRS).update_every
    configs = {"baseline": None}
    for signal in ("attention", "jacobian", "hessian"):
        configs[signal] = keras_kd.LayerwiseLearningRate(PAIRS, signal=signal)
        configs[f"{signal}/every step"] = keras_kd.LayerwiseLearningRate(
            PAIRS, signal=signal, update_every=1)
    distillers = {name: build(teacher, lw, args.jit)
                  for name, lw in configs.items()}
    wall = {name: [] for name in configs}
    cpu = {name: [] for name in configs}

    class Clock(keras.callbacks.Callback):
        """Wall and process CPU time from the first step's start to the last
        step's end (excludes `fit`'s set-up)."""

        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
                self.start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, batch, logs=None):
            self.end = (time.perf_counter(), time.process_time())

    def run(name, distiller, steps):
        size = steps * args.batch
        clock = Clock()
        distiller.fit(x[:size], y[:size], batch_size=args.batch, epochs=1,
                      verbose=0, shuffle=False, callbacks=[clock])
        wall[name].append((clock.end[0] - clock.start[0]) / steps)
        cpu[name].append((clock.end[1] - clock.start[1]) / steps)

    def steps_of(name):
        return args.update_steps if "every step" in name else args.steps

    for name, distiller in distillers.items():  # warm-up: tracing
        run(name, distiller, steps_of(name))
    for times in (wall, cpu):
        for name in times:
            times[name].clear()
    for _ in range(args.rounds):
        for name, distiller in distillers.items():
            run(name, distiller, steps_of(name))

    print(f"{args.rounds} interleaved rounds of {args.steps} steps "
          f"({args.update_steps} for update_every=1), batch {args.batch}, "
          f"jit_compile={args.jit}, default update_every={default_every}")
    med = statistics.median
    for name in configs:
        print(f"  {name:22s} wall median {1000 * med(wall[name]):7.1f} "
              f"min {1000 * min(wall[name]):7.1f} ms/step | process CPU "
              f"median {1000 * med(cpu[name]):7.1f} ms/step")

    def ratios(name):
        """(CPU-time ratio of medians, wall ratio of the fastest rounds,
        median of the per-round wall ratios)."""
        per_round = [t / b for t, b in zip(wall[name], wall["baseline"])]
        return (med(cpu[name]) / med(cpu["baseline"]),
                min(wall[name]) / min(wall["baseline"]), med(per_round))

    print("ratio = step time with layer-wise learning rates / without")
    for signal in ("attention", "jacobian", "hessian"):
        target = "target <= 1.10" if signal != "hessian" else "reported"
        c, w, r = ratios(signal)
        print(f"ratio {signal:9s} CPU {c:.3f} | wall fastest {w:.3f} | wall "
              f"per-round median {r:.3f}  [{target}]")
    print("per-update cost = (step time with update_every=1) / baseline - 1, "
          "in baseline steps")
    for signal in ("attention", "jacobian", "hessian"):
        c, w, r = ratios(f"{signal}/every step")
        print(f"per-update cost {signal:9s} CPU {c - 1:.2f} | wall fastest "
              f"{w - 1:.2f} | wall per-round median {r - 1:.2f} baseline "
              f"steps; {1000 * (c - 1) * med(cpu['baseline']):.0f} ms CPU")


if __name__ == "__main__":
    main()

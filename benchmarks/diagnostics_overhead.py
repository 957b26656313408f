"""Step time of a two-teacher Distiller with every diagnostic on, over the
same distiller with none (target: <= 1.15x).

Three distillers are built in this process from the same two teachers and
copies of one student: diagnostics off, all six on (agreement, KL, mutual
information, ECE, teacher-teacher and teacher-student attention IoU), and
off again (an A/A control that shows the noise floor of the machine). They
are warmed up, then timed in interleaved rounds (the order rotates every
round) on the compiled Keras train function, so that machine noise hits all
alike. A round's ratio is its mean step time over the "off" one of the same
round; the script prints the median of those ratios, for wall-clock time
and for the process's CPU time (less sensitive to other processes on a
shared machine).

Run:
    python benchmarks/diagnostics_overhead.py            # 32x32x3, batch 64
    python benchmarks/diagnostics_overhead.py --size 8 --channels 1 --width 8
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kd  # noqa: E402
from keras_kd import metrics as m  # noqa: E402

CLASSES = 10


def cnn(prefix, width, size, channels):
    inputs = keras.Input((size, size, channels))
    x = inputs
    for stage in (1, 2):
        x = keras.layers.Conv2D(width * stage, 3, padding="same",
                                use_bias=False)(x)
        x = keras.layers.BatchNormalization()(x)
        x = keras.layers.Activation("relu", name=f"{prefix}_stage{stage}")(x)
        if stage == 1:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(CLASSES, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=prefix)


def diagnostics():
    return [
        m.TopOneAgreement(), m.TeacherKL(), m.MutualInformation(),
        m.ExpectedCalibrationError(),
        m.AttentionIoU(("t1", "t2"), ("t1_stage2", "t2_stage2"),
                       ("t1_logits", "t2_logits")),
        m.AttentionIoU(("t1", "s"), ("t1_stage2", "s_stage2"),
                       ("t1_logits", "s_logits")),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=int, default=32,
                        help="teacher width (student: width / 4)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5,
                        help="steps per timed block")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)

    rng = np.random.default_rng(0)
    n = args.batch * 8
    x = rng.random((n, args.size, args.size, args.channels)).astype("float32")
    y = rng.integers(0, CLASSES, size=n)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        args.batch, drop_remainder=True).cache().repeat()

    t1 = cnn("t1", args.width, args.size, args.channels)
    t2 = cnn("t2", args.width // 2, args.size, args.channels)
    student = cnn("s", max(args.width // 4, 2), args.size, args.channels)
    # "off" twice: the second is an A/A control measuring the noise floor.
    configs = (("off", None), ("on", diagnostics()), ("off_again", None))
    runs = {}
    for label, diags in configs:
        copy = keras.models.clone_model(student)
        copy.set_weights(student.get_weights())
        d = keras_kd.Distiller([t1, t2], copy, diagnostics=diags)
        d.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
        d.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0,
              shuffle=False)  # traces the step
        runs[label] = (d, iter(dataset))

    def block(label):
        """Mean wall-clock and process CPU time of one step."""
        d, iterator = runs[label]
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            logs = d.train_function(iterator)
        float(logs["loss"])  # waits for the last step
        return ((time.perf_counter() - wall) / args.steps,
                (time.process_time() - cpu) / args.steps)

    for label in runs:  # warm-up blocks
        block(label)
    times = {label: [] for label in runs}
    labels = list(runs)
    for r in range(args.rounds):
        order = labels[r % 3:] + labels[:r % 3]  # rotate who goes first
        for label in order:
            times[label].append(block(label))

    def ratio(label, kind):
        return statistics.median(
            a[kind] / b[kind] for a, b in zip(times[label], times["off"]))

    keys = sorted(runs["on"][0].get_metrics_result())
    print(f"input {args.size}x{args.size}x{args.channels}, batch "
          f"{args.batch}, teachers width {args.width}/{args.width // 2}, "
          f"student width {max(args.width // 4, 2)}; {args.rounds} rounds "
          f"x {args.steps} steps per configuration, interleaved")
    print(f"logged with diagnostics on: {keys}")
    for label in labels:
        wall = statistics.median(t[0] for t in times[label])
        cpu = statistics.median(t[1] for t in times[label])
        print(f"median step time {label}: wall {wall * 1e3:.2f} ms, "
              f"process CPU {cpu * 1e3:.2f} ms")
    for kind, what in ((0, "wall"), (1, "CPU")):
        print(f"{what:>4}: noise floor off_again/off "
              f"{ratio('off_again', kind):.3f}; ratio on/off "
              f"{ratio('on', kind):.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()

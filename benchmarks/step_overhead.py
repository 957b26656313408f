"""Per-step overhead of `keras_kd.Distiller` (TensorFlow, JAX, PyTorch).

For a CNN teacher and two students (a small one and one of the teacher's
size) this measures, on one fixed batch:

  (a) the `keras_kd.Distiller` train step;
  (b) its lower bound: the teacher's inference forward (the same
      multi-output extractor the distiller runs, jit-compiled on
      TensorFlow and JAX, under `torch.no_grad()` on PyTorch) plus the
      student's own train step (the student compiled alone with the same
      optimizer and loss), timed separately and summed;
  (c) `keras.distillation.Distiller` with the equivalent configuration
      (`LogitsDistillation` with a `KLDivergence` instance plus one
      `FeatureDistillation` on the same layers, using the same attention
      transfer loss object), on the same weights.

Every train step (a, b's student part, c) is driven the same way: the
model's compiled `train_function` is called directly on the batch (the
path `train_on_batch` takes, without its per-call metric reset and log
conversion), and each timed block of steps ends by reading the last loss
back to the host. On TensorFlow and JAX all models use
`jit_compile=True`; on PyTorch they run eagerly (`jit_compile=False`,
Keras' default there). On JAX the compiled `train_function` is stateless:
each runner threads its own state (every variable's value) from step to
step, as `fit` does, and the teacher's forward is a `jax.jit` of the
extractor's `stateless_call` with its weights passed in.

The machine may be noisy, so the configurations are timed round-robin (the
order rotates every round) for many short rounds after a warm-up. For wall
time and for process CPU time it prints the ratios of the medians, the
medians of the per-round ratios (paired within a round, which cancels slow
load drift) and the ratios of the minima, and it checks the targets
(a/b <= 1.05, a/c <= 0.95 for the teacher-sized student) against each.

With `--hlo` it also counts, for every configuration, the convolutions
in the optimized XLA program of one step (forward and gradient
separately); this shows what work each step does, whatever the noise.

Usage:
    python benchmarks/step_overhead.py --backend jax   # on JAX (default:
                                                  # KERAS_BACKEND, else
                                                  # tensorflow)
    python benchmarks/step_overhead.py --backend torch # eager PyTorch (no
                                                  # compilation: ~1 min)
    python benchmarks/step_overhead.py            # full run (~5 min on 2
                                                  # loaded cores, ~2.3 of
                                                  # them XLA compilation)
    python benchmarks/step_overhead.py --quick    # smoke run (~2.5 min,
                                                  # nearly all compilation)
    python benchmarks/step_overhead.py --hlo      # + convolution counts
                                                  # (TensorFlow only)
"""

import argparse
import os
import platform
import re
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

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf  # noqa: E402
elif BACKEND == "jax":
    import jax  # noqa: E402
elif BACKEND == "torch":
    import torch  # noqa: E402
else:
    sys.exit(f"step_overhead.py runs on tensorflow, jax or torch, not "
             f"{BACKEND}")

import keras_kd  # noqa: E402

TEMPERATURE = 4.0
STUDENT_LOSS_WEIGHT = 0.5
KD_WEIGHT = 1.0
AT_WEIGHT = 1000.0
FEATURE_STAGE = 2
# XLA on TensorFlow and JAX; Keras' default (eager) on PyTorch.
JIT_COMPILE = BACKEND != "torch"


# Models.

def make_cnn(prefix, widths, blocks_per_stage, num_classes, seed):
    """A plain VGG-style CNN on 32x32x3: conv-BN-ReLU blocks, one stage per
    width, max-pooling between stages, global average pooling and a dense
    classifier. The last activation of stage `i` is named
    `<prefix>_stage<i>`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name=f"{prefix}_input")
    x = inputs
    for stage, width in enumerate(widths, start=1):
        if stage > 1:
            x = keras.layers.MaxPooling2D(name=f"{prefix}_pool{stage}")(x)
        for block in range(blocks_per_stage):
            x = keras.layers.Conv2D(
                width, 3, padding="same", use_bias=False,
                name=f"{prefix}_s{stage}_conv{block}",
            )(x)
            x = keras.layers.BatchNormalization(
                name=f"{prefix}_s{stage}_bn{block}"
            )(x)
            last = block == blocks_per_stage - 1
            x = keras.layers.ReLU(
                name=f"{prefix}_stage{stage}" if last
                else f"{prefix}_s{stage}_relu{block}"
            )(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_gap")(x)
    outputs = keras.layers.Dense(num_classes, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=f"{prefix}_cnn")


def clone_with_weights(model):
    """An independent copy of `model` with the same weights."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def student_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def optimizer():
    return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)


def feature_layers(student_prefix):
    return f"t_stage{FEATURE_STAGE}", f"{student_prefix}_stage{FEATURE_STAGE}"


# The three configurations.

def build_kd_distiller(teacher, student, prefix):
    t_layer, s_layer = feature_layers(prefix)
    distiller = keras_kd.Distiller(
        teacher=teacher,
        student=student,
        terms=[
            keras_kd.Term(
                keras_kd.losses.KD(temperature=TEMPERATURE),
                weight=(1.0 - STUDENT_LOSS_WEIGHT) * KD_WEIGHT,
            ),
            keras_kd.Term(
                keras_kd.losses.AttentionTransfer(),
                weight=(1.0 - STUDENT_LOSS_WEIGHT) * AT_WEIGHT,
                teacher_layer=t_layer,
                student_layer=s_layer,
            ),
        ],
        student_loss_weight=STUDENT_LOSS_WEIGHT,
    )
    distiller.compile(
        optimizer=optimizer(), loss=student_loss(),
        jit_compile=JIT_COMPILE)
    return distiller


def build_keras_distiller(teacher, student, prefix):
    t_layer, s_layer = feature_layers(prefix)
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=student,
        distillation_losses=[
            keras.distillation.LogitsDistillation(
                temperature=TEMPERATURE, loss=keras.losses.KLDivergence()
            ),
            keras.distillation.FeatureDistillation(
                loss=keras_kd.losses.AttentionTransfer(),
                teacher_layer_name=t_layer,
                student_layer_name=s_layer,
            ),
        ],
        distillation_loss_weights=[KD_WEIGHT, AT_WEIGHT],
        student_loss_weight=STUDENT_LOSS_WEIGHT,
    )
    distiller.compile(
        optimizer=optimizer(), loss=student_loss(),
        jit_compile=JIT_COMPILE)
    return distiller


def build_student_alone(student):
    student.compile(optimizer=optimizer(), loss=student_loss(),
                    jit_compile=JIT_COMPILE)
    return student


def build_teacher_forward(teacher, prefix):
    """The teacher's inference forward as the distiller runs it: one call
    of a multi-output extractor (logits and the tapped stage),
    `training=False`; jit-compiled on TensorFlow and JAX, eager under
    `torch.no_grad()` (no autograd graph) on PyTorch."""
    t_layer, _ = feature_layers(prefix)
    extractor = keras.Model(
        teacher.input, [teacher.output, teacher.get_layer(t_layer).output]
    )
    if BACKEND == "jax":
        trainable = [v.value for v in extractor.trainable_variables]
        non_trainable = [v.value for v in extractor.non_trainable_variables]
        stateless = jax.jit(lambda tv, ntv, x: extractor.stateless_call(
            tv, ntv, x, training=False)[0])
        return lambda x: stateless(trainable, non_trainable, x)
    if BACKEND == "torch":
        def forward(x):
            with torch.no_grad():
                return extractor(x, training=False)

        return forward

    @tf.function(jit_compile=True)
    def forward(x):
        return extractor(x, training=False)

    return forward


# Timing.

class TrainSteps:
    """Runs `n` train steps of a compiled model on one fixed batch through
    its `train_function`, and waits for the result. On JAX the function is
    stateless and the runner threads the model's state through it."""

    def __init__(self, model, x, y):
        self.model = model
        self.data = [(x, y)]
        model.make_train_function()
        self.state = None
        if BACKEND == "jax":
            if not model.built:  # keras.distillation.Distiller
                model(x)
            model.optimizer.build(model.trainable_variables)
            self.state = (
                [v.value for v in model.trainable_variables],
                [v.value for v in model.non_trainable_variables],
                [v.value for v in model.optimizer.variables],
                [v.value for v in model.metrics_variables],
            )

    def _step(self):
        if BACKEND == "jax":
            logs, self.state = self.model.train_function(
                self.state, iter(self.data))
            return logs
        return self.model.train_function(self.data)

    def warm_up(self):
        return {k: float(v) for k, v in self._step().items()}

    def __call__(self, n):
        for _ in range(n):
            logs = self._step()
        keras.ops.convert_to_numpy(logs["loss"])


class ForwardSteps:
    def __init__(self, fn, x):
        self.fn = fn
        self.x = x

    def warm_up(self):
        return self.fn(self.x)

    def __call__(self, n):
        for _ in range(n):
            out = self.fn(self.x)
        keras.ops.convert_to_numpy(out[0])


def time_round_robin(runners, rounds, steps):
    """Per-step wall-clock and process CPU times (seconds) of each runner:
    `rounds` samples each, of `steps` steps; the order of the runners
    rotates every round."""
    names = list(runners)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            runners[name](steps)
            wall[name].append((time.perf_counter() - w0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    return wall, cpu


# Structure of the compiled step.

def count_convolutions(hlo_text):
    """(forward, gradient) convolution counts of an optimized HLO module;
    gradient convolutions carry a `gradient_tape/` op name."""
    forward = gradient = 0
    for line in hlo_text.splitlines():
        if " convolution(" not in line:
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        if name and "gradient_tape/" in name.group(1):
            gradient += 1
        else:
            forward += 1
    return forward, gradient


def train_step_hlo(model, x, y):
    """Optimized XLA HLO of one `train_step` of a compiled (and already
    stepped, so built) model."""
    step = tf.function(model.train_step, jit_compile=True)
    return step.experimental_get_compiler_ir((x, y))(stage="optimized_hlo")


def print_hlo_report(runners, labels, x, y):
    print("convolutions in the optimized XLA program of one step "
          "(forward + gradient):")
    teacher_fn = runners["teacher"].fn
    t_fwd, t_grad = count_convolutions(
        teacher_fn.experimental_get_compiler_ir(x)(stage="optimized_hlo"))
    print(f"  teacher forward: {t_fwd} + {t_grad}")
    for label in labels:
        cells = []
        for key, title in (("b_student", "student alone"),
                           ("a", "(a) keras_kd"), ("c", "(c) keras")):
            model = runners[(label, key)].model
            fwd, grad = count_convolutions(train_step_hlo(model, x, y))
            cells.append(f"{title} {fwd} + {grad}")
        print(f"  {label}: " + ", ".join(cells))


# Main.

def summarize(samples, labels):
    """Median per-step times and the a/b, a/c ratios for each student."""
    def med(key):
        return statistics.median(samples[key])

    rows = {}
    for label in labels:
        a, bs, c = (med((label, k)) for k in ("a", "b_student", "c"))
        bt = med("teacher")
        # Per-round ratios, paired within a round, cancel slow drifts in
        # the machine's load.
        paired_ab = statistics.median(
            sa / (st + ss) for sa, st, ss in zip(
                samples[(label, "a")], samples["teacher"],
                samples[(label, "b_student")]))
        paired_ac = statistics.median(
            sa / sc for sa, sc in zip(samples[(label, "a")],
                                      samples[(label, "c")]))
        am, btm, bsm, cm = (min(samples[k]) for k in (
            (label, "a"), "teacher", (label, "b_student"), (label, "c")))
        rows[label] = dict(a=a, bt=bt, bs=bs, b=bt + bs, c=c,
                           ab=a / (bt + bs), ac=a / c,
                           pab=paired_ab, pac=paired_ac,
                           mab=am / (btm + bsm), mac=am / cm)
    return rows


def print_table(title, rows):
    print(title)
    print(f"  {'student':<14}{'(a) keras_kd':>13}{'teacher fwd':>13}"
          f"{'student step':>13}{'(b) sum':>10}{'(c) keras':>11}"
          f"{'a/b':>7}{'a/c':>7}  {'paired a/b, a/c':>16}  "
          f"{'min a/b, a/c':>13}")
    for label, r in rows.items():
        print(f"  {label:<14}{r['a'] * 1e3:13.1f}{r['bt'] * 1e3:13.1f}"
              f"{r['bs'] * 1e3:13.1f}{r['b'] * 1e3:10.1f}{r['c'] * 1e3:11.1f}"
              f"{r['ab']:7.3f}{r['ac']:7.3f}  {r['pab']:9.3f}{r['pac']:7.3f}"
              f"  {r['mab']:6.3f}{r['mac']:7.3f}")


def main(argv=None):
    if BACKEND == "tensorflow":
        # Every model has its own train function; TF warns about
        # "retracing" when it sees several of them. Harmless here.
        tf.get_logger().setLevel("ERROR")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (read before Keras is imported)")
    parser.add_argument("--quick", action="store_true",
                        help="very short smoke run (small models, 2 rounds)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default 64; 16 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default 48; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per config per round (default 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per config after compiling")
    parser.add_argument("--hlo", action="store_true",
                        help="also count convolutions in each compiled step")
    args = parser.parse_args(argv)
    if args.hlo and BACKEND != "tensorflow":
        parser.error("--hlo counts convolutions of TensorFlow XLA programs")
    quick = args.quick
    batch = args.batch or (16 if quick else 64)
    rounds = args.rounds or (2 if quick else 48)
    steps = args.steps or 1
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)

    num_classes = 100
    if quick:
        teacher_widths, teacher_blocks = (8, 16, 32), 1
        small_widths, small_blocks = (4, 8, 16), 1
    else:
        teacher_widths, teacher_blocks = (16, 32, 64), 2
        small_widths, small_blocks = (8, 16, 32), 1

    if BACKEND == "tensorflow":
        engine = f"tensorflow {tf.__version__}"
    elif BACKEND == "jax":
        engine = f"jax {jax.__version__} on {jax.devices()[0].platform}"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = (f"torch {torch.__version__} on {device}, "
                  f"{torch.get_num_threads()} threads")
    print(f"python {platform.python_version()}, {engine}, "
          f"keras {keras.__version__}, keras_kd {keras_kd.__version__}, "
          f"backend {BACKEND}, {os.cpu_count()} CPUs")
    print(f"batch {batch}, 32x32x3 inputs, {num_classes} classes; "
          f"{rounds} rounds x {steps} steps per config (round-robin), "
          f"{warmup} warm-up steps; "
          + ("jit_compile=True everywhere" if JIT_COMPILE
             else "eager (jit_compile=False) everywhere"))

    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(
        rng.standard_normal((batch, 32, 32, 3), "float32"))
    y = keras.ops.convert_to_tensor(
        rng.integers(0, num_classes, (batch,)), "int32")

    teacher = make_cnn("t", teacher_widths, teacher_blocks, num_classes, 1)
    students = {
        "small": make_cnn("s", small_widths, small_blocks, num_classes, 2),
        "teacher-sized": make_cnn("s", teacher_widths, teacher_blocks,
                                  num_classes, 3),
    }
    print(f"teacher: widths {teacher_widths}, {teacher_blocks} conv/stage, "
          f"{teacher.count_params():,} params")
    for label, student in students.items():
        print(f"student '{label}': widths "
              f"{small_widths if label == 'small' else teacher_widths}, "
              f"{small_blocks if label == 'small' else teacher_blocks} "
              f"conv/stage, {student.count_params():,} params")
    print(f"terms: KD(T={TEMPERATURE}) + attention transfer "
          f"t_stage{FEATURE_STAGE} -> s_stage{FEATURE_STAGE}; student loss "
          f"weight {STUDENT_LOSS_WEIGHT}; SGD(0.01, momentum=0.9)")

    runners = {}
    compile_start = time.perf_counter()
    # Both students read the same teacher stage, so one teacher forward
    # serves as the first half of both lower bounds.
    runners["teacher"] = ForwardSteps(
        build_teacher_forward(clone_with_weights(teacher), "s"), x)
    runners["teacher"].warm_up()
    for label, student in students.items():
        # Independent copies with identical weights for every
        # configuration: none shares an optimizer, tracker or BN statistic
        # with another.
        kd = build_kd_distiller(
            clone_with_weights(teacher), clone_with_weights(student), "s")
        alone = build_student_alone(clone_with_weights(student))
        ref = build_keras_distiller(
            clone_with_weights(teacher), clone_with_weights(student), "s")

        runners[(label, "a")] = TrainSteps(kd, x, y)
        runners[(label, "b_student")] = TrainSteps(alone, x, y)
        runners[(label, "c")] = TrainSteps(ref, x, y)

        # The first call compiles. Same weights and batch: both distillers
        # must report the same first loss.
        first_kd = runners[(label, "a")].warm_up()["loss"]
        first_ref = runners[(label, "c")].warm_up()["total_loss"]
        runners[(label, "b_student")].warm_up()
        print(f"  '{label}' first-step loss: keras_kd {first_kd:.5f}, "
              f"keras.distillation {first_ref:.5f}")
    print(f"{'compile + first' if JIT_COMPILE else 'first'} steps: "
          f"{time.perf_counter() - compile_start:.1f} s")

    for runner in runners.values():
        runner(warmup)

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    wall, cpu = time_round_robin(runners, rounds, steps)
    print(f"timed rounds: {time.perf_counter() - start:.1f} s; load average "
          f"before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print()

    labels = list(students)
    wall_rows = summarize(wall, labels)
    cpu_rows = summarize(cpu, labels)
    print_table("wall-clock ms per step, median over rounds; ratios of "
                "medians, median of per-round ratios, ratio of minima:",
                wall_rows)
    print_table("process CPU ms per step (all threads), same statistics; "
                "less sensitive to other processes' load:", cpu_rows)
    print()
    # On a loaded machine the estimators can disagree; report each.
    estimators = (
        ("wall, ratio of medians", wall_rows, "ab", "ac"),
        ("wall, median of per-round ratios", wall_rows, "pab", "pac"),
        ("CPU, ratio of medians", cpu_rows, "ab", "ac"),
        ("CPU, median of per-round ratios", cpu_rows, "pab", "pac"),
    )
    for title, rows, ab, ac in estimators:
        ok_ab = all(rows[label][ab] <= 1.05 for label in labels)
        ok_ac = rows["teacher-sized"][ac] <= 0.95
        print(f"{title + ':':<34} a/b <= 1.05 both "
              f"{'met' if ok_ab else 'NOT met':<8}("
              + ", ".join(f"{rows[label][ab]:.3f}" for label in labels)
              + f");  a/c <= 0.95 teacher-sized "
              f"{'met' if ok_ac else 'NOT met'} "
              f"({rows['teacher-sized'][ac]:.3f})")
    if args.hlo:
        print()
        print_hlo_report(runners, labels, x, y)
    return 0


if __name__ == "__main__":
    sys.exit(main())

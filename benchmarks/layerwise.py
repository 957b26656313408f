"""Step time of distillation with layer-wise learning rates, relative to the
same distillation without them, measured in one process (TensorFlow, JAX
or PyTorch).

Every configuration trains the same teacher/student pair (three-stage CNNs on
synthetic 32x32x3 images, KD + attention transfer, SGD with momentum).
Configurations are timed in interleaved rounds of `--steps` training steps
each, in an order that rotates every round (after one warm-up round that
traces and compiles the functions). Each
round's time is divided by the baseline's time in the same round. Three
ratios are printed: of the median process CPU time per step (all threads;
the least disturbed by other jobs on a shared machine), of the fastest
rounds' wall time (other jobs only ever add time), and the median of the
per-round wall-time ratios.

Two drivers run the steps:
- `--driver steps` (default): the model's compiled `train_function` is
  called directly on one fixed batch (the path `fit` takes, without its
  callbacks and data pipeline), and each round ends by reading the last
  loss back to the host. On JAX the function is stateless: the runner
  threads every variable's value from step to step, as `fit` does (as in
  `step_overhead.py`).
- `--driver fit`: `fit` on `--steps` batches, timed from the first batch's
  start to the last batch's end by a callback (the method of the figures
  recorded before JAX support, for comparison; TensorFlow only, as JAX's
  asynchronous dispatch hides the end of a step from a callback).

Printed:
- the minor page faults per step of every configuration (`--driver
  steps`): memory taken fresh from the operating system. On a CPU, XLA
  allocates a program's memory at every call, and glibc hands blocks above
  its mmap threshold back to the system when they are freed.
- `ratio <signal>`: step time with `LayerwiseLearningRate(signal=...)` at the
  default `update_every` over the step time without it (target <= 1.10 for
  attention and Jacobian).
- `per-update cost <signal>`: with `update_every=1` every step re-estimates
  the scales; the extra time per step over the baseline is the cost of one
  update, in baseline steps (and in milliseconds at the median baseline
  step).

Usage:
    python benchmarks/layerwise.py --backend jax [--steps 50] [--rounds 9]
    python benchmarks/layerwise.py --backend tensorflow [--jit]
    python benchmarks/layerwise.py --backend torch   # eager PyTorch
    python benchmarks/layerwise.py --backend jax --quick   # smoke run
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

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kd  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND not in ("tensorflow", "jax", "torch"):
    sys.exit(f"layerwise.py runs on tensorflow, jax or torch, not {BACKEND}")

CLASSES = 10
PAIRS = [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2"),
         ("s_stage3", "t_stage3")]


def _minor_faults():
    """The process's minor page faults so far (0 where `resource` is
    missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cnn(prefix, width, size):
    inputs = keras.Input((size, size, 3))
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


def build(teacher, layerwise, jit, width, size):
    keras.utils.set_random_seed(1)
    student = cnn("s", width, size)
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


class TrainSteps:
    """Runs `n` train steps of a compiled model on one fixed batch through
    its `train_function`, and waits for the result. On JAX the function is
    stateless and the runner threads the model's state through it."""

    def __init__(self, model, x, y):
        self.model = model
        tensor = keras.ops.convert_to_tensor
        self.data = [(tensor(x), tensor(y))]
        model.make_train_function()
        self.state = None
        if BACKEND == "jax":
            import jax.numpy as jnp

            model.optimizer.build(model.trainable_variables)

            def own(variables):
                # Copies: the compiled step donates its input buffers, and
                # the distillers share the teacher's variables.
                return [jnp.array(v.value, copy=True) for v in variables]

            self.state = (
                own(model.trainable_variables),
                own(model.non_trainable_variables),
                own(model.optimizer.variables),
                own(model.metrics_variables),
            )

    def _step(self):
        if BACKEND == "jax":
            logs, self.state = self.model.train_function(
                self.state, iter(self.data))
            return logs
        return self.model.train_function(self.data)

    def __call__(self, n):
        for _ in range(n):
            logs = self._step()
        return float(keras.ops.convert_to_numpy(logs["loss"]))


class FitSteps:
    """Runs `n` steps through `fit` and reports the time from the first
    batch's start to the last batch's end (TensorFlow)."""

    def __init__(self, model, x, y, batch):
        self.model, self.x, self.y, self.batch = model, x, y, batch
        self.elapsed = None

    def __call__(self, n):
        clock = self

        class Clock(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                if batch == 0:
                    clock.start = (time.perf_counter(), time.process_time())

            def on_train_batch_end(self, batch, logs=None):
                clock.end = (time.perf_counter(), time.process_time())

        size = n * self.batch
        self.model.fit(self.x[:size], self.y[:size], batch_size=self.batch,
                       epochs=1, verbose=0, shuffle=False, callbacks=[Clock()])
        self.elapsed = (self.end[0] - self.start[0],
                        self.end[1] - self.start[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (read before Keras is imported)")
    parser.add_argument("--driver", choices=("steps", "fit"), default="steps")
    parser.add_argument("--steps", type=int, default=50,
                        help="steps per round; a multiple of update_every "
                        "so that every round holds the same updates")
    parser.add_argument("--update-steps", type=int, default=10,
                        help="steps per round with update_every=1")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--jit", action="store_true",
                        help="jit_compile=True on TensorFlow (XLA) or "
                        "PyTorch (torch.compile); JAX always compiles the "
                        "step with jax.jit")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small models and images, 2 rounds "
                        "of 4 steps, update_every=2")
    args = parser.parse_args(argv)
    if args.driver == "fit" and BACKEND != "tensorflow":
        parser.error("--driver fit measures TensorFlow only")
    width, size, update_every = 8, 32, None
    if args.quick:
        args.steps, args.update_steps, args.rounds = 4, 2, 2
        args.batch, width, size, update_every = 8, 2, 16, 2
    jit = True if BACKEND == "jax" else args.jit

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if args.driver == "fit":
        n = max(args.steps, args.update_steps) * args.batch
    else:
        n = args.batch
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=n)
    teacher = cnn("t", 4 * width, size)

    options = {} if update_every is None else {"update_every": update_every}
    default_every = keras_kd.LayerwiseLearningRate(
        PAIRS, **options).update_every
    if args.steps % default_every:
        parser.error(f"--steps must be a multiple of update_every "
                     f"({default_every})")
    configs = {"baseline": None}
    for signal in ("attention", "jacobian", "hessian"):
        configs[signal] = keras_kd.LayerwiseLearningRate(
            PAIRS, signal=signal, **options)
        configs[f"{signal}/every step"] = keras_kd.LayerwiseLearningRate(
            PAIRS, signal=signal, update_every=1)
    distillers = {name: build(teacher, lw, jit, width, size)
                  for name, lw in configs.items()}
    if args.driver == "fit":
        runners = {name: FitSteps(d, x, y, args.batch)
                   for name, d in distillers.items()}
    else:
        runners = {name: TrainSteps(d, x, y)
                   for name, d in distillers.items()}
    wall = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    faults = {name: [] for name in configs}

    def steps_of(name):
        return args.update_steps if "every step" in name else args.steps

    def run(name):
        runner, steps = runners[name], steps_of(name)
        if args.driver == "fit":
            runner(steps)
            w, c = runner.elapsed
        else:
            f0 = _minor_faults()
            w0, c0 = time.perf_counter(), time.process_time()
            runner(steps)
            w, c = time.perf_counter() - w0, time.process_time() - c0
            faults[name].append((_minor_faults() - f0) / steps)
        wall[name].append(w / steps)
        cpu[name].append(c / steps)

    compile_start = time.perf_counter()
    for name in configs:  # warm-up: tracing and compilation
        run(name)
    compile_seconds = time.perf_counter() - compile_start
    for times in (wall, cpu, faults):
        for name in times:
            times[name].clear()
    names = list(configs)
    for index in range(args.rounds):
        # The order rotates every round, so that no configuration always
        # follows the same one.
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            run(name)

    if BACKEND == "jax":
        import jax

        engine = f"jax {jax.__version__} on {jax.devices()[0].platform}"
    elif BACKEND == "torch":
        import torch

        engine = f"torch {torch.__version__}"
    else:
        import tensorflow as tf

        engine = f"tensorflow {tf.__version__}"
    print(f"python {platform.python_version()}, {engine}, keras "
          f"{keras.__version__}, {os.cpu_count()} CPUs; driver "
          f"{args.driver}, jit_compile={jit}")
    print(f"{args.rounds} interleaved rounds of {args.steps} steps "
          f"({args.update_steps} for update_every=1), batch {args.batch}, "
          f"{size}x{size}x3, default update_every={default_every}; warm-up "
          f"(compilation) {compile_seconds:.1f} s")
    med = statistics.median
    for name in configs:
        print(f"  {name:22s} wall median {1000 * med(wall[name]):7.1f} "
              f"min {1000 * min(wall[name]):7.1f} ms/step | process CPU "
              f"median {1000 * med(cpu[name]):7.1f} ms/step")
    if faults["baseline"]:
        print("minor page faults per step (memory the process took fresh "
              "from the system), median over rounds:")
        print("  " + " | ".join(f"{name} {med(faults[name]):.0f}"
                                for name in configs))

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
    return 0


if __name__ == "__main__":
    sys.exit(main())

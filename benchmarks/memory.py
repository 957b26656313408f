"""Peak memory and step time: LAKD local modules versus end-to-end KD.

Both configurations train the same 4-stage CNN student (two
conv-BN-ReLU blocks per stage) from the same wider teacher with the same
losses: 0.1 * cross-entropy + 0.9 * KD on the logits and one
`ActivationMapping` (NDAM) feature term at each split point, matched to
the teacher's corresponding layer.

- `end_to_end`: those feature terms as `Term`s; one gradient tape over the
  whole student.
- `lakd`: `LocalModules` split at the same points; one gradient tape per
  module, applied in turn.

Two sets of split points (`--split`, default both, one table each):

- `stages`: the outputs of the first three stages (4 modules). The first
  module, the 32x32 stage, holds about half of the student's activations.
- `blocks`: the output of every conv block except the last (7 splits, 8
  modules of one conv block each), which evens out the modules' memory.

Each configuration runs in its own subprocess (TensorFlow on CPU, batch 256,
synthetic 32x32x3 images, the Keras default `jit_compile="auto"`, which is
no XLA on a CPU-only machine: the train step is a `tf.function` graph). The
child measures its resident set size (VmRSS) once the models are built and
compiled, right before the first step (the baseline), then runs
`--steps` training steps (`train_on_batch`, the first one traces the graph)
and reports

- `peak_mb`: peak RSS of the process (`ru_maxrss`) minus the baseline, over
  all steps including the first;
- `steady_peak_mb`: the peak over the steps after the first (the kernel's
  high-water mark is reset after step 1 via /proc/self/clear_refs), minus
  the same baseline; this excludes the one-off cost of tracing and
  optimizing the graph;
- `step_s`: median wall time of the steps after the first;
- `cpu_s`: median process CPU time (user + system, all threads) of the
  same steps, less sensitive than wall time to other jobs on the machine.

Resident memory also counts what the C library's allocator keeps around
after tensors are freed, which depends on how allocations interleave. A
second kind of child (`--live`) therefore runs the same steps with
TensorFlow's own BFC allocator on the CPU (`TF_CPU_ALLOCATOR_USE_BFC=true`)
and reports its peak of bytes held by live tensors over the steps after
the first (`live_peak_mb`), which is what a GPU's memory must hold.

The configurations are run alternately `--repeats` times in each mode; the
parent prints the median of each quantity and the ratios LAKD / end-to-end,
computed from the medians of this one invocation.

On JAX (`--backend jax`) the whole step is one XLA program (`jit_compile`
is Keras' default there), with one `jax.value_and_grad` per LAKD module.
The live-tensor peak is then the device allocator's `peak_bytes_in_use`
where the device reports it (GPUs); the JAX CPU client reports no memory
statistics, so on CPU only resident memory is measured.

Usage: python benchmarks/memory.py [--backend tensorflow|jax] [--repeats 3]
       [--steps 8] [--split stages|blocks|both]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ("end_to_end", "lakd")
SPLITS = ("stages", "blocks")
BATCH = 256
SIZE = 32
CLASSES = 10
STUDENT_WIDTHS = (16, 32, 64, 128)
TEACHER_WIDTHS = (32, 64, 128, 256)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    """Reset the kernel's peak-RSS mark (VmHWM); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cnn(keras, prefix, widths):
    inputs = keras.Input((SIZE, SIZE, 3), name=f"{prefix}_input")
    x = inputs
    for stage, width in enumerate(widths, start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                                    name=f"{prefix}_s{stage}_conv{conv}")(x)
            x = keras.layers.BatchNormalization(
                name=f"{prefix}_s{stage}_bn{conv}")(x)
            x = keras.layers.Activation(
                "relu",
                name=(f"{prefix}_stage{stage}" if conv == 2
                      else f"{prefix}_s{stage}_relu{conv}"))(x)
        if stage < len(widths):
            x = keras.layers.MaxPooling2D(name=f"{prefix}_pool{stage}")(x)
    x = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_gap")(x)
    outputs = keras.layers.Dense(CLASSES, name=f"{prefix}_logits")(x)
    return keras.Model(inputs, outputs, name=prefix)


def split_points(split):
    """`(student layers, teacher layers)` at which the student is split
    (and the feature terms read)."""
    if split == "stages":
        stages = range(1, len(STUDENT_WIDTHS))
        return ([f"s_stage{i}" for i in stages],
                [f"t_stage{i}" for i in stages])
    student, teacher = [], []
    for i in range(1, len(STUDENT_WIDTHS) + 1):
        student.append(f"s_s{i}_relu1")
        teacher.append(f"t_s{i}_relu1")
        if i < len(STUDENT_WIDTHS):
            student.append(f"s_stage{i}")
            teacher.append(f"t_stage{i}")
    return student, teacher


def build(keras, keras_kd, config, split):
    """The compiled distiller of one configuration."""
    teacher = _cnn(keras, "t", TEACHER_WIDTHS)
    student = _cnn(keras, "s", STUDENT_WIDTHS)
    splits, teacher_layers = split_points(split)
    kd = keras_kd.Term(keras_kd.losses.KD(temperature=4.0), weight=0.9)
    if config == "end_to_end":
        terms = [kd] + [
            keras_kd.Term(keras_kd.losses.ActivationMapping(alpha=1.0,
                                                            beta=0.1),
                          teacher_layer=t, student_layer=s, name=f"ndam{i}")
            for i, (s, t) in enumerate(zip(splits, teacher_layers), start=1)
        ]
        distiller = keras_kd.Distiller(teacher, student, terms=terms,
                                       student_loss_weight=0.1)
    else:
        distiller = keras_kd.Distiller(
            teacher, student, terms=[kd], student_loss_weight=0.1,
            local_modules=keras_kd.LocalModules(
                splits, teacher_layers, alpha=1.0, beta=0.1))
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return distiller


def _live_peak(backend, reset):
    """The allocator's peak of live tensors, in bytes (after `reset()` when
    `reset`), or `None` where the backend's device does not report it."""
    if backend == "tensorflow":
        import tensorflow as tf

        if reset:
            tf.config.experimental.reset_memory_stats("CPU:0")
            return None
        return tf.config.experimental.get_memory_info("CPU:0")["peak"]
    import jax

    stats = jax.devices()[0].memory_stats()
    if reset or not stats:
        return None
    return stats.get("peak_bytes_in_use")


def child(config, split, steps, live, backend):
    os.environ["KERAS_BACKEND"] = backend
    if live:
        os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import resource

    import keras
    import numpy as np

    import keras_kd

    keras.utils.set_random_seed(0)
    distiller = build(keras, keras_kd, config, split)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=BATCH)

    if live:
        distiller.train_on_batch(x, y)
        _live_peak(backend, reset=True)
        for _ in range(steps - 1):
            distiller.train_on_batch(x, y)
        peak = _live_peak(backend, reset=False)
        print("RESULT " + json.dumps(
            {"config": config,
             "live_peak_mb": None if peak is None else peak / 2**20}),
            flush=True)
        return

    baseline_kb = _status_kb("VmRSS")
    times, cpu_times = [], []
    first_peak_kb = steady_peak_kb = None
    for step in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        distiller.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if step == 0:
            # Resetting the high-water mark also resets ru_maxrss: keep it.
            first_peak_kb = resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss
            reset = _reset_peak()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if reset:
        steady_peak_kb = _status_kb("VmHWM")
    peak_kb = max(peak_kb, first_peak_kb)
    result = {
        "config": config,
        "jit_compile": bool(distiller.jit_compile),
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": (peak_kb - baseline_kb) / 1024,
        "steady_peak_mb": (None if steady_peak_kb is None
                           else (steady_peak_kb - baseline_kb) / 1024),
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:]),
        "cpu_s": statistics.median(cpu_times[1:]),
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(config, split, steps, backend, live=False):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--config", config, "--split", split,
         "--steps", str(steps), "--backend", backend]
        + (["--live"] if live else []),
        capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{config} ({split}) failed:\n"
                           f"{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(line[-1][len("RESULT "):])


def measure(split, steps, repeats, backend):
    """Runs both configurations for one set of split points and prints the
    runs, the medians and the ratios."""
    student_layers, _ = split_points(split)
    print(f"\n== split {split}: {len(student_layers)} split points "
          f"({len(student_layers) + 1} LAKD modules) at "
          f"{', '.join(student_layers)}; the same points carry the "
          "end-to-end feature terms", flush=True)
    runs = {c: [] for c in CONFIGS}
    for repeat in range(repeats):
        for config in CONFIGS:
            result = run_child(config, split, steps, backend)
            runs[config].append(result)
            print(f"  run {repeat + 1} {config:>10}: "
                  f"peak {result['peak_mb']:7.1f} MB, steady peak "
                  f"{result['steady_peak_mb']:7.1f} MB, step "
                  f"{result['step_s']:.3f} s, CPU {result['cpu_s']:.3f} s "
                  "(baseline "
                  f"{result['baseline_mb']:.0f} MB, jit_compile="
                  f"{result['jit_compile']})", flush=True)
    for repeat in range(repeats):
        for config in CONFIGS:
            result = run_child(config, split, steps, backend, live=True)
            runs[config][repeat].update(result)
            if result["live_peak_mb"] is not None:
                print(f"  run {repeat + 1} {config:>10}: live tensors peak "
                      f"{result['live_peak_mb']:7.1f} MB", flush=True)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else float("nan")

    medians = {
        c: {k: median(r[k] for r in runs[c])
            for k in ("peak_mb", "steady_peak_mb", "live_peak_mb", "step_s",
                      "cpu_s")}
        for c in CONFIGS
    }
    print(f"\n{'split ' + split:>14} {'peak MB':>9} {'steady MB':>10} "
          f"{'live MB':>9} {'step s':>8} {'CPU s':>7}")
    for c in CONFIGS:
        m = medians[c]
        print(f"{c:>14} {m['peak_mb']:9.1f} {m['steady_peak_mb']:10.1f} "
              f"{m['live_peak_mb']:9.1f} {m['step_s']:8.3f} "
              f"{m['cpu_s']:7.3f}")
    e2e, lakd = medians["end_to_end"], medians["lakd"]
    peak_ratio = lakd["peak_mb"] / e2e["peak_mb"]
    steady_ratio = lakd["steady_peak_mb"] / e2e["steady_peak_mb"]
    live_ratio = lakd["live_peak_mb"] / e2e["live_peak_mb"]
    time_ratio = lakd["step_s"] / e2e["step_s"]
    cpu_ratio = lakd["cpu_s"] / e2e["cpu_s"]
    print(f"\n[{split}] LAKD / end-to-end peak memory:        "
          f"{peak_ratio:.3f} (target <= 0.85: "
          f"{'met' if peak_ratio <= 0.85 else 'NOT met'})")
    print(f"[{split}] LAKD / end-to-end steady peak memory: "
          f"{steady_ratio:.3f}")
    print(f"[{split}] LAKD / end-to-end live-tensor peak:   "
          f"{live_ratio:.3f} "
          f"({'<=' if live_ratio <= 0.85 else '>'} 0.85)")
    print(f"[{split}] LAKD / end-to-end step time:          "
          f"{time_ratio:.3f} (target <= 1.2: "
          f"{'met' if time_ratio <= 1.2 else 'NOT met'})")
    print(f"[{split}] LAKD / end-to-end step CPU time:      "
          f"{cpu_ratio:.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS)
    parser.add_argument("--split", choices=SPLITS + ("both",),
                        default="both",
                        help="split points: after each of the first three "
                        "stages, after every conv block but the last, or "
                        "both (one table each; the default)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--live", action="store_true",
                        help="child only: report the allocator's peak")
    parser.add_argument("--backend", choices=("tensorflow", "jax"),
                        default=os.environ.get("KERAS_BACKEND", "tensorflow"))
    args = parser.parse_args()
    if args.config:
        if args.split == "both":
            parser.error("a child (--config) needs --split stages|blocks")
        child(args.config, args.split, args.steps, args.live, args.backend)
        return

    print(f"batch {BATCH}, {SIZE}x{SIZE}x3 inputs, student widths "
          f"{STUDENT_WIDTHS}, teacher widths {TEACHER_WIDTHS}, "
          f"{args.steps} steps per process, {args.repeats} processes per "
          f"configuration (alternating), backend {args.backend}")
    for split in (SPLITS if args.split == "both" else (args.split,)):
        measure(split, args.steps, args.repeats, args.backend)


if __name__ == "__main__":
    main()

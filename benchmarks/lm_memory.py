"""Peak extra memory and step time of a token-level divergence, chunked
(`chunk_size=`) against unchunked, forward + backward.

At B=4, T=1024, V=32,000 (float32 logits: 500 MiB per (B, T, V) tensor)
two forms of the loss are measured, each chunked and unchunked:

- `logits`: `ForwardKL` (or `GeneralizedJSD`) on given teacher and student
  logits; the gradient with respect to the student logits. The gradient
  itself is one (B, T, V) tensor in both configurations, so chunking can
  at best remove the softmax intermediates around it.
- `fused`: the student's last hidden states (B, T, H=768) and LM-head kernel
  (H, V) instead of its logits; the gradient with respect to both. The
  unchunked configuration computes the full logits `h @ W`, then the loss;
  the chunked one is `ForwardKL(chunk_size=..., lm_head=...)`, which
  computes the logits chunk by chunk and never for the whole batch.

The teacher's logits are an input in both forms (as a teacher forward or a
cache gives them).

Memory. Each configuration runs in its own subprocess, which reports the
peak memory its steps add to what the inputs already hold:

- on a GPU, from the device allocator: JAX `memory_stats()`
  (`peak_bytes_in_use - bytes_in_use` before the first step), PyTorch
  `torch.cuda.max_memory_allocated()`, TensorFlow
  `get_memory_info()["peak"]`;
- on a CPU, the process's resident set size (`VmHWM - VmRSS`), with the
  high-water mark reset after the first (compiling) step: this includes
  what the allocator keeps after freeing, so it is an upper bound;
- on JAX, also XLA's own account of the compiled step
  (`compiled.memory_analysis()`): `temp` (intermediates) and `out` (the
  gradients and the value), the same on every run, whatever the load.

Time. One more subprocess builds both configurations of a form and times
them round-robin for `--rounds` rounds of `--steps` steps after a warm-up
(each block ends by reading the loss back to the host), and prints the
ratio of the medians and the median of the per-round ratios.

Targets: chunked / unchunked peak extra memory <= 0.25 and step
time <= 1.2.

Usage:
    python benchmarks/lm_memory.py --backend jax   # the recorded figures
    python benchmarks/lm_memory.py --quick         # smoke run, tiny sizes
    python benchmarks/lm_memory.py --backend torch --forms fused
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

FORMS = ("logits", "fused")
CONFIGS = ("unchunked", "chunked")
FULL = dict(batch=4, time=1024, vocab=32000, hidden=768, chunk_size=128)
QUICK = dict(batch=2, time=64, vocab=1000, hidden=64, chunk_size=16)
MIB = 2.0 ** 20


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# One configuration (runs in a child process).
# --------------------------------------------------------------------------


def build(form, config, sizes, divergence):
    """`(step, args)`: `step(*args)` runs forward + backward and returns
    the loss value (a host float is read by the caller)."""
    import keras
    import numpy as np
    from keras import ops

    from keras_kd import losses

    backend = keras.backend.backend()
    b, t, v, h = (sizes[k] for k in ("batch", "time", "vocab", "hidden"))
    chunk = sizes["chunk_size"] if config == "chunked" else None
    rng = np.random.default_rng(0)
    teacher = ops.convert_to_tensor(
        rng.normal(size=(b, t, v)).astype("float32"))
    weights = np.ones((b, t), "float32")
    weights[1, t // 2:] = 0.0  # some padding
    weights = ops.convert_to_tensor(weights)

    def make_loss(**kwargs):
        if divergence == "jsd":
            return losses.GeneralizedJSD(beta=0.5, chunk_size=chunk, **kwargs)
        return losses.ForwardKL(chunk_size=chunk, **kwargs)

    if form == "logits":
        args = [ops.convert_to_tensor(
            rng.normal(size=(b, t, v)).astype("float32"))]
        loss = make_loss()

        def value(student):
            return loss(teacher, student, sample_weight=weights)
    else:
        args = [ops.convert_to_tensor(
                    rng.normal(size=(b, t, h)).astype("float32")),
                ops.convert_to_tensor(
                    (rng.normal(size=(h, v)) / np.sqrt(h)).astype("float32"))]

        def value(hidden, kernel):
            if chunk is None:
                return make_loss()(teacher, ops.matmul(hidden, kernel),
                                   sample_weight=weights)
            loss = make_loss(lm_head=lambda x: ops.matmul(x, kernel))
            return loss(teacher, hidden, sample_weight=weights)

    if backend == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(value, argnums=tuple(
            range(len(args)))))
    elif backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(*inputs):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = value(*inputs)
            return out, tape.gradient(out, inputs)
    else:
        import torch

        def step(*inputs):
            inputs = [x.detach().requires_grad_(True) for x in inputs]
            out = value(*inputs)
            grads = torch.autograd.grad(out, inputs)
            return out.detach(), grads
    return step, args


def _device_kind():
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


class _DeviceMemory:
    """Peak bytes a block of work adds on the device (GPU), or `None`."""

    def __init__(self):
        import keras

        self.backend = keras.backend.backend()
        self.base = None

    def start(self):
        if self.backend == "jax":
            import jax

            self.device = jax.devices()[0]
            stats = self.device.memory_stats() or {}
            self.base = stats.get("bytes_in_use")
        elif self.backend == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
            self.base = tf.config.experimental.get_memory_info(
                "GPU:0")["current"]

    def peak_extra(self):
        if self.base is None:
            return None
        if self.backend == "jax":
            stats = self.device.memory_stats()
            return stats["peak_bytes_in_use"] - self.base
        if self.backend == "torch":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        import tensorflow as tf

        return tf.config.experimental.get_memory_info("GPU:0")["peak"] \
            - self.base


def _host_float(out):
    import keras

    value = out[0]
    return float(keras.ops.convert_to_numpy(value))


def child_memory(form, config, sizes, divergence, steps):
    import keras

    step, args = build(form, config, sizes, divergence)
    result = {"form": form, "config": config}
    if keras.backend.backend() == "jax":
        compiled = step.lower(*args).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            result["xla_temp_mib"] = analysis.temp_size_in_bytes / MIB
            result["xla_out_mib"] = analysis.output_size_in_bytes / MIB
    gpu = _device_kind() == "gpu"
    device = _DeviceMemory() if gpu else None
    if device is not None and keras.backend.backend() == "jax":
        device.start()  # the JAX allocator's peak cannot be reset
    _host_float(step(*args))  # compiles (or warms up)
    rss_base = _status_kb("VmRSS")
    reset = _reset_peak()
    if device is not None and keras.backend.backend() != "jax":
        device.start()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _host_float(step(*args))
        times.append(time.perf_counter() - start)
    if device is not None:
        result["device_peak_extra_mib"] = device.peak_extra() / MIB
    if reset:
        result["rss_peak_extra_mib"] = (
            _status_kb("VmHWM") - rss_base) / 1024.0
    result["step_ms_median"] = 1e3 * statistics.median(times)
    return result


def child_time(form, sizes, divergence, rounds, steps, warmup):
    runners = {c: build(form, c, sizes, divergence) for c in CONFIGS}
    for step, args in runners.values():
        for _ in range(warmup):
            _host_float(step(*args))
    samples = {c: [] for c in CONFIGS}
    order = list(CONFIGS)
    for _ in range(rounds):
        for config in order:
            step, args = runners[config]
            start = time.perf_counter()
            for _ in range(steps):
                out = step(*args)
            _host_float(out)
            samples[config].append((time.perf_counter() - start) / steps)
        order.reverse()
    return {"form": form, "samples_ms": {
        c: [1e3 * s for s in v] for c, v in samples.items()}}


# --------------------------------------------------------------------------
# The parent: one child per measurement, then the table.
# --------------------------------------------------------------------------


def _run_child(args, extra):
    env = dict(os.environ, KERAS_BACKEND=args.backend,
               TF_CPP_MIN_LOG_LEVEL="2")
    if args.backend == "jax" and "XLA_PYTHON_CLIENT_PREALLOCATE" not in env:
        # The allocator's statistics then count what the step uses.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    command = [sys.executable, os.path.abspath(__file__), "--child",
               "--backend", args.backend, "--divergence", args.divergence,
               "--sizes", json.dumps(args.sizes), *extra]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(extra)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"),
                        default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--divergence", choices=("forward_kl", "jsd"),
                        default="forward_kl")
    parser.add_argument("--forms", default=",".join(FORMS),
                        help="comma-separated subset of logits,fused")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 2 rounds: a smoke run")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None,
                        help="memory children per configuration (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (default 20)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per config per round (default 3)")
    parser.add_argument("--child", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        sizes = json.loads(args.sizes)
        kind, form, *rest = args.measure.split(":")
        if kind == "memory":
            result = child_memory(form, rest[0], sizes, args.divergence,
                                  steps=int(rest[1]))
        else:
            result = child_time(form, sizes, args.divergence,
                                rounds=int(rest[0]), steps=int(rest[1]),
                                warmup=int(rest[2]))
        print(json.dumps(result))
        return 0

    sizes = dict(QUICK if args.quick else FULL)
    if args.chunk_size:
        sizes["chunk_size"] = args.chunk_size
    args.sizes = sizes
    repeats = args.repeats or (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 20)
    steps = args.steps or (1 if args.quick else 3)
    forms = [f for f in args.forms.split(",") if f]
    print(f"lm_memory.py: backend {args.backend}, divergence "
          f"{args.divergence}, B={sizes['batch']} T={sizes['time']} "
          f"V={sizes['vocab']} H={sizes['hidden']}, chunk_size "
          f"{sizes['chunk_size']}; python {platform.python_version()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    for form in forms:
        results = {c: [] for c in CONFIGS}
        for _ in range(repeats):  # alternate the configurations
            for config in CONFIGS:
                results[config].append(_run_child(
                    args, ["--measure", f"memory:{form}:{config}:{steps}"]))
        print(f"\n== {form}: peak extra memory (MiB), median of {repeats} "
              "child process(es) per configuration")
        keys = [k for k in ("device_peak_extra_mib", "rss_peak_extra_mib",
                            "xla_temp_mib", "xla_out_mib")
                if any(k in r for r in results["unchunked"])]
        medians = {c: {k: statistics.median(r[k] for r in results[c]
                                             if k in r) for k in keys}
                   for c in CONFIGS}
        if "xla_temp_mib" in keys:
            for c in CONFIGS:
                medians[c]["xla_temp+out_mib"] = (
                    medians[c]["xla_temp_mib"] + medians[c]["xla_out_mib"])
            keys.append("xla_temp+out_mib")
        print(f"{'measure':26s} {'unchunked':>10s} {'chunked':>10s} "
              f"{'ratio':>7s}")
        for key in keys:
            a, b = medians["unchunked"][key], medians["chunked"][key]
            print(f"{key:26s} {_fmt(a):>10s} {_fmt(b):>10s} "
                  f"{_fmt(_ratio(b, a), 3):>7s}")

        timing = _run_child(args, ["--measure",
                                   f"time:{form}:{rounds}:{steps}:2"])
        samples = timing["samples_ms"]
        med = {c: statistics.median(samples[c]) for c in CONFIGS}
        paired = statistics.median(
            b / a for a, b in zip(samples["unchunked"], samples["chunked"]))
        print(f"step time (ms per forward + backward), {rounds} rounds x "
              f"{steps} steps, round-robin: unchunked {med['unchunked']:.2f}"
              f", chunked {med['chunked']:.2f}; ratio of medians "
              f"{med['chunked'] / med['unchunked']:.3f}, median of "
              f"per-round ratios {paired:.3f}")

    print("\nTargets: chunked / unchunked peak extra memory <= 0.25, step "
          "time <= 1.2.")
    print("In benchmarks/gpu.sh: part lm_memory 120 \"$python\" "
          "benchmarks/lm_memory.py --backend jax --repeats 1 --rounds 10")
    return 0


if __name__ == "__main__":
    sys.exit(main())

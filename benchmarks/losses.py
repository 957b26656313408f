"""Cost of the correlation losses compared with Hinton KD.

Measures forward + backward (gradient with respect to the student logits)
of each loss as one step: compiled on TensorFlow (XLA) and JAX (`jax.jit`),
eager on PyTorch (Keras' default there: the loss, then
`torch.autograd.grad`):

1. Time at B=256, C=1000: KD, SpearmanCorrelation, CMKD, DIST, a naive
   all-pairs soft-rank Spearman loss, and a Spearman loss on the soft ranks
   of tensorflow-probability's relaxed sorting matrix
   (`tfp.math.soft_sorting_matrix`), each as a ratio to KD, and the
   backend's `argsort` of the same logits (`keras.ops.argsort`:
   `tf.argsort`, `jnp.argsort`, `torch.argsort`). On the TensorFlow
   backend the step is `tf.function(jit_compile=True)` (XLA); a second
   table repeats the main losses without XLA. After each table the speed
   targets are printed with the time of each baseline: SpearmanCorrelation
   and CMKD at most 3x (argsort + KD), DIST at most 1.5x KD. The tfp row
   and the table without XLA need TensorFlow; on the other backends they
   are skipped with the reason.
2. Peak extra memory at B=8, C=32000: each loss runs (compiled, or eager
   on PyTorch) in a fresh subprocess that reports its peak resident memory
   (`VmHWM`, or `ru_maxrss` where /proc is missing); the peak of a
   subprocess that imports everything and builds the inputs but runs no
   loss is subtracted.
3. Closeness to exact ranks: max and mean |soft rank - rankdata| of
   `keras_kd.ops.rank.soft_rank` and of the tfp soft ranks.
4. What the window gives up: the cosine between the Spearman loss gradient
   with a window of 4 to 32 neighbours and with all pairs compared softly.
5. A top-k teacher against a dense one, per token, at B=8, T=128,
   V=32000, k=10: `ForwardKL()` given dense teacher logits `(B, T, V)`,
   and the same loss given the teacher's `TopKDistribution` (computed
   before timing, as a teacher cache stores it, float16), forward and
   backward with respect to the student logits. The teacher (logits, or
   the top-k arrays) is an argument of the compiled step, not a constant
   XLA could fold. Target: the top-k step at most 0.5x the dense step.

The tfp baseline is `tfp.math.soft_sorting_matrix`, which is NeuralSort
(Grover et al. 2019, a softmax over an n x n score matrix), not a Sinkhorn
iteration; both are O(C^2) per row.

Usage:

    python benchmarks/losses.py            # full run (a few minutes on CPU)
    python benchmarks/losses.py --quick    # fewer repetitions
    python benchmarks/losses.py --backend jax     # jax.jit (no tfp row)
    python benchmarks/losses.py --backend torch   # eager PyTorch (no tfp row)
    python benchmarks/losses.py --only topk       # part 5 alone
    python benchmarks/losses.py --only correlation  # parts 1 to 4

`--backend` (default: $KERAS_BACKEND, else tensorflow) is read before Keras
is imported; the memory subprocesses inherit it.

Timings on a shared machine are noisy: every loss is timed in interleaved
rounds and the median is reported, together with the median process CPU
time per step (less sensitive to other processes on the machine).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import backend_from_argv

if backend_from_argv(sys.argv[1:]):
    os.environ["KERAS_BACKEND"] = backend_from_argv(sys.argv[1:])
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_kd.losses.cmkd import CMKD  # noqa: E402
from keras_kd.losses.correlation import SpearmanCorrelation  # noqa: E402
from keras_kd.losses.dist import DIST  # noqa: E402
from keras_kd.losses.divergences import ForwardKL  # noqa: E402
from keras_kd.ops.correlation import pearson_correlation  # noqa: E402
from keras_kd.ops.rank import exact_rank  # noqa: E402
from keras_kd.ops.rank import pairwise_soft_rank  # noqa: E402
from keras_kd.ops.rank import soft_rank  # noqa: E402
from keras_kd.ops.sort import argsort_rows  # noqa: E402
from keras_kd.teachers.topk import TopKDistribution  # noqa: E402
from keras_kd.teachers.topk import top_k_distribution  # noqa: E402

BACKEND = keras.backend.backend()
STRENGTH = 0.1  # regularization_strength of every soft rank below
TFP_TEMPERATURE = 0.1  # temperature of the tfp relaxed sorting matrix


# ------------------------------------------------------------------ losses


def _kd_loss():
    """keras_kd's KD if it imports, else a local Hinton KD."""
    try:
        from keras_kd.losses.logits import KD

        return KD(temperature=4.0), "keras_kd.losses.logits.KD"
    except ImportError:

        def kd(teacher, student):
            log_p_t = ops.log_softmax(teacher / 4.0, axis=-1)
            log_p_s = ops.log_softmax(student / 4.0, axis=-1)
            kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
            return 16.0 * ops.mean(kl)

        return kd, "local Hinton KD"


ARGSORT = "keras.ops.argsort alone"
NATIVE_ARGSORT = {"tensorflow": "tf.argsort", "jax": "jnp.argsort",
                  "torch": "torch.argsort"}


def argsort_alone(teacher, student):
    """Not a loss: one `keras.ops.argsort` of the student logits (the
    backend's own argsort: `tf.argsort`, `jnp.argsort`, `torch.argsort`).
    The baseline of the rank losses' speed target."""
    order = ops.cast(ops.argsort(ops.stop_gradient(student)), student.dtype)
    return ops.mean(order) + 0.0 * ops.mean(student)


def key_sort_alone(teacher, student):
    """Not a loss: the sort the rank functions use (`argsort_rows`: under
    TensorFlow with XLA a sort of packed int64 keys, else the same as
    `keras.ops.argsort`). Spearman and CMKD sort twice (teacher and
    student), so twice this is the floor of any design that needs both
    orders."""
    order = ops.cast(argsort_rows(student), student.dtype)
    return ops.mean(order) + 0.0 * ops.mean(student)


def naive_spearman(teacher, student):
    """Spearman loss with the O(B C^2) all-pairs soft rank."""
    ranks = pairwise_soft_rank(student, STRENGTH)
    teacher_ranks = exact_rank(ops.stop_gradient(teacher))
    return ops.mean(1.0 - pearson_correlation(ranks, teacher_ranks))


def _tfp_module():
    """tensorflow_probability, or the reason it cannot be used."""
    if BACKEND != "tensorflow":
        return None, f"needs the TensorFlow backend (this is {BACKEND})"
    try:
        import tensorflow_probability as tfp

        tfp.math.soft_sorting_matrix  # noqa: B018
        return tfp, None
    except Exception as error:  # ImportError or an incompatible TF version
        return None, f"cannot import tensorflow_probability: {error!r}"


def tfp_soft_rank(x, temperature=TFP_TEMPERATURE):
    """Ascending 1-based soft ranks from tfp's relaxed sorting matrix.

    `soft_sorting_matrix` (NeuralSort, Grover et al. 2019) returns `P` with
    `P[k, j]` ~ [x_j is the (k+1)-th largest]; the descending rank of `x_j`
    is `sum_k (k + 1) P[k, j]`.
    """
    import tensorflow as tf

    tfp, _ = _tfp_module()
    n = x.shape[-1]
    matrix = tfp.math.soft_sorting_matrix(x, temperature)
    places = tf.range(1, n + 1, dtype=x.dtype)
    descending = tf.einsum("...kj,k->...j", matrix, places)
    return (n + 1.0) - descending


def tfp_spearman(teacher, student):
    ranks = tfp_soft_rank(student)
    teacher_ranks = exact_rank(ops.stop_gradient(teacher))
    return ops.mean(1.0 - pearson_correlation(ranks, teacher_ranks))


def candidates(include_quadratic=True):
    kd, kd_name = _kd_loss()
    losses = {
        "KD": kd,
        "SpearmanCorrelation": SpearmanCorrelation(
            temperature=1.0, regularization_strength=STRENGTH
        ),
        "SpearmanCorrelation window=4": SpearmanCorrelation(
            temperature=1.0, regularization_strength=STRENGTH, window=4
        ),
        "CMKD": CMKD(temperature=4.0, regularization_strength=STRENGTH),
        "DIST": DIST(temperature=4.0),
    }
    losses[ARGSORT] = argsort_alone
    losses["argsort_rows alone (sort floor)"] = key_sort_alone
    if include_quadratic:
        losses["naive pairwise Spearman"] = naive_spearman
        if _tfp_module()[0] is not None:
            losses["tfp soft_sorting_matrix Spearman"] = tfp_spearman
    return losses, kd_name


# ----------------------------------------------------------------- stepping


def make_step(loss, teacher, jit=True):
    """Returns `step(student)` running forward + backward and blocking on
    it, and the function that makes the student tensor from an array.
    `jit` is ignored on PyTorch, whose steps are eager."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        teacher = tf.constant(teacher)

        def forward_backward(student):
            with tf.GradientTape() as tape:
                tape.watch(student)
                value = loss(teacher, student)
            return value, tape.gradient(value, student)

        compiled = tf.function(forward_backward, jit_compile=jit)

        def step(student):
            value, grad = compiled(student)
            return float(value), grad.numpy()

        return step, tf.constant
    if BACKEND == "jax":
        import jax

        teacher = jax.numpy.asarray(teacher)
        # The teacher is an argument, not a closed-over constant: XLA would
        # otherwise evaluate its sort at compile time (over a minute on CPU).
        value_and_grad = jax.value_and_grad(lambda s, t: loss(t, s))
        compiled = jax.jit(value_and_grad) if jit else value_and_grad

        def step(student):
            value, grad = compiled(student, teacher)
            return float(value), np.asarray(grad)

        return step, jax.numpy.asarray
    if BACKEND == "torch":
        import torch

        teacher = ops.convert_to_tensor(teacher)  # on Keras' device

        def to_tensor(array):
            return ops.convert_to_tensor(array).requires_grad_(True)

        def step(student):
            value = loss(teacher, student)
            (grad,) = torch.autograd.grad(value, student)
            # Reading both back waits for a GPU to finish.
            return float(value.detach()), grad.cpu().numpy()

        return step, to_tensor
    raise SystemExit(f"benchmarks/losses.py supports tensorflow, jax and "
                     f"torch, not {BACKEND}.")


def make_inputs(batch, classes, seed=0):
    rng = np.random.default_rng(seed)
    teacher = (3.0 * rng.normal(size=(batch, classes))).astype("float32")
    student = (3.0 * rng.normal(size=(batch, classes))).astype("float32")
    return teacher, student


def time_losses(losses, batch, classes, rounds, jit=True, slow_rounds=3):
    """Median wall and CPU milliseconds per step, interleaved rounds, and
    the quartiles of the wall times (XLA's CPU runtime does not always run
    the two sorts of Spearman and CMKD at the same time, so their step
    times can have two modes; see docs/ops.md)."""
    teacher, student = make_inputs(batch, classes)
    steps = {}
    for name, loss in losses.items():
        step, to_tensor = make_step(loss, teacher, jit=jit)
        steps[name] = (step, to_tensor(student))
    return time_steps(steps, rounds, slow_rounds)


def time_steps(steps, rounds, slow_rounds=3):
    """`steps` maps a name to `(step, student)`; each step is called once
    to compile (or warm up) and twice more, then once per name in each of
    `rounds` interleaved rounds (a step slower than 0.5 s in only the
    first `slow_rounds`). Returns the medians and quartiles per name."""
    warm = {}
    for name, (step, s) in steps.items():
        start = time.perf_counter()
        step(s)  # compile
        compile_s = time.perf_counter() - start
        step(s)
        start = time.perf_counter()
        step(s)
        first = time.perf_counter() - start
        warm[name] = (step, s, compile_s, first)
    wall = {name: [] for name in warm}
    cpu = {name: [] for name in warm}
    for r in range(rounds):
        for name, (step, s, _, first) in warm.items():
            if first > 0.5 and r >= slow_rounds:
                continue  # quadratic baselines: a few rounds are enough
            c0, w0 = time.process_time(), time.perf_counter()
            step(s)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {
            "wall_ms": 1e3 * float(np.median(wall[name])),
            "wall_p25_ms": 1e3 * float(np.percentile(wall[name], 25)),
            "wall_p75_ms": 1e3 * float(np.percentile(wall[name], 75)),
            "cpu_ms": 1e3 * float(np.median(cpu[name])),
            "compile_s": warm[name][2],
            "runs": len(wall[name]),
        }
        for name in warm
    }


def print_timings(title, results):
    print(f"\n{title}")
    kd = results["KD"]
    print("wall and CPU: medians over the runs; wall p25-p75: the middle "
          "half of the wall times")
    print(f"{'loss':36s} {'wall ms':>9s} {'x KD':>7s} {'wall p25-p75':>15s} "
          f"{'CPU ms':>9s} {'x KD':>7s} {'runs':>5s}")
    for name, r in results.items():
        quartiles = f"{r['wall_p25_ms']:.1f}-{r['wall_p75_ms']:.1f}"
        print(f"{name:36s} {r['wall_ms']:9.2f} "
              f"{r['wall_ms'] / kd['wall_ms']:7.1f} {quartiles:>15s} "
              f"{r['cpu_ms']:9.2f} "
              f"{r['cpu_ms'] / kd['cpu_ms']:7.1f} {r['runs']:5d}")


TARGETS = (
    # (loss, baselines whose times add up, most allowed)
    ("SpearmanCorrelation", (ARGSORT, "KD"), 3.0),
    ("CMKD", (ARGSORT, "KD"), 3.0),
    ("DIST", ("KD",), 1.5),
)


def print_targets(results):
    """The speed targets, from the medians of one table: each loss's time
    over the sum of its baselines' times, in wall and CPU time."""
    print(f"Speed targets ({ARGSORT} is {NATIVE_ARGSORT[BACKEND]} of the "
          "same student logits; ratios of medians):")
    for name in (ARGSORT, "KD"):
        r = results[name]
        print(f"  baseline {name}: wall {r['wall_ms']:.2f} ms, CPU "
              f"{r['cpu_ms']:.2f} ms")
    for name, baselines, limit in TARGETS:
        if name not in results:
            continue
        r = results[name]
        wall = sum(results[b]["wall_ms"] for b in baselines)
        cpu = sum(results[b]["cpu_ms"] for b in baselines)
        base = " + ".join("argsort" if b == ARGSORT else b
                          for b in baselines)
        verdict = "within" if r["wall_ms"] <= limit * wall else "above"
        print(f"  {name} <= {limit:g} x ({base}): wall {r['wall_ms']:.2f} / "
              f"{wall:.2f} ms = {r['wall_ms'] / wall:.2f}x, CPU "
              f"{r['cpu_ms']:.2f} / {cpu:.2f} ms = {r['cpu_ms'] / cpu:.2f}x "
              f"({verdict} the target in wall time)")


# ------------------------------------------------------ top-k vs dense teacher

TOPK_SHAPE = (8, 128, 32000)  # batch, time, vocabulary
TOPK_K = 10
TOPK_LIMIT = 0.5  # the top-k step at most this times the dense step
DENSE = "ForwardKL, dense teacher logits"
TOPK = f"ForwardKL, top-{TOPK_K} teacher"


def make_teacher_step(loss, teacher):
    """Like `make_step`, with the teacher (dense logits or a
    `TopKDistribution` of arrays) passed to the compiled function as an
    argument on every backend: a closed-over teacher would be a constant
    that XLA may fold (the dense teacher's softmax, the top-k marks),
    which a training step cannot do. The step waits for the value and one
    entry of the gradient rather than copying the whole `(B, T, V)`
    gradient to NumPy: a copy both variants would pay and a training step
    does not."""
    sparse = isinstance(teacher, TopKDistribution)
    leaves = list(teacher) if sparse else [teacher]

    def rebuild(parts):
        return TopKDistribution(*parts) if sparse else parts[0]

    if BACKEND == "tensorflow":
        import tensorflow as tf

        leaves = [tf.constant(leaf) for leaf in leaves]

        def forward_backward(student, *parts):
            with tf.GradientTape() as tape:
                tape.watch(student)
                value = loss(rebuild(parts), student)
            return value, tape.gradient(value, student)

        compiled = tf.function(forward_backward, jit_compile=True)

        def step(student):
            return _wait(*compiled(student, *leaves))

        return step, tf.constant
    if BACKEND == "jax":
        import jax

        leaves = [jax.numpy.asarray(leaf) for leaf in leaves]
        compiled = jax.jit(jax.value_and_grad(
            lambda s, *parts: loss(rebuild(parts), s)))

        def step(student):
            return _wait(*compiled(student, *leaves))

        return step, jax.numpy.asarray
    if BACKEND == "torch":
        import torch

        teacher = rebuild([ops.convert_to_tensor(leaf) for leaf in leaves])

        def to_tensor(array):
            return ops.convert_to_tensor(array).requires_grad_(True)

        def step(student):
            value = loss(teacher, student)
            (grad,) = torch.autograd.grad(value, student)
            return _wait(value.detach(), grad)

        return step, to_tensor
    raise SystemExit(f"benchmarks/losses.py supports tensorflow, jax and "
                     f"torch, not {BACKEND}.")


def _wait(value, grad):
    """The value and the first entry of the gradient as Python floats:
    reading both back waits for an accelerator to finish the step."""
    first = grad[(0,) * len(grad.shape)]
    return float(ops.convert_to_numpy(value)), float(
        ops.convert_to_numpy(first))


def time_topk_teacher(rounds, shape=TOPK_SHAPE, k=TOPK_K):
    """Times `ForwardKL()` with a dense teacher and with its top-k form,
    interleaved; the top-k form is computed before timing (float16, the
    cache's dtype)."""
    rng = np.random.default_rng(0)
    teacher = (3.0 * rng.normal(size=shape)).astype("float32")
    student = (3.0 * rng.normal(size=shape)).astype("float32")
    sparse = top_k_distribution(teacher, k)
    sparse = TopKDistribution(*[ops.convert_to_numpy(p) for p in sparse])
    loss = ForwardKL()
    steps = {}
    for name, given in ((DENSE, teacher), (TOPK, sparse)):
        step, to_tensor = make_teacher_step(loss, given)
        steps[name] = (step, to_tensor(student))
    return time_steps(steps, rounds, slow_rounds=rounds)


def print_topk_teacher(results, mode, shape=TOPK_SHAPE, k=TOPK_K):
    batch, length, vocab = shape
    print(f"\nTop-k teacher against dense teacher logits, per token: "
          f"ForwardKL at B={batch}, T={length}, V={vocab}, k={k}, forward "
          f"+ backward with respect to the student logits, {mode}; the "
          "top-k distribution is computed before timing, the dense logits "
          "are an input of the step")
    print(f"{'teacher':36s} {'wall ms':>9s} {'wall p25-p75':>15s} "
          f"{'CPU ms':>9s} {'runs':>5s}")
    for name, r in results.items():
        quartiles = f"{r['wall_p25_ms']:.1f}-{r['wall_p75_ms']:.1f}"
        print(f"{name:36s} {r['wall_ms']:9.2f} {quartiles:>15s} "
              f"{r['cpu_ms']:9.2f} {r['runs']:5d}")
    dense, top = results[DENSE], results[TOPK]
    print("Speed target (ratio of medians):")
    print(f"  baseline {DENSE}: wall {dense['wall_ms']:.2f} ms, CPU "
          f"{dense['cpu_ms']:.2f} ms")
    wall = top["wall_ms"] / dense["wall_ms"]
    cpu = top["cpu_ms"] / dense["cpu_ms"]
    verdict = "within" if wall <= TOPK_LIMIT else "above"
    print(f"  top-{k} <= {TOPK_LIMIT:g} x dense: wall {top['wall_ms']:.2f} / "
          f"{dense['wall_ms']:.2f} ms = {wall:.2f}x, CPU "
          f"{top['cpu_ms']:.2f} / {dense['cpu_ms']:.2f} ms = {cpu:.2f}x "
          f"({verdict} the target in wall time)")


# ------------------------------------------------------------------- memory


def _peak_rss_mib():
    """Peak resident memory of this process, in MiB.

    Reads `VmHWM` from /proc/self/status: unlike `ru_maxrss`, which Linux
    carries over from the parent across `exec`, it covers only this
    process's own address space. Falls back to `ru_maxrss` elsewhere.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def memory_child(name, batch, classes):
    """Runs in a fresh process: one loss (or none), prints JSON."""
    teacher, student = make_inputs(batch, classes)
    result = {"name": name}
    if name != "idle":
        losses, _ = candidates(include_quadratic=False)
        step, to_tensor = make_step(losses[name], teacher)
        s = to_tensor(student)
        step(s)
        wall, cpu = [], []
        for _ in range(7):
            c0, w0 = time.process_time(), time.perf_counter()
            step(s)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        result["wall_ms"] = 1e3 * float(np.median(wall))
        result["cpu_ms"] = 1e3 * float(np.median(cpu))
    result["maxrss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result))


def measure_memory(names, batch, classes):
    rows = {}
    for name in ["idle"] + names:
        command = [sys.executable, os.path.abspath(__file__),
                   "--memory-child", name, "--batch", str(batch),
                   "--classes", str(classes)]
        out = subprocess.run(command, capture_output=True, text=True,
                             check=False)
        lines = [line for line in out.stdout.splitlines()
                 if line.startswith("RESULT ")]
        if out.returncode or not lines:
            rows[name] = {"error": out.stderr.strip().splitlines()[-1:]}
            continue
        rows[name] = json.loads(lines[-1][len("RESULT "):])
    return rows


def print_memory(rows, batch, classes, mode):
    print(f"\nPeak memory at B={batch}, C={classes}, forward + backward, "
          f"{mode} (fresh subprocess per loss, its peak RSS minus the idle "
          "subprocess's)")
    idle = rows["idle"]["maxrss_mib"]
    print(f"idle subprocess (imports + inputs): {idle:.0f} MiB")
    kd = rows.get("KD", {})
    print(f"{'loss':36s} {'extra MiB':>10s} {'wall ms':>9s} {'x KD':>7s} "
          f"{'CPU ms':>9s} {'x KD':>7s}")
    for name, r in rows.items():
        if name == "idle":
            continue
        if "error" in r:
            print(f"{name:36s} failed: {r['error']}")
            continue
        wall_ratio = r["wall_ms"] / kd["wall_ms"] if kd else float("nan")
        cpu_ratio = r["cpu_ms"] / kd["cpu_ms"] if kd else float("nan")
        print(f"{name:36s} {r['maxrss_mib'] - idle:10.0f} "
              f"{r['wall_ms']:9.2f} {wall_ratio:7.1f} {r['cpu_ms']:9.2f} "
              f"{cpu_ratio:7.1f}")
    pairwise_gib = batch * classes**2 * 4 / 2**30
    print(f"{'naive pairwise / tfp soft sort':36s} not run: one B x C x C "
          f"float32 intermediate alone is {pairwise_gib:.1f} GiB")


# ---------------------------------------------------------------- closeness


def rank_closeness(batch=16, classes=1000):
    import scipy.stats

    teacher, _ = make_inputs(batch, classes, seed=1)
    exact = scipy.stats.rankdata(teacher, axis=-1)
    print(f"\nCloseness to exact ranks (|soft - rankdata| max / mean, "
          f"B={batch}, C={classes}, x ~ N(0, 3^2), float32)")
    gaps = np.diff(np.sort(teacher, axis=-1), axis=-1)
    print(f"smallest gap between two values of a row: {gaps.min():.2e}, "
          f"median gap: {np.median(gaps):.2e}")
    for strength in (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-6):
        ranks = ops.convert_to_numpy(soft_rank(teacher, strength))
        error = np.abs(ranks - exact)
        print(f"keras_kd soft_rank eps={strength:<8g} (window 16): "
              f"{error.max():10.4f} {error.mean():10.4f}")
    tfp, reason = _tfp_module()
    if tfp is None:
        print(f"tfp soft_sorting_matrix: skipped ({reason})")
        return
    for temperature in (1.0, 0.1, 0.01, 1e-3):
        ranks = np.asarray(tfp_soft_rank(teacher, temperature))
        error = np.abs(ranks - exact)
        finite = np.isfinite(ranks).all()
        print(f"tfp soft_sorting_matrix temperature={temperature:<8g}: "
              f"{np.nanmax(error):10.4f} {np.nanmean(error):10.4f}"
              f"{'' if finite else ' (non-finite values)'}")


# ---------------------------------------------------------------- gradients


def window_agreement(batch=16, classes=1000, windows=(4, 8, 16, 32)):
    """Cosine between the Spearman loss gradient with a `window` and with
    every pair compared softly (`window = classes - 1`, which is the
    all-pairs soft rank), per sample, for a student correlated with its
    teacher. Shows what a shorter window gives up."""
    from keras_kd.losses.correlation import spearman_loss

    rng = np.random.default_rng(2)
    teacher = (3.0 * rng.normal(size=(batch, classes))).astype("float32")
    student = (0.7 * teacher + 2.0 * rng.normal(size=(batch, classes)))
    student = student.astype("float32")
    print(f"\nSpearman gradient against the all-pairs soft rank's (cosine per "
          f"sample, mean / min; B={batch}, C={classes}, strength {STRENGTH})")
    for temperature in (1.0, 4.0):
        def gradient(window):
            return ops.convert_to_numpy(_loss_gradient(
                lambda t, s: ops.mean(spearman_loss(
                    t, s, temperature, STRENGTH, window=window)),
                teacher, student))

        reference = gradient(classes - 1)
        cells = []
        for window in windows:
            g = gradient(window)
            norms = np.linalg.norm(g, axis=-1) * np.linalg.norm(
                reference, axis=-1)
            cosine = np.sum(g * reference, -1) / norms
            cells.append(f"window {window}: {cosine.mean():.3f} / "
                         f"{cosine.min():.3f}")
        print(f"temperature {temperature:g}: " + ", ".join(cells))


def _loss_gradient(loss, teacher, student):
    """Gradient with respect to the student, computed eagerly (tracing the
    all-pairs window, about 2000 steps, would take minutes)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        student = tf.constant(student)
        with tf.GradientTape() as tape:
            tape.watch(student)
            value = loss(tf.constant(teacher), student)
        return tape.gradient(value, student)
    if BACKEND == "torch":
        import torch

        student = ops.convert_to_tensor(student).requires_grad_(True)
        value = loss(ops.convert_to_tensor(teacher), student)
        return torch.autograd.grad(value, student)[0]
    import jax

    return jax.grad(lambda s: loss(teacher, s))(jax.numpy.asarray(student))


# --------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("tensorflow", "jax", "torch"),
                        help="Keras backend (default: $KERAS_BACKEND, else "
                        "tensorflow)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("correlation", "topk"),
                        help="run parts 1 to 4 (correlation) or part 5 "
                        "(topk) alone")
    parser.add_argument("--memory-child")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=32000)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch, args.classes)
        return

    import platform

    print(f"backend={BACKEND} keras={keras.__version__} "
          f"python={platform.python_version()} cpus={os.cpu_count()}")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # one tf.function per loss
        print(f"tensorflow={tf.__version__} "
              f"gpus={len(tf.config.list_physical_devices('GPU'))}")
    elif BACKEND == "jax":
        import jax

        print(f"jax={jax.__version__} devices={jax.devices()}")
    elif BACKEND == "torch":
        import torch

        print(f"torch={torch.__version__} threads={torch.get_num_threads()} "
              f"device={ops.convert_to_tensor(0.0).device}")
    compiled = {
        "tensorflow": "XLA (tf.function(jit_compile=True))",
        "jax": "jax.jit",
        "torch": "eager PyTorch (torch.autograd.grad)",
    }[BACKEND]
    if args.only != "topk":
        correlation_parts(args.quick, compiled)
    if args.only != "correlation":
        results = time_topk_teacher(3 if args.quick else 10)
        print_topk_teacher(results, compiled)


def correlation_parts(quick, compiled):
    """Parts 1 to 4 of the module docstring."""
    losses, kd_name = candidates()
    print(f"KD baseline: {kd_name}; soft rank strength {STRENGTH}, "
          f"tfp temperature {TFP_TEMPERATURE}")
    tfp, reason = _tfp_module()
    if tfp is None:
        print(f"tfp soft_sorting_matrix Spearman: skipped ({reason})")
    else:
        print(f"tensorflow_probability={tfp.__version__}")

    # Memory first, while this process is still small.
    rows = measure_memory(
        ["KD", "SpearmanCorrelation", "CMKD", "DIST"], 8, 32000)

    rounds = 6 if quick else 30
    results = time_losses(losses, 256, 1000, rounds)
    print_timings(f"Forward + backward at B=256, C=1000, {compiled}",
                  results)
    first = "first-call" if BACKEND == "torch" else "compile"
    print(f"{first} seconds: " + ", ".join(
        f"{name} {r['compile_s']:.1f}" for name, r in results.items()))
    print_targets(results)
    if BACKEND == "tensorflow":
        main_losses, _ = candidates(include_quadratic=False)
        main_losses.pop("SpearmanCorrelation window=4")
        results = time_losses(main_losses, 256, 1000, rounds, jit=False)
        print_timings("Forward + backward at B=256, C=1000, tf.function "
                      "without XLA", results)
        print_targets(results)
    else:
        print(f"\nTable without XLA: skipped (tf.function without "
              f"jit_compile needs the TensorFlow backend; this is "
              f"{BACKEND})")

    print_memory(rows, 8, 32000, compiled)
    rank_closeness()
    window_agreement()


if __name__ == "__main__":
    main()

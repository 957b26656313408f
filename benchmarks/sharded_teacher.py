"""Per-device memory of a distillation step whose teacher is sharded on the
model axis of a `keras.distribution` mesh (JAX).

For each model-axis size M, a Keras Hub Gemma teacher (built from scratch,
nothing downloaded) is laid out by `GemmaBackbone.get_layout_map` on a
`(batch, M)` mesh, a smaller Gemma student is replicated, and the
distiller's training step (`ForwardKL`, chunked, fused with both LM heads)
is compiled for one batch. XLA's own account of the compiled step
(`memory_analysis()`, per device, exact and independent of load) gives the
argument bytes; the teacher's share is read from the teacher's shards.
Then a few steps are timed (on virtual CPU devices, for reference only:
they share the machine's cores).

    python benchmarks/sharded_teacher.py --virtual-devices 8      # CPU
    python benchmarks/sharded_teacher.py --size gemma_7b --dtype bfloat16  # 8 GPUs

`--virtual-devices N` makes N CPU devices (the XLA flag is set before JAX
starts); without it the script uses the accelerators that JAX sees.
"""

import argparse
import os
import statistics
import sys
import time

SIZES = {
    # The size the tests use, a little larger.
    "small": dict(teacher=dict(num_layers=2, hidden_dim=128,
                               intermediate_dim=512, num_query_heads=8,
                               num_key_value_heads=8, head_dim=16),
                  student=dict(num_layers=1, hidden_dim=32,
                               intermediate_dim=64, num_query_heads=4,
                               num_key_value_heads=4, head_dim=8),
                  vocabulary=512, batch=8, length=32, chunk=8),
    # Gemma 7B's shape (8.5 B parameters, 17 GB in bfloat16), distilled
    # into a 2-layer student of width 1024 with the same vocabulary. (Gemma
    # 2B has one key-value head, which Keras Hub's layout map cannot split
    # on a model axis.)
    "gemma_7b": dict(teacher=dict(num_layers=28, hidden_dim=3072,
                                  intermediate_dim=49152, num_query_heads=16,
                                  num_key_value_heads=16, head_dim=256),
                     student=dict(num_layers=2, hidden_dim=1024,
                                  intermediate_dim=8192, num_query_heads=8,
                                  num_key_value_heads=8, head_dim=128),
                     vocabulary=256000, batch=8, length=512, chunk=128),
}


def parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--virtual-devices", type=int, default=0)
    parser.add_argument("--model-axes", default="1,2,4,8")
    parser.add_argument("--batch-axis", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps per configuration (0: none)")
    parser.add_argument("--dtype", default="float32")
    return parser.parse_args()


ARGS = parse()
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if ARGS.virtual_devices:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") +
        f" --xla_force_host_platform_device_count={ARGS.virtual_devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
import keras_kd  # noqa: E402
from keras_kd.batches import carry_weights  # noqa: E402

Gemma = keras_hub.models.GemmaBackbone
MiB = 2 ** 20


def backbone(config, vocabulary, seed):
    keras.utils.set_random_seed(seed)
    return Gemma(vocabulary_size=vocabulary, dtype=ARGS.dtype, **config)


def tokens(size):
    rng = np.random.default_rng(0)
    shape = (size["batch"], size["length"])
    mask = np.ones(shape, "int32")
    mask[::2, shape[1] // 2:] = 0
    x = {"token_ids": (rng.integers(1, size["vocabulary"], shape) * mask)
         .astype("int32"), "padding_mask": mask}
    return x, mask.astype("float32")


def configuration(m, size):
    devices = jax.devices()[:ARGS.batch_axis * m]
    mesh = keras.distribution.DeviceMesh(
        (ARGS.batch_axis, m), ("batch", "model"), devices)
    teacher_scope = keras.distribution.ModelParallel(
        layout_map=Gemma.get_layout_map(mesh), batch_dim_name="batch")
    training = keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch")
    with teacher_scope.scope():
        teacher = backbone(size["teacher"], size["vocabulary"], 0)
    keras.distribution.set_distribution(training)
    try:
        student = backbone(size["student"], size["vocabulary"], 1)
        loss = keras_kd.losses.ForwardKL(
            chunk_size=size["chunk"],
            teacher_lm_head=teacher.token_embedding,
            lm_head=student.token_embedding)
        d = keras_kd.Distiller(teacher, student, terms=[keras_kd.Term(loss)],
                               student_loss_weight=0.0)
        d.compile(optimizer=keras.optimizers.Adam(1e-4))
        x, weights = tokens(size)
        d.optimizer.build(d.trainable_variables)
        state = ([v.value for v in d.trainable_variables],
                 [v.value for v in d.non_trainable_variables],
                 [v.value for v in d.optimizer.variables],
                 [v.value for v in d.metrics_variables])
        data = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, training.get_data_layout(a.shape)
                                     .backend_layout),
            (carry_weights(x, weights),))
        start = time.perf_counter()
        analysis = jax.jit(d.train_step).lower(
            state, data).compile().memory_analysis()
        compile_s = time.perf_counter() - start
        row = {
            "M": m, "devices": len(devices),
            "argument": analysis.argument_size_in_bytes,
            "temp": analysis.temp_size_in_bytes,
            "output": analysis.output_size_in_bytes,
            "teacher": sum(v.value.nbytes for v in teacher.weights),
            "shard": max(sum(s.data.nbytes for v in teacher.weights
                             for s in v.value.addressable_shards
                             if s.device == device) for device in devices),
            "compile_s": compile_s,
        }
        times = []
        if ARGS.steps:
            d.fit(x, sample_weight=weights, batch_size=size["batch"],
                  epochs=1, verbose=0)  # compiles
            for _ in range(ARGS.steps):
                start = time.perf_counter()
                d.fit(x, sample_weight=weights, batch_size=size["batch"],
                      epochs=1, verbose=0)
                times.append(time.perf_counter() - start)
        row["step_s"] = statistics.median(times) if times else float("nan")
        return row
    finally:
        keras.distribution.set_distribution(None)


def main():
    size = SIZES[ARGS.size]
    axes = [int(m) for m in ARGS.model_axes.split(",")]
    print(f"jax {jax.__version__}, keras {keras.__version__}, keras-hub "
          f"{keras_hub.__version__}; {len(jax.devices())} devices: "
          f"{jax.devices()[0].device_kind}; size {ARGS.size}, dtype "
          f"{ARGS.dtype}, batch axis {ARGS.batch_axis}")
    logits = (size["batch"] // ARGS.batch_axis * size["length"] *
              size["vocabulary"] * 4)
    print(f"one device's full float32 teacher logits would be "
          f"{logits / MiB:.2f} MiB")
    rows = [configuration(m, size) for m in axes]
    base = rows[0]
    print("\n| model axis M | devices | step arguments (MiB) | teacher "
          "per device (MiB), from memory_analysis | teacher shards (MiB) | "
          "teacher share | 1/M | temp (MiB) | step time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        # The rest of the arguments (student, optimizer, batch) do not
        # change with M: the change is the teacher's.
        teacher = row["argument"] - base["argument"] + (
            base["shard"])
        print(f"| {row['M']} | {row['devices']} | "
              f"{row['argument'] / MiB:.3f} | {teacher / MiB:.3f} | "
              f"{row['shard'] / MiB:.3f} | "
              f"{row['shard'] / row['teacher']:.4f} | {1 / row['M']:.4f} | "
              f"{row['temp'] / MiB:.3f} | {row['step_s']:.3f} |")


if __name__ == "__main__":
    main()

"""Run by test_distribute.py in processes of their own: device and worker
configuration must be set before the backend initialises.

    python distribute_check.py jax_data_parallel
        JAX with two virtual CPU devices: the same distiller trained on one
        device and with `keras.distribution.DataParallel` over both.
    python distribute_check.py tf_worker OUT.npz
        One TensorFlow process: a worker of `MultiWorkerMirroredStrategy`
        when `TF_CONFIG` is set, else the single-worker reference.

Each prints one line `RESULT <json>` or writes OUT.npz.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
MODE = sys.argv[1]
if MODE == "jax_data_parallel":
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2")
else:
    os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_cnn, make_token_lm, uneven_tokens  # noqa: E402

import keras_kd  # noqa: E402
keras.config.disable_traceback_filtering()

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, size=64)
    return x, y


def build(weights=None, batchnorm=True):
    keras.utils.set_random_seed(0)
    teacher = make_cnn("t", 8, batchnorm=batchnorm)
    student = make_cnn("s", 4, batchnorm=batchnorm,
                       regularizer=keras.regularizers.L2(0.01))
    d = keras_kd.Distiller(teacher, student, terms=[
        keras_kd.Term(keras_kd.losses.KD(2.0), 0.9),
        keras_kd.Term(keras_kd.losses.FeatureMSE(), 1.0,
                      teacher_layer="t_stage2", student_layer="s_stage2"),
    ], student_loss_weight=0.1)
    if weights is not None:
        d.set_weights(weights)
    d.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
              loss=SCCE, metrics=["accuracy"])
    return d


def run(d):
    x, y = data()
    fit = d.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    logs = {k: float(v[-1]) for k, v in fit.history.items()}
    logs.update({f"eval_{k}": float(v) for k, v in d.evaluate(
        x, y, batch_size=32, return_dict=True, verbose=0).items()})
    return logs, [keras.ops.convert_to_numpy(w) for w in d.weights]


def jax_data_parallel():
    import jax

    devices = jax.devices("cpu")
    single = build()
    initial = single.get_weights()
    single_logs, single_weights = run(single)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices))
    parallel = build(initial)
    parallel_logs, parallel_weights = run(parallel)
    shards = len(parallel.student.trainable_variables[0].value.sharding
                 .device_set)
    print("RESULT" + json.dumps({
        "devices": len(devices), "shards": shards,
        "single": single_logs, "parallel": parallel_logs,
        "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(
            single_weights, parallel_weights)),
    }))


def tf_worker(out):
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    # Batch normalization would see each replica's half of the batch.
    with strategy.scope():
        d = build(batchnorm=False)
    logs, weights = run(d)
    # A masked, chunked token divergence; each worker's half of the batch
    # holds a very different number of real tokens.
    with strategy.scope():
        keras.utils.set_random_seed(0)
        lm = keras_kd.Distiller(
            make_token_lm("t", 32), make_token_lm("s", 16),
            terms=[keras_kd.Term(keras_kd.losses.ForwardKL(chunk_size=5))],
            student_loss_weight=0.0)
        lm.compile(optimizer=keras.optimizers.SGD(0.5))
    tokens, token_weights = uneven_tokens()
    lm_logs = lm.fit(tokens, sample_weight=token_weights, batch_size=16,
                     epochs=3, shuffle=False, verbose=0).history
    np.savez(out, replicas=strategy.num_replicas_in_sync,
             keys=np.array(sorted(logs)),
             logs=np.array([logs[k] for k in sorted(logs)]),
             lm_keys=np.array(sorted(lm_logs)),
             lm_logs=np.array([lm_logs[k] for k in sorted(lm_logs)]),
             **{f"w{i}": w for i, w in enumerate(weights)},
             **{f"lmw{i}": w for i, w in
                enumerate(lm.student.get_weights())})


if __name__ == "__main__":
    if MODE == "jax_data_parallel":
        jax_data_parallel()
    else:
        tf_worker(sys.argv[2])

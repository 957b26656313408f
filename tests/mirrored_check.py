"""Run by test_distribute.py in its own process: two logical CPU devices
must be configured before TensorFlow initialises."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_cnn, make_token_lm, uneven_tokens  # noqa: E402

import keras_kd  # noqa: E402


def build():
    keras.utils.set_random_seed(0)
    teacher = make_cnn("t", 8, batchnorm=False)
    student = make_cnn("s", 4, batchnorm=False,
                       regularizer=keras.regularizers.L2(0.01))
    d = keras_kd.Distiller(teacher, student, terms=[
        keras_kd.Term(keras_kd.losses.KD(), 0.9),
        keras_kd.Term(keras_kd.losses.FeatureMSE(), 1.0,
                      teacher_layer="t_stage2", student_layer="s_stage2"),
    ], student_loss_weight=0.1)
    d.compile(optimizer=keras.optimizers.SGD(0.1),
              loss=keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True))
    return d


rng = np.random.default_rng(0)
x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
y = rng.integers(0, 5, size=32)

single = build()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = build()
mirrored.set_weights(single.get_weights())
teacher_before = [w.copy() for w in mirrored.teacher.get_weights()]

out = {"replicas": strategy.num_replicas_in_sync}
for name, d in (("single", single), ("mirrored", mirrored)):
    out[name + "_eval"] = d.evaluate(x, y, batch_size=32, return_dict=True,
                                     verbose=0)
    out[name + "_fit"] = {k: v[-1] for k, v in d.fit(
        x, y, batch_size=32, epochs=2, shuffle=False,
        verbose=0).history.items()}
out["max_weight_diff"] = max(
    float(np.abs(a - b).max()) for a, b in zip(
        single.student.get_weights(), mirrored.student.get_weights()))
out["teacher_unchanged"] = all(
    np.array_equal(a, b)
    for a, b in zip(teacher_before, mirrored.teacher.get_weights()))


# A token divergence, masked and chunked: the replicas hold very different
# numbers of real tokens, and the mean is still over the global batch.
def build_lm():
    keras.utils.set_random_seed(0)
    d = keras_kd.Distiller(
        make_token_lm("t", 32), make_token_lm("s", 16),
        terms=[keras_kd.Term(keras_kd.losses.ForwardKL(chunk_size=5))],
        student_loss_weight=0.0)
    d.compile(optimizer=keras.optimizers.SGD(0.5))
    return d


tokens, token_weights = uneven_tokens()
single_lm = build_lm()
with strategy.scope():
    mirrored_lm = build_lm()
mirrored_lm.set_weights(single_lm.get_weights())
for name, d in (("single", single_lm), ("mirrored", mirrored_lm)):
    out[name + "_lm_fit"] = d.fit(
        tokens, sample_weight=token_weights, batch_size=16, epochs=3,
        shuffle=False, verbose=0).history
out["lm_max_weight_diff"] = max(
    float(np.abs(a - b).max()) for a, b in zip(
        single_lm.student.get_weights(), mirrored_lm.student.get_weights()))
print("RESULT" + json.dumps(out))

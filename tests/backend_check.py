"""Run by test_backends.py in a process of its own, on the backend that
`KERAS_BACKEND` names (Keras picks its backend at import).

    python backend_check.py step OUT.npz
        One SGD step of KD plus a feature term from fixed NumPy weights;
        writes the student's weights after the step.
    python backend_check.py save DIR [layerwise]
        Trains a distiller (with layer-wise learning rates when asked) for
        one epoch and saves it as DIR/d.keras, with its weights and
        evaluation logs in DIR/saved.npz.
    python backend_check.py resume DIR
        Loads DIR/d.keras, evaluates it, trains one more epoch and writes
        DIR/resumed.npz.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_cnn  # noqa: E402

import keras_kd  # noqa: E402

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 5, size=16)
    return x, y


def distiller(batchnorm, layerwise=False):
    teacher = make_cnn("t", 8, batchnorm=batchnorm)
    student = make_cnn("s", 4, batchnorm=batchnorm)
    layerwise_lr = None
    if layerwise:
        layerwise_lr = keras_kd.LayerwiseLearningRate(
            pairs=[("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")],
            update_every=2)
    return keras_kd.Distiller(teacher, student, terms=[
        keras_kd.Term(keras_kd.losses.KD(2.0), 0.9),
        keras_kd.Term(keras_kd.losses.FeatureMSE(), 1.0,
                      teacher_layer="t_stage2", student_layer="s_stage2"),
    ], student_loss_weight=0.1, layerwise_lr=layerwise_lr)


def fixed_weights(model, seed):
    rng = np.random.default_rng(seed)
    model.set_weights([0.3 * rng.normal(size=w.shape).astype("float32")
                       for w in model.get_weights()])


def values(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


def step(out, layerwise=False):
    del layerwise
    d = distiller(batchnorm=False)
    fixed_weights(d.teacher, 1)
    fixed_weights(d.student, 2)
    for index, adapter in enumerate(d.adapters.values()):
        fixed_weights(adapter, 3 + index)
    d.compile(optimizer=keras.optimizers.SGD(0.1), loss=SCCE)
    x, y = batch()
    d.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    np.savez(out, *values(d.student.weights))


def save(folder, layerwise=False):
    keras.utils.set_random_seed(0)
    d = distiller(batchnorm=True, layerwise=layerwise)
    d.compile(optimizer=keras.optimizers.Adam(1e-2), loss=SCCE,
              metrics=["accuracy"])
    x, y = batch()
    d.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    d.save(os.path.join(folder, "d.keras"))
    logs = d.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    np.savez(os.path.join(folder, "saved.npz"),
             logs=np.array([logs[k] for k in sorted(logs)]),
             keys=np.array(sorted(logs)),
             iterations=int(keras.ops.convert_to_numpy(
                 d.optimizer.iterations)),
             **{f"w{i}": w for i, w in enumerate(values(d.weights))})


def resume(folder, layerwise=False):
    del layerwise  # read from the file
    d = keras.saving.load_model(os.path.join(folder, "d.keras"))
    x, y = batch()
    logs = d.evaluate(x, y, batch_size=16, return_dict=True, verbose=0)
    loaded = values(d.weights)
    teacher = values(d.teacher.weights)
    iterations = int(keras.ops.convert_to_numpy(d.optimizer.iterations))
    history = d.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.savez(os.path.join(folder, "resumed.npz"),
             logs=np.array([logs[k] for k in sorted(logs)]),
             keys=np.array(sorted(logs)), iterations=iterations,
             jit_compile=bool(d.jit_compile),
             loss=np.array(history.history["loss"]),
             student_changed=any(
                 not np.array_equal(a, b) for a, b in zip(
                     loaded, values(d.weights))),
             teacher_unchanged=all(
                 np.array_equal(a, b) for a, b in zip(
                     teacher, values(d.teacher.weights))),
             **{f"w{i}": w for i, w in enumerate(loaded)})


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    options = {"layerwise": True} if "layerwise" in sys.argv[3:] else {}
    {"step": step, "save": save, "resume": resume}[command](target,
                                                            **options)
    print("DONE", keras.backend.backend())

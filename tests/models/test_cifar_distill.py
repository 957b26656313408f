"""A CIFAR student from `keras_kd.models.cifar` distils from a CIFAR teacher
through its named stages, and exports alone as a SavedModel."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd.models import cifar


def test_shufflenet_v2_distils_from_resnet8_and_exports(tmp_path):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=8)
    teacher = cifar.resnet8(num_classes=10)
    student = cifar.shufflenet_v2(num_classes=10)
    before = [w.copy() for w in student.get_weights()]
    distiller = keras_kd.Distiller(
        teacher, student,
        terms=[keras_kd.Term(keras_kd.losses.KD(temperature=4.0)),
               # Both models name their stages: no layer lookup by hand.
               keras_kd.Term(keras_kd.losses.AttentionTransfer(),
                             teacher_layer="stage2", student_layer="stage2",
                             weight=100.0)])
    distiller.compile(optimizer=keras.optimizers.SGD(0.01))
    history = distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert {"kd_loss", "attention_transfer_loss"} <= set(history.history), \
        sorted(history.history)
    assert any(not np.array_equal(a, b)
               for a, b in zip(before, student.get_weights()))

    path = distiller.export_student(str(tmp_path / "student"), verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        reloaded.serve(tf.constant(x)).numpy(),
        student.predict(x, verbose=0), rtol=1e-4, atol=1e-4)
    assert len(reloaded.variables) == len(student.weights)

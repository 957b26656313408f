"""Clear, early answers for what used to fail deep inside training or train
silently on the wrong thing: multi-output models, subclassed models, log
names, numbers, the teacher's safety, features and augmentations."""

import math
import re
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_kd
from keras_kd import Distiller, LayerwiseLearningRate, Term
from keras_kd.losses import (
    DIST, KD, ActivationMapping, AttentionTransfer, DistillationLoss,
    FeatureMSE,
)
from keras_kd.metrics import TeacherKL, TopOneAgreement

from backend_utils import BACKEND, to_numpy
from conftest import NUM_CLASSES, make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
DOCS = Path(__file__).resolve().parents[1] / "docs"


def two_headed(prefix, as_dict=False, classes=3):
    """A model with outputs `cls` (classes) and `box` (4), as a list or a
    dict."""
    inputs = keras.Input((6,), name=f"{prefix}_input")
    h = keras.layers.Dense(8, activation="relu", name=f"{prefix}_h")(inputs)
    cls = keras.layers.Dense(classes, name="cls")(h)
    box = keras.layers.Dense(4, name="box")(h)
    outputs = {"cls": cls, "box": box} if as_dict else [cls, box]
    return keras.Model(inputs, outputs, name=prefix)


def pick(outputs, key):
    """One output of a model's computed outputs, by name."""
    if isinstance(outputs, dict):
        return outputs[key]
    return outputs[["cls", "box"].index(key)]


class Subclassed(keras.Model):
    """A subclassed classifier: its output shape is known at run time only."""

    def __init__(self, classes, name, heads=1):
        super().__init__(name=name)
        self.heads = [keras.layers.Dense(classes) for _ in range(heads)]

    def call(self, x):
        x = ops.reshape(x, (ops.shape(x)[0], -1))
        outputs = [head(x) for head in self.heads]
        return outputs[0] if len(outputs) == 1 else outputs


def small_data(n=16):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(n, 6)).astype("float32"),
            rng.integers(0, 3, size=n))


def weights_of(model):
    return [to_numpy(v) for v in model.weights]


# 4. Numbers.

BAD = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", BAD)
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ValueError, match="`weight` must be a finite"):
        Term(KD(), weight=value)
    with pytest.raises(ValueError, match="`temperature` must be a finite"):
        KD(temperature=value)
    with pytest.raises(ValueError, match="`temperature` must be a finite"):
        TeacherKL(temperature=value)
    with pytest.raises(ValueError, match="`p` must be a finite"):
        LayerwiseLearningRate([("a", "b"), ("c", "d")], p=value)
    with pytest.raises(ValueError, match="`p` must be a finite"):
        AttentionTransfer(p=value)
    with pytest.raises(ValueError, match="`alpha` must be a finite"):
        ActivationMapping(alpha=value)
    with pytest.raises(ValueError, match="`beta` must be a finite"):
        DIST(beta=value)
    with pytest.raises(ValueError, match="`student_loss_weight` must be"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4),
                  student_loss_weight=value)


def test_negative_student_loss_weight_is_refused():
    with pytest.raises(ValueError, match=(
            "`student_loss_weight` must be a finite number >= 0, got -0.5")):
        Distiller(make_cnn("t", 8), make_cnn("s", 4),
                  student_loss_weight=-0.5)


class NaNLoss(DistillationLoss):
    """A loss whose value is NaN, and depends on the student."""

    matches_channels = False

    def call(self, teacher_output, student_output):
        return ops.mean(student_output, axis=-1) * math.nan


def test_weight_zero_parts_cannot_poison_the_total(data):
    x, y = data

    def nan_labels_loss(y_true, y_pred):
        return ops.mean(y_pred, axis=-1) * math.nan

    d = Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[
        Term(KD(), weight=1.0), Term(NaNLoss(name="nan"), weight=0.0)],
        student_loss_weight=0.0)
    d.compile(optimizer=keras.optimizers.SGD(0.05), loss=nan_labels_loss)
    history = d.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert math.isnan(history["nan_loss"][0])  # still logged
    assert math.isnan(history["student_loss"][0])
    assert np.isfinite(history["loss"][0])
    assert all(np.isfinite(w).all() for w in weights_of(d.student))


# 5. The teacher is never trained.

def test_student_that_is_a_teacher_is_refused():
    model = make_cnn("m", 4)
    with pytest.raises(ValueError, match="student 'm' is also the teacher"):
        Distiller(model, model)
    with pytest.raises(ValueError, match=(
            "student 'm' is also the teacher 1 'm'")):
        Distiller([make_cnn("t", 8), model], model)


def test_student_sharing_a_layer_or_variable_with_a_teacher_is_refused():
    teacher = make_cnn("t", 8)
    shared = teacher.get_layer("t_logits")
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Conv2D(16, 3, name="s_conv")(inputs)
    student = keras.Model(
        inputs, shared(keras.layers.GlobalAveragePooling2D()(features)),
        name="s")
    with pytest.raises(ValueError, match=(
            "student 's' and the teacher 't' share the layer 't_logits'")):
        Distiller(teacher, student)

    class Tied(keras.layers.Layer):
        """Multiplies by another layer's kernel (a shared variable)."""

        def __init__(self, kernel, **kwargs):
            super().__init__(**kwargs)
            self.kernel = kernel

        def call(self, x):
            return ops.matmul(x, self.kernel)

    inputs = keras.Input((8, 8, 1))
    h = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(16, 3)(inputs))
    student = keras.Model(inputs, Tied(shared.kernel)(h), name="s2")
    assert not any(layer is shared for layer in student.layers)
    with pytest.raises(ValueError, match=(
            "student 's2' and the teacher 't' share the variable "
            "'t_logits/kernel'")):
        Distiller(teacher, student)


def test_a_shared_input_layer_is_allowed():
    teacher = make_cnn("t", 8)
    h = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3)(teacher.input))
    student = keras.Model(teacher.input, keras.layers.Dense(NUM_CLASSES)(h),
                          name="s")
    Distiller(teacher, student)

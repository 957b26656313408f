"""Clear, early answers for what used to fail deep inside training or train
silently on the wrong thing: multi-output models, subclassed models, log
names, numbers, the teacher's safety, features and augmentations."""

import math
import re
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


# 1. Multi-output models.

@pytest.mark.parametrize("as_dict", [False, True])
def test_multi_output_model_without_an_output_choice_is_refused(as_dict):
    teacher, student = two_headed("t", as_dict), two_headed("s", as_dict)
    with pytest.raises(ValueError, match=(
            r"teacher 't' has 2 outputs \(.*'cls' \(None, 3\).*'box' "
            r"\(None, 4\).*term 'kd'.*`teacher_output=`")):
        Distiller(teacher, student)
    with pytest.raises(ValueError, match=(
            r"student 's' has 2 outputs.*`student_output=`")):
        Distiller(teacher, student, terms=[Term(KD(), teacher_output="cls")])
    # A single-output student with a multi-output teacher needs a choice
    # on the teacher side only.
    single = keras.Model(student.input, pick(student.output, "cls"))
    Distiller(teacher, single, terms=[Term(KD(), teacher_output="cls")])


@pytest.mark.parametrize("as_dict", [False, True])
def test_terms_read_the_chosen_outputs(as_dict):
    x, y = small_data()
    teacher, student = two_headed("t", as_dict), two_headed("s", as_dict)
    d = Distiller(teacher, student, terms=[
        Term(KD(), teacher_output="cls", student_output=0),
        Term(FeatureMSE(), teacher_output=1, student_output="box"),
    ])
    # The compiled loss keeps Keras' handling of several outputs: a dict
    # keyed by output name, one `<output>_loss` each.
    d.compile(optimizer=keras.optimizers.SGD(0.01),
              loss={"cls": SCCE, "box": "mse"})
    labels = {"cls": y, "box": np.zeros((len(x), 4), "float32")}
    if not as_dict:
        labels = [labels["cls"], labels["box"]]
    logs = d.evaluate(x, labels, batch_size=len(x), return_dict=True,
                      verbose=0)
    t_out, s_out = teacher(x), student(x)
    np.testing.assert_allclose(
        logs["kd_loss"],
        to_numpy(KD()(pick(t_out, "cls"), pick(s_out, "cls"))), rtol=1e-5)
    np.testing.assert_allclose(
        logs["feature_mse_loss"],
        to_numpy(FeatureMSE()(pick(t_out, "box"), pick(s_out, "box"))),
        rtol=1e-5)
    assert {"cls_loss", "box_loss", "student_loss"} <= set(logs)
    history = d.fit(x, labels, epochs=1, batch_size=8, verbose=0).history
    assert all(np.isfinite(v[-1]) for v in history.values())
    d.fit(x, epochs=1, batch_size=8, verbose=0)  # pure distillation


@pytest.mark.parametrize("ensemble", ["logits", "losses"])
def test_multi_output_teacher_ensemble(ensemble):
    x, _ = small_data()
    teachers = [two_headed("t1", True), two_headed("t2", True)]
    student = two_headed("s", True)
    d = Distiller(teachers, student, ensemble=ensemble,
                  terms=[Term(KD(), teacher_output="cls",
                              student_output="cls")])
    d.compile(optimizer=keras.optimizers.SGD(0.01))
    logs = d.evaluate(x, batch_size=len(x), return_dict=True, verbose=0)
    t_cls = [to_numpy(t(x)["cls"]) for t in teachers]
    s_cls = student(x)["cls"]
    if ensemble == "logits":
        expected = to_numpy(KD()(np.mean(t_cls, axis=0), s_cls))
    else:
        expected = np.mean([to_numpy(KD()(t, s_cls)) for t in t_cls])
    np.testing.assert_allclose(logs["kd_loss"], expected, rtol=1e-5)
    d.fit(x, epochs=1, batch_size=8, verbose=0)
    with pytest.raises(ValueError, match="Teacher 1 't3' outputs"):
        Distiller([teachers[0], two_headed("t3", False)], student,
                  terms=[Term(KD(), teacher_output="cls",
                              student_output="cls")])


def test_output_choices_are_checked():
    teacher, student = two_headed("t"), two_headed("s")
    with pytest.raises(ValueError, match=(
            r"student 's' has no output 'nope' \(`student_output` of the "
            r"term 'kd'\); its outputs are: 'cls' \(None, 3\)")):
        Distiller(teacher, student, terms=[
            Term(KD(), teacher_output="cls", student_output="nope")])
    with pytest.raises(ValueError, match="teacher 't' has no output 2 "):
        Distiller(teacher, student, terms=[
            Term(KD(), teacher_output=2, student_output=0)])
    with pytest.raises(ValueError, match=(
            r"teacher 't' outputs shape \(None, 3\) but the student 's' "
            r"outputs shape \(None, 4\); the term 'kd'")):
        Distiller(teacher, student, terms=[
            Term(KD(), teacher_output="cls", student_output="box")])
    with pytest.raises(TypeError, match="`teacher_output` must be"):
        Term(KD(), teacher_output=1.0)
    with pytest.raises(ValueError, match="feature term reads"):
        Term(FeatureMSE(), teacher_layer="a", student_layer="b",
             teacher_output="cls")


def test_output_choice_in_config():
    term = Term(KD(), teacher_output="cls", student_output=1)
    again = Term.from_config(term.get_config())
    assert (again.teacher_output, again.student_output) == ("cls", 1)
    assert "teacher_output='cls'" in repr(term)


def test_distillation_losses_expect_tensors():
    t = np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match=(
            r"FeatureMSE expects a tensor as the student output, got a "
            r"list of 2.*teacher_output")):
        FeatureMSE()(t, [t, t])
    with pytest.raises(ValueError, match=(
            "KD expects a tensor as the student output, got a dict of 1")):
        KD()(t, {"a": t})
    with pytest.raises(ValueError, match="as the teacher output"):
        KD()((t, t), t)
    assert float(to_numpy(KD()(t, t))) == pytest.approx(0.0)


# 2. Subclassed models: shapes known at the first batch.

def test_subclassed_shape_mismatch_is_named_at_the_first_batch():
    x = np.zeros((8, 6), "float32")
    teacher = Subclassed(3, "sub_t")
    student = Subclassed(5, "sub_s")
    d = Distiller(teacher, student)  # shapes unknown here
    d.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=(
            r"teacher 'sub_t' outputs shape \(.*3\) but the student 'sub_s' "
            r"outputs shape \(.*5\); the term 'kd'")):
        d.fit(x, epochs=1, batch_size=4, verbose=0)


def test_subclassed_ensemble_mismatch_is_named_at_the_first_batch():
    x = np.zeros((8, 6), "float32")
    d = Distiller([Subclassed(3, "a"), Subclassed(5, "b")],
                  Subclassed(3, "s"))
    d.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=(
            r"Teacher 1 'b' outputs shape \(.*5\) but teacher 'a' outputs "
            r"shape \(.*3\)")):
        d.fit(x, epochs=1, batch_size=4, verbose=0)


def test_subclassed_multi_output_needs_a_choice_at_the_first_batch():
    x = np.zeros((8, 6), "float32")
    d = Distiller(Subclassed(3, "t", heads=2), Subclassed(3, "s"))
    d.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="teacher 't' has 2 outputs"):
        d.fit(x, epochs=1, batch_size=4, verbose=0)
    d = Distiller(Subclassed(3, "t", heads=2), Subclassed(3, "s"),
                  terms=[Term(KD(), teacher_output=1)])
    d.compile(optimizer="sgd")
    d.fit(x, epochs=1, batch_size=4, verbose=0)
    d = Distiller(Subclassed(3, "t", heads=2), Subclassed(3, "s"),
                  terms=[Term(KD(), teacher_output="cls")])
    d.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="teacher 't' has no output 'cls'"):
        d.fit(x, epochs=1, batch_size=4, verbose=0)


# 3. Names.

def test_term_named_like_a_compiled_output_loss_is_refused():
    teacher, student = two_headed("t"), two_headed("s")
    with pytest.raises(ValueError, match=(
            "named 'box', so it would log as 'box_loss', the key of the "
            "compiled student loss on its output 'box'")):
        Distiller(teacher, student, terms=[
            Term(FeatureMSE(), teacher_output="box", student_output="box",
                 name="box")])


def test_term_named_like_a_built_in_log_is_refused():
    with pytest.raises(ValueError, match=(
            "named 'student', so it would log as 'student_loss', the key "
            "of the student's own loss")):
        Distiller(*_cnn(), terms=[Term(KD(), name="student")])
    with pytest.raises(ValueError, match=(
            "named 'local_1', so it would log as 'local_1_loss', the key of "
            "a local module's activation-mapping loss")):
        Distiller(*_cnn(), terms=[Term(KD(), name="local_1")],
                  local_modules=_local())
    # Without local modules the name is free.
    d = Distiller(*_cnn(), terms=[Term(KD(), name="local_1")])
    assert d.term_names == ["local_1"]


def test_term_named_like_a_validation_log_is_refused():
    with pytest.raises(ValueError, match="'val_loss', the key of the "
                                         "validation value of 'loss'"):
        Distiller(*_cnn(), terms=[Term(KD(), name="val")])
    with pytest.raises(ValueError, match="'val_kd_loss'.*of 'kd_loss'"):
        Distiller(*_cnn(), terms=[Term(KD()), Term(KD(), name="val_kd")])
    Distiller(*_cnn(), terms=[Term(KD(), name="val_kd")])  # no clash


def test_a_log_name_used_twice_is_refused(data):
    x, y = data
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4))
    d.compile(optimizer="sgd", loss=SCCE,
              metrics=[keras.metrics.SparseCategoricalAccuracy(
                  name="kd_loss")])
    with pytest.raises(ValueError, match="Two logs .* named 'kd_loss'"):
        d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4),
                  diagnostics=[TopOneAgreement(name="accuracy")])
    d.compile(optimizer="sgd", loss=SCCE, metrics=["accuracy"])
    with pytest.raises(ValueError, match="named 'accuracy'"):
        d.fit(x, y, epochs=1, batch_size=16, verbose=0)


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


def test_every_loss_of_weight_zero_is_refused_at_construction():
    with pytest.raises(ValueError, match="weight 0.*'kd', 'fit'"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[
            Term(KD(), weight=0.0), Term(FeatureMSE(), weight=0.0,
                                         teacher_layer="t_stage2",
                                         student_layer="s_stage2",
                                         name="fit")],
            student_loss_weight=0.0)
    # One positive weight is enough.
    Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[
        Term(KD(), weight=0.0)], student_loss_weight=0.5)


def test_a_module_loss_that_misses_its_variables_trains(data):
    """LAKD: a last module with only a weight-0 feature term (an adapter
    its loss never reaches) gets zero gradients on every backend."""
    x, y = data
    student = make_cnn("s", 4, batchnorm=False)
    before = weights_of(student)
    d = Distiller(make_cnn("t", 8), student, terms=[
        Term(FeatureMSE(), weight=0.0, teacher_layer="t_stage2",
             student_layer="s_stage2")],
        student_loss_weight=0.0,
        local_modules=keras_kd.LocalModules(split_at=["s_pool"],
                                            teacher_layers=["t_pool"]))
    d.compile(optimizer=keras.optimizers.SGD(0.05), loss=SCCE)
    d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    after = weights_of(student)
    names = [w.path for w in student.weights]
    for name, a, b in zip(names, before, after):
        # The first module trains by its activation mapping; the second
        # (stage 2 and the classifier) has no loss of positive weight.
        if "stage1" in name:
            assert np.any(a != b), name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.backends("tensorflow")
def test_an_empty_data_set_is_named():
    import tensorflow as tf

    d = Distiller(make_cnn("t", 8), make_cnn("s", 4))
    d.compile(optimizer="sgd", loss=SCCE)
    empty = tf.data.Dataset.from_tensor_slices(
        (np.zeros((0, 8, 8, 1), "float32"), np.zeros((0,), "int64"))).batch(4)
    with pytest.raises(ValueError, match="'distiller' is empty"):
        d.fit(empty, epochs=1, verbose=0)


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


# 6. Features.

def test_attention_transfer_on_vectors_is_refused():
    with pytest.raises(ValueError, match=(
            r"spatial axis.*teacher layer 't_gap'.*shape \(None, 16\).*"
            r"identically 0")):
        Distiller(make_cnn("t", 8), make_cnn("s", 8), terms=[
            Term(AttentionTransfer(), teacher_layer="t_gap",
                 student_layer="s_gap")])
    with pytest.raises(ValueError, match=r"term 'attention_transfer' \(final"):
        Distiller(make_cnn("t", 8), make_cnn("s", 8),
                  terms=[Term(AttentionTransfer())])
    v = np.ones((2, 5), "float32")
    with pytest.raises(ValueError, match="spatial axis"):
        AttentionTransfer()(v, v)


def test_plain_keras_loss_as_feature_term(data):
    x, y = data
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[
        Term(keras.losses.MeanSquaredError(), teacher_layer="t_stage2",
             student_layer="s_stage2")])
    # Channel counts differ (16 vs 8): an adapter, as for FeatureMSE.
    assert list(d.adapters) == ["mean_squared_error"]
    d.compile(optimizer=keras.optimizers.SGD(0.01), loss=SCCE)
    history = d.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert np.isfinite(history["mean_squared_error_loss"][0])
    with pytest.raises(ValueError, match=(
            "MeanSquaredError of term .* plain `keras.losses.Loss`.*spatial "
            "sizes must be equal")):
        Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[
            Term(keras.losses.MeanSquaredError(), teacher_layer="t_stage1",
                 student_layer="s_stage2")])


def test_a_layer_called_twice_cannot_be_tapped():
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", name="s_twice")
    h = conv(conv(inputs))
    outputs = keras.layers.Dense(NUM_CLASSES)(
        keras.layers.GlobalAveragePooling2D()(h))
    student = keras.Model(inputs, outputs, name="s")
    with pytest.raises(ValueError, match=(
            "Layer 's_twice' is called 2 times in the student model 's'")):
        Distiller(make_cnn("t", 8), student, terms=[
            Term(FeatureMSE(), teacher_layer="t_stage1",
                 student_layer="s_twice")])


# 7. Smaller ones.

def test_untrainable_distiller_warns_like_keras(data):
    x, y = data
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4))
    d.compile(optimizer="sgd", loss=SCCE)
    d.trainable = False
    before = weights_of(d.student)
    with pytest.warns(UserWarning, match="no trainable variables"):
        d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    for a, b in zip(before, weights_of(d.student)):
        np.testing.assert_array_equal(a, b)


def test_split_at_an_input_layer_is_named():
    from keras_kd.local.graph import split_chain

    student = make_cnn("s", 4)
    with pytest.raises(ValueError, match=(
            "'s_input' in `split_at` is an input layer of the student 's'")):
        split_chain(student, ["s_input", "s_stage2"], "student", "split_at")


def crop(x):
    return x[:, 1:-1, 1:-1, :]


def halve(x):
    return x[::2]


@pytest.mark.parametrize("augmentation, what", [
    (crop, "The student augmentation 'crop'"),
    (halve, "The student augmentation 'halve'"),
])
def test_augmentation_that_changes_the_batch_is_named(data, augmentation,
                                                      what):
    x, _ = data
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4),
                  student_augmentation=augmentation)
    d.compile(optimizer="sgd")
    # In a TensorFlow graph the batch size is checked when the batch runs
    # (a TensorFlow error carrying the same message).
    expected = Exception if BACKEND == "tensorflow" else ValueError
    with pytest.raises(expected, match=re.escape(what) + ".*keep the batch"):
        d.fit(x, epochs=1, batch_size=16, verbose=0)


def test_teacher_augmentation_that_changes_the_shape_names_the_teacher(data):
    x, _ = data
    d = Distiller([make_cnn("t1", 8), make_cnn("t2", 8)], make_cnn("s", 4),
                  teacher_augmentation=[None, crop])
    d.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=(
            r"augmentation of the teacher 't2' 'crop' maps a batch of shape "
            r"\(.*8, 8, 1\) to \(.*6, 6, 1\)")):
        d.fit(x, epochs=1, batch_size=16, verbose=0)


# 8. NaN in the data.

def test_terminate_on_nan_stops_at_a_nan_teacher(data):
    x, y = data
    teacher = make_cnn("t", 8)
    kernel, bias = teacher.get_layer("t_logits").get_weights()
    teacher.get_layer("t_logits").set_weights(
        [kernel, np.full_like(bias, np.nan)])
    d = Distiller(teacher, make_cnn("s", 4))
    d.compile(optimizer="sgd", loss=SCCE)
    history = d.fit(x, y, epochs=3, batch_size=8, verbose=0,
                    callbacks=[keras.callbacks.TerminateOnNaN()])
    assert len(history.history["loss"]) == 1
    assert math.isnan(history.history["loss"][0])
    assert "TerminateOnNaN" in (DOCS / "troubleshooting.md").read_text()
    assert "troubleshooting.md" in (DOCS / "index.md").read_text()


# The documented list of construction-time errors matches the code.

def _tied_student(teacher):
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(16, 3)(inputs))
    return keras.Model(inputs, teacher.get_layer("t_logits")(h), name="s")


def _called_twice():
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", name="s_twice")
    h = keras.layers.GlobalAveragePooling2D()(conv(conv(inputs)))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h), name="s")


def _subclassed():
    model = Subclassed(NUM_CLASSES, "sub")
    model(np.zeros((1, 8, 8, 1), "float32"))
    return model


def _feature(teacher_layer, student_layer, loss=None, **models):
    return Distiller(
        models.get("teacher", _model("t", 8)),
        models.get("student", _model("s", 4)),
        terms=[Term(loss or FeatureMSE(), teacher_layer=teacher_layer,
                    student_layer=student_layer)])


def _cnn(**kwargs):
    return _model("t", 8, **kwargs), _model("s", 4)


_MODELS = {}


def _model(prefix, width, **kwargs):
    """`make_cnn(prefix, width, **kwargs)`, built once per test: the
    construction errors below leave the models unchanged, and building a
    model is most of their cost."""
    key = (prefix, width, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        _MODELS[key] = make_cnn(prefix, width, **kwargs)
    return _MODELS[key]


# The start of each documented item (after the error type), and a call that
# raises it.
DOCUMENTED_ERRORS = {
    "a `teacher` (or an item": lambda: Distiller("t", _model("s", 4)),
    "a `terms` that is neither": lambda: Distiller(*_cnn(), terms=KD()),
    "an item of `terms`": lambda: Distiller(*_cnn(), terms=[KD()]),
    "a `student_loss_weight` that is not a number":
        lambda: Distiller(*_cnn(), student_loss_weight="high"),
    "an augmentation that is neither":
        lambda: Distiller(*_cnn(), student_augmentation="strong"),
    "a `local_modules` that is not":
        lambda: Distiller(*_cnn(), local_modules="local"),
    "an empty list of teachers": lambda: Distiller([], _model("s", 4)),
    "the student passed as the teacher": lambda: _same_model(),
    "a student that shares a layer": lambda: _shared_layer(),
    "a `student_loss_weight` that is negative":
        lambda: Distiller(*_cnn(), student_loss_weight=math.nan),
    "an `ensemble` other than":
        lambda: Distiller([_model("a", 4), _model("b", 4)],
                          _model("s", 4), ensemble="mean"),
    "a list of teacher augmentations":
        lambda: Distiller([_model("a", 4), _model("b", 4)],
                          _model("s", 4), teacher_augmentation=[None]),
    "`local_modules` together with `layerwise_lr`":
        lambda: Distiller(*_cnn(), local_modules=_local(),
                          layerwise_lr=_layerwise()),
    "a term whose log name is the distiller's":
        lambda: Distiller(*_cnn(), terms=[Term(KD(), name="student")]),
    "a term whose log name is the validation form": lambda: Distiller(
        *_cnn(), terms=[Term(KD(), name="val")]),
    "a term on the final outputs of a multi-output model":
        lambda: Distiller(two_headed("t"), two_headed("s")),
    "a `teacher_output` or `student_output` that names":
        lambda: Distiller(two_headed("t"), two_headed("s"), terms=[
            Term(KD(), teacher_output="cls", student_output="bbox")]),
    "final outputs (the chosen ones) of different shapes":
        lambda: Distiller(_model("t", 8, classes=3), _model("s", 4)),
    "teachers of an ensemble whose outputs differ":
        lambda: Distiller([_model("a", 4), _model("b", 4, classes=3)],
                          _model("s", 4)),
    "a layer name not in the model": lambda: _feature("t_stage9", "s_stage1"),
    "a feature term on a subclassed model":
        lambda: _feature("t_stage1", "dense", student=_subclassed()),
    "a layer to read that is called more than once":
        lambda: _feature("t_stage1", "s_twice", student=_called_twice()),
    "features of different ranks": lambda: _feature("t_gap", "s_stage1"),
    "features read by one term from several teachers": lambda: Distiller(
        [_model("t", 8), _model("t", 4)], _model("s", 4), terms=[
            Term(FeatureMSE(), teacher_layer="t_stage2",
                 student_layer="s_stage2")]),
    "a plain `keras.losses.Loss` feature term": lambda: _feature(
        "t_stage1", "s_stage2", keras.losses.MeanSquaredError()),
    "`AttentionTransfer` on values without a spatial axis":
        lambda: _feature("t_gap", "s_gap", AttentionTransfer()),
    "a Keras-layer augmentation that changes":
        lambda: Distiller(*_cnn(),
                          student_augmentation=keras.layers.RandomCrop(6, 6)),
    "diagnostics with a multi-output": lambda: Distiller(
        two_headed("t"), two_headed("s"),
        terms=[Term(KD(), teacher_output=0, student_output=0)],
        diagnostics=["top1_agreement"]),
    "a diagnostic named like": lambda: Distiller(
        *_cnn(), diagnostics=[TopOneAgreement(name="kd_loss")]),
    "an `AttentionIoU` diagnostic": lambda: Distiller(
        *_cnn(), diagnostics=[keras_kd.metrics.AttentionIoU()]),
    "a term or diagnostic that reads logits": lambda: Distiller(
        _model("t", 4), keras.Model(
            _model("s", 4).inputs,
            keras.layers.Softmax()(_model("s", 4).outputs[0]))),
    "every loss of weight 0": lambda: Distiller(
        *_cnn(), terms=[Term(KD(), weight=0.0)], student_loss_weight=0.0),
    "a `MutualInformation` diagnostic": lambda: Distiller(
        *_cnn(), diagnostics=[keras_kd.metrics.MutualInformation(
            num_classes=3)]),
}


def _same_model():
    model = _model("s", 4)
    return Distiller(model, model)


def _shared_layer():
    teacher = _model("t", 8)
    return Distiller(teacher, _tied_student(teacher))


def _layerwise():
    return LayerwiseLearningRate([("s_stage1", "t_stage1"),
                                  ("s_stage2", "t_stage2")])


def _local():
    return keras_kd.LocalModules(split_at=["s_stage1"],
                                 teacher_layers=["t_stage1"])


def documented_errors():
    """`[(error type, text)]` of the list in docs/api.md."""
    text = (DOCS / "api.md").read_text()
    section = text.split("### Errors raised at construction", 1)[1]
    section = section.split("\n#", 1)[0]
    return re.findall(r"^- `(\w+)`: (.+)$", section, flags=re.MULTILINE)


ERROR_TYPES = {"TypeError": TypeError, "ValueError": ValueError}


def test_every_documented_construction_error_is_raised():
    _MODELS.clear()
    items = documented_errors()
    assert len(items) == len(DOCUMENTED_ERRORS)
    for error, text in items:
        keys = [k for k in DOCUMENTED_ERRORS if text.startswith(k)]
        assert len(keys) == 1, text
        with pytest.raises(ERROR_TYPES[error]) as raised:
            DOCUMENTED_ERRORS[keys[0]]()
        assert type(raised.value) is ERROR_TYPES[error], (text, raised.value)
    _MODELS.clear()

"""docs/coming_from.md: its code blocks run as written, and what it says
keras-kd does differently from `keras.distillation` holds."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_kd

PAGE = Path(__file__).resolve().parent.parent / "docs" / "coming_from.md"


def code_blocks():
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL)


@pytest.fixture(scope="module")
def page():
    """The namespace after running every block of the page, in order."""
    namespace = {"__name__": "coming_from"}
    for block in code_blocks():
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def test_the_page_has_the_three_examples():
    blocks = code_blocks()
    assert len(blocks) == 4
    assert "keras.distillation.Distiller(" in blocks[1]
    assert "keras_kd.Distiller(" in blocks[2]
    assert "GeneralizedJSD(" in blocks[3]


def test_the_blocks_train(page):
    logs = page["history"].history
    for key in ("loss", "student_loss", "kd_loss", "feature_mse_loss"):
        assert np.isfinite(logs[key][-1]), key
    lm_logs = page["lm_history"].history
    assert np.isfinite(lm_logs["loss"][-1]) and lm_logs["loss"][-1] > 0


def _logits():
    rng = np.random.default_rng(1)
    return (rng.normal(scale=2.0, size=(8, 5)).astype("float32"),
            rng.normal(scale=2.0, size=(8, 5)).astype("float32"))


def test_kd_is_logits_distillation_with_the_kl_divergence_class():
    teacher, student = _logits()
    theirs = keras.distillation.LogitsDistillation(
        temperature=4.0, loss=keras.losses.KLDivergence())
    ours = keras_kd.losses.KD(temperature=4.0)
    np.testing.assert_allclose(
        float(ours(teacher, student)),
        float(theirs.compute_loss(teacher, student)), rtol=1e-4)


def test_logits_distillation_default_string_loss_skips_the_softmax():
    # What the page says of Keras' default `loss="kl_divergence"`: the KL
    # of the scaled logits clipped to [1e-7, 1], not of the probabilities,
    # and without the factor `T**2`.
    teacher, student = _logits()
    theirs = keras.distillation.LogitsDistillation(temperature=4.0)
    clipped = [np.clip(z / 4.0, 1e-7, 1.0) for z in (teacher, student)]
    expected = np.mean(np.sum(
        clipped[0] * np.log(clipped[0] / clipped[1]), axis=-1))
    np.testing.assert_allclose(
        float(theirs.compute_loss(teacher, student)), expected, rtol=1e-4)
    ours = keras_kd.losses.KD(temperature=4.0)
    assert abs(float(ours(teacher, student)) - expected) > 0.1


def test_feature_mse_is_feature_distillation_with_mse():
    rng = np.random.default_rng(2)
    teacher = rng.normal(size=(8, 16)).astype("float32")
    student = rng.normal(size=(8, 16)).astype("float32")
    theirs = keras.distillation.FeatureDistillation(loss="mse")
    ours = keras_kd.losses.FeatureMSE()
    np.testing.assert_allclose(
        float(ours(teacher, student)),
        float(theirs.compute_loss(teacher, student)), rtol=1e-5)


def test_keras_freezes_the_teacher_and_keras_kd_does_not(page):
    classifier = page["classifier"]
    teacher = classifier(64, "t")
    before = [w.copy() for w in teacher.get_weights()]
    keras_kd.Distiller(teacher=teacher, student=classifier(8, "s"),
                       terms=[keras_kd.Term(keras_kd.losses.KD())])
    assert teacher.trainable
    assert all(layer.trainable for layer in teacher.layers)
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    keras.distillation.Distiller(
        teacher=teacher, student=classifier(8, "s"),
        distillation_losses=keras.distillation.LogitsDistillation())
    assert not teacher.trainable


def _count_calls(layer):
    calls = []
    original = layer.call

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.call = counted
    return calls


def test_keras_runs_the_student_twice_and_keras_kd_once(page):
    classifier, x, y = page["classifier"], page["x"], page["y"]
    teacher = page["teacher"]
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    student = classifier(8, "s")
    theirs = keras.distillation.Distiller(
        teacher=teacher, student=student,
        distillation_losses=[keras.distillation.FeatureDistillation(
            teacher_layer_name="t_features",
            student_layer_name="s_features")])
    theirs.compile(optimizer="sgd", loss=ce, run_eagerly=True)
    theirs.train_on_batch(x[:8], y[:8])  # builds what the first step builds
    calls = _count_calls(student.get_layer("s_hidden"))
    theirs.train_on_batch(x[:8], y[:8])
    assert len(calls) == 2

    student = classifier(8, "s")
    ours = keras_kd.Distiller(
        teacher=teacher, student=student,
        terms=[keras_kd.Term(keras_kd.losses.FeatureMSE(),
                             teacher_layer="t_features",
                             student_layer="s_features")])
    ours.compile(optimizer="sgd", loss=ce, run_eagerly=True)
    ours.train_on_batch(x[:8], y[:8])
    calls = _count_calls(student.get_layer("s_hidden"))
    ours.train_on_batch(x[:8], y[:8])
    assert len(calls) == 1


def test_keras_ignores_sample_weight_and_keras_kd_applies_it(page):
    classifier, x, y = page["classifier"], page["x"], page["y"]
    teacher = page["teacher"]
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    half = np.where(np.arange(len(x)) < len(x) // 2, 1.0, 0.0)
    ones = np.ones(len(x))

    theirs = keras.distillation.Distiller(
        teacher=teacher, student=classifier(8, "s"),
        distillation_losses=keras.distillation.LogitsDistillation())
    theirs.compile(optimizer="sgd", loss=ce)
    ours = keras_kd.Distiller(teacher=teacher, student=classifier(8, "s"),
                              terms=[keras_kd.Term(keras_kd.losses.KD())])
    ours.compile(optimizer="sgd", loss=ce)

    def loss(model, weights):
        return model.evaluate(x, y, sample_weight=weights, batch_size=len(x),
                              verbose=0, return_dict=True)["loss"]

    np.testing.assert_allclose(loss(theirs, ones), loss(theirs, half),
                               rtol=1e-6)
    assert abs(loss(ours, ones) - loss(ours, half)) > 1e-4

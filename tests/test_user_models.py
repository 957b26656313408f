"""The user's models are never changed: whatever a `Distiller` does, the
teacher's and the student's layers keep their call nodes, configurations,
names, trainable flags and weights (the teacher's bit for bit, also after
training), and the same models can serve any number of further
distillers."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, Term
from keras_kd import _keras_compat as compat
from keras_kd.losses import KD, FeatureMSE

from conftest import make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _layers(model):
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        if any(layer is seen for seen in found):
            continue
        found.append(layer)
        stack.extend(getattr(layer, "layers", None) or [])
    return found


def graph_state(model):
    """What must not change in a model, weights aside: each layer's name,
    call count, configuration and trainable flag, and the model's own
    configuration."""
    return (
        model.name,
        model.get_config(),
        [(layer.name, compat.call_count(layer), layer.trainable,
          layer.get_config()) for layer in _layers(model)],
    )


def weights(model):
    return [np.array(w) for w in model.get_weights()]


def assert_same_weights(before, model):
    after = weights(model)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def _lakd():
    return {"local_modules": keras_kd.LocalModules(
        split_at=["s_pool"], teacher_layers=["t_pool"])}


def _lakd_with_feature_term():
    # A feature term inside the first module, with an adapter (4 vs 8
    # channels), and a teacher cut into segments.
    return {"local_modules": keras_kd.LocalModules(
        split_at=["s_pool"], teacher_layers=["t_pool"]),
        "terms": [Term(KD()), Term(FeatureMSE(), teacher_layer="t_stage1",
                                   student_layer="s_stage1")]}


def _layerwise():
    return {"layerwise_lr": keras_kd.LayerwiseLearningRate(
        pairs=[("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")])}


def _diagnostics():
    iou = keras_kd.metrics.AttentionIoU(
        models=("t", "student"), feature_layers=("t_stage2", "s_stage2"),
        classifier_layers=("t_logits", "s_logits"))
    return {"diagnostics": ["top1_agreement", "teacher_kl", iou]}


def _adapters():
    return {"terms": [Term(KD()), Term(FeatureMSE(), teacher_layer="t_stage2",
                                       student_layer="s_stage2")]}


def _augmented():
    return {"teacher_augmentation": keras_kd.augment.weak(),
            "student_augmentation": keras_kd.augment.weak()}


FEATURES = {
    "kd": dict,
    "adapters": _adapters,
    "local_modules": _lakd,
    "local_modules_feature_term": _lakd_with_feature_term,
    "layerwise_lr": _layerwise,
    "diagnostics": _diagnostics,
    "augmentations": _augmented,
    "ensemble": lambda: {"ensemble": "losses", "teacher_augmentation": [
        None, keras_kd.augment.weak()]},
}


def _second_distiller(teacher, size):
    """A distiller that reads a named layer of `teacher` (fails when a
    layer of the teacher has gained a call node)."""
    student = make_cnn("s2", 4, size=size)
    d = Distiller(teacher, student, terms=[
        Term(FeatureMSE(), teacher_layer="t_stage2",
             student_layer="s2_stage2")])
    d.compile(optimizer="sgd", loss=SCCE)
    return d


@pytest.mark.parametrize("feature", list(FEATURES))
def test_user_models_are_never_changed(feature, data):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    # With an ensemble, the second teacher is checked like the first.
    other = make_cnn("u", 8) if feature == "ensemble" else None
    teachers = [teacher, other] if other is not None else teacher
    teacher_graph, student_graph = graph_state(teacher), graph_state(student)
    teacher_weights, student_weights = weights(teacher), weights(student)
    other_graph = other_weights = None
    if other is not None:
        other_graph, other_weights = graph_state(other), weights(other)

    kwargs = FEATURES[feature]()
    d = Distiller(teachers, student, **kwargs)
    assert graph_state(teacher) == teacher_graph
    assert graph_state(student) == student_graph
    assert_same_weights(teacher_weights, teacher)
    assert_same_weights(student_weights, student)

    d.compile(optimizer=keras.optimizers.SGD(0.05), loss=SCCE)
    d.fit(x, y, batch_size=16, epochs=1, verbose=0)
    d.evaluate(x, y, batch_size=16, verbose=0)
    assert graph_state(teacher) == teacher_graph
    assert graph_state(student) == student_graph
    assert_same_weights(teacher_weights, teacher)
    # The student trained (the check above would pass on a no-op).
    assert any(np.any(a != b) for a, b in
               zip(student_weights, weights(student)))

    # The same models serve further distillers: the same configuration
    # again (a re-run notebook cell), and one that reads a named layer.
    again = Distiller(teachers, student, **FEATURES[feature]())
    again.compile(optimizer=keras.optimizers.SGD(0.05), loss=SCCE)
    again.train_on_batch(x[:16], y[:16])
    second = _second_distiller(teacher, size=x.shape[1])
    second.train_on_batch(x[:16], y[:16])
    assert graph_state(teacher) == teacher_graph
    assert graph_state(student) == student_graph
    assert_same_weights(teacher_weights, teacher)
    if other is not None:
        assert graph_state(other) == other_graph
        assert_same_weights(other_weights, other)


def test_teacher_cache_leaves_the_teacher_unchanged(data, tmp_path):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    teacher_graph, teacher_weights = graph_state(teacher), weights(teacher)
    cache = keras_kd.cache_teacher_outputs(
        teacher, x, batch_size=16, layers=["t_stage2"], verbose=0)
    d = Distiller(teacher, student, terms=_adapters()["terms"])
    d.compile(optimizer=keras.optimizers.SGD(0.05), loss=SCCE,
              jit_compile=False)
    d.fit(cache.dataset(x, y, batch_size=16), epochs=1, verbose=0)
    assert graph_state(teacher) == teacher_graph
    assert_same_weights(teacher_weights, teacher)
    _second_distiller(teacher, size=x.shape[1]).train_on_batch(
        x[:16], y[:16])
    assert graph_state(teacher) == teacher_graph

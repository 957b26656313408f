"""A fast pass over every feature of the `Distiller`: each one is built,
trains one step (`train_on_batch`) and shows its effect; a distiller makes a
`.keras` round trip and trains on. Small models and one step each, so that
CI can run this file alone, quickly, on the oldest Keras that
`pyproject.toml` allows (with JAX, NumPy and pytest only: nothing here needs
TensorFlow, SciPy or scikit-learn)."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, LayerwiseLearningRate, LocalModules, Term
from keras_kd.losses import KD, FeatureMSE
from keras_kd.teachers import Teachers

from conftest import NUM_CLASSES, make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
STAGES = [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")]


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=16)
    return x, y


def compiled(teacher, student, **kwargs):
    d = Distiller(teacher, student, student_loss_weight=0.1, **kwargs)
    d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=SCCE)
    return d


def values(variables):
    return [keras.ops.convert_to_numpy(v.value).copy() for v in variables]


def moved(before, variables):
    """Whether any of `variables` differs from its `before` value."""
    return any(not np.array_equal(a, b)
               for a, b in zip(before, values(variables)))


def train_one_step(d, x, y):
    """One `train_on_batch`: the student's weights move, the teachers'
    do not; returns the step's logs."""
    student = values(d.student.trainable_weights)
    teachers = [values(t.weights) for t in d.teachers]
    logs = d.train_on_batch(x, y, return_dict=True)
    assert moved(student, d.student.trainable_weights)
    for before, t in zip(teachers, d.teachers):
        assert not moved(before, t.weights), t.name
    assert np.isfinite(float(logs["loss"]))
    return logs


def test_kd_on_final_outputs(batch):
    x, y = batch
    teacher = make_cnn("t", 8, batchnorm=False)
    student = make_cnn("s", 4, batchnorm=False)
    d = compiled(teacher, student, terms=[Term(KD(temperature=4.0), 0.9)])
    expected = float(KD(4.0)(teacher.predict(x, verbose=0),
                             student.predict(x, verbose=0)))
    logs = train_one_step(d, x, y)
    assert {"loss", "student_loss", "kd_loss"} <= set(logs)
    np.testing.assert_allclose(float(logs["kd_loss"]), expected, rtol=1e-4)


def test_feature_term_with_an_adapter(batch):
    x, y = batch
    d = compiled(make_cnn("t", 8), make_cnn("s", 4), terms=[
        Term(KD()), Term(FeatureMSE(), teacher_layer="t_stage1",
                         student_layer="s_stage1")])
    assert list(d.adapters) == ["feature_mse"]  # 4 vs 8 channels
    adapter = values(d.adapters["feature_mse"].trainable_weights)
    logs = train_one_step(d, x, y)
    assert float(logs["feature_mse_loss"]) > 0
    assert moved(adapter, d.adapters["feature_mse"].trainable_weights)


def test_local_modules(batch):
    x, y = batch
    d = compiled(make_cnn("t", 8), make_cnn("s", 4), terms=[Term(KD())],
                 local_modules=LocalModules(["s_stage1", "s_stage2"],
                                            ["t_stage1", "t_stage2"]))
    assert d.local_plan.num_modules == 3
    first = values(d.local_plan.module_variables(0))
    logs = train_one_step(d, x, y)
    assert {"local_1_loss", "local_2_loss"} <= set(logs)
    assert moved(first, d.local_plan.module_variables(0))


def test_layerwise_learning_rate(batch):
    x, y = batch
    d = compiled(make_cnn("t", 8), make_cnn("s", 4), terms=[Term(KD())],
                 layerwise_lr=LayerwiseLearningRate(
                     pairs=STAGES, min_scale=0.5, max_scale=2.0))
    assert isinstance(d.optimizer, keras_kd.LayerwiseOptimizer)
    logs = train_one_step(d, x, y)
    scales = [float(logs[f"lr_scale/{s}"]) for s, _ in STAGES]
    assert all(0.5 - 1e-6 <= s <= 2.0 + 1e-6 for s in scales)
    assert int(keras.ops.convert_to_numpy(d.optimizer.iterations)) == 1


def test_diagnostics(batch):
    x, y = batch
    teacher = make_cnn("t", 8, batchnorm=False)
    student = make_cnn("s", 4, batchnorm=False)
    agreement = np.mean(
        keras.ops.convert_to_numpy(teacher(x)).argmax(-1)
        == keras.ops.convert_to_numpy(student(x)).argmax(-1))
    d = compiled(teacher, student,
                 diagnostics=["top1_agreement", "teacher_kl"])
    logs = train_one_step(d, x, y)
    np.testing.assert_allclose(float(logs["top1_agreement"]), agreement,
                               atol=1e-6)
    assert float(logs["teacher_kl"]) > 0


def test_two_teachers_losses_ensemble_and_augmentation(batch):
    x, y = batch
    augmentation = keras_kd.augment.weak(flip=False, seed=3)
    d = compiled([make_cnn("t1", 8), make_cnn("t2", 6)], make_cnn("s", 4),
                 ensemble="losses", teacher_augmentation=augmentation)
    assert d.ensemble == "losses" and len(d.teachers) == 2
    seeds = values(augmentation.non_trainable_variables)
    assert seeds
    logs = train_one_step(d, x, y)
    assert float(logs["kd_loss"]) > 0
    assert moved(seeds, augmentation.non_trainable_variables)  # it ran


def test_teacher_cache(batch, monkeypatch):
    x, y = batch
    teacher = make_cnn("t", 8)
    cache = keras_kd.cache_teacher_outputs(teacher, x, batch_size=8,
                                           verbose=0)
    d = compiled(teacher, make_cnn("s", 4))

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(Teachers, "__call__", no_teacher)
    logs = train_one_step(d, cache.inputs(x), y)
    assert float(logs["kd_loss"]) > 0


def test_save_load_round_trip_trains_on(batch, tmp_path):
    x, y = batch
    d = compiled(make_cnn("t", 8), make_cnn("s", 4), terms=[
        Term(KD(4.0), 0.9), Term(FeatureMSE(), teacher_layer="t_stage2",
                                 student_layer="s_stage2")])
    train_one_step(d, x, y)
    path = str(tmp_path / "distiller.keras")
    d.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, Distiller) and loaded.compiled
    assert [t.name for t in loaded.terms] == ["kd", "feature_mse"]
    for a, b in zip(values(d.weights), values(loaded.weights)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values(d.optimizer.variables),
                    values(loaded.optimizer.variables)):
        np.testing.assert_array_equal(a, b)  # iterations and momenta
    # One more step from the same state gives the same student.
    train_one_step(d, x, y)
    train_one_step(loaded, x, y)
    for a, b in zip(values(d.student.weights),
                    values(loaded.student.weights)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

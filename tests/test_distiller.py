import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, Term
from keras_kd.losses import KD, AttentionTransfer, FeatureMSE

from conftest import NUM_CLASSES, assert_augmented_once_per_training_step
from conftest import make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_distiller(student=None, teacher=None, student_loss_weight=0.1,
                   terms=None):
    teacher = teacher or make_cnn("t", 8)
    student = student or make_cnn("s", 4)
    terms = terms if terms is not None else [
        Term(KD(temperature=4.0), weight=0.9),
        Term(AttentionTransfer(), weight=10.0, teacher_layer="t_stage2",
             student_layer="s_stage2"),
        Term(FeatureMSE(), weight=1.0, teacher_layer="t_stage1",
             student_layer="s_stage1"),
    ]
    return Distiller(teacher, student, terms=terms,
                     student_loss_weight=student_loss_weight)


def compile_(d, **kwargs):
    d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=SCCE,
              metrics=["accuracy"], **kwargs)
    return d


def snapshot(model):
    return snapshot_vars(model.weights)


def snapshot_vars(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_fit_history_and_frozen_teacher(data):
    x, y = data
    d = compile_(make_distiller())
    teacher = d.teacher
    before = snapshot(teacher)
    flags = (teacher.trainable, [layer.trainable for layer in teacher.layers])
    config = teacher.get_config()
    history = d.fit(x, y, validation_data=(x, y), epochs=2, batch_size=8,
                    verbose=0)
    names = {"loss", "student_loss", "kd_loss", "attention_transfer_loss",
             "feature_mse_loss", "accuracy"}
    assert set(history.history) == names | {f"val_{n}" for n in names}
    assert_same(before, snapshot(teacher))  # incl. batch-norm statistics
    assert flags == (teacher.trainable,
                     [layer.trainable for layer in teacher.layers])
    assert config == teacher.get_config()
    assert not teacher.compiled


def test_optimizer_trains_student_and_adapters_only(data):
    x, y = data
    d = compile_(make_distiller())
    assert list(d.adapters) == ["feature_mse"]  # 4 vs 8 channels
    trained = {id(v) for v in d.trainable_variables}
    assert not trained & {id(v) for v in d.teacher.weights}
    adapter_before = snapshot(d.adapters["feature_mse"])
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not any(np.array_equal(a, b) for a, b in zip(
        adapter_before, snapshot(d.adapters["feature_mse"])))
    slots = {id(v) for v in d.optimizer.variables}
    assert not slots & {id(v) for v in d.teacher.weights}
    n_slots = len(d.optimizer.variables) - 2  # minus iterations, lr
    assert n_slots == len(d.trainable_variables)  # one momentum each


def test_student_runs_forward_once_per_step(data):
    x, y = data
    d = compile_(make_distiller())
    bn = d.student.get_layer("s_bn")
    pre_bn = keras.Model(d.student.input, d.student.get_layer("s_stage1").output)
    batch_mean = np.mean(keras.ops.convert_to_numpy(pre_bn(x, training=False)),
                         axis=(0, 1, 2))
    d.train_on_batch(x, y)
    # momentum 0.5 from a zero moving mean: one update gives 0.5 * mean,
    # two forward passes would give 0.75 * mean.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), 0.5 * batch_mean,
                               rtol=1e-4, atol=1e-6)


def test_evaluate_changes_no_state(data):
    x, y = data
    d = compile_(make_distiller())
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    before = snapshot(d)
    d.evaluate(x, y, verbose=0)
    d.predict(x, verbose=0)
    assert_same(before, snapshot(d))


def test_total_loss_is_weighted_sum_plus_regularization(data):
    x, y = data
    student = make_cnn("s", 4, regularizer=keras.regularizers.L2(0.5))
    d = compile_(make_distiller(student=student))
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    regularization = float(sum(keras.ops.convert_to_numpy(v) for v in student.losses))
    assert regularization > 0.01
    expected = (0.1 * logs["student_loss"] + 0.9 * logs["kd_loss"]
                + 10.0 * logs["attention_transfer_loss"]
                + 1.0 * logs["feature_mse_loss"] + regularization)
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    # Independent check of two parts against plain Keras.
    logits = student.predict(x, verbose=0)
    teacher_logits = d.teacher.predict(x, verbose=0)
    np.testing.assert_allclose(logs["student_loss"], float(SCCE(y, logits)),
                               rtol=1e-5)
    np.testing.assert_allclose(logs["kd_loss"],
                               float(KD(4.0)(teacher_logits, logits)),
                               rtol=1e-5)


def test_sample_weight_zero_contributes_nothing(data):
    x, y = data
    w = (np.arange(len(x)) % 2).astype("float32")  # odd samples only
    x_other = x.copy()
    x_other[w == 0] = np.random.default_rng(5).normal(size=x[w == 0].shape)
    y_other = y.copy()
    y_other[w == 0] = (y[w == 0] + 1) % NUM_CLASSES

    def train(x_, y_):
        keras.utils.set_random_seed(3)
        d = compile_(make_distiller(student=make_cnn("s", 4, batchnorm=False),
                                    teacher=make_cnn("t", 8, batchnorm=False)))
        logs = d.evaluate(x_, y_, sample_weight=w, batch_size=32,
                          return_dict=True, verbose=0)
        d.fit(x_, y_, sample_weight=w, batch_size=32, epochs=1, verbose=0,
              shuffle=False)
        return logs, snapshot(d.student)

    logs_a, weights_a = train(x, y)
    logs_b, weights_b = train(x_other, y_other)
    for key in set(logs_a) - {"accuracy"}:  # Keras `metrics` are unweighted
        np.testing.assert_allclose(logs_a[key], logs_b[key], rtol=1e-5,
                                   err_msg=key)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_without_labels_is_pure_distillation(data):
    x, _ = data
    d = compile_(make_distiller())
    before = snapshot(d.student)
    history = d.fit(x, epochs=1, batch_size=8, verbose=0)
    assert set(history.history) == {"loss", "kd_loss",
                                    "attention_transfer_loss",
                                    "feature_mse_loss"}
    assert not all(np.array_equal(a, b)
                   for a, b in zip(before, snapshot(d.student)))


@pytest.mark.backends("tensorflow", "jax")
def test_jit_compile_matches_eager(data):
    x, y = data
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(7)
        d = compile_(make_distiller(), jit_compile=jit, run_eagerly=not jit)
        d.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
        results.append(d.evaluate(x, y, return_dict=True, verbose=0))
    assert d.jit_compile
    for key in results[0]:
        np.testing.assert_allclose(results[0][key], results[1][key],
                                   rtol=1e-3, atol=1e-5, err_msg=key)


def test_save_load_resumes_without_compile(tmp_path, data):
    x, y = data
    d = compile_(make_distiller())
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "d.keras")
    d.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, Distiller) and loaded.compiled
    assert [t.name for t in loaded.terms] == [t.name for t in d.terms]
    assert loaded.student_loss_weight == 0.1
    assert_same(snapshot(d), snapshot(loaded))
    assert int(loaded.optimizer.iterations) == int(d.optimizer.iterations)
    assert_same(snapshot_vars(d.optimizer.variables),
                snapshot_vars(loaded.optimizer.variables))
    # Resumed training matches continued training of the original.
    d.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(snapshot(d.student), snapshot(loaded.student)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_config_round_trip():
    d = make_distiller()
    clone = Distiller.from_config(d.get_config())
    assert [repr(t) for t in clone.terms] == [repr(t) for t in d.terms]
    assert clone.student.get_config() == d.student.get_config()
    term = Term(KD(2.0), weight=0.3, name="soft")
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(term))
    assert repr(again) == repr(term) and again.loss.temperature == 2.0


def test_export_student_only(tmp_path, data):
    tf = pytest.importorskip("tensorflow")
    x, y = data
    d = compile_(make_distiller())
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "student")
    d.export_student(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(tf.constant(x)).numpy(),
                               d.student.predict(x, verbose=0), atol=1e-5)
    exported = {tuple(v.shape) for v in reloaded.variables}
    assert len(reloaded.variables) == len(d.student.weights)
    adapter_kernel = tuple(d.adapters["feature_mse"].kernel.shape)
    assert adapter_kernel not in exported


def test_default_term():
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4))
    assert [t.name for t in d.terms] == ["kd"] == d.term_names


def test_terms_keep_their_names_and_log_under_unique_ones(data):
    x, y = data
    terms = [Term(KD(1.0)), Term(KD(2.0)), Term(KD(3.0), name="kd_1")]
    d = compile_(make_distiller(terms=terms))
    assert [t.name for t in terms] == ["kd", "kd", "kd_1"]  # not renamed
    assert all(a is b for a, b in zip(d.terms, terms))
    assert d.term_names == ["kd", "kd_2", "kd_1"]
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    assert {"kd_loss", "kd_2_loss", "kd_1_loss"} <= set(logs)
    # Each key holds its own term's value.
    student = d.student.predict(x, verbose=0)
    teacher = d.teacher.predict(x, verbose=0)
    for key, temperature in (("kd_loss", 1.0), ("kd_2_loss", 2.0),
                             ("kd_1_loss", 3.0)):
        np.testing.assert_allclose(
            logs[key], float(KD(temperature)(teacher, student)), rtol=1e-5,
            err_msg=key)


def test_a_single_term_trains_like_a_list_of_one(data):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    initial = student.get_weights()
    results = []
    for wrap in (lambda term: term, lambda term: [term]):
        student.set_weights(initial)
        term = Term(KD(temperature=2.0), weight=0.5)
        d = compile_(Distiller(teacher, student, terms=wrap(term),
                               student_loss_weight=0.1))
        assert d.terms == [term]
        history = d.fit(x, y, batch_size=len(x), epochs=1, shuffle=False,
                        verbose=0)
        results.append((history.history, snapshot(student)))
    (single, single_weights), (listed, listed_weights) = results
    assert set(single) == set(listed) == {"loss", "student_loss", "kd_loss",
                                          "accuracy"}
    for key in single:
        np.testing.assert_allclose(single[key], listed[key], rtol=1e-6,
                                   err_msg=key)
    for a, b in zip(single_weights, listed_weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("terms, hint", [
    (KD(), "Wrap a loss in a term"),
    ("kd", "got 'kd'"),
    ({"kd": Term(KD())}, "of type dict"),
])
def test_terms_that_are_not_a_term_or_a_list_are_refused(terms, hint):
    with pytest.raises(TypeError, match="`terms` must be a `keras_kd.Term` "
                                        "or a list of them") as info:
        Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=terms)
    assert hint in str(info.value)


def test_terms_may_be_a_tuple():
    terms = (Term(KD(1.0)), Term(KD(2.0), name="kd_t2"))
    d = Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=terms)
    assert d.term_names == ["kd", "kd_t2"]


def test_term_named_like_a_builtin_log_is_refused():
    with pytest.raises(ValueError, match="'student_loss'.*another `name=`"):
        make_distiller(terms=[Term(KD(), name="student")])


def numpy_valid_conv(x, kernel, bias):
    """A 'valid' 3x3 convolution, stride 1, channels last, in NumPy."""
    k = kernel.shape[0]
    rows, cols = x.shape[1] - k + 1, x.shape[2] - k + 1
    out = np.zeros((len(x), rows, cols, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            out += np.einsum("bhwc,cd->bhwd",
                             x[:, i:i + rows, j:j + cols], kernel[i, j])
    return out + bias


def test_sequential_models_are_tapped_at_the_named_layers(data):
    x, y = data

    def seq(prefix, width):
        return keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(width, 3, name=f"{prefix}_conv"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES)], name=prefix)

    d = compile_(Distiller(seq("t", 6), seq("s", 3), terms=[
        Term(KD()), Term(FeatureMSE(), teacher_layer="t_conv",
                         student_layer="s_conv")]))

    def numpy_feature_mse():
        # The two conv outputs, by hand from the weights; the student's
        # 3 channels are mapped to the teacher's 6 by the adapter.
        t_conv = d.teacher.get_layer("t_conv")
        s_conv = d.student.get_layer("s_conv")
        adapter = d.adapters["feature_mse"]
        t_feat = numpy_valid_conv(x, *snapshot_vars(t_conv.weights))
        s_feat = numpy_valid_conv(x, *snapshot_vars(s_conv.weights))
        kernel, bias = snapshot_vars(adapter.weights)
        return np.mean((s_feat @ kernel + bias - t_feat) ** 2)

    # One training step on the whole batch logs the loss of the weights it
    # started from; evaluation that of the weights after it.
    expected = numpy_feature_mse()
    logs = d.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["feature_mse_loss"], expected, rtol=1e-4)
    after = numpy_feature_mse()
    assert abs(after - expected) > 1e-2 * expected  # the step moved them
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    np.testing.assert_allclose(logs["feature_mse_loss"], after, rtol=1e-4)


# Errors raised before training.

def test_unknown_layer_names_closest():
    with pytest.raises(ValueError) as err:
        make_distiller(terms=[Term(FeatureMSE(), teacher_layer="t_stage3",
                                   student_layer="s_stage2")])
    message = str(err.value)
    assert "t_stage3" in message and "'t'" in message and "t_stage2" in message


def test_subclassed_model_with_taps_explains():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.conv = keras.layers.Conv2D(4, 3, name="conv")
            self.head = keras.layers.Dense(NUM_CLASSES)

        def call(self, x):
            return self.head(keras.ops.mean(self.conv(x), axis=(1, 2)))

    sub = Sub()
    sub(np.zeros((1, 8, 8, 1), "float32"))
    with pytest.raises(ValueError, match="Functional"):
        Distiller(make_cnn("t", 8), sub, terms=[
            Term(FeatureMSE(), teacher_layer="t_stage1", student_layer="conv")])
    # Without taps a subclassed student works.
    Distiller(make_cnn("t", 8), sub)


def test_output_shape_mismatch_names_models():
    with pytest.raises(ValueError, match="teacher 't'.*student 's'"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4, classes=3))


def test_incompatible_spatial_sizes_name_term():
    with pytest.raises(ValueError, match="feature_mse.*t_stage1.*s_stage2"):
        Distiller(make_cnn("t", 8, size=9), make_cnn("s", 4, size=9),
                  terms=[Term(FeatureMSE(), teacher_layer="t_stage1",
                              student_layer="s_stage2")])
    Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[
        Term(FeatureMSE(), teacher_layer="t_stage1", student_layer="s_stage2")])


def test_bad_arguments():
    with pytest.raises(TypeError, match="Term"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4), terms=[KD()])
    with pytest.raises(TypeError, match="keras.losses.Loss"):
        Term("kd")
    with pytest.raises(ValueError, match="together"):
        Term(FeatureMSE(), teacher_layer="t_stage1")
    with pytest.raises(TypeError, match="teacher"):
        Distiller("teacher", make_cnn("s", 4))


def test_public_names():
    assert {"Distiller", "Term", "losses"} <= set(dir(keras_kd))


def test_augmentation_seeds_advance_once_per_training_step(data):
    x, y = data
    teacher_aug = keras_kd.augment.weak(flip=False, seed=3)
    student_aug = keras_kd.augment.weak(flip=False, seed=4)
    d = compile_(Distiller(make_cnn("t", 8), make_cnn("s", 4),
                           teacher_augmentation=teacher_aug,
                           student_augmentation=student_aug))

    assert_augmented_once_per_training_step(
        d, [teacher_aug, student_aug], x, y)


def test_variables_split_into_trained_and_state():
    d = make_distiller()
    trained = {id(v) for v in d.trainable_variables}
    state = {id(v) for v in d.non_trainable_variables}
    assert not trained & state
    assert trained | state == {id(v) for v in d.variables}
    assert {id(v) for v in d.teacher.variables} <= state


@pytest.mark.backends("jax", "torch")
def test_export_without_tensorflow_says_what_to_install(tmp_path,
                                                         monkeypatch):
    from keras_kd import export

    monkeypatch.setattr(export, "_has", lambda module: False)
    d = make_distiller()
    with pytest.raises(ImportError, match="pip install tensorflow"):
        d.export_student(str(tmp_path / "student"))
    assert not (tmp_path / "student").exists()

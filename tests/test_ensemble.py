"""Teacher ensembles, per-model augmentation and diagnostics in the
Distiller."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import log_softmax, softmax
from sklearn.metrics import mutual_info_score

import keras_kd
from keras_kd import Distiller, Term
from keras_kd.losses import AttentionTransfer
from keras_kd.metrics import (AttentionIoU, ExpectedCalibrationError,
                              MutualInformation, TeacherKL, TopOneAgreement)

from conftest import NUM_CLASSES, make_cnn
from test_distiller import assert_same, snapshot
from test_metrics import numpy_ece, numpy_iou

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def numpy_kd(teacher_logits, student_logits, tau=4.0):
    log_p = log_softmax(np.asarray(teacher_logits, "float64") / tau, -1)
    log_q = log_softmax(np.asarray(student_logits, "float64") / tau, -1)
    return tau**2 * np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))


def predict(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def compile_(d):
    d.compile(optimizer=keras.optimizers.SGD(0.05), loss=SCCE,
              metrics=["accuracy"])
    return d


def all_diagnostics():
    return [
        TopOneAgreement(), TeacherKL(), MutualInformation(),
        ExpectedCalibrationError(),
        AttentionIoU(("t1", "t2"), ("t1_stage2", "t2_stage2"),
                     ("t1_logits", "t2_logits")),
        AttentionIoU(("t1", "student"), ("t1_stage2", "s_stage2"),
                     ("t1_logits", "s_logits")),
    ]


def test_logits_and_losses_ensembles_equal_numpy(data):
    x, y = data
    t1, t2 = make_cnn("t1", 8), make_cnn("t2", 6)
    student = make_cnn("s", 4)
    logits = [predict(t, x) for t in (t1, t2)]
    s_logits = predict(student, x)
    expected = {
        "logits": numpy_kd(np.mean(logits, axis=0), s_logits),
        "losses": np.mean([numpy_kd(t, s_logits) for t in logits]),
    }
    assert abs(expected["logits"] - expected["losses"]) > 1e-4
    for mode, value in expected.items():
        d = compile_(Distiller([t1, t2], student, ensemble=mode))
        logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
        np.testing.assert_allclose(logs["kd_loss"], value, rtol=1e-5,
                                   err_msg=mode)
        assert d.ensemble == mode


def test_augmentation_per_model_in_training_only(data):
    x, y = data

    def brighter(images):
        return images + 1.0

    def mirrored(images):
        return keras.ops.flip(images, axis=2)

    def darker(images):
        return images * 0.5

    t1 = make_cnn("t1", 8, batchnorm=False)
    t2 = make_cnn("t2", 6, batchnorm=False)
    student = make_cnn("s", 4)  # with batch norm, momentum 0.5
    before = [snapshot(t) for t in (t1, t2)]
    d = compile_(Distiller([t1, t2], student, student_loss_weight=0.0,
                           teacher_augmentation=[brighter, mirrored],
                           student_augmentation=darker))
    # The student's training-mode logits before the step, on a copy so
    # that the student's batch-norm statistics are not touched.
    copy = keras.models.clone_model(student)
    copy.set_weights(student.get_weights())
    s_train = keras.ops.convert_to_numpy(copy(darker(x), training=True))
    teacher_mean = (predict(t1, brighter(x)) + predict(t2, mirrored(x))) / 2
    pre_bn = keras.Model(student.input, student.get_layer("s_stage1").output)
    batch_mean = np.mean(predict(pre_bn, darker(x)), axis=(0, 1, 2))

    logs = d.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["kd_loss"],
                               numpy_kd(teacher_mean, s_train), rtol=1e-4)
    # One student forward, on the augmented batch: the moving mean moved
    # once (momentum 0.5 from zero) towards the augmented batch's mean.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(student.get_layer("s_bn").moving_mean),
        0.5 * batch_mean, rtol=1e-4, atol=1e-6)
    # Evaluation sees clean data only.
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    clean_mean = (predict(t1, x) + predict(t2, x)) / 2
    np.testing.assert_allclose(logs["kd_loss"],
                               numpy_kd(clean_mean, predict(student, x)),
                               rtol=1e-4)
    for teacher, weights in zip((t1, t2), before):
        assert_same(weights, snapshot(teacher))
        assert not teacher.compiled


def numpy_cam_maps(model, feature_layer, classifier_layer, x, size=(8, 8)):
    feature_model = keras.Model(model.input,
                                model.get_layer(feature_layer).output)
    feature = predict(feature_model, x)
    kernel = keras.ops.convert_to_numpy(
        model.get_layer(classifier_layer).kernel)
    cam = np.einsum("bhwk,kc->bhw", feature, kernel)
    return tf.image.resize(cam[..., None], size, method="bilinear").numpy()[
        ..., 0]


def numpy_diagnostics(t1, t2, student, x, y):
    """The values of `all_diagnostics()` on `(x, y)`, by NumPy, scikit-learn
    and TensorFlow's resize from the models' outputs."""
    t_mean = (predict(t1, x) + predict(t2, x)) / 2
    s_logits = predict(student, x)
    p, q = softmax(t_mean.astype("float64"), -1), softmax(s_logits, -1)
    cams = {
        "t1": numpy_cam_maps(t1, "t1_stage2", "t1_logits", x),
        "t2": numpy_cam_maps(t2, "t2_stage2", "t2_logits", x),
        "s": numpy_cam_maps(student, "s_stage2", "s_logits", x),
    }
    return {
        "top1_agreement": np.mean(t_mean.argmax(-1) == s_logits.argmax(-1)),
        "teacher_kl": np.mean(np.sum(p * np.log(p / q), -1)),
        "mutual_information": mutual_info_score(t_mean.argmax(-1),
                                                s_logits.argmax(-1)),
        "ece": numpy_ece(y, s_logits),
        "attention_iou_t1_t2": numpy_iou([cams["t1"]], [cams["t2"]]),
        "attention_iou_t1_student": numpy_iou([cams["t1"]], [cams["s"]]),
    }


def assert_diagnostics_equal(logs, expected, what):
    for name, value in expected.items():
        atol = 1e-6 if name == "mutual_information" else 0.0
        np.testing.assert_allclose(logs[name], value, rtol=1e-4, atol=atol,
                                   err_msg=f"{what} {name}")


def test_training_and_validation_diagnostics_equal_references(tmp_path,
                                                              data):
    x, y = data
    x_val = np.random.default_rng(9).normal(size=(48, 8, 8, 1)).astype(
        "float32")
    y_val = np.random.default_rng(10).integers(0, NUM_CLASSES, size=48)
    t1, t2 = make_cnn("t1", 8), make_cnn("t2", 6)
    # The training-epoch diagnostics have a reference only if every batch
    # of the epoch sees the same student: no augmentation, no batch norm
    # in the student (its training-mode output would depend on the batch)
    # and a learning rate of 0 for the 4 steps of epoch 1 (32 samples in
    # batches of 8). Then epoch 1's values (streaming over its batches)
    # equal the references on all 32 samples with the initial weights. The
    # learning rate is 0.05 in epoch 2, so that the validation values are
    # checked against weights that training moved.
    student = make_cnn("s", 4, batchnorm=False)
    initial = predict(student, x)
    expected_train = numpy_diagnostics(t1, t2, student, x, y)
    d = Distiller([t1, t2], student, diagnostics=all_diagnostics())
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [3], [0.0, 0.05])
    d.compile(optimizer=keras.optimizers.SGD(schedule), loss=SCCE,
              metrics=["accuracy"])
    history = d.fit(x, y, validation_data=(x_val, y_val), epochs=2,
                    batch_size=8, verbose=0)
    assert int(d.optimizer.iterations) == 8
    assert np.abs(predict(student, x) - initial).max() > 1e-3
    names = ["top1_agreement", "teacher_kl", "mutual_information", "ece",
             "attention_iou_t1_t2", "attention_iou_t1_student"]
    assert set(names) == set(expected_train)
    for name in names:
        assert len(history.history[name]) == 2
        assert len(history.history[f"val_{name}"]) == 2
    assert_diagnostics_equal({k: v[0] for k, v in history.history.items()},
                             expected_train, "training epoch 1")

    # Validation values (6 batches of 8) against references on all 48,
    # with the weights after epoch 2.
    val = {k[4:]: v[-1] for k, v in history.history.items()
           if k.startswith("val_")}
    assert_diagnostics_equal(val, numpy_diagnostics(t1, t2, student, x_val,
                                                    y_val), "validation")
    s_logits = predict(student, x_val)

    # The exported student holds the student's variables only.
    path = str(tmp_path / "student")
    d.export_student(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    assert len(reloaded.variables) == len(student.weights)
    np.testing.assert_allclose(reloaded.serve(x_val).numpy(), s_logits,
                               atol=1e-5)

    png = keras_kd.plot_diagnostics(history, str(tmp_path / "d.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_save_load_with_several_teachers(tmp_path, data):
    x, y = data
    t1, t2 = make_cnn("t1", 8), make_cnn("t2", 6)
    d = compile_(Distiller(
        [t1, t2], make_cnn("s", 4), ensemble="losses",
        teacher_augmentation=[keras_kd.augment.weak(flip=False), None],
        student_augmentation=keras_kd.augment.strong(),
        diagnostics=["top1_agreement", "mutual_information", "ece"]))
    with pytest.raises(ValueError, match="2 teachers.*teachers"):
        d.teacher  # noqa: B018
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "d.keras")
    d.save(path)
    loaded = keras.models.load_model(path)
    assert [t.name for t in loaded.teachers] == ["t1", "t2"]
    assert loaded.ensemble == "losses"
    assert [m.get_config() for m in loaded.diagnostics] == [
        m.get_config() for m in d.diagnostics]
    assert loaded.get_config()["teacher_augmentation"][1] is None
    for a, b in zip(d.teachers, loaded.teachers):
        assert_same(snapshot(a), snapshot(b))
    assert_same(snapshot(d.student), snapshot(loaded.student))
    logs = d.evaluate(x, y, return_dict=True, verbose=0)
    np.testing.assert_allclose(
        list(loaded.evaluate(x, y, return_dict=True, verbose=0).values()),
        list(logs.values()), rtol=1e-5)
    clone = Distiller.from_config(d.get_config())
    assert clone.get_config()["student_augmentation"] == \
        d.get_config()["student_augmentation"]
    # Pure distillation: the diagnostics needing labels are left out.
    history = loaded.fit(x, epochs=1, batch_size=16, verbose=0)
    assert {"top1_agreement", "mutual_information"} <= set(history.history)
    assert "ece" not in history.history


def numpy_at(t_feature, s_feature):
    def att(f):
        a = np.mean(f.astype("float64") ** 2, axis=-1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)
    return np.mean(np.mean((att(s_feature) - att(t_feature)) ** 2, -1))


def test_feature_terms_read_every_teacher_with_the_layer(data):
    x, y = data
    t_a, t_b = make_cnn("t", 8), make_cnn("t", 8)  # same layer names
    other, student = make_cnn("u", 6), make_cnn("s", 4)
    d = compile_(Distiller([t_a, t_b, other], student, terms=[
        Term(AttentionTransfer(), teacher_layer="t_stage2",
             student_layer="s_stage2"),
        Term(AttentionTransfer(), teacher_layer="u_stage2",
             student_layer="s_stage2", name="at_u"),
    ]))

    def feature(model, name):
        return predict(keras.Model(model.input, model.get_layer(name).output),
                       x)

    s_feat = feature(student, "s_stage2")
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    np.testing.assert_allclose(
        logs["attention_transfer_loss"],
        np.mean([numpy_at(feature(t, "t_stage2"), s_feat)
                 for t in (t_a, t_b)]), rtol=1e-4)
    np.testing.assert_allclose(
        logs["at_u_loss"], numpy_at(feature(other, "u_stage2"), s_feat),
        rtol=1e-4)
    with pytest.raises(ValueError, match="equal shapes"):
        Distiller([make_cnn("t", 8), make_cnn("t", 6)], student, terms=[
            Term(AttentionTransfer(), teacher_layer="t_stage2",
                 student_layer="s_stage2")])
    with pytest.raises(ValueError, match="'v_stage2'.*any teacher.*'u'"):
        Distiller([t_a, other], student, terms=[
            Term(AttentionTransfer(), teacher_layer="v_stage2",
                 student_layer="s_stage2")])


def test_errors_before_training():
    t1, t2, s = make_cnn("t1", 8), make_cnn("t2", 6), make_cnn("s", 4)
    with pytest.raises(ValueError, match="Teacher 1 't3'.*\\(None, 3\\)"):
        Distiller([t1, make_cnn("t3", 6, classes=3)], s)
    with pytest.raises(TypeError, match=r"`teacher\[1\]`"):
        Distiller([t1, "t2"], s)
    with pytest.raises(ValueError, match="`ensemble`"):
        Distiller([t1, t2], s, ensemble="mean")
    with pytest.raises(ValueError, match="3 entries but there are 2"):
        Distiller([t1, t2], s, teacher_augmentation=[None, None, None])
    with pytest.raises(TypeError, match="student_augmentation"):
        Distiller([t1, t2], s, student_augmentation="strong")
    with pytest.raises(ValueError, match="random_crop.*'s'.*\\(None, 6, 6"):
        Distiller(t1, s, student_augmentation=keras.layers.RandomCrop(6, 6))

    def iou(models=("t1", "t2"), features=("t1_stage2", "t2_stage2"),
            classifiers=("t1_logits", "t2_logits")):
        return Distiller([t1, t2], s, diagnostics=[
            AttentionIoU(models, features, classifiers)])

    with pytest.raises(ValueError, match="'t9'.*Known names"):
        iou(models=("t1", "t9"))
    with pytest.raises(ValueError, match="'t2_stage3'.*'t2'.*t2_stage2"):
        iou(features=("t1_stage2", "t2_stage3"))
    with pytest.raises(ValueError, match="'t2_gap'.*Dense"):
        iou(classifiers=("t1_logits", "t2_gap"))
    with pytest.raises(ValueError, match="'t1_stage1'.*channels == 16"):
        iou(features=("t1_stage1", "t2_stage2"))
    with pytest.raises(ValueError, match="needs `models`"):
        Distiller([t1, t2], s, diagnostics=[AttentionIoU()])
    with pytest.raises(ValueError, match="both named 'kd_loss'"):
        Distiller(t1, s, diagnostics=[TopOneAgreement(name="kd_loss")])
    with pytest.raises(ValueError, match="counts 3 classes.*5"):
        Distiller(t1, s, diagnostics=[MutualInformation(num_classes=3)])

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.spatial.distance import jensenshannon

import keras_kd
from keras_kd import Distiller, LayerwiseLearningRate, Term
from keras_kd.layerwise import (
    collapse_channels, divergence_scales, hessian_vector_products,
    js_divergence, normalize_map,
)
from keras_kd.losses import KD
from keras_kd.taps import Tap

from conftest import make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PAIRS = [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")]
SCALE_KEYS = ["lr_scale/s_stage1", "lr_scale/s_stage2"]


def layerwise(**kwargs):
    kwargs.setdefault("pairs", PAIRS)
    return LayerwiseLearningRate(**kwargs)


def make(lw=None, student=None, teacher=None, optimizer=None, seed=1,
         **compile_kwargs):
    keras.utils.set_random_seed(seed)
    teacher = teacher or make_cnn("t", 8)
    student = student or make_cnn("s", 4)
    d = Distiller(teacher, student, terms=[Term(KD(4.0), weight=0.9)],
                  student_loss_weight=0.1, layerwise_lr=lw)
    d.compile(optimizer=optimizer or keras.optimizers.Adam(1e-2), loss=SCCE,
              **compile_kwargs)
    return d


def values(variables):
    return [keras.ops.convert_to_numpy(v) for v in variables]


def state_of(d):
    """Everything that decides how training goes on."""
    lws = d.layerwise_state
    out = values(d.weights) + values(d.optimizer.variables)
    for name in lws.student_layers:
        out += values(lws.optimizers[name].variables)
    return out


# Pure functions, checked against independent references.

def test_js_divergence_matches_scipy():
    rng = np.random.default_rng(0)
    p = rng.random((6, 10)) ** 3
    q = rng.random((6, 10))
    p[0, :5] = 0.0  # zeros contribute nothing
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    ours = keras.ops.convert_to_numpy(js_divergence(p, q))
    reference = jensenshannon(p, q, axis=1) ** 2  # natural log by default
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)
    same = keras.ops.convert_to_numpy(js_divergence(p, p))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    disjoint = js_divergence(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(disjoint), np.log(2),
                               rtol=1e-6)


def test_maps_collapse_channels_and_normalize():
    rng = np.random.default_rng(1)
    feature = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    collapsed = keras.ops.convert_to_numpy(collapse_channels(feature, p=2))
    np.testing.assert_allclose(collapsed[..., 0], (feature ** 2).mean(-1),
                               rtol=1e-6)
    normalized = keras.ops.convert_to_numpy(normalize_map(collapsed))
    assert normalized.shape == (2, 16)
    np.testing.assert_allclose(normalized.sum(-1), 1.0, rtol=1e-6)
    zero = keras.ops.convert_to_numpy(normalize_map(np.zeros((1, 4))))
    np.testing.assert_allclose(zero, 0.25)


def test_scales_follow_divergence_within_clip():
    d = np.array([0.02, 0.05, 0.1, 0.4, 0.03])
    wide = keras.ops.convert_to_numpy(divergence_scales(d, 1e-3, 1e3))
    np.testing.assert_allclose(wide, d / d.mean(), rtol=1e-6)
    tight = keras.ops.convert_to_numpy(divergence_scales(d, 0.5, 2.0))
    assert tight.min() == pytest.approx(0.5) and tight.max() == pytest.approx(2)
    assert np.all(np.diff(tight[np.argsort(d)]) >= 0)  # order preserved
    ones = keras.ops.convert_to_numpy(divergence_scales(np.zeros(3), 0.5, 2))
    np.testing.assert_allclose(ones, 1.0)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_hessian_vector_products_are_exact():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="h")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
    tap = Tap(model, ["h"], "student")
    x = tf.constant(np.random.default_rng(2).normal(size=(2, 3)), tf.float32)
    classes = tf.constant([0, 2])
    probe = tf.constant(np.random.default_rng(3).choice([-1.0, 1.0], (2, 4)),
                        tf.float32)
    (product,), = hessian_vector_products(tap, x, classes, [[probe]])
    # Independent: the full Hessian of the cross-entropy with respect to the
    # hidden activations, from the dense head alone.
    head = model.layers[-1]
    h = model.get_layer("h")(x)
    with tf.GradientTape() as outer:
        outer.watch(h)
        with tf.GradientTape() as inner:
            inner.watch(h)
            logp = tf.nn.log_softmax(head(h))
            loss = -tf.reduce_sum(tf.gather(logp, classes, batch_dims=1))
        grad = inner.gradient(loss, h)
    hessian = outer.batch_jacobian(grad, h)  # samples are independent
    expected = tf.einsum("bij,bj->bi", hessian, probe)
    np.testing.assert_allclose(product.numpy(), expected.numpy(), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_jacobian_map_matches_closed_form(data):
    x, _ = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    d = Distiller(teacher, student, layerwise_lr=layerwise(signal="jacobian"))
    teacher_maps, student_maps = d.layerwise_state.signal_maps(x)
    # After s_stage2 come global average pooling and the dense logits, so
    # d logit_c / d F[h, w, k] = W[k, c] / (H * W) at every position.
    classes = np.argmax(teacher.predict(x, verbose=0), -1)
    for model, maps in ((student, student_maps), (teacher, teacher_maps)):
        kernel = keras.ops.convert_to_numpy(model.layers[-1].kernel)
        positions = 4 * 4
        expected = ((kernel[:, classes] / positions) ** 2).mean(0)
        got = keras.ops.convert_to_numpy(maps[1])[..., 0]
        np.testing.assert_allclose(got, np.broadcast_to(
            expected[:, None, None], got.shape), rtol=1e-4)
    # A frozen teacher (no trainable variable to watch) gives the same maps.
    teacher.trainable = False
    frozen, _ = d.layerwise_state.signal_maps(x)
    for a, b in zip(frozen, teacher_maps):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a),
                                   keras.ops.convert_to_numpy(b), rtol=1e-6)
    assert np.abs(keras.ops.convert_to_numpy(teacher_maps[0])).max() > 0


# Behaviour inside fit.

@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_larger_divergence_larger_learning_rate(data):
    """Student = teacher with its stage-2 kernel perturbed: stage 1 agrees
    exactly (divergence 0), stage 2 does not. Each variable moves by its
    scale times the step plain distillation takes from the same point."""
    x, y = data

    def twins():
        keras.utils.set_random_seed(4)
        teacher = make_cnn("t", 4, batchnorm=False)
        student = make_cnn("s", 4, batchnorm=False)
        student.set_weights(teacher.get_weights())
        kernel = student.get_layer("s_stage2").kernel
        kernel.assign(kernel * 1.5 + 0.05)
        return teacher, student

    sgd = dict(learning_rate=0.1, global_clipnorm=0.5)
    plain = make(None, *reversed(twins()),
                 optimizer=keras.optimizers.SGD(**sgd))
    lw = make(layerwise(min_scale=0.01, max_scale=100.0),
              *reversed(twins()), optimizer=keras.optimizers.SGD(**sgd))
    before = values(plain.student.weights)
    assert all(np.array_equal(a, b) for a, b in
               zip(before, values(lw.student.weights)))
    plain.train_on_batch(x, y)
    logs = lw.train_on_batch(x, y, return_dict=True)

    divergences = {k: float(v.numpy())
                   for k, v in lw.layerwise_state.divergences.items()}
    assert divergences["s_stage1"] < 1e-6 < divergences["s_stage2"]
    scales = {name: logs[f"lr_scale/{name}"] for name in ("s_stage1",
                                                          "s_stage2")}
    assert scales["s_stage1"] == pytest.approx(0.01)  # clipped from 0
    assert scales["s_stage2"] == pytest.approx(2.0)   # d / mean(d)
    owners = {}
    for name, variables in lw.layerwise_state.layer_variables.items():
        owners.update({v.path: name for v in variables})
    for var_plain, var_lw, start in zip(plain.student.weights,
                                        lw.student.weights, before):
        step_plain = keras.ops.convert_to_numpy(var_plain) - start
        step_lw = keras.ops.convert_to_numpy(var_lw) - start
        scale = scales.get(owners.get(var_lw.path), 1.0)
        np.testing.assert_allclose(step_lw, scale * step_plain, rtol=1e-4,
                                   atol=1e-7, err_msg=var_lw.path)
    assert np.abs(step_plain).max() > 0


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_scales_clipped_logged_and_follow_schedule(data):
    x, y = data
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append({k: logs[k] for k in SCALE_KEYS})

    d = make(layerwise(min_scale=0.9, max_scale=1.1, update_every=2),
             optimizer=keras.optimizers.SGD(schedule, momentum=0.9))
    history = d.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False,
                    callbacks=[Record()])
    assert set(SCALE_KEYS) <= set(history.history)
    assert len(seen) == 8 and all(set(s) == set(SCALE_KEYS) for s in seen)
    logged = np.array([[s[k] for k in SCALE_KEYS] for s in seen])
    assert logged.min() >= 0.9 - 1e-6 and logged.max() <= 1.1 + 1e-6
    assert np.isclose(logged, 0.9).any() and np.isclose(logged, 1.1).any()
    # Re-estimated on steps 0, 2, 4, 6 only.
    for step in range(1, 8, 2):
        np.testing.assert_array_equal(logged[step], logged[step - 1])
    lws = d.layerwise_state
    for key, name in zip(SCALE_KEYS, lws.student_layers):
        assert history.history[key][-1] == pytest.approx(logged[-1][
            SCALE_KEYS.index(key)])
        assert float(lws.scales[name].numpy()) == pytest.approx(
            history.history[key][-1])
        # The last step (iteration 7) ran at schedule(7) * scale.
        lr = float(keras.ops.convert_to_numpy(
            lws.optimizers[name].learning_rate))
        assert lr == pytest.approx(float(schedule(7)) * logged[-1][
            SCALE_KEYS.index(key)], rel=1e-5)
    assert int(d.optimizer.iterations) == 8
    assert all(int(o.iterations) == 8 for o in lws.optimizers.values())


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_each_optimizer_owns_its_layer_slots():
    d = make(layerwise())
    lws = d.layerwise_state
    groups = lws.layer_variables
    assert [v.path for v in groups["s_stage1"]] == [
        v.path for v in d.student.get_layer("s_stage1").trainable_variables]
    owned = {v.path for vs in groups.values() for v in vs}
    rest = [v for v in d.trainable_variables if v.path not in owned]
    assert {v.path for v in rest} == {
        v.path for name in ("s_bn", "s_logits")
        for v in d.student.get_layer(name).trainable_variables}

    def slot_owners(optimizer, variables):
        slots = [v for v in optimizer.variables
                 if v.name not in ("iteration", "learning_rate")]
        assert len(slots) == 2 * len(variables)  # Adam: momentum, velocity
        for slot in slots:
            matches = [v for v in variables
                       if slot.name.startswith(v.path.replace("/", "_") + "_")]
            assert len(matches) == 1, slot.name
            assert tuple(slot.shape) == tuple(matches[0].shape)

    slot_owners(d.optimizer, rest)
    for name, variables in groups.items():
        slot_owners(lws.optimizers[name], variables)
    all_slots = [id(v) for o in [d.optimizer, *lws.optimizers.values()]
                 for v in o.variables]
    assert len(all_slots) == len(set(all_slots))


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_save_load_resumes_identically(tmp_path, data):
    x, y = data
    schedule = keras.optimizers.schedules.ExponentialDecay(0.02, 3, 0.7)

    def build():
        return make(layerwise(signal="hessian", update_every=3,
                              min_scale=0.2, max_scale=5.0),
                    optimizer=keras.optimizers.Adam(schedule))

    fit = dict(batch_size=8, verbose=0, shuffle=False)
    straight = build()
    straight.fit(x, y, epochs=2, **fit)
    interrupted = build()
    interrupted.fit(x, y, epochs=1, **fit)
    path = str(tmp_path / "d.keras")
    interrupted.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layerwise_lr.get_config() == \
        interrupted.layerwise_lr.get_config()
    for a, b in zip(state_of(interrupted), state_of(loaded)):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, epochs=1, **fit)
    for a, b in zip(state_of(straight), state_of(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_backup_and_restore_resumes_identically(tmp_path, data):
    x, y = data
    fit = dict(batch_size=16, verbose=0, shuffle=False, epochs=3)

    def build(seed=1):
        return make(layerwise(signal="attention", update_every=3,
                              min_scale=0.2, max_scale=5.0),
                    optimizer=keras.optimizers.Adam(0.02), seed=seed)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    straight = build()
    straight.fit(x, y, **fit)
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        build().fit(x, y, callbacks=[
            keras.callbacks.BackupAndRestore(backup_dir), Interrupt()], **fit)
    resumed = build(seed=99)  # different initial weights
    history = resumed.fit(
        x, y, callbacks=[keras.callbacks.BackupAndRestore(backup_dir)], **fit)
    assert len(history.history["loss"]) == 1  # only the last epoch ran
    for a, b in zip(state_of(straight), state_of(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_xla_matches_graph(data):
    x, y = data
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(2)
        d = make(layerwise(signal="jacobian", update_every=2, min_scale=0.1,
                           max_scale=10.0), jit_compile=jit,
                 student=make_cnn("s", 4, batchnorm=False))
        history = d.fit(x, y, epochs=1, batch_size=8, verbose=0,
                        shuffle=False)
        results.append((history.history, values(d.student.weights)))
    for key in SCALE_KEYS + ["loss"]:
        np.testing.assert_allclose(results[0][0][key], results[1][0][key],
                                   rtol=1e-4, err_msg=key)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_export_and_teacher_unaffected(tmp_path, data):
    x, y = data
    d = make(layerwise(signal="hessian", update_every=1))
    teacher_before = values(d.teacher.weights)
    teacher_config = d.teacher.get_config()
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(np.array_equal(a, b)
               for a, b in zip(teacher_before, values(d.teacher.weights)))
    assert teacher_config == d.teacher.get_config()
    path = d.export_student(str(tmp_path / "student"), verbose=False)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(reloaded.serve(x).numpy(),
                               d.student.predict(x, verbose=0), atol=1e-5)
    assert len(reloaded.variables) == len(d.student.weights)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_block_scope_takes_layers_up_to_the_pair():
    lw = layerwise(pairs=[("s_pool", "t_pool"), ("s_stage2", "t_stage2")],
                   scope="block")
    d = make(lw)
    groups = {name: sorted({v.path.split("/")[0] for v in variables})
              for name, variables in d.layerwise_state.layer_variables.items()}
    assert groups == {"s_pool": ["s_bn", "s_stage1"],
                      "s_stage2": ["s_stage2"]}
    owned = {v.path for vs in d.layerwise_state.layer_variables.values()
             for v in vs}
    rest = {v.path.split("/")[0] for v in d.trainable_variables
            if v.path not in owned}
    assert rest == {"s_logits"}


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_config_round_trip_and_user_object_untouched():
    lw = layerwise(signal="hessian", update_every=7, min_scale=0.3,
                   max_scale=3.0, p=1, hutchinson_samples=2)
    config = lw.get_config()
    d = make(lw)
    assert lw.get_config() == config and d.layerwise_lr is lw
    assert d.layerwise_state.config is not lw
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(lw))
    assert again.get_config() == config
    clone = Distiller.from_config(d.get_config())
    assert clone.layerwise_lr.get_config() == config
    assert Distiller.from_config(
        make(None).get_config()).layerwise_state is None


# Errors before training.

@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_bad_arguments():
    with pytest.raises(ValueError, match="at least two"):
        LayerwiseLearningRate([("s_stage1", "t_stage1")])
    with pytest.raises(ValueError, match="s_stage1.*more than one pair"):
        LayerwiseLearningRate([("s_stage1", "t_stage1"),
                               ("s_stage1", "t_stage2")])
    with pytest.raises(ValueError, match="signal"):
        layerwise(signal="fisher")
    with pytest.raises(ValueError, match="min_scale=2.0, max_scale=1.0"):
        layerwise(min_scale=2.0, max_scale=1.0)
    with pytest.raises(ValueError, match="update_every"):
        layerwise(update_every=0)
    with pytest.raises(TypeError, match="LayerwiseLearningRate"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4), layerwise_lr=PAIRS)


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_model_errors_name_layers():
    t, s = make_cnn("t", 8), make_cnn("s", 4)
    with pytest.raises(ValueError, match="s_stage3.*'s'.*s_stage2"):
        Distiller(t, s, layerwise_lr=layerwise(
            pairs=[("s_stage3", "t_stage1"), ("s_stage2", "t_stage2")]))
    with pytest.raises(ValueError, match="'s_pool'.*scope='block'"):
        Distiller(t, s, layerwise_lr=layerwise(
            pairs=[("s_pool", "t_pool"), ("s_stage2", "t_stage2")]))
    with pytest.raises(ValueError, match="s_stage1.*t_logits.*same rank"):
        Distiller(t, s, layerwise_lr=layerwise(
            pairs=[("s_stage1", "t_logits"), ("s_stage2", "t_stage2")]))
    t9, s9 = make_cnn("t", 8, size=9), make_cnn("s", 4, size=9)
    with pytest.raises(ValueError, match="s_stage2.*t_stage1.*divide"):
        Distiller(t9, s9, layerwise_lr=layerwise(
            pairs=[("s_stage1", "t_stage1"), ("s_stage2", "t_stage1")]))


@pytest.mark.backends("tensorflow")  # layer-wise rates: TF only for now
def test_unsupported_optimizers_rejected_at_compile():
    for optimizer, match in (
            (keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()),
             "LossScaleOptimizer"),
            (keras.optimizers.SGD(gradient_accumulation_steps=2),
             "gradient_accumulation_steps"),
            (keras.optimizers.SGD(use_ema=True), "use_ema")):
        with pytest.raises(ValueError, match=match):
            make(layerwise(), optimizer=optimizer)


def test_public_name():
    assert keras_kd.LayerwiseLearningRate is LayerwiseLearningRate

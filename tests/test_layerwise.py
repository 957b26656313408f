import keras
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

import keras_kd
from keras_kd import Distiller, LayerwiseLearningRate, LayerwiseOptimizer
from keras_kd import Term
from keras_kd.layerwise import (
    collapse_channels, divergence_scales, hessian_vector_products,
    js_divergence, normalize_map,
)
from keras_kd.losses import KD
from keras_kd.taps import Tap

from backend_utils import to_numpy
from conftest import make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PAIRS = [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")]
SCALE_KEYS = ["lr_scale/s_stage1", "lr_scale/s_stage2"]
LSO = keras.optimizers.LossScaleOptimizer


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
    return [to_numpy(v.value if isinstance(v, keras.Variable) else v)
            for v in variables]


def state_of(d):
    """Everything that decides how training goes on: the distiller's
    variables and every optimizer variable (the groups' slots and the
    scales included)."""
    return values(d.weights) + values(d.optimizer.variables)


def scalar(variable):
    return float(to_numpy(variable.value))


@pytest.fixture
def policy():
    """Sets a global dtype policy for the test, and float32 after it."""
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy("float32")


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


def test_hessian_vector_products_are_exact():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="h")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))
    tap = Tap(model, ["h"], "student")
    x = np.random.default_rng(2).normal(size=(2, 3)).astype("float32")
    classes = np.array([0, 2])
    probe = np.random.default_rng(3).choice([-1.0, 1.0], (2, 4)).astype(
        "float32")
    (product,), = hessian_vector_products(tap, x, classes, [[probe]])
    # Independent, in NumPy: for logits z = h W + b, the Hessian of
    # -log softmax(z)[c] with respect to h is W (diag(p) - p p^T) W^T, per
    # sample (samples are independent).
    kernel = to_numpy(model.get_layer("head").kernel.value).astype("float64")
    bias = to_numpy(model.get_layer("head").bias.value).astype("float64")
    h = to_numpy(model.get_layer("h")(x)).astype("float64")
    z = h @ kernel + bias
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = np.stack([
        kernel @ (np.diag(p[b]) - np.outer(p[b], p[b])) @ kernel.T @ probe[b]
        for b in range(2)])
    np.testing.assert_allclose(to_numpy(product), expected, rtol=1e-4,
                               atol=1e-6)
    assert np.abs(expected).max() > 1e-3


def test_perturbed_call_adds_eps_downstream_in_inference_mode():
    """The perturbed forward pass adds each `eps` to its layer's output and
    everything downstream sees it (a skip connection included), runs the
    layers in inference mode even within a call in training mode, and adds
    no call to the user's layers: they can still be tapped."""
    from keras_kd.layerwise.perturb import perturbed_call

    class TrainingOnly(keras.layers.Layer):
        def call(self, x, training=None):
            return x + 100.0 if training else x

    class Outer(keras.layers.Layer):
        def call(self, x, training=None):
            return perturbed_call(tap, x, eps)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(
        keras.layers.Dropout(0.9)(TrainingOnly()(a)))
    out = keras.layers.Dense(2, name="head")(keras.layers.Add()([a, b]))
    model = keras.Model(inputs, out)
    tap = Tap(model, ["b", "a", "b"], "student")  # not in graph order
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype("float32")
    eps = [rng.normal(size=(5, 4)).astype("float32") for _ in range(3)]
    outputs, features = Outer()(x, training=True)
    w = {n: [to_numpy(v) for v in model.get_layer(n).weights]
         for n in ("a", "b", "head")}
    ref_a = x @ w["a"][0] + w["a"][1] + eps[1]
    ref_b = ref_a @ w["b"][0] + w["b"][1] + eps[0] + eps[2]
    ref_out = (ref_a + ref_b) @ w["head"][0] + w["head"][1]
    np.testing.assert_allclose(to_numpy(outputs), ref_out, rtol=1e-5,
                               atol=1e-5)
    for feature, ref in zip(features, [ref_b, ref_a, ref_b]):
        np.testing.assert_allclose(to_numpy(feature), ref, rtol=1e-5,
                                   atol=1e-5)
    assert Tap(model, ["a", "b"], "student").feature_shapes == [(None, 4)] * 2


def test_jacobian_map_matches_closed_form(data):
    x, _ = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    d = Distiller(teacher, student, layerwise_lr=layerwise(signal="jacobian"))
    teacher_maps, student_maps = d.layerwise_state.signal_maps(x)
    # After s_stage2 come global average pooling and the dense logits, so
    # d logit_c / d F[h, w, k] = W[k, c] / (H * W) at every position.
    classes = np.argmax(teacher.predict(x, verbose=0), -1)
    for model, maps in ((student, student_maps), (teacher, teacher_maps)):
        kernel = to_numpy(model.layers[-1].kernel.value)
        positions = 4 * 4
        expected = ((kernel[:, classes] / positions) ** 2).mean(0)
        got = to_numpy(maps[1])[..., 0]
        np.testing.assert_allclose(got, np.broadcast_to(
            expected[:, None, None], got.shape), rtol=1e-4)
    # A frozen teacher (no trainable variable to watch) gives the same maps.
    teacher.trainable = False
    frozen, _ = d.layerwise_state.signal_maps(x)
    for a, b in zip(frozen, teacher_maps):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6)
    assert np.abs(to_numpy(teacher_maps[0])).max() > 0


# Behaviour inside fit.

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

    divergences = {k: scalar(v)
                   for k, v in lw.layerwise_state.divergences.items()}
    assert divergences["s_stage1"] < 1e-6 < divergences["s_stage2"]
    scales = {name: float(logs[f"lr_scale/{name}"])
              for name in ("s_stage1", "s_stage2")}
    assert scales["s_stage1"] == pytest.approx(0.01)  # clipped from 0
    assert scales["s_stage2"] == pytest.approx(2.0)   # d / mean(d)
    for name, variable in lw.optimizer.scales.items():
        assert scalar(variable) == pytest.approx(scales[name])
    owners = {}
    for name, variables in lw.layerwise_state.layer_variables.items():
        owners.update({v.path: name for v in variables})
    for var_plain, var_lw, start in zip(plain.student.weights,
                                        lw.student.weights, before):
        step_plain = to_numpy(var_plain.value) - start
        step_lw = to_numpy(var_lw.value) - start
        scale = scales.get(owners.get(var_lw.path), 1.0)
        np.testing.assert_allclose(step_lw, scale * step_plain, rtol=1e-4,
                                   atol=1e-7, err_msg=var_lw.path)
    assert np.abs(step_plain).max() > 0


def test_scales_clipped_logged_and_follow_schedule(data):
    x, y = data
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append({k: float(logs[k]) for k in SCALE_KEYS})

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
        assert scalar(lws.scales[name]) == pytest.approx(
            history.history[key][-1])
        # Each group's learning rate is the schedule at the current
        # iteration (8, after 8 steps) times its scale.
        lr = float(to_numpy(lws.optimizers[name].learning_rate))
        assert lr == pytest.approx(float(to_numpy(schedule(8))) * logged[-1][
            SCALE_KEYS.index(key)], rel=1e-5)
    assert int(to_numpy(d.optimizer.iterations)) == 8
    assert all(int(to_numpy(o.iterations)) == 8
               for o in lws.optimizers.values())


def test_each_optimizer_owns_its_layer_slots():
    d = make(layerwise())
    d.optimizer.build(d.trainable_variables)
    lws = d.layerwise_state
    assert isinstance(d.optimizer, LayerwiseOptimizer)
    assert lws.optimizer is d.optimizer
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

    slot_owners(d.optimizer.inner_optimizer, rest)
    for name, variables in groups.items():
        slot_owners(lws.optimizers[name], variables)
    optimizers = [d.optimizer.inner_optimizer, *lws.optimizers.values()]
    all_slots = [id(v) for o in optimizers for v in o.variables]
    assert len(all_slots) == len(set(all_slots))
    # Keras sees all of it: the wrapper's variables hold every optimizer's
    # slots and iteration counts, and the scales.
    listed = {id(v) for v in d.optimizer.variables}
    assert set(all_slots) <= listed
    assert {id(v) for v in d.optimizer.scales.values()} <= listed
    assert len(d.optimizer.variables) == len(listed)


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
    assert isinstance(loaded.optimizer, LayerwiseOptimizer)
    for a, b in zip(state_of(interrupted), state_of(loaded)):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, epochs=1, **fit)
    for a, b in zip(state_of(straight), state_of(loaded)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


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


@pytest.mark.backends("tensorflow", "jax")  # PyTorch: no XLA here
def test_jit_matches_no_jit(data):
    """TensorFlow `jit_compile=True` (XLA) and JAX `jit` (Keras' default
    there) against the same training without it. Under `jit`, JAX decides
    on the host which steps re-estimate and runs the re-estimation as a
    program of its own; its train function loops over 3 steps a call."""
    x, y = data
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(2)
        d = make(layerwise(signal="jacobian", update_every=2, min_scale=0.1,
                           max_scale=10.0), jit_compile=jit,
                 student=make_cnn("s", 4, batchnorm=False),
                 optimizer=keras.optimizers.Adam(1e-2),
                 steps_per_execution=3 if jit else 1)
        assert d.jit_compile == jit
        history = d.fit(x, y, epochs=2, batch_size=4, verbose=0,
                        shuffle=False)
        results.append((history.history, values(d.student.weights)))
    for key in SCALE_KEYS + ["loss"]:
        np.testing.assert_allclose(results[0][0][key], results[1][0][key],
                                   rtol=1e-4, err_msg=key)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.backends("jax")
def test_jax_step_program_holds_no_reestimation(data, monkeypatch):
    """On JAX under `jit` the divergences are re-estimated in a program of
    their own: the step's program never traces `measure`, so it holds none
    of its buffers."""
    from keras_kd.layerwise.routing import LayerwiseState
    from keras_kd.trainers.jax import JAXTrainer

    inside_step, traced = [False], []
    step, measure = JAXTrainer._train_step, LayerwiseState.measure

    def spy_step(self, *args, **kwargs):
        inside_step[0] = True
        try:
            return step(self, *args, **kwargs)
        finally:
            inside_step[0] = False

    def spy_measure(self, *args, **kwargs):
        traced.append(inside_step[0])
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(JAXTrainer, "_train_step", spy_step)
    monkeypatch.setattr(LayerwiseState, "measure", spy_measure)
    x, y = data
    d = make(layerwise(update_every=2))
    history = d.fit(x, y, epochs=2, batch_size=8, verbose=0, shuffle=False)
    assert traced == [False]  # traced once, outside the step
    # ... and the re-estimation ran: the scales moved from 1.
    assert any(abs(history.history[k][-1] - 1.0) > 1e-3 for k in SCALE_KEYS)
    traced.clear()
    # Without `jit` Keras calls the step itself, which re-estimates inside.
    d = make(layerwise(update_every=2), run_eagerly=True)
    d.fit(x[:8], y[:8], epochs=1, batch_size=8, verbose=0)
    assert traced == [True]


@pytest.mark.backends("jax")
def test_jax_refresh_schedule_finds_every_due_step():
    """The host-side schedule of the JAX trainer agrees with the in-step
    rule on every step, when the iteration count stalls (a loss-scale
    optimizer skipping steps) and when it is
    changed between steps (a restore), and reads the count rarely."""
    from keras_kd.trainers.jax import _RefreshSchedule

    every = 5
    rng = np.random.default_rng(0)
    true = [0]
    for _ in range(400):  # +1 mostly; stalls, in runs
        true.append(true[-1] + int(rng.random() < 0.7))
    true[200:] = [t + 37 for t in true[200:]]  # restored to a later count
    true[300:] = [t - 90 for t in true[300:]]  # ... and an earlier one
    reads = []

    def read(values):
        reads.append(values[0])
        return values[0]

    schedule = _RefreshSchedule(lambda i: i % every == 0, read)
    values = [true[0]]
    for step, count in enumerate(true[:-1]):
        if step in (200, 300):
            values = [count]  # state that did not come from the last step
        assert schedule.due(values) == (count % every == 0), step
        values = [true[step + 1]]
        schedule.stepped(values)
    # A count that moves every step is read on the due steps and the step
    # after each (and the first), not on the others.
    reads.clear()
    schedule = _RefreshSchedule(lambda i: i % every == 0, read)
    values = [0]
    for count in range(100):
        assert schedule.due(values) == (count % every == 0)
        values = [count + 1]
        schedule.stepped(values)
    assert sorted(set(reads)) == sorted(
        {c for c in range(100) if c % every in (0, 1)})


def test_export_and_teacher_unaffected(tmp_path, data):
    tf = pytest.importorskip("tensorflow")
    x, y = data
    # The Jacobian signal differentiates through the teacher every step.
    d = make(layerwise(signal="jacobian", update_every=1))
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


def test_config_round_trip_and_user_object_untouched():
    lw = layerwise(signal="hessian", update_every=7, min_scale=0.3,
                   max_scale=3.0, p=1, hutchinson_samples=2)
    config = lw.get_config()
    user_optimizer = keras.optimizers.Adam(1e-2)
    d = make(lw, optimizer=user_optimizer)
    assert lw.get_config() == config and d.layerwise_lr is lw
    assert d.layerwise_state.config is not lw
    assert d.optimizer.inner_optimizer is user_optimizer
    # Keras saves the optimizer given to `compile`, not the wrapper.
    saved = d.get_compile_config()["optimizer"]
    assert saved["class_name"] == "Adam"
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(lw))
    assert again.get_config() == config
    clone = Distiller.from_config(d.get_config())
    assert clone.layerwise_lr.get_config() == config
    assert Distiller.from_config(
        make(None).get_config()).layerwise_state is None


# Layer-wise optimizer, and its combinations with Keras optimizers.

def _dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
        keras.layers.Dense(1, name="head")])


@pytest.mark.parametrize("options", [
    dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(
        0.05, 1, 0.7), momentum=0.9),
    dict(global_clipnorm=0.5),
    dict(use_ema=True, ema_momentum=0.5),
], ids=["schedule", "global_clipnorm", "ema"])
def test_layerwise_optimizer_at_scale_one_is_the_inner_optimizer(options):
    """With every scale at 1, the wrapper trains exactly as the optimizer it
    wraps: same schedule at each step, one global clip over all gradients,
    the same moving averages swapped in at the end of `fit`."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x.sum(1, keepdims=True) * 3).astype("float32")

    def options_copy():
        out = dict(options)
        if "learning_rate" in out:
            out["learning_rate"] = keras.optimizers.schedules.deserialize(
                keras.optimizers.schedules.serialize(out["learning_rate"]))
        return out

    reference = _dense_model()
    reference.compile(keras.optimizers.SGD(**options_copy()), "mse")
    model = _dense_model()
    wrapper = LayerwiseOptimizer(
        keras.optimizers.SGD(**options_copy()),
        groups={"hidden": model.get_layer("hidden").trainable_variables})
    model.compile(wrapper, "mse")
    start = values(model.weights)
    reference.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(values(reference.weights), values(model.weights)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert any(np.abs(a - b).max() > 1e-3
               for a, b in zip(start, values(model.weights)))
    assert int(to_numpy(wrapper.iterations)) == 8
    assert all(int(to_numpy(o.iterations)) == 8
               for o in wrapper.group_optimizers.values())


def test_layerwise_optimizer_counts_steps_without_variables_outside():
    """With every variable in a group, the inner optimizer trains nothing
    but still counts the steps: the groups' learning rates follow its
    schedule, as a single optimizer's would."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = (x.sum(1, keepdims=True) * 3).astype("float32")

    def schedule():
        return keras.optimizers.schedules.ExponentialDecay(0.05, 1, 0.5)

    reference = _dense_model()
    reference.compile(keras.optimizers.SGD(schedule()), "mse")
    model = _dense_model()
    wrapper = LayerwiseOptimizer(keras.optimizers.SGD(schedule()), groups={
        name: model.get_layer(name).trainable_variables
        for name in ("hidden", "head")})
    model.compile(wrapper, "mse")
    reference.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    assert wrapper.group_variables[None] == []
    assert int(to_numpy(wrapper.inner_optimizer.iterations)) == 8
    for a, b in zip(values(reference.weights), values(model.weights)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_layerwise_optimizer_scales_each_group_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = x.sum(1, keepdims=True).astype("float32")
    reference = _dense_model()
    reference.compile(keras.optimizers.SGD(0.1), "mse")
    model = _dense_model()
    wrapper = LayerwiseOptimizer(
        keras.optimizers.SGD(0.1),
        groups={"hidden": model.get_layer("hidden").trainable_variables})
    model.compile(wrapper, "mse")
    wrapper.build(model.trainable_variables)
    wrapper.scales["hidden"].assign(0.25)
    start = values(model.weights)
    reference.train_on_batch(x, y)
    model.train_on_batch(x, y)
    for name, a, b, s in zip(["hidden"] * 2 + ["head"] * 2, start,
                             values(reference.weights),
                             values(model.weights)):
        factor = 0.25 if name == "hidden" else 1.0
        # Steps are ~1e-2; each is a difference of float32 weights ~1, so
        # it carries rounding of ~1e-7.
        np.testing.assert_allclose(s - a, factor * (b - a), rtol=1e-5,
                                   atol=1e-6)
        assert np.abs(b - a).max() > 1e-3
    assert len(wrapper.variables) == len({id(v) for v in wrapper.variables})
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, LayerwiseOptimizer)
    assert loaded.optimizer.group_names == ["hidden"]
    assert scalar(loaded.optimizer.scales["hidden"]) == 0.25
    for a, b in zip(values(wrapper.variables),
                    values(loaded.optimizer.variables)):
        np.testing.assert_array_equal(a, b)
    config = wrapper.get_config()
    assert config["groups"] == {"hidden": [
        v.path for v in model.get_layer("hidden").trainable_variables]}
    assert LayerwiseOptimizer.from_config(config).group_names == ["hidden"]


@pytest.mark.parametrize("options", [
    dict(use_ema=True, ema_momentum=0.5),
    dict(global_clipnorm=0.5),
    dict(loss_scale=True),
], ids=["ema", "global_clipnorm", "loss_scale_optimizer"])
def test_distiller_compositions_match_plain_distillation(data, options):
    """With `min_scale = max_scale = 1` the layer-wise distiller trains
    exactly as plain distillation with the same optimizer configuration:
    each Keras option keeps its meaning through the wrapper."""
    x, y = data
    options = dict(options)
    loss_scale = options.pop("loss_scale", False)

    def optimizer():
        inner = keras.optimizers.SGD(0.05, momentum=0.5, **options)
        return LSO(inner, initial_scale=2.0 ** 10) if loss_scale else inner

    updates = []

    class Updates(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.before = values(self.model.student.trainable_variables)

        def on_train_batch_end(self, batch, logs=None):
            after = values(self.model.student.trainable_variables)
            updates.append(max(np.abs(a - b).max()
                               for a, b in zip(after, self.before)))

    plain = make(None, optimizer=optimizer())
    user = optimizer()
    lw = make(layerwise(min_scale=1.0, max_scale=1.0), optimizer=user)
    fit = dict(batch_size=8, epochs=1, verbose=0, shuffle=False)
    plain.fit(x, y, **fit)
    lw.fit(x, y, callbacks=[Updates()], **fit)
    for a, b in zip(values(plain.student.weights),
                    values(lw.student.weights)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert int(to_numpy(lw.optimizer.iterations)) == int(
        to_numpy(plain.optimizer.iterations))
    assert len(updates) == 4 and all(u > 0 for u in updates)
    if loss_scale:
        assert isinstance(lw.optimizer, LSO)
        assert isinstance(lw.optimizer.inner_optimizer, LayerwiseOptimizer)
        assert lw.optimizer is not user  # a new one around the wrapper
        assert not isinstance(user.inner_optimizer, LayerwiseOptimizer)
        assert scalar(lw.optimizer.dynamic_scale) == 2.0 ** 10


def test_mixed_float16_wraps_loss_scale_optimizer_outside(policy):
    policy("mixed_float16")
    d = make(layerwise(), optimizer=keras.optimizers.SGD(0.1))
    assert isinstance(d.optimizer, LSO)
    assert isinstance(d.optimizer.inner_optimizer, LayerwiseOptimizer)
    assert d.layerwise_state.optimizer is d.optimizer.inner_optimizer


# Several teachers.

def _teachers():
    keras.utils.set_random_seed(5)
    first = make_cnn("t", 8)
    second = make_cnn("t", 8)        # the same layer names, other weights
    third = make_cnn("u", 8)         # no paired layer: top class only
    # The third teacher's vote decides the top class of the ensemble.
    third.get_layer("u_logits").bias.assign([0.0, 0.0, 0.0, 0.0, 30.0])
    return [first, second, third]


def test_several_teachers_average_divergences(data):
    x, _ = data
    teachers = _teachers()
    keras.utils.set_random_seed(6)
    student = make_cnn("s", 4)
    lw = layerwise(signal="attention")
    both = Distiller(teachers, student, layerwise_lr=lw)
    teacher_maps, _ = both.layerwise_state.signal_maps(x)
    assert all(len(maps) == 2 for maps in teacher_maps)
    measured = to_numpy(both.layerwise_state.measure(x))
    alone = [to_numpy(Distiller(t, student, layerwise_lr=lw)
                      .layerwise_state.measure(x)) for t in teachers[:2]]
    np.testing.assert_allclose(measured, (alone[0] + alone[1]) / 2,
                               rtol=1e-5)
    assert np.abs(alone[0] - alone[1]).max() > 1e-4


def test_several_teachers_share_the_top_class(data):
    x, _ = data
    teachers = _teachers()
    keras.utils.set_random_seed(6)
    student = make_cnn("s", 4)
    d = Distiller(teachers, student, layerwise_lr=layerwise(
        signal="jacobian"))
    teacher_maps, student_maps = d.layerwise_state.signal_maps(x)
    # The top class is the argmax of the three teachers' averaged logits
    # (the third has no paired layer but votes).
    logits = [t.predict(x, verbose=0) for t in teachers]
    classes = np.argmax(np.mean(logits, 0), -1)
    assert np.all(classes == 4)
    assert np.any(np.argmax(logits[0], -1) != 4)
    positions = 4 * 4
    for model, got in ((teachers[0], teacher_maps[1][0]),
                       (teachers[1], teacher_maps[1][1]),
                       (student, student_maps[1])):
        kernel = to_numpy(model.layers[-1].kernel.value)
        expected = ((kernel[:, classes] / positions) ** 2).mean(0)
        got = to_numpy(got)[..., 0]
        np.testing.assert_allclose(got, np.broadcast_to(
            expected[:, None, None], got.shape), rtol=1e-4)


def test_several_teachers_train(data):
    x, y = data
    d = Distiller(_teachers(), make_cnn("s", 4),
                  terms=[Term(KD(4.0), weight=0.9)], student_loss_weight=0.1,
                  layerwise_lr=layerwise(signal="hessian", update_every=2))
    d.compile(optimizer=keras.optimizers.Adam(1e-2), loss=SCCE)
    history = d.fit(x, y, epochs=2, batch_size=8, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    for key in SCALE_KEYS:
        assert np.all(np.isfinite(history[key]))
    with pytest.raises(ValueError, match="No teacher has the layer 't_x'"):
        Distiller(_teachers(), make_cnn("s", 4), layerwise_lr=layerwise(
            pairs=[("s_stage1", "t_x"), ("s_stage2", "t_stage2")]))


# Errors before training.

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


def test_optimizer_errors():
    built = keras.optimizers.SGD()
    built.build(make_cnn("x", 2).trainable_variables)
    with pytest.raises(ValueError, match="already built"):
        make(layerwise(), optimizer=built)
    with pytest.raises(ValueError, match="LossScaleOptimizer\\(Layerwise"):
        LayerwiseOptimizer(LSO(keras.optimizers.SGD()), groups={"a": []})
    with pytest.raises(ValueError, match="non-empty dict"):
        LayerwiseOptimizer(keras.optimizers.SGD(), groups={})
    model = _dense_model()
    frozen = LayerwiseOptimizer(keras.optimizers.SGD(), groups={
        "hidden": model.get_layer("hidden").trainable_variables})
    with pytest.raises(ValueError, match="group 'hidden'.*frozen"):
        frozen.build(model.get_layer("head").trainable_variables)
    d = make(layerwise())
    other = LayerwiseOptimizer(keras.optimizers.SGD(), groups={
        "s_stage1": d.student.get_layer("s_stage1").trainable_variables})
    with pytest.raises(ValueError, match="groups \\['s_stage1'\\]"):
        d.compile(optimizer=other, loss=SCCE)


@pytest.mark.parametrize("loss_scale", [False, True],
                         ids=["plain", "loss_scale_optimizer"])
def test_gradient_accumulation_is_refused_at_compile(loss_scale):
    user = keras.optimizers.SGD(0.1, gradient_accumulation_steps=4)
    if loss_scale:
        user = LSO(user)
    with pytest.raises(ValueError, match=(
            "does not support `gradient_accumulation_steps`, set to 4 on "
            "the optimizer 'sgd'.*batches 4 times larger")):
        make(layerwise(), optimizer=user)
    inner = user.inner_optimizer if loss_scale else user
    assert not inner.built  # the user's optimizer is left as it was
    model = _dense_model()
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        LayerwiseOptimizer(
            keras.optimizers.Adam(gradient_accumulation_steps=2),
            groups={"hidden": model.get_layer("hidden").trainable_variables})
    # Set after construction: refused when the optimizer is built.
    wrapper = LayerwiseOptimizer(keras.optimizers.SGD(), groups={
        "hidden": model.get_layer("hidden").trainable_variables})
    wrapper.inner_optimizer.gradient_accumulation_steps = 2
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        wrapper.build(model.trainable_variables)


def test_public_name():
    assert keras_kd.LayerwiseLearningRate is LayerwiseLearningRate
    assert keras_kd.LayerwiseOptimizer is LayerwiseOptimizer

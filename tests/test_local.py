import types
import weakref

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, LocalModules, Term
from keras_kd.losses import KD, ActivationMapping, FeatureMSE

from backend_utils import value_and_grad
from conftest import NUM_CLASSES, assert_augmented_once_per_training_step
from conftest import make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# make_cnn layers: stage1 -> [bn] -> pool -> stage2 -> gap -> logits.
SPLITS = ["s_stage1", "s_stage2"]
TEACHER = ["t_stage1", "t_stage2"]


def make_lakd(student=None, teacher=None, terms=None, batchnorm=True,
              split_at=SPLITS, teacher_layers=TEACHER, alpha=1.0, beta=0.1):
    teacher = teacher or make_cnn("t", 8, batchnorm=batchnorm)
    student = student or make_cnn("s", 4, batchnorm=batchnorm)
    terms = terms if terms is not None else [Term(KD(temperature=4.0), 0.9)]
    return Distiller(teacher, student, terms=terms, student_loss_weight=0.1,
                     local_modules=LocalModules(split_at, teacher_layers,
                                                alpha=alpha, beta=beta))


def compile_(d, optimizer=None, **kwargs):
    d.compile(optimizer=optimizer or keras.optimizers.SGD(0.05, momentum=0.9),
              loss=SCCE, metrics=["accuracy"], **kwargs)
    return d


def snapshot(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def layer_vars(model, names):
    return [v for n in names for v in model.get_layer(n).trainable_variables]


# Module structure: layers of each module (no batch norm in these models).
MODULE_LAYERS = [["s_stage1"], ["s_pool", "s_stage2"], ["s_gap", "s_logits"]]


def test_modules_cover_the_student_as_a_chain():
    d = make_lakd(batchnorm=False)
    runner = d.local_plan
    names = [[layer.name for layer in m.layers] for m in runner.parts]
    assert [sorted(n) for n in names] == [sorted(n) for n in MODULE_LAYERS]
    # Modules run the student's own layers (no copies).
    stage2 = next(layer for layer in runner.parts[1].layers
                  if layer.name == "s_stage2")
    assert stage2 is d.student.get_layer("s_stage2")
    # 4 vs 8 and 8 vs 16 channels: one adapter per split, owned by it.
    assert list(d.adapters) == ["local_1", "local_2"]
    owned = {id(v) for v in runner.module_variables(0)}
    assert {id(v) for v in d.adapters["local_1"].trainable_variables} <= owned


def gradients_of(fn, variables):
    """`fn()` and its gradient with respect to each of `variables`, on any
    backend: the variables are read from differentiated values."""
    def with_values(*values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn()

    return value_and_grad(with_values,
                          *[keras.ops.convert_to_numpy(v) for v in variables])


def module_loss(d, x, y, k):
    """Module `k`'s loss, by the plan's own code path, after modules
    `0..k-1` ran on the same batch with the hand-off the trainers use."""
    plan = d.local_plan
    x = keras.ops.convert_to_tensor(x)
    stream = plan.teacher_stream(x)
    h = x
    for j in range(k + 1):
        stream.advance(j)
        module = plan.module_losses(j, keras.ops.stop_gradient(h), y, None,
                                    stream, training=True)
        h = module.output
    return module.losses.total


def test_module_loss_has_exactly_zero_gradient_on_earlier_modules(data):
    x, y = data
    d = compile_(make_lakd())
    plan = d.local_plan
    variables = d.trainable_variables
    owner = {id(v): k for k in range(plan.num_modules)
             for v in plan.module_variables(k)}
    for k in range(plan.num_modules):
        _, grads = gradients_of(lambda k=k: module_loss(d, x, y, k),
                                variables)
        own = [g for v, g in zip(variables, grads) if owner[id(v)] == k]
        assert sum(float(np.abs(g).sum()) for g in own) > 0
        for v, g in zip(variables, grads):
            if owner[id(v)] < k:
                assert not np.any(g), (k, v.path)


def test_update_of_a_module_ignores_later_modules_weights(data):
    x, y = data

    def first_two_modules_after_step(perturb, local):
        keras.utils.set_random_seed(2)
        if local:
            d = make_lakd(batchnorm=False)
        else:  # end to end, same losses, for contrast
            d = Distiller(make_cnn("t", 8, batchnorm=False),
                          make_cnn("s", 4, batchnorm=False),
                          terms=[Term(KD(4.0), 0.9)] + [
                              Term(ActivationMapping(), teacher_layer=t,
                                   student_layer=s)
                              for s, t in zip(SPLITS, TEACHER)],
                          student_loss_weight=0.1)
        compile_(d)
        if perturb:  # change the weights of the last module only
            rng = np.random.default_rng(0)
            for v in layer_vars(d.student, ["s_logits"]):
                v.assign(v + rng.normal(size=v.shape).astype("float32"))
        variables = layer_vars(d.student, ["s_stage1", "s_stage2"])
        before = snapshot(variables)
        d.train_on_batch(x, y)
        return [a - b for a, b in zip(snapshot(variables), before)]

    base = first_two_modules_after_step(False, local=True)
    moved = first_two_modules_after_step(True, local=True)
    for a, b in zip(base, moved):
        np.testing.assert_array_equal(a, b)
    # End to end, the same change reaches the earlier layers' update.
    base = first_two_modules_after_step(False, local=False)
    moved = first_two_modules_after_step(True, local=False)
    assert any(not np.allclose(a, b, rtol=1e-2) for a, b in zip(base, moved))


def test_each_module_is_updated_by_its_own_loss_only(data):
    x, y = data
    lr = 0.1
    d = compile_(make_lakd(batchnorm=False),
                 optimizer=keras.optimizers.SGD(lr))
    student, teacher = d.student, d.teacher
    am, kd = ActivationMapping(alpha=1.0, beta=0.1), KD(4.0)

    def stage(model, name):
        return keras.Model(model.input, model.get_layer(name).output)

    # Independent reference: each module's own loss from models built here.
    def own_loss(k):
        if k < 2:
            s_feat = d.adapters[f"local_{k + 1}"](
                stage(student, SPLITS[k])(x))
            return am(stage(teacher, TEACHER[k])(x), s_feat)
        logits = student(x)
        return 0.1 * SCCE(y, logits) + 0.9 * kd(teacher(x), logits)

    expected_grads = []
    for k in range(3):
        variables = layer_vars(student, MODULE_LAYERS[k])
        if k < 2:
            variables += d.adapters[f"local_{k + 1}"].trainable_variables
        _, grads = gradients_of(lambda k=k: own_loss(k), variables)
        expected_grads.append((variables, grads))
    # What an end-to-end sum of the same losses would give the first module.
    _, summed = gradients_of(lambda: own_loss(0) + own_loss(1) + own_loss(2),
                             expected_grads[0][0])

    before = [snapshot(v) for v, _ in expected_grads]
    d.train_on_batch(x, y)
    assert int(d.optimizer.iterations) == 1  # one update per batch
    for (variables, grads), old in zip(expected_grads, before):
        for v, g, w in zip(variables, grads, old):
            np.testing.assert_allclose(keras.ops.convert_to_numpy(v),
                                       w - lr * g, rtol=1e-4,
                                       atol=1e-6, err_msg=v.path)
    # The test separates the two: the summed loss moves module 1 otherwise.
    own = expected_grads[0][1]
    assert max(float(np.abs(a - b).max()) for a, b in zip(own, summed)) > 1e-4


def test_regularization_is_in_the_loss_and_the_update_of_its_module(data):
    x, y = data
    lr, l2 = 0.1, 0.05

    def one_step(regularizer):
        keras.utils.set_random_seed(5)  # the same weights in both runs
        student = make_cnn("s", 4, batchnorm=False, regularizer=regularizer)
        d = compile_(make_lakd(student=student, batchnorm=False),
                     optimizer=keras.optimizers.SGD(lr))
        before = snapshot(d.trainable_variables)
        logs = d.train_on_batch(x, y, return_dict=True)
        return d, logs, before, snapshot(d.trainable_variables)

    d, logs, before, after = one_step(keras.regularizers.L2(l2))
    _, plain_logs, plain_before, plain_after = one_step(None)
    for a, b in zip(before, plain_before):
        np.testing.assert_array_equal(a, b)
    kernel = d.student.get_layer("s_stage2").kernel
    index = next(i for i, v in enumerate(d.trainable_variables)
                 if v is kernel)
    # The L2 penalty by hand, from the weights the step started from.
    penalty = l2 * float(np.sum(before[index].astype("float64") ** 2))
    assert penalty > 1e-3

    def module_sum(logs):
        return (logs["local_1_loss"] + logs["local_2_loss"]
                + 0.1 * logs["student_loss"] + 0.9 * logs["kd_loss"])

    # (a) The logged loss of the step: the module losses plus the penalty.
    np.testing.assert_allclose(plain_logs["loss"], module_sum(plain_logs),
                               rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], module_sum(logs) + penalty,
                               rtol=1e-5)
    # (b) Plain SGD: the penalty adds its gradient, 2 * l2 * w, to the
    # regularized kernel's update (that of module 2) and to nothing else.
    for i, (reg, no_reg, w) in enumerate(zip(after, plain_after, before)):
        expected = -lr * 2 * l2 * w if i == index else np.zeros_like(w)
        np.testing.assert_allclose(reg - no_reg, expected, rtol=1e-3,
                                   atol=1e-6,
                                   err_msg=d.trainable_variables[i].path)
    assert np.abs(lr * 2 * l2 * before[index]).max() > 1e-3


def test_fit_history_losses_and_frozen_teacher(data):
    x, y = data
    terms = [Term(KD(4.0), 0.9),
             Term(FeatureMSE(), 0.5, teacher_layer="t_stage2",
                  student_layer="s_pool")]
    d = compile_(make_lakd(terms=terms))
    assert d.local_plan.feature_terms == [[], [1], []]  # s_pool is in module 2
    teacher_before = snapshot(d.teacher.weights)
    history = d.fit(x, y, validation_data=(x, y), epochs=1, batch_size=8,
                    verbose=0)
    names = {"loss", "student_loss", "kd_loss", "feature_mse_loss",
             "local_1_loss", "local_2_loss", "accuracy"}
    assert set(history.history) == names | {f"val_{n}" for n in names}
    for a, b in zip(teacher_before, snapshot(d.teacher.weights)):
        np.testing.assert_array_equal(a, b)
    # Evaluation: total = sum of the module losses; no state changes.
    before = snapshot(d.weights)
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    for a, b in zip(before, snapshot(d.weights)):
        np.testing.assert_array_equal(a, b)
    expected = (0.1 * logs["student_loss"] + 0.9 * logs["kd_loss"]
                + 0.5 * logs["feature_mse_loss"] + logs["local_1_loss"]
                + logs["local_2_loss"])
    np.testing.assert_allclose(logs["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        logs["student_loss"], float(SCCE(y, d.student.predict(x, verbose=0))),
        rtol=1e-5)
    # Unlabelled data: pure distillation.
    history = d.fit(x, epochs=1, batch_size=16, verbose=0)
    assert set(history.history) == {"loss", "kd_loss", "feature_mse_loss",
                                    "local_1_loss", "local_2_loss"}


def test_each_layer_runs_forward_once_per_step(data):
    x, y = data
    d = compile_(make_lakd(split_at=["s_bn", "s_stage2"],
                           teacher_layers=["t_bn", "t_stage2"]))
    bn = d.student.get_layer("s_bn")
    pre_bn = keras.Model(d.student.input,
                         d.student.get_layer("s_stage1").output)
    batch_mean = np.mean(keras.ops.convert_to_numpy(pre_bn(x, training=False)),
                         axis=(0, 1, 2))
    d.train_on_batch(x, y)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean),
                               0.5 * batch_mean, rtol=1e-4, atol=1e-6)


class Probe(keras.layers.Layer):
    """Identity layer for eager runs: `record` keeps a weak reference to
    its input; `check` notes whether that recorded tensor is still alive."""

    def __init__(self, log, role, **kwargs):
        super().__init__(**kwargs)
        self.log, self.role = log, role

    def compute_output_shape(self, input_shape):
        return input_shape

    def call(self, x):
        if self.role == "record":
            self.log.ref = weakref.ref(x)
        else:
            self.log.alive = self.log.ref() is not None
        return x


def test_module_activations_are_released_before_next_module(data):
    x, y = data

    def alive_in_module_2(local):
        log = types.SimpleNamespace()  # a dict would be copied by Keras
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(4, 3, padding="same", name="p_conv")(inputs)
        h = Probe(log, "record")(h)  # an activation inside module 1
        h = keras.layers.Conv2D(4, 3, padding="same", name="p_split")(h)
        h = Probe(log, "check")(h)  # runs during module 2's forward
        h = keras.layers.GlobalAveragePooling2D()(h)
        student = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))
        if local:
            d = make_lakd(student=student, split_at=["p_split"],
                          teacher_layers=["t_stage1"])
        else:
            d = Distiller(make_cnn("t", 8), student, terms=[
                Term(KD(), 0.9), Term(ActivationMapping(),
                                      teacher_layer="t_stage1",
                                      student_layer="p_split")])
        compile_(d, run_eagerly=True)
        d.train_on_batch(x, y)
        return log.alive

    assert alive_in_module_2(local=True) is False
    assert alive_in_module_2(local=False) is True  # one tape holds it


@pytest.mark.backends("tensorflow", "jax")
def test_jit_compile_matches(data):
    x, y = data
    results = []
    for jit in (False, True):
        keras.utils.set_random_seed(7)
        d = compile_(make_lakd(), jit_compile=jit, run_eagerly=not jit)
        logs = d.train_on_batch(x, y, return_dict=True)
        results.append((logs, snapshot(d.student.weights)))
    for key in results[0][0]:
        np.testing.assert_allclose(results[0][0][key], results[1][0][key],
                                   rtol=1e-3, atol=1e-5, err_msg=key)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_save_load_and_export_whole_student(tmp_path, data):
    x, y = data
    d = compile_(make_lakd())
    d.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "lakd.keras")
    d.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.local_modules, LocalModules)
    assert loaded.local_modules.get_config() == d.local_modules.get_config()
    for a, b in zip(snapshot(d.weights), snapshot(loaded.weights)):
        np.testing.assert_array_equal(a, b)
    assert int(loaded.optimizer.iterations) == int(d.optimizer.iterations)
    d.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(snapshot(d.student.weights),
                    snapshot(loaded.student.weights)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    tf = pytest.importorskip("tensorflow")
    export = str(tmp_path / "student")
    d.export_student(export, verbose=False)
    reloaded = tf.saved_model.load(export)
    out = reloaded.serve(tf.constant(x)).numpy()
    assert out.shape == (len(x), NUM_CLASSES)  # the logits, not a module
    np.testing.assert_allclose(out, d.student.predict(x, verbose=0),
                               atol=1e-5)
    assert len(reloaded.variables) == len(d.student.weights)


def test_config_round_trip():
    d = make_lakd()
    clone = Distiller.from_config(d.get_config())
    assert repr(clone.local_modules) == repr(d.local_modules)
    assert list(clone.adapters) == list(d.adapters)
    spec = LocalModules(["a"], ["b"], alpha=2.0, beta=0.0, pooling="max",
                        normalize="minmax", name="lakd")
    again = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(spec))
    assert again.get_config() == spec.get_config()


def test_teacher_runs_in_segments_when_it_is_a_chain(data):
    x, y = data
    logs = []
    for segments in (True, False):
        keras.utils.set_random_seed(4)
        d = compile_(make_lakd(batchnorm=False))
        assert d.local_plan.teacher_segments is not None
        if not segments:
            d.local_plan.teacher_segments = None  # one teacher forward instead
        logs.append(d.evaluate(x, y, return_dict=True, verbose=0))
    for key in logs[0]:
        np.testing.assert_allclose(logs[0][key], logs[1][key], rtol=1e-5,
                                   err_msg=key)
    # A teacher that `teacher_layers` do not cut into a chain runs whole.
    teacher = residual_student()
    d = compile_(make_lakd(teacher=teacher, split_at=["s_stage1"],
                           teacher_layers=["r_conv2"]))
    assert d.local_plan.teacher_segments is None
    assert np.isfinite(d.train_on_batch(x, y, return_dict=True)["loss"])


# Errors raised at construction, before any training.

def residual_student():
    inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, padding="same", name="r_conv1")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", name="r_conv2")(a)
    c = keras.layers.Add(name="r_add")([a, b])
    c = keras.layers.Conv2D(8, 3, padding="same", name="r_conv3")(c)
    x = keras.layers.GlobalAveragePooling2D(name="r_gap")(c)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES,
                                                  name="r_logits")(x),
                       name="r")


def test_split_that_is_not_a_chain():
    with pytest.raises(ValueError) as err:
        make_lakd(student=residual_student(), split_at=["r_conv2"],
                  teacher_layers=["t_stage1"])
    message = str(err.value)
    assert "chain" in message and "'r_add'" in message
    assert "'r_conv1'" in message and "module 2" in message
    # Splitting after the merge is a chain.
    d = make_lakd(student=residual_student(), split_at=["r_add"],
                  teacher_layers=["t_stage1"])
    assert len(d.local_plan.parts) == 2


def test_unknown_names_and_wrong_lengths():
    with pytest.raises(ValueError, match="'s_stage3'.*student.*s_stage"):
        make_lakd(split_at=["s_stage3"], teacher_layers=["t_stage1"])
    with pytest.raises(ValueError, match="'t_stage9'.*teacher"):
        make_lakd(teacher_layers=["t_stage1", "t_stage9"])
    with pytest.raises(ValueError, match="1 name.*`split_at` has 2"):
        LocalModules(SPLITS, ["t_stage1"])
    with pytest.raises(ValueError, match="more than once"):
        LocalModules(["s_stage1", "s_stage1"], TEACHER)
    with pytest.raises(TypeError, match="list of layer names"):
        LocalModules("s_stage1", "t_stage1")
    with pytest.raises(TypeError, match="LocalModules"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4),
                  local_modules={"split_at": SPLITS})


def test_bad_split_points():
    with pytest.raises(ValueError, match="from input to output.*'s_stage1'"):
        make_lakd(split_at=["s_stage2", "s_stage1"])
    with pytest.raises(ValueError, match="no layer.*'s_logits'"):
        make_lakd(split_at=["s_logits"], teacher_layers=["t_logits"])
    with pytest.raises(ValueError, match="spatial axis.*'s_gap'"):
        make_lakd(split_at=["s_gap"], teacher_layers=["t_gap"])
    with pytest.raises(ValueError, match="pooled.*'s_stage1'"):
        make_lakd(student=make_cnn("s", 4, size=9),
                  teacher=make_cnn("t", 8, size=9), split_at=["s_stage1"],
                  teacher_layers=["t_stage2"])
    shared = keras.layers.Conv2D(1, 3, padding="same", name="shared")
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="x_conv")(shared(
        shared(inputs)))
    out = keras.layers.Dense(NUM_CLASSES)(
        keras.layers.GlobalAveragePooling2D()(h))
    with pytest.raises(ValueError, match="'shared' in `split_at` is called 2 times"):
        make_lakd(student=keras.Model(inputs, out), split_at=["shared"],
                  teacher_layers=["t_stage1"])


def test_public_name():
    assert keras_kd.LocalModules is LocalModules
    assert keras_kd.losses.ActivationMapping is ActivationMapping


def test_local_modules_and_layerwise_lr_are_exclusive():
    with pytest.raises(ValueError, match="cannot be combined"):
        Distiller(make_cnn("t", 8), make_cnn("s", 4),
                  local_modules=LocalModules(SPLITS, TEACHER),
                  layerwise_lr=keras_kd.LayerwiseLearningRate(
                      [("s_stage1", "t_stage1"), ("s_stage2", "t_stage2")]))


def test_several_teachers_average_each_module_loss(data):
    x, y = data
    teachers = [make_cnn("t", 8), make_cnn("t", 8)]  # same layer names
    d = compile_(Distiller(
        teachers, make_cnn("s", 4), terms=[Term(KD(4.0), 0.9)],
        student_loss_weight=0.1, diagnostics=["top1_agreement"],
        local_modules=LocalModules(SPLITS, TEACHER)))
    assert d.local_plan.teacher_segments is None  # teachers run whole
    logs = d.evaluate(x, y, batch_size=32, return_dict=True, verbose=0)
    am = ActivationMapping()
    for k, (s_layer, t_layer) in enumerate(zip(SPLITS, TEACHER)):
        feature = d.adapters[f"local_{k + 1}"](keras.Model(
            d.student.input, d.student.get_layer(s_layer).output)(x))
        expected = np.mean([float(am(keras.Model(
            t.input, t.get_layer(t_layer).output)(x), feature))
            for t in teachers])
        np.testing.assert_allclose(logs[f"local_{k + 1}_loss"], expected,
                                   rtol=1e-5)
    mean_logits = np.mean([keras.ops.convert_to_numpy(t(x))
                           for t in teachers], axis=0)
    student = d.student.predict(x, verbose=0)
    np.testing.assert_allclose(logs["kd_loss"],
                               float(KD(4.0)(mean_logits, student)),
                               rtol=1e-5)
    np.testing.assert_allclose(
        logs["top1_agreement"],
        np.mean(mean_logits.argmax(-1) == student.argmax(-1)), rtol=1e-6)
    history = d.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert {"local_1_loss", "local_2_loss", "top1_agreement"} <= set(
        history.history)


@pytest.mark.parametrize("teachers", [1, 2])
def test_augmentations_apply_in_training_steps_only(data, teachers):
    x, y = data
    teacher_aug = keras_kd.augment.weak(flip=False, seed=3)
    student_aug = keras_kd.augment.weak(flip=False, seed=4)
    d = compile_(Distiller(
        [make_cnn("t", 8) for _ in range(teachers)], make_cnn("s", 4),
        terms=[Term(KD(4.0), 0.9)], teacher_augmentation=teacher_aug,
        student_augmentation=student_aug,
        local_modules=LocalModules(SPLITS, TEACHER)))
    # One teacher still runs segment by segment, after its augmentation.
    assert (d.local_plan.teacher_segments is not None) == (teachers == 1)
    assert_augmented_once_per_training_step(
        d, [teacher_aug, student_aug], x, y)

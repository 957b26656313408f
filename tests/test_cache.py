"""Teacher caches (`keras_kd.cache`): training from cached outputs is
training with the live teachers; caches are checked before they are used."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import Distiller, Term
from keras_kd.cache import CACHE_KEY, TeacherCache, reconstruct_logits
from keras_kd.losses import (CMKD, DIST, KD, AttentionTransfer,
                             PearsonCorrelation, SpearmanCorrelation)
from keras_kd.teachers import Teachers

from backend_utils import BACKEND, to_numpy
from conftest import NUM_CLASSES, make_cnn

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
BATCH = 8


def clone(model):
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def distiller(teacher, student, terms=None, **kwargs):
    """A compiled distiller on a copy of `student`. XLA is off: the live and
    the cached steps are different programs, which XLA may round
    differently (see docs/teacher_cache.md)."""
    d = Distiller(teacher, clone(student), terms=terms,
                  student_loss_weight=0.1, **kwargs)
    d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=SCCE,
              jit_compile=False)
    return d


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(a.get_weights(), b.get_weights()))


def cache_of(teacher, x, **kwargs):
    kwargs.setdefault("batch_size", BATCH)
    return keras_kd.cache_teacher_outputs(teacher, x, verbose=0, **kwargs)


FINAL_OUTPUT_TERMS = [
    Term(KD(temperature=4.0), weight=0.5), Term(DIST()),
    Term(PearsonCorrelation()), Term(SpearmanCorrelation()), Term(CMKD()),
]


def test_full_cache_trains_as_the_live_teacher(data, monkeypatch):
    x, y = data
    sample_weight = np.random.default_rng(2).uniform(size=len(x))
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    live = distiller(teacher, student, FINAL_OUTPUT_TERMS)
    cached = distiller(teacher, student, FINAL_OUTPUT_TERMS)
    fit = dict(sample_weight=sample_weight, batch_size=BATCH, epochs=2,
               shuffle=False, verbose=0)
    live_history = live.fit(x, y, **fit).history

    # The cached distiller never runs a teacher.
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran")

    monkeypatch.setattr(Teachers, "__call__", no_teacher)
    cached_history = cached.fit(cache.inputs(x), y, **fit).history
    assert max_difference(live.student, student) > 1e-3  # it trained
    # Equal up to rounding, which these 8 steps amplify to weight
    # differences of up to 1e-4; a misaligned or noisy cache moves them by
    # 0.016 or more (docs/teacher_cache.md, benchmarks/cache_rounding.py).
    assert max_difference(live.student, cached.student) <= 1e-3
    for name, values in live_history.items():
        np.testing.assert_allclose(cached_history[name], values, rtol=1e-3)
    cached_logs = cached.evaluate(cache.inputs(x), y, return_dict=True,
                                  verbose=0)
    monkeypatch.undo()
    live_logs = live.evaluate(x, y, return_dict=True, verbose=0)
    for name, value in live_logs.items():
        np.testing.assert_allclose(cached_logs[name], value, rtol=1e-3)
    # `predict` and `call` give the student the inputs alone.
    np.testing.assert_allclose(
        cached.predict(cache.inputs(x), batch_size=BATCH, verbose=0),
        cached.predict(x, batch_size=BATCH, verbose=0))


def test_shuffled_cache_stays_aligned_with_its_samples(data):
    """Keras shuffles the cached outputs with their samples: the same seed
    gives the same weights as the live teacher."""
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    live = distiller(teacher, student, [Term(KD())])
    cached = distiller(teacher, student, [Term(KD())])
    keras.utils.set_random_seed(7)
    live.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    keras.utils.set_random_seed(7)
    cached.fit(cache.inputs(x), y, batch_size=BATCH, epochs=2, verbose=0)
    assert max_difference(live.student, cached.student) <= 1e-6
    # A cache paired with the samples in another order trains otherwise.
    wrong = distiller(teacher, student, [Term(KD())])
    keras.utils.set_random_seed(7)
    wrong.fit(cache.inputs(x[::-1], check_samples=False), y, batch_size=BATCH,
              epochs=2, verbose=0)
    assert max_difference(live.student, wrong.student) > 1e-4


def test_student_augmentation_with_a_cache(data):
    """The student augments its inputs alone: with equally seeded
    augmentations, the cached and the live distillers train alike."""
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    models = []
    for fit_x in (x, cache.inputs(x)):
        d = distiller(teacher, student, [Term(KD())],
                      student_augmentation=keras_kd.augment.weak(
                          flip=False, seed=4))
        d.fit(fit_x, y, batch_size=BATCH, shuffle=False, verbose=0)
        models.append(d.student)
    assert max_difference(*models) <= 1e-6


@pytest.mark.parametrize("ensemble", ["logits", "losses"])
def test_ensemble_cache_trains_as_the_live_teachers(data, ensemble):
    x, y = data
    teachers = [make_cnn("t", 8), make_cnn("u", 6)]
    student = make_cnn("s", 4)
    cache = cache_of(teachers, x, ensemble=ensemble)
    assert cache.manifest["ensemble"] == (
        "mean" if ensemble == "logits" else "each")
    live = distiller(teachers, student, [Term(KD())], ensemble=ensemble)
    cached = distiller(teachers, student, [Term(KD())], ensemble=ensemble)
    live.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    cached.fit(cache.inputs(x), y, batch_size=BATCH, shuffle=False, verbose=0)
    assert max_difference(live.student, cached.student) <= 1e-6


def test_cached_features_train_as_the_live_teacher(data):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    terms = [Term(KD()),
             Term(AttentionTransfer(), weight=10.0, teacher_layer="t_stage2",
                  student_layer="s_stage2")]
    with pytest.warns(UserWarning, match="per sample"):
        cache = cache_of(teacher, x, layers=["t_stage2"])
    assert cache.feature_keys == {(0, "t_stage2")}
    assert cache.arrays["features/teacher_0/t_stage2"].shape == (32, 4, 4, 16)
    live = distiller(teacher, student, terms)
    cached = distiller(teacher, student, terms)
    live.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    cached.fit(cache.inputs(x), y, batch_size=BATCH, shuffle=False, verbose=0)
    assert max_difference(live.student, cached.student) <= 1e-6


def test_top_k_rebuilds_the_teacher_distribution():
    from keras_kd.cache.build import _top_k

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(6, 40)).astype("float32")
    log_probs, indices = _top_k(logits, 5)
    assert log_probs.dtype == np.float16 and indices.dtype == np.int16
    rebuilt = to_numpy(reconstruct_logits(log_probs, indices, 40))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = to_numpy(keras.ops.softmax(rebuilt))
    top = np.argsort(-p, axis=-1)[:, :5]
    np.testing.assert_array_equal(np.sort(indices, -1), np.sort(top, -1))
    # Exact on the top k (float16 storage), the rest of the mass spread
    # evenly over the other 35 classes.
    np.testing.assert_allclose(np.take_along_axis(q, top, -1),
                               np.take_along_axis(p, top, -1), rtol=2e-3)
    rest = 1.0 - np.take_along_axis(p, top, -1).sum(-1)
    mask = np.ones_like(p, bool)
    np.put_along_axis(mask, top, False, -1)
    np.testing.assert_allclose(q[mask].reshape(6, 35),
                               np.repeat(rest[:, None] / 35, 35, -1),
                               rtol=2e-2)
    # More classes than int16 holds: int32 indices.
    assert _top_k(rng.normal(size=(2, 40000)), 3)[1].dtype == np.int32


def test_top_k_cache_trains_within_noise_of_the_full_cache():
    """On scikit-learn's digits (1,200 training, 597 test images): a
    logistic-regression teacher (scikit-learn, copied into a Dense layer),
    then MLP students distilled without labels (KD, T=4, Adam 0.02, batch
    200, 8 epochs) from a full cache and from a top-3 cache (of 10
    classes), seeds 0, 1, 2 each. docs/teacher_cache.md records the
    accuracies."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    x_train, y_train, x_test, y_test = x[:1200], y[:1200], x[1200:], y[1200:]
    regression = LogisticRegression(max_iter=500).fit(x_train, y_train)
    teacher = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)],
                               name="teacher")
    teacher.set_weights([regression.coef_.T.astype("float32"),
                         regression.intercept_.astype("float32")])
    full = cache_of(teacher, x_train, batch_size=256)
    top3 = cache_of(teacher, x_train, batch_size=256, top_k=3)
    assert top3.nbytes < full.nbytes / 3

    def mlp():
        return keras.Sequential([
            keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10)], name="student")

    # One distiller for the six runs (compiling is most of the cost): each
    # run starts from its seed's fresh student and a fresh optimizer state.
    student = mlp()
    d = Distiller(teacher, student, terms=[Term(KD(temperature=4.0))])
    d.compile(optimizer=keras.optimizers.Adam(0.02))
    d.optimizer.build(d.trainable_variables)
    fresh_optimizer = [np.array(v) for v in d.optimizer.variables]

    def accuracy(cache, seed):
        keras.utils.set_random_seed(100 + seed)
        student.set_weights(mlp().get_weights())
        for variable, value in zip(d.optimizer.variables, fresh_optimizer):
            variable.assign(value)
        keras.utils.set_random_seed(seed)
        d.fit(cache.inputs(x_train), epochs=8, batch_size=200, verbose=0)
        predicted = np.argmax(student.predict(x_test, verbose=0), -1)
        return float(np.mean(predicted == y_test))

    full_acc = np.array([accuracy(full, s) for s in range(3)])
    top_acc = np.array([accuracy(top3, s) for s in range(3)])
    print(f"{BACKEND}: full {full_acc} mean {full_acc.mean():.4f}; top-3 "
          f"{top_acc} mean {top_acc.mean():.4f}")
    assert full_acc.mean() > 0.85
    noise = max(2 * max(full_acc.std(), top_acc.std()), 0.02)
    assert abs(top_acc.mean() - full_acc.mean()) <= noise


def test_mismatched_caches_are_rejected(data, tmp_path):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    other = make_cnn("t", 8)  # same architecture, other weights
    d = distiller(other, student)
    before = d.student.get_weights()
    with pytest.raises(ValueError, match="other teachers, or other weights"):
        d.fit(cache.inputs(x), y, batch_size=BATCH, verbose=0)
    with pytest.raises(ValueError, match="other teachers"):
        d.fit(x, y, validation_data=(cache.inputs(x), y), verbose=0)
    with pytest.raises(ValueError, match="other teachers"):
        d.evaluate(cache.inputs(x), y, verbose=0)
    with pytest.raises(ValueError, match="other teachers"):
        d.fit(cache.dataset(x, y), verbose=0)
    with pytest.raises(ValueError, match="other teachers"):
        d.train_on_batch(cache.inputs(x), y)
    assert all(np.array_equal(a, b)
               for a, b in zip(before, d.student.get_weights()))

    # Data of another length, or other samples.
    with pytest.raises(ValueError, match="holds 31 samples but the teacher"):
        cache.inputs(x[:-1])
    with pytest.raises(ValueError, match="Sample 0 of `x` differs"):
        cache.inputs(x[::-1])
    with pytest.raises(ValueError, match="holds 31 samples"):
        cache.dataset(x, y[:-1])

    # What a cache cannot replace.
    augmented = distiller(teacher, student,
                          teacher_augmentation=keras_kd.augment.weak())
    with pytest.raises(ValueError, match="teacher_augmentation"):
        augmented.fit(cache.inputs(x), y, verbose=0)
    features = distiller(teacher, student, [
        Term(AttentionTransfer(), teacher_layer="t_stage2",
             student_layer="s_stage2")])
    with pytest.raises(ValueError, match=r"layers=\['t_stage2'\]"):
        features.fit(cache.inputs(x), y, verbose=0)
    teachers = [teacher, make_cnn("u", 6)]
    averaged = cache_of(teachers, x)
    with pytest.raises(ValueError, match="ensemble=\"losses\""):
        distiller(teachers, student, ensemble="losses").fit(
            averaged.inputs(x), y, verbose=0)
    with pytest.raises(ValueError, match="smaller than the number of classes"):
        cache_of(teacher, x, top_k=NUM_CLASSES)

    # An incomplete directory.
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete teacher cache"):
        TeacherCache.load(tmp_path / "partial")


def test_generators_are_checked_and_unchecked_batches_refused(data):
    """`fit` peeks at a generator's first batch to check its cache; a step
    fed a cached batch any other way refuses it until `cache.check`."""
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    batches = list(cache.dataset(x, y, batch_size=BATCH, shuffle=False))

    def generator():
        while True:
            yield from batches

    with pytest.raises(ValueError, match="other teachers"):
        distiller(make_cnn("t", 8), student).fit(
            generator(), steps_per_epoch=2, verbose=0)
    d = distiller(teacher, student)
    d.fit(generator(), steps_per_epoch=4, epochs=2, verbose=0)
    live = distiller(teacher, student)
    live.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert max_difference(live.student, d.student) <= 1e-6

    fresh = distiller(teacher, student)
    batch = keras.tree.map_structure(keras.ops.convert_to_tensor,
                                     batches[0][0])
    with pytest.raises(ValueError, match="was not checked"):
        fresh.distillation_step.teacher_outputs(batch)
    fresh.check_teacher_cache(cache)
    outputs = fresh.distillation_step.teacher_outputs(batch)
    np.testing.assert_array_equal(to_numpy(outputs.outputs),
                                  cache.arrays["outputs"][:BATCH])


def test_fit_checks_its_validation_data_once(data, monkeypatch):
    """`fit` checks `x` and `validation_data` together before the first
    step; the `evaluate` it runs for validation does not check them again
    (the teachers' fingerprint is computed once per `fit`), and an
    `evaluate` of its own checks, also after a `fit` that failed."""
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    d = distiller(teacher, student, [Term(KD())])
    records = []
    build = keras_kd.cache.requirements

    def counted(*args, **kwargs):
        records.append(build(*args, **kwargs))
        return records[-1]

    monkeypatch.setattr(keras_kd.cache, "requirements", counted)
    history = d.fit(cache.inputs(x), y, batch_size=BATCH, epochs=2,
                    validation_data=(cache.inputs(x), y), verbose=0)
    assert len(history.history["val_loss"]) == 2
    assert len(records) == 1
    assert records[0].teachers == ("t",)
    assert [t.name for t in records[0].terms] == ["kd"]
    d.evaluate(cache.inputs(x), y, verbose=0)
    assert len(records) == 2

    class Stop(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        d.fit(cache.inputs(x), y, batch_size=BATCH, callbacks=[Stop()],
              verbose=0)
    other = cache_of(make_cnn("t", 8), x)
    with pytest.raises(ValueError, match="other teachers"):
        d.evaluate(other.inputs(x), y, verbose=0)


def test_dataset_batches_carry_their_own_outputs(data):
    x, y = data
    teacher = make_cnn("t", 8)
    cache = cache_of(teacher, x)
    outputs = to_numpy(teacher(x, training=False))
    dataset = cache.dataset(x, y, batch_size=5, shuffle=True, seed=0)
    assert len(dataset) == 7
    seen = []
    for epoch in range(2):
        rows = []
        for index in range(len(dataset)):
            batch_x, batch_y = dataset[index]
            inputs = batch_x["inputs"]
            (entry,) = batch_x[CACHE_KEY].values()
            # Each row's cached output is the teacher's output on that row.
            row = [int(np.flatnonzero((x == s).all(axis=(1, 2, 3)))[0])
                   for s in inputs]
            np.testing.assert_allclose(entry["outputs"], outputs[row],
                                       atol=1e-5)
            np.testing.assert_array_equal(batch_y, y[row])
            rows += row
        assert sorted(rows) == list(range(32))
        seen.append(rows)
        dataset.on_epoch_end()
    assert seen[0] != seen[1]  # a new order every epoch


def test_on_disk_cache_survives_a_process_restart(data, tmp_path):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    teacher.save(tmp_path / "teacher.keras")
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import keras, numpy as np, keras_kd
        teacher = keras.saving.load_model({str(tmp_path / 'teacher.keras')!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        keras_kd.cache_teacher_outputs(
            teacher, x, batch_size={BATCH}, verbose=0,
            directory={str(tmp_path / 'full')!r})
        keras_kd.cache_teacher_outputs(
            teacher, x, batch_size={BATCH}, top_k=2, verbose=0,
            directory={str(tmp_path / 'top2')!r})
    """)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    subprocess.run([sys.executable, "-c", script], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(__file__)),
                   timeout=600)

    memory = cache_of(teacher, x)
    disk = TeacherCache.load(tmp_path / "full")
    assert isinstance(disk.arrays["outputs"], np.memmap)
    assert disk.tag == memory.tag and len(disk) == 32
    np.testing.assert_array_equal(disk.arrays["outputs"],
                                  memory.arrays["outputs"])
    top2 = TeacherCache.load(tmp_path / "top2")
    assert {k: str(a.dtype) for k, a in top2.arrays.items()} == {
        "log_probs": "float16", "indices": "int16"}
    assert top2.manifest["teachers"][0]["name"] == "t"

    from_memory = distiller(teacher, student, [Term(KD())])
    from_disk = distiller(teacher, student, [Term(KD())])
    from_memory.fit(memory.inputs(x), y, batch_size=BATCH, shuffle=False,
                    verbose=0)
    # (`fit` would shuffle the order of the batches.)
    from_disk.fit(disk.dataset(x, y, batch_size=BATCH, shuffle=False),
                  shuffle=False, verbose=0)
    assert max_difference(from_memory.student, from_disk.student) <= 1e-6
    # Overwriting leaves memory maps of the old files intact.
    before = np.array(disk.arrays["outputs"])
    cache_of(make_cnn("t", 8), x, directory=tmp_path / "full",
             overwrite=True)
    np.testing.assert_array_equal(disk.arrays["outputs"], before)
    assert TeacherCache.load(tmp_path / "full").tag != disk.tag

    # An interrupted build leaves no cache to open, and no partial file.
    def interrupted():
        yield x[:8]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache_of(teacher, interrupted(), directory=tmp_path / "cut")
    assert os.listdir(tmp_path / "cut") == []
    with pytest.raises(FileNotFoundError, match="interrupted"):
        TeacherCache.load(tmp_path / "cut")

    # `save` writes an in-memory cache; the same arrays come back.
    saved = memory.save(tmp_path / "saved")
    np.testing.assert_array_equal(saved.arrays["outputs"],
                                  memory.arrays["outputs"])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        memory.save(tmp_path / "saved")


def test_distiller_trained_from_a_cache_saves_and_loads(data, tmp_path):
    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    d = distiller(teacher, student, [Term(KD())])
    d.fit(cache.inputs(x), y, batch_size=BATCH, verbose=0)
    d.save(tmp_path / "d.keras")
    loaded = keras.saving.load_model(tmp_path / "d.keras")
    for a, b in zip(d.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The loaded teachers have the same fingerprint: the cache still fits.
    d.fit(cache.inputs(x), y, batch_size=BATCH, shuffle=False, verbose=0)
    loaded.fit(cache.inputs(x), y, batch_size=BATCH, shuffle=False,
               verbose=0)
    assert max_difference(d.student, loaded.student) <= 1e-6


@pytest.mark.backends("tensorflow")
def test_tf_data_carries_the_cache(data):
    import tensorflow as tf

    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)
    live = distiller(teacher, student, [Term(KD())])
    live.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    # A dataset of the cached arrays, and the cache zipped with a dataset
    # of single samples.
    sliced = tf.data.Dataset.from_tensor_slices((cache.inputs(x), y))
    zipped = cache.inputs(tf.data.Dataset.from_tensor_slices((x, y)))
    for dataset in (sliced, zipped):
        cached = distiller(teacher, student, [Term(KD())])
        cached.fit(dataset.batch(BATCH), verbose=0)
        assert max_difference(live.student, cached.student) <= 1e-6
    with pytest.raises(ValueError, match="The dataset holds 4 samples"):
        cache.inputs(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    with pytest.raises(ValueError, match="Sample 0"):
        cache.inputs(tf.data.Dataset.from_tensor_slices(x[::-1]))


def two_input_teacher():
    """A teacher of a dict of two inputs: an image and a vector."""
    image = keras.Input((8, 8, 1), name="image")
    extra = keras.Input((3,), name="extra")
    merged = keras.layers.Concatenate()(
        [keras.layers.Flatten()(image), extra])
    return keras.Model({"image": image, "extra": extra},
                       keras.layers.Dense(NUM_CLASSES)(merged), name="two")


def test_every_row_is_compared_with_its_digest(data, tmp_path):
    """Two swapped rows (rows the first/middle/last probes do not see), or
    one input of a dict permuted, are refused by `inputs`, by the batches
    of `dataset` as they are read and by a `tf.data` pipeline; a cache
    written without row digests still loads and checks its probes."""
    import tensorflow as tf

    x, y = data
    teacher = make_cnn("t", 8)
    cache = cache_of(teacher, x)
    assert cache.row_digests.shape == (32, 3)
    swapped = x.copy()
    swapped[[5, 6]] = x[[6, 5]]
    with pytest.raises(ValueError, match="Sample 5 of `x` differs"):
        cache.inputs(swapped)
    cache.inputs(x.astype("float64"))  # another dtype alone passes
    dataset = cache.dataset(swapped, y, batch_size=BATCH, shuffle=False)
    with pytest.raises(ValueError, match="Sample 5 of `x` differs"):
        dataset[0]
    dataset[1]  # rows 8 to 15 are the cache's
    # Shuffled batches, in `fit`: each row compared with its digest.
    with pytest.raises(ValueError, match="Sample [56] of `x` differs"):
        distiller(teacher, make_cnn("s", 4)).fit(
            cache.dataset(swapped, y, batch_size=BATCH, seed=0), verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"\[Sample\] \[5\] \[of the dataset differs"):
        list(cache.inputs(tf.data.Dataset.from_tensor_slices(
            (swapped, y))).batch(BATCH))
    list(cache.inputs(tf.data.Dataset.from_tensor_slices(
        (swapped, y)), check_samples=False).batch(BATCH))

    # One input of a dict permuted.
    rng = np.random.default_rng(3)
    inputs = {"image": x, "extra": rng.normal(size=(32, 3)).astype("f4")}
    two = cache_of(two_input_teacher(), inputs)
    assert two.row_digests.shape == (32, 6)
    permuted = dict(inputs, extra=inputs["extra"][np.r_[0:3, 7, 4:7, 3,
                                                        8:32]])
    with pytest.raises(ValueError, match="Sample 3 of `x` differs"):
        two.inputs(permuted)
    with pytest.raises(ValueError, match="Sample 3 of `x` differs"):
        two.dataset(permuted, batch_size=BATCH, shuffle=False)[0]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"\[Sample\] \[3\] \[of the dataset differs"):
        list(two.inputs(tf.data.Dataset.from_tensor_slices(permuted)))
    assert two.inputs(inputs)["inputs"] is inputs

    # A cache written without row digests: the probes alone.
    cache.save(tmp_path / "old")
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["row_digests"]
    manifest_path.write_text(json.dumps(manifest))
    os.remove(tmp_path / "old" / "row_digests.npy")
    old = TeacherCache.load(tmp_path / "old")
    assert old.row_digests is None
    old.inputs(swapped)  # rows 5 and 6 are not probed
    old.dataset(swapped, y, batch_size=BATCH, shuffle=False)[0]
    with pytest.raises(ValueError, match="Sample 0 of `x` differs"):
        old.inputs(x[::-1])


def test_tf_data_of_unknown_length_must_match_the_cache(data):
    """A `tf.data` pipeline whose length `tf.data` cannot tell beforehand
    is refused when it is longer (one sample inserted at row 10) or
    shorter than the cache, as it is read; of the right length it trains
    as the live teacher."""
    import tensorflow as tf

    x, y = data
    teacher, student = make_cnn("t", 8), make_cnn("s", 4)
    cache = cache_of(teacher, x)

    def unknown(*arrays):
        dataset = tf.data.Dataset.from_tensor_slices(arrays)
        return dataset.filter(lambda *element: True)

    assert int(unknown(x, y).cardinality()) < 0
    inserted = (np.insert(x, 10, x[3], axis=0), np.insert(y, 10, y[3]))
    d = distiller(teacher, student, [Term(KD())])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="holds more than 32 samples"):
        d.fit(cache.inputs(unknown(*inserted), check_samples=False).batch(
            BATCH), verbose=0)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"\[Sample\] \[10\] \[of the dataset"):
        list(cache.inputs(unknown(*inserted)).batch(BATCH))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"holds\] \[31\] \[samples, but the teacher"):
        list(cache.inputs(unknown(x[:-1], y[:-1]),
                          check_samples=False).batch(BATCH))
    with pytest.raises(ValueError, match="The dataset holds 33 samples"):
        cache.inputs(tf.data.Dataset.from_tensor_slices(inserted))
    live = distiller(teacher, student, [Term(KD())])
    live.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0)
    cached = distiller(teacher, student, [Term(KD())])
    cached.fit(cache.inputs(unknown(x, y)).batch(BATCH), verbose=0)
    assert max_difference(live.student, cached.student) <= 1e-6


def test_damaged_cache_files_are_named(data, tmp_path):
    x, _ = data
    directory = tmp_path / "damaged"
    cache_of(make_cnn("t", 8), x, top_k=2, directory=directory)
    TeacherCache.load(directory)
    where = re.escape(f"The teacher cache in '{directory}' is damaged")
    path = directory / "indices.npy"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(ValueError, match=where + r": its file "
                       r"'indices.npy' cannot be read.*truncated.*"
                       r"Rebuild it with `keras_kd.cache_teacher_outputs"):
        TeacherCache.load(directory)
    os.remove(path)
    with pytest.raises(ValueError,
                       match=where + ": its file 'indices.npy' is missing"):
        TeacherCache.load(directory)
    (directory / "manifest.json").write_text('{"format": "keras_kd.')
    with pytest.raises(ValueError, match=where + ": its file "
                       "'manifest.json' is not valid JSON"):
        TeacherCache.load(directory)

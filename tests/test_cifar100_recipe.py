"""`benchmarks/cifar100.py`: the CIFAR-100 recipe, on synthetic data.

Every method trains two steps from a teacher that the script trains
first, on CIFAR-shaped random images written as the `--data-dir` file;
the models are two narrow CNNs with the layer names of
`keras_kd.models.cifar` (`stem`, `stage1`, ..., `pooled`), so that the
feature methods find their layers. The augmentation, the optimizer, the
schedule, the data formats and the results table are checked against
values written here.
"""

import csv
import pickle
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent
                       / "benchmarks"))
import cifar100  # noqa: E402

# mdistiller's `mdistiller/dataset/cifar100.py`.
MDISTILLER_MEAN = (0.5071, 0.4867, 0.4408)
MDISTILLER_STD = (0.2675, 0.2565, 0.2761)
TRAIN, TEST = 128, 64


def narrow_cnn(width):
    """A builder of a CIFAR-shaped CNN named as the zoo's models are."""
    def builder(num_classes=100):
        inputs = keras.Input((32, 32, 3))
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same",
                                use_bias=False, name="conv1")(inputs)
        x = keras.layers.BatchNormalization(name="bn1")(x)
        x = keras.layers.ReLU(name="stem")(x)
        for k in (1, 2, 3):
            x = keras.layers.Conv2D(
                width * k, 3, strides=1 if k == 1 else 2, padding="same",
                name=f"layer{k}_conv")(x)
            x = keras.layers.BatchNormalization(name=f"layer{k}_bn")(x)
            x = keras.layers.Identity(name=f"stage{k}_preact")(x)
            x = keras.layers.ReLU(name=f"stage{k}")(x)
        x = keras.layers.GlobalAveragePooling2D(name="pooled")(x)
        outputs = keras.layers.Dense(num_classes, name="fc")(x)
        return keras.Model(inputs, outputs, name=f"narrow{width}")
    return builder


ARCHITECTURES = {"narrow_t": narrow_cnn(8), "narrow_s": narrow_cnn(4)}


def random_cifar(rng, n):
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 100, n))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar100")
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = (random_cifar(rng, TRAIN),
                                            random_cifar(rng, TEST))
    np.savez(folder / "cifar100.npz", x_train=x_train, y_train=y_train,
             x_test=x_test, y_test=y_test)
    return folder


def recipe(workdir, *extra):
    """Runs the script on the synthetic data: 2 steps of 64 images."""
    argv = ["--teacher", "narrow_t", "--student", "narrow_s",
            "--data-dir", str(workdir), "--out", str(workdir / "out"),
            "--limit", str(TRAIN), "--eval-batch-size", str(TEST),
            "--validation-freq", "2", "--quiet", *extra]
    assert cifar100.main(argv, architectures=ARCHITECTURES) == 0


def results(workdir):
    with open(workdir / "out" / "results_cifar100.csv", newline="") as f:
        return list(csv.DictReader(f))


def epoch_log(workdir, name):
    with open(workdir / "out" / "runs" / name / "epochs.csv",
              newline="") as f:
        return list(csv.DictReader(f))


# What each method must log: its terms, its modules, its scales.
LOGGED = {
    "vanilla": [],
    "kd": ["kd_loss", "student_loss"],
    "at": ["at_stage1_loss", "at_stage2_loss", "at_stage3_loss"],
    "fitnet": ["fitnet_loss"],
    "dist": ["dist_loss"],
    "cmkd": ["cmkd_loss"],
    "lakd": ["local_1_loss", "local_2_loss", "kd_loss"],
    "layerwise": ["lr_scale/stage1", "lr_scale/stage3", "kd_loss"],
    "ensemble": ["kd_loss"],
}


def test_every_method_of_the_issue_is_offered():
    assert set(cifar100.METHODS) == set(LOGGED)


@pytest.mark.parametrize("method", list(LOGGED))
def test_each_method_trains_two_steps(workdir, method):
    pipeline = "tf" if method == "kd" and \
        cifar100.tensorflow_available() else "numpy"
    recipe(workdir, "--method", method, "--epochs", "1",
           "--pipeline", pipeline)

    row = results(workdir)[-1]
    assert (row["method"], row["student"], row["epochs"], row["limit"],
            row["full_run"], row["pipeline"]) == (
                method, "narrow_s", "1", str(TRAIN), "0", pipeline)
    teachers = cifar100.METHODS[method].teachers
    assert row["teacher"] == ",".join(["narrow_t"] * teachers)
    # The teacher was trained first by the script, and reused after.
    assert row["teacher_source"].count("trained here") == teachers
    assert 0 <= float(row["test_top1"]) <= 100

    name = f"{method}_{row['teacher'].replace(',', '+')}_narrow_s_e1_" \
        f"limit{TRAIN}_s0".replace("__", "_")
    log = epoch_log(workdir, name)
    assert len(log) == 1
    for key in LOGGED[method]:
        assert key in log[0], (key, sorted(log[0]))
    if method == "vanilla":
        assert "student_loss" not in log[0]

    # The student was trained: its weights left their initial values.
    fresh = cifar100.build_model("narrow_s", 0, ARCHITECTURES)
    trained = cifar100.build_model("narrow_s", 0, ARCHITECTURES)
    trained.load_weights(workdir / "out" / "runs" / name
                         / "student.weights.h5")
    assert any(not np.allclose(a, b) for a, b in zip(
        fresh.get_weights(), trained.get_weights()))


def test_teachers_are_trained_once_and_kept(workdir):
    recipe(workdir, "--method", "kd", "--epochs", "1", "--pipeline",
           "numpy", "--seed", "3")
    rows = [r for r in results(workdir) if r["method"] == "teacher"]
    seeds = sorted(r["seed"] for r in rows)
    assert seeds.count("3") == 1
    recipe(workdir, "--method", "dist", "--epochs", "1", "--pipeline",
           "numpy", "--seed", "3")
    rows = [r for r in results(workdir) if r["method"] == "teacher"]
    assert sorted(r["seed"] for r in rows).count("3") == 1


def test_a_stopped_run_resumes_after_its_last_epoch(workdir, monkeypatch):
    stop = cifar100.Throughput.on_epoch_begin

    def stop_at_second_epoch(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt
        stop(self, epoch, logs)

    monkeypatch.setattr(cifar100.Throughput, "on_epoch_begin",
                        stop_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        recipe(workdir, "--method", "vanilla", "--epochs", "2",
               "--pipeline", "numpy", "--seed", "5")
    monkeypatch.setattr(cifar100.Throughput, "on_epoch_begin", stop)
    recipe(workdir, "--method", "vanilla", "--epochs", "2", "--pipeline",
           "numpy", "--seed", "5")
    # Epoch 0 ran once: the second call started at epoch 1.
    log = epoch_log(workdir, f"vanilla_narrow_s_e2_limit{TRAIN}_s5")
    assert [row["epoch"] for row in log] == ["0", "1"]
    # A complete run is not run again.
    count = len(results(workdir))
    recipe(workdir, "--method", "vanilla", "--epochs", "2", "--pipeline",
           "numpy", "--seed", "5")
    assert len(results(workdir)) == count


def windows(padded_image):
    """Every 32x32 window of a padded image, and their mirror images."""
    for top in range(9):
        for left in range(9):
            window = padded_image[top:top + 32, left:left + 32]
            yield (top, left, False), window
            yield (top, left, True), window[:, ::-1]


def check_padded_crops_and_flips(images, out):
    mean = np.array(MDISTILLER_MEAN, dtype="float32")
    std = np.array(MDISTILLER_STD, dtype="float32")
    assert out.shape == images.shape and out.dtype == np.float32
    pixels = np.rint((np.asarray(out) * std + mean) * 255).astype(int)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(int)
    seen = set()
    for image, result in zip(padded, pixels):
        found = [where for where, window in windows(image)
                 if np.array_equal(window, result)]
        assert found, "not a window of the zero-padded image"
        seen.add(found[0])
    # Random offsets and flips, not one fixed crop.
    assert len({s[:2] for s in seen}) > 10
    assert {s[2] for s in seen} == {False, True}


def test_numpy_augmentation_is_a_padded_crop_and_flip():
    images, _ = random_cifar(np.random.default_rng(1), 64)
    out = cifar100.augment_numpy(images, np.random.default_rng(2))
    check_padded_crops_and_flips(images, out)


def test_tf_augmentation_is_a_padded_crop_and_flip():
    tf = pytest.importorskip("tensorflow")
    images, _ = random_cifar(np.random.default_rng(1), 64)
    out = cifar100.augment_tf(tf.constant(images),
                              tf.constant([3, 4], dtype=tf.int64))
    check_padded_crops_and_flips(images, out.numpy())


def test_test_images_are_only_normalized():
    images, labels = random_cifar(np.random.default_rng(1), 10)
    batches = cifar100.NumpyBatches(images, labels, 4, train=False)
    x, y = batches[0]
    expected = (images[:4] / 255.0 - MDISTILLER_MEAN) / MDISTILLER_STD
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y, labels[:4])
    assert len(batches) == 3  # the last batch is kept, as PyTorch does


def test_weight_decay_is_pytorchs_coupled_l2():
    lr, momentum, wd = 0.05, 0.9, 5e-4
    w0 = np.array([1.0, -2.0, 3.0], dtype="float32")
    grads = [np.array([0.1, 0.2, -0.3], dtype="float32"),
             np.zeros(3, dtype="float32"),
             np.array([-0.5, 0.0, 0.5], dtype="float32")]
    # torch.optim.SGD(lr, momentum, weight_decay): d = g + wd * w;
    # b = d at the first step, then b = momentum * b + d; w -= lr * b.
    w, b = w0.astype("float64"), None
    for g in grads:
        d = g + wd * w
        b = d if b is None else momentum * b + d
        w = w - lr * b

    variable = keras.Variable(w0)
    optimizer = cifar100.CoupledWeightDecaySGD(lr, momentum=momentum, l2=wd)
    for g in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g)], [variable])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), w,
                               rtol=1e-5)

    # Keras' own weight decay is decoupled: another result.
    variable = keras.Variable(w0)
    decoupled = keras.optimizers.SGD(lr, momentum=momentum, weight_decay=wd)
    for g in grads:
        decoupled.apply([keras.ops.convert_to_tensor(g)], [variable])
    assert not np.allclose(keras.ops.convert_to_numpy(variable), w,
                           rtol=1e-6, atol=0)

    config = optimizer.get_config()
    assert config["l2"] == wd
    assert cifar100.CoupledWeightDecaySGD.from_config(config).l2 == wd


@pytest.mark.backends("jax", "torch")
def test_weight_decay_in_the_stateless_form():
    # JAX's training step applies gradients without naming the variables:
    # the optimizer decays those it was built on.
    lr, momentum, wd = 0.05, 0.9, 5e-4
    w0 = np.array([1.0, -2.0], dtype="float32")
    g = np.array([0.5, 0.25], dtype="float32")
    variable = keras.Variable(w0)
    optimizer = cifar100.CoupledWeightDecaySGD(lr, momentum=momentum, l2=wd)
    optimizer.build([variable])
    values, state = [variable.value], [v.value for v in optimizer.variables]
    for _ in range(2):
        values, state = optimizer.stateless_apply(
            state, [keras.ops.convert_to_tensor(g)], values)
    # Two PyTorch SGD steps (see above).
    b1 = g + wd * w0
    w1 = w0 - lr * b1
    w2 = w1 - lr * (momentum * b1 + g + wd * w1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(values[0]), w2,
                               rtol=1e-5)


def test_learning_rate_schedule_is_mdistillers():
    steps = 782  # ceil(50000 / 64)
    schedule = cifar100.learning_rate_schedule(0.05, 240, steps)

    def lr_at(epoch, step=0):
        return float(schedule(epoch * steps + step))

    # mdistiller: lr * 0.1 ** (number of milestones < epoch), epochs
    # counted from 1.
    for epoch in range(240):
        expected = 0.05 * 0.1 ** sum(epoch + 1 > m for m in (150, 180, 210))
        for step in (0, steps - 1):
            assert lr_at(epoch, step) == pytest.approx(expected), epoch
    assert cifar100.learning_rate_for("mobilenetv2") == 0.01
    assert cifar100.learning_rate_for("resnet8x4") == 0.05
    assert cifar100.milestones_for(24) == [15, 18, 21]


def test_reads_the_official_python_archive(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    originals = {}
    for part, n in (("train", 6), ("test", 3)):
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        with open(folder / part, "wb") as f:
            pickle.dump({b"data": chw.reshape(n, -1),
                         b"fine_labels": labels,
                         b"coarse_labels": [0] * n}, f)
        originals[part] = (chw, labels)
    (x_train, y_train), (x_test, y_test) = cifar100.load_cifar100(
        str(tmp_path))
    for (x, y), part in (((x_train, y_train), "train"),
                         ((x_test, y_test), "test")):
        chw, labels = originals[part]
        assert x.shape == (len(labels), 32, 32, 3)
        # Pixel (row 5, column 7) of channel 2 of image 1.
        assert x[1, 5, 7, 2] == chw[1, 2, 5, 7]
        np.testing.assert_array_equal(y, labels)


def test_a_missing_data_dir_says_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar100.npz"):
        cifar100.load_cifar100(str(tmp_path))


def row(method, best, last, full=True, seed=0):
    return {"method": method, "teacher": "resnet32x4",
            "student": "resnet8x4", "epochs": "240" if full else "2",
            "limit": "", "seed": str(seed), "full_run": "1" if full else "0",
            "test_top1": last, "best_test_top1": best,
            "backend": "jax", "device": "H100", "date": "2027-01-01",
            "command": f"python benchmarks/cifar100.py --method {method}"}


def test_the_table_shows_only_full_runs_beside_published_figures():
    page = cifar100.render_table([
        row("kd", "74.00", "73.80"), row("kd", "74.20", "74.00", seed=1),
        row("dist", "99.00", "99.00", full=False)])
    lines = {line.split(" | ")[0]: line for line in page.splitlines()
             if line.startswith("| ")}
    kd, dist = lines["| KD"], lines["| DIST"]
    assert "73.33 [mdistiller]" in kd
    assert "74.10 ± 0.14 / 73.90 ± 0.14" in kd
    assert "76.31 [dist]" in dist and "not measured yet" in dist
    assert "99.00" not in page
    assert "79.42 [crd]" in lines["| resnet32x4 alone"]
    assert "72.50 [crd]" in lines["| student alone"]
    assert "not recorded" in lines["| CMKD"]
    assert "1 short run(s)" in page
    for key in ("crd", "mdistiller", "dist"):
        assert f"- [{key}] " in page

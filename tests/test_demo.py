"""Tests of the `keras-kd demo` command and `keras_kd.demo.run_demo`.

They run the demo in quick mode (1 epoch, 100 labels), which checks the
plumbing (training, table, SavedModel export, CLI) but says nothing about
the distillation gain; that is measured by `benchmarks/accuracy.py`.
"""

import sys

import keras
import numpy as np
import pytest

pytest.importorskip("sklearn")
# The demo ends with a SavedModel, which needs TensorFlow on every backend.
tf = pytest.importorskip("tensorflow")

from keras_kd import cli, demo  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "student"
    return demo.run_demo(quick=True, seed=0, output=str(output), verbose=0)


@pytest.fixture(scope="module")
def test_images():
    data = demo.load_digits_data(seed=0, num_labels=demo.QUICK_LABELS)
    return data["x_test"][:16]


def test_reported_accuracies_are_those_of_the_returned_models(quick_run):
    # Recomputed through another path than the demo's `accuracy` (a direct
    # call of each model and Keras' accuracy metric) on the held-out split.
    data = demo.load_digits_data(seed=0, num_labels=demo.QUICK_LABELS)
    x_test, y_test = data["x_test"], data["y_test"]
    assert len(x_test) == 540  # 30% of the 1,797 images
    for key in ("teacher", "student_alone", "distilled"):
        model = quick_run["models"][key]
        metric = keras.metrics.SparseCategoricalAccuracy()
        metric.update_state(y_test, model(x_test, training=False))
        assert isinstance(quick_run[key], float)
        np.testing.assert_allclose(quick_run[key], float(metric.result()),
                                   rtol=1e-6, err_msg=key)


def test_exported_student_matches_distilled_student(quick_run, test_images):
    reloaded = tf.saved_model.load(quick_run["export_path"])
    served = reloaded.serve(tf.constant(test_images)).numpy()
    student = quick_run["models"]["distilled"]
    expected = student.predict(test_images, verbose=0)
    assert served.shape == (len(test_images), demo.NUM_CLASSES)
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-5)


def test_export_holds_the_student_only(quick_run):
    reloaded = tf.saved_model.load(quick_run["export_path"])
    exported = sum(int(np.prod(v.shape)) for v in reloaded.variables)
    student = quick_run["models"]["distilled"]
    assert exported == student.count_params()
    assert exported < quick_run["models"]["teacher"].count_params()


def test_student_alone_and_distilled_start_from_the_same_weights():
    first = demo.fresh_student(seed=3)
    second = demo.fresh_student(seed=3)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_labelled_subset_is_part_of_the_training_set():
    data = demo.load_digits_data(seed=1, num_labels=120)
    assert data["x_labeled"].shape == (120, 8, 8, 1)
    assert len(data["x_train"]) + len(data["x_test"]) == 1797
    assert np.unique(data["y_labeled"]).size == demo.NUM_CLASSES
    train_rows = {row.tobytes() for row in data["x_train"]}
    assert all(row.tobytes() in train_rows for row in data["x_labeled"])
    assert 0.0 <= data["x_train"].min() and data["x_train"].max() <= 1.0


def test_matched_epochs_gives_the_same_number_of_steps():
    assert demo.matched_epochs(30, 1257, 300) == 126
    assert demo.matched_epochs(30, 1257, 1257) == 30


def test_format_table_lists_every_row():
    table = demo.format_table({"teacher": 0.98765, "student": 0.5})
    assert "teacher" in table and "0.9877" in table
    assert "student" in table and "0.5000" in table


def test_full_run_prints_a_table_of_test_accuracies():
    rows = {"teacher": 0.98, "student alone": 0.94, "distilled": 0.97}
    text = demo.results_text(rows, quick=False, epochs=30, labels=300)
    assert text.splitlines()[0].split() == ["model", "test", "accuracy"]
    assert "install check" not in text.lower()
    assert "not a comparison" not in text.lower()


def test_quick_run_says_it_is_not_a_comparison():
    rows = {"teacher": 0.9, "student alone": 0.85, "distilled": 0.77}
    text = demo.results_text(rows, quick=True, epochs=1, labels=100)
    lines = text.splitlines()
    words = " ".join(text.split())
    assert lines[0].startswith("Install check (--quick: 1 epoch, 100 labels)")
    assert "accuracies are NOT a comparison" in words
    assert "without --quick" in words
    # The table comes after the notice and its heading is not "test
    # accuracy": the numbers are not presented as a result.
    heading = next(line for line in lines if line.startswith("model"))
    assert lines.index(heading) > 0
    assert "test accuracy" not in text
    assert "install check only" in heading
    assert "0.7700" in text and "0.8500" in text


def test_cli_demo_quick_prints_table_and_exports(tmp_path, capsys):
    output = tmp_path / "cli_student"
    assert cli.main(["demo", "--quick", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "accuracies are NOT a comparison" in " ".join(printed.split())
    assert "accuracy (install check only)" in printed
    assert "test accuracy" not in printed
    assert "teacher" in printed
    assert "student alone" in printed
    assert "distilled student" in printed
    assert str(output) in printed
    assert (output / "saved_model.pb").is_file()


def test_cli_rejects_out_of_range_labels(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--labels", "5"])
    assert exit_info.value.code == 2
    assert "num_labels" in capsys.readouterr().err


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r'pip install "keras-kd\[demo\]"'):
        demo.load_digits_data()

"""A small, self-contained distillation demo on scikit-learn's digits.

The setting is one where a teacher has value beyond its labels: a small CNN
teacher is trained on every labelled training image, while the student only
gets a few hundred labels. Three models are compared on held-out test
images:

* the teacher;
* the student trained alone on its few labels ("student alone");
* the same student architecture, from the same initial weights, distilled
  from the teacher on all training images *without their labels*
  (`Distiller.fit(x_train)`), optionally with a feature term.

The data (1,797 grey 8x8 images of handwritten digits) ships with
scikit-learn, so nothing is downloaded. scikit-learn is the optional
`[demo]` extra and is imported only when the data is loaded.

Every piece (data, model builders, the training recipes) is a public
function so that `benchmarks/accuracy.py` can reuse it.
"""

import math
import os
import time

import keras
import numpy as np

import keras_kd

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)

# Default training recipe of the full demo.
DEFAULT_EPOCHS = 30
DEFAULT_LABELS = 300
DEFAULT_TEMPERATURE = 4.0
DEFAULT_OUTPUT = "keras_kd_demo_student"
DEFAULT_BATCH_SIZE = 32
# Adam learning rates. Both students (alone and distilled) use the larger
# one. At 2e-3, 30 epochs of distillation underfit (seed 0: 96.9% test
# accuracy, against 98.7% at 1e-2), while the student alone scored about
# the same at either rate (94.3% and 94.4% on seed 0).
TEACHER_LEARNING_RATE = 2e-3
STUDENT_LEARNING_RATE = 1e-2
# Settings of `quick=True` (the test suite's run).
QUICK_EPOCHS = 1
QUICK_LABELS = 100

# Names of the layers a feature term reads (both 4x4 maps).
TEACHER_FEATURE_LAYER = "t_stage2"
STUDENT_FEATURE_LAYER = "s_stage2"


def _require_sklearn():
    try:
        from sklearn import datasets, model_selection
    except ImportError as err:  # pragma: no cover - depends on the env
        raise ImportError(
            "The keras-kd demo needs scikit-learn for its bundled digits "
            'data set. Install it with: pip install "keras-kd[demo]"'
        ) from err
    return datasets, model_selection


def load_digits_data(seed=0, num_labels=DEFAULT_LABELS, test_fraction=0.3):
    """Loads scikit-learn's digits and splits them for the demo.

    The images are scaled to [0, 1] and shaped `(n, 8, 8, 1)`. A stratified
    split holds out `test_fraction` of the images for testing; among the
    training images, `num_labels` (stratified as far as possible) are the
    labelled subset the student alone may use.

    Args:
        seed: seed of the split and of the choice of the labelled subset.
        num_labels: number of labelled training images for the student.
        test_fraction: fraction of the 1,797 images held out for testing.

    Returns:
        A dict with `x_train`, `y_train` (all training images and labels;
        the labels are for the teacher only), `x_labeled`, `y_labeled` (the
        student's labelled subset), `x_test` and `y_test`.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: `num_labels` is not between the number of classes and
            the number of training images.
    """
    datasets, model_selection = _require_sklearn()
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    if not NUM_CLASSES <= num_labels <= len(x_train):
        raise ValueError(
            f"`num_labels` must be between {NUM_CLASSES} and the number of "
            f"training images ({len(x_train)}), got {num_labels}."
        )
    if num_labels == len(x_train):
        labeled = np.arange(len(x_train))
    else:
        labeled, _ = model_selection.train_test_split(
            np.arange(len(x_train)), train_size=num_labels, stratify=y_train,
            random_state=seed,
        )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_labeled": x_train[labeled],
        "y_labeled": y_train[labeled],
        "x_test": x_test,
        "y_test": y_test,
    }


def build_teacher(name="teacher"):
    """The demo's teacher: a small CNN (160,554 parameters).

    Args:
        name: model name.

    Returns:
        An untrained functional `keras.Model` mapping `(n, 8, 8, 1)` images
        to `(n, 10)` logits. Its layer `"t_stage2"` outputs a
        `(4, 4, 64)` feature map.
    """
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = keras.layers.Conv2D(
        32, 3, padding="same", activation="relu", name="t_conv1"
    )(inputs)
    x = keras.layers.Conv2D(
        32, 3, padding="same", activation="relu", name="t_stage1"
    )(x)
    x = keras.layers.MaxPooling2D(2, name="t_pool")(x)
    x = keras.layers.Conv2D(
        64, 3, padding="same", activation="relu", name=TEACHER_FEATURE_LAYER
    )(x)
    x = keras.layers.Flatten(name="t_flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="t_dense")(x)
    x = keras.layers.Dropout(0.3, name="t_dropout")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="t_logits")(x)
    return keras.Model(inputs, outputs, name=name)


def build_student(name="student"):
    """The demo's student: a much smaller CNN (3,818 parameters).

    Args:
        name: model name.

    Returns:
        An untrained functional `keras.Model` mapping `(n, 8, 8, 1)` images
        to `(n, 10)` logits. Its layer `"s_stage2"` outputs a `(4, 4, 16)`
        feature map.
    """
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = keras.layers.Conv2D(
        8, 3, padding="same", activation="relu", name="s_stage1"
    )(inputs)
    x = keras.layers.MaxPooling2D(2, name="s_pool")(x)
    x = keras.layers.Conv2D(
        16, 3, padding="same", activation="relu", name=STUDENT_FEATURE_LAYER
    )(x)
    x = keras.layers.Flatten(name="s_flatten")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, name="s_logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _optimizer(learning_rate):
    return keras.optimizers.Adam(learning_rate)


def _sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def accuracy(model, x, y):
    """Top-1 accuracy of a logits model.

    Args:
        model: a `keras.Model` returning logits.
        x: images.
        y: integer labels.

    Returns:
        The accuracy as a Python float in [0, 1].
    """
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def train_supervised(model, x, y, epochs, batch_size=DEFAULT_BATCH_SIZE,
                     learning_rate=TEACHER_LEARNING_RATE, verbose=1):
    """Trains a model with cross-entropy on labels (teacher, student alone).

    Args:
        model: the `keras.Model` to train (logits output).
        x: training images.
        y: integer labels.
        epochs: number of epochs.
        batch_size: batch size.
        learning_rate: Adam learning rate.
        verbose: Keras `fit` verbosity.

    Returns:
        The trained `model`.
    """
    model.compile(
        optimizer=_optimizer(learning_rate), loss=_sparse_ce(),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose)
    return model


def kd_terms(temperature=DEFAULT_TEMPERATURE):
    """Distillation terms: Hinton KD on the logits only.

    Args:
        temperature: KD temperature.

    Returns:
        A list with one `keras_kd.Term`.
    """
    return [keras_kd.Term(keras_kd.losses.KD(temperature=temperature))]


def kd_feature_terms(temperature=DEFAULT_TEMPERATURE, feature_weight=1.0):
    """Distillation terms: Hinton KD plus a FitNet hint on the 4x4 maps.

    The hint is `FeatureMSE` between the teacher's `t_stage2` (64 channels)
    and the student's `s_stage2` (16 channels); the `Distiller` adds a
    trainable 1x1 adapter on the student side, which is not exported.

    Args:
        temperature: KD temperature.
        feature_weight: weight of the feature term.

    Returns:
        A list of two `keras_kd.Term`.
    """
    return kd_terms(temperature) + [
        keras_kd.Term(
            keras_kd.losses.FeatureMSE(), weight=feature_weight,
            teacher_layer=TEACHER_FEATURE_LAYER,
            student_layer=STUDENT_FEATURE_LAYER,
        )
    ]


def distill(teacher, student, terms, x, epochs,
            batch_size=DEFAULT_BATCH_SIZE,
            learning_rate=STUDENT_LEARNING_RATE, verbose=1,
            **distiller_kwargs):
    """Distils `teacher` into `student` on unlabelled images.

    `Distiller.fit(x)` is called without labels, so the student's own loss
    is skipped and the student learns only from the teacher.

    Args:
        teacher: the trained teacher.
        student: the student to train (modified in place).
        terms: list of `keras_kd.Term`.
        x: unlabelled training images.
        epochs: number of epochs.
        batch_size: batch size.
        learning_rate: Adam learning rate.
        verbose: Keras `fit` verbosity.
        **distiller_kwargs: further `keras_kd.Distiller` arguments, such as
            `local_modules` or `layerwise_lr`.

    Returns:
        The trained `keras_kd.Distiller`.
    """
    # No labels reach `fit`, so the student loss is skipped anyway; its
    # weight is 0 to make plain that the labels play no part.
    distiller = keras_kd.Distiller(
        teacher=teacher, student=student, terms=terms,
        student_loss_weight=0.0, **distiller_kwargs,
    )
    distiller.compile(optimizer=_optimizer(learning_rate), loss=_sparse_ce())
    distiller.fit(x, epochs=epochs, batch_size=batch_size, verbose=verbose)
    return distiller


def matched_epochs(epochs, num_train, num_labeled):
    """Epochs over a labelled subset that give about as many optimizer
    steps as `epochs` over the full training set (the student-alone budget).

    Args:
        epochs: epochs over the full training set.
        num_train: number of training images.
        num_labeled: number of labelled images.

    Returns:
        An int, at least `epochs`.
    """
    return max(epochs, math.ceil(epochs * num_train / num_labeled))


def train_teacher(data, epochs, seed, verbose=1):
    """Builds and trains the teacher on every labelled training image.

    Args:
        data: the dict returned by `load_digits_data`.
        epochs: number of epochs.
        seed: random seed of the initialisation and the shuffling.
        verbose: Keras `fit` verbosity.

    Returns:
        The trained teacher.
    """
    keras.utils.set_random_seed(seed)
    return train_supervised(
        build_teacher(), data["x_train"], data["y_train"], epochs,
        learning_rate=TEACHER_LEARNING_RATE, verbose=verbose,
    )


def fresh_student(seed, name="student"):
    """Builds a student whose initial weights depend only on `seed`.

    Two calls with the same seed return students with identical weights, so
    the student alone and the distilled student start from the same point.

    Args:
        seed: random seed of the initialisation.
        name: model name.

    Returns:
        An untrained student.
    """
    keras.utils.set_random_seed(seed + 1)
    return build_student(name=name)


def train_student_alone(data, epochs, seed, verbose=1):
    """Trains a fresh student on the labelled subset only.

    It runs `matched_epochs(epochs, ...)` epochs over the labelled images,
    i.e. about as many optimizer steps as `epochs` over the full training
    set.

    Args:
        data: the dict returned by `load_digits_data`.
        epochs: epochs over the full training set (see above).
        seed: random seed of the initialisation and the shuffling.
        verbose: Keras `fit` verbosity.

    Returns:
        The trained student.
    """
    student = fresh_student(seed, name="student_alone")
    alone_epochs = matched_epochs(
        epochs, len(data["x_train"]), len(data["x_labeled"])
    )
    return train_supervised(
        student, data["x_labeled"], data["y_labeled"], alone_epochs,
        learning_rate=STUDENT_LEARNING_RATE, verbose=verbose,
    )


def distill_student(teacher, data, terms, epochs, seed, verbose=1,
                    **distiller_kwargs):
    """Distils the teacher into a fresh student on all training images,
    without their labels.

    Args:
        teacher: the trained teacher.
        data: the dict returned by `load_digits_data`.
        terms: list of `keras_kd.Term`.
        epochs: number of epochs.
        seed: random seed of the initialisation and the shuffling (the same
            seed as `train_student_alone` gives the same initial weights).
        verbose: Keras `fit` verbosity.
        **distiller_kwargs: further `keras_kd.Distiller` arguments.

    Returns:
        The trained `keras_kd.Distiller`; its `student` is the distilled
        student.
    """
    student = fresh_student(seed, name="student")
    return distill(
        teacher, student, terms, data["x_train"], epochs,
        learning_rate=STUDENT_LEARNING_RATE, verbose=verbose,
        **distiller_kwargs,
    )


def format_table(accuracies, heading="test accuracy"):
    """Formats test accuracies as a small text table.

    Args:
        accuracies: ordered mapping of row label -> accuracy in [0, 1].
        heading: heading of the accuracy column.

    Returns:
        The table as a string (no trailing newline).
    """
    width = max(len(name) for name in accuracies)
    column = max(len(heading), 6)
    lines = [f"{'model':<{width}}  {heading:>{column}}",
             "-" * (width + 2 + column)]
    for name, value in accuracies.items():
        lines.append(f"{name:<{width}}  {value:{column}.4f}")
    return "\n".join(lines)


def quick_notice(epochs, labels):
    """What a `quick` run says before its numbers.

    A quick run is too short for the distilled student to beat the student
    alone (it often does not), so its accuracies are not a comparison.

    Args:
        epochs: epochs of the run.
        labels: labelled images of the student alone.

    Returns:
        The notice as a string (no trailing newline).
    """
    plural = "" if epochs == 1 else "s"
    return (
        f"Install check (--quick: {epochs} epoch{plural}, {labels} labels): "
        "this run checks that\n"
        "training, distillation and the SavedModel export work. Its "
        "accuracies are NOT a\n"
        "comparison: a run this short says nothing about distillation "
        "against training\n"
        "alone. Run `keras-kd demo` without --quick for the comparison."
    )


def results_text(accuracies, quick, epochs, labels):
    """What the demo prints of its accuracies.

    A full run prints them as a table of test accuracies. A quick run
    prints `quick_notice` first, and its table's heading says that it is
    an install check only.

    Args:
        accuracies: ordered mapping of row label -> accuracy in [0, 1].
        quick: whether the run was a quick one.
        epochs: epochs of the run.
        labels: labelled images of the student alone.

    Returns:
        The text as a string (no trailing newline).
    """
    if not quick:
        return format_table(accuracies)
    return "\n".join([
        quick_notice(epochs, labels),
        format_table(accuracies, heading="accuracy (install check only)"),
    ])


def run_demo(epochs=None, labels=None, seed=0, output=DEFAULT_OUTPUT,
             quick=False, temperature=DEFAULT_TEMPERATURE,
             feature_term=False, verbose=1):
    """Runs the demo: teacher, student alone, distilled student.

    1. The teacher trains on every labelled training image.
    2. The student trains alone on `labels` labelled images, for about as
       many optimizer steps as the distillation (see `matched_epochs`).
    3. A fresh student with the same initial weights is distilled from the
       teacher on all training images, without labels.
    4. The three held-out test accuracies are printed as a table and the
       distilled student is exported as a SavedModel to `output`.

    Args:
        epochs: epochs over the full training set for the teacher and the
            distillation. Defaults to 30 (1 with `quick`).
        labels: number of labelled images for the student alone. Defaults to
            300 (100 with `quick`).
        seed: seed of the data split, the labelled subset and every weight
            initialisation (`keras.utils.set_random_seed`).
        output: directory the distilled student is exported to.
        quick: a tiny run that checks the install (1 epoch, 100 labels,
            unless `epochs` or `labels` are given). It prints that its
            accuracies are not a comparison: at this size the distilled
            student often scores below the student alone.
        temperature: KD temperature.
        feature_term: also distil the teacher's `t_stage2` feature map with
            a `FeatureMSE` term.
        verbose: Keras `fit` verbosity (0, 1 or 2); with 0 only the table
            and the export path are printed.

    Returns:
        A dict with `"teacher"`, `"student_alone"` and `"distilled"` (test
        accuracies in [0, 1]), `"export_path"` (the SavedModel directory,
        absolute), `"seconds"` (wall time of the run) and `"models"` (a dict
        holding the trained `"teacher"`, `"student_alone"` and
        `"distilled"` student models).

    Raises:
        ImportError: scikit-learn is not installed.
    """
    start = time.perf_counter()
    if epochs is None:
        epochs = QUICK_EPOCHS if quick else DEFAULT_EPOCHS
    if labels is None:
        labels = QUICK_LABELS if quick else DEFAULT_LABELS
    data = load_digits_data(seed=seed, num_labels=labels)
    num_train = len(data["x_train"])

    def say(text):
        if verbose:
            print(text, flush=True)

    say(f"[1/3] Teacher: {num_train} labelled images, {epochs} epochs")
    teacher = train_teacher(data, epochs, seed, verbose=verbose)

    alone_epochs = matched_epochs(epochs, num_train, labels)
    say(f"[2/3] Student alone: {labels} labelled images, {alone_epochs} "
        "epochs (about as many steps as the distillation)")
    student_alone = train_student_alone(data, epochs, seed, verbose=verbose)

    say(f"[3/3] Distilled student: {num_train} images without labels, "
        f"{epochs} epochs, same initial weights as the student alone")
    terms = (
        kd_feature_terms(temperature) if feature_term
        else kd_terms(temperature)
    )
    distiller = distill_student(
        teacher, data, terms, epochs, seed, verbose=verbose
    )
    student = distiller.student

    x_test, y_test = data["x_test"], data["y_test"]
    results = {
        "teacher": accuracy(teacher, x_test, y_test),
        "student_alone": accuracy(student_alone, x_test, y_test),
        "distilled": accuracy(student, x_test, y_test),
    }
    distilled_label = "distilled student (0 labels" + (
        ", KD + feature)" if feature_term else ", KD)"
    )
    rows = {
        f"teacher ({num_train} labels)": results["teacher"],
        f"student alone ({labels} labels)": results["student_alone"],
        distilled_label: results["distilled"],
    }
    print()
    print(results_text(rows, quick=quick, epochs=epochs, labels=labels))
    print(f"({len(x_test)} held-out test images, seed {seed})")

    export_path = os.path.abspath(output)
    distiller.export_student(export_path, verbose=False)
    print(f"Distilled student exported to {export_path}")
    results["export_path"] = export_path
    results["seconds"] = time.perf_counter() - start
    results["models"] = {
        "teacher": teacher, "student_alone": student_alone,
        "distilled": student,
    }
    return results

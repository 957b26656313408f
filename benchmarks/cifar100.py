"""The CIFAR-100 benchmark of the distillation literature, in Keras.

One recipe for every method: the schedule of mdistiller's CIFAR-100
configurations (`configs/cifar100/*.yaml` and `mdistiller/engine/cfg.py` in
github.com/megvii-research/mdistiller), which the distillation papers'
CIFAR-100 tables follow:

- 240 epochs, batch 64, SGD with momentum 0.9, learning rate 0.05 (0.01 for
  MobileNetV2 and ShuffleNet students), divided by 10 at epochs 150, 180
  and 210, weight decay 5e-4 (PyTorch's: an L2 gradient added before the
  momentum, on every trained variable; `CoupledWeightDecaySGD` below);
- random 32x32 crop of the image padded with 4 black pixels on every side,
  random horizontal flip, per-channel normalization with the CIFAR-100
  mean (0.5071, 0.4867, 0.4408) and standard deviation
  (0.2675, 0.2565, 0.2761) of mdistiller's `mdistiller/dataset/cifar100.py`;
- top-1 accuracy on the 10,000 test images after every epoch; the figure
  that mdistiller and the papers report is the best over the epochs, and
  this script records it beside the last epoch's.

Each method keeps its published loss weights (see `METHODS`). Models come
from `keras_kd.models.cifar`; the teacher is loaded from a checkpoint
(`--teacher-checkpoint`: a PyTorch checkpoint of mdistiller's
`cifar_teachers.tar`, read by `keras_kd.models.cifar.load_torch_weights`, or
a Keras `.weights.h5`), or trained first by this script with the same
recipe and kept under `<out>/teachers/` for the next runs.

Every run appends a row to a CSV file (`<out>/results_cifar100.csv`); runs
shortened by `--epochs` or `--limit` are marked as short runs, and
`--table` renders the full runs of that file beside the published figures
as `benchmarks/RESULTS_cifar100.md`. Runs resume where they stopped
(`keras.callbacks.BackupAndRestore`, saved after every epoch): run the same
command again.

Data: `keras.datasets.cifar100` (downloaded once by Keras), or
`--data-dir DIR` holding `cifar100.npz` (arrays `x_train`, `y_train`,
`x_test`, `y_test`, uint8 images of shape (N, 32, 32, 3) and fine labels;
`--export-npz DIR` writes it from Keras' copy) or the extracted
`cifar-100-python/` folder of the official archive. The input pipeline is
`tf.data` when TensorFlow is installed (on every backend) and a
`keras.utils.PyDataset` of NumPy batches otherwise (`--pipeline`); both
augment a whole batch at once.

Usage:

    python benchmarks/cifar100.py --teacher resnet32x4 --student resnet8x4 \\
        --method kd --teacher-checkpoint \\
        cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth
    python benchmarks/cifar100.py --method dist --epochs 1 --limit 640
    python benchmarks/cifar100.py --measure-pipeline --epochs 1 --limit 6400
    python benchmarks/cifar100.py --table
"""

import argparse
import csv
import datetime
import math
import os
import pickle
import platform
import shlex
import statistics
import sys
import time

if __name__ == "__main__":
    from _common import backend_from_argv

    if backend_from_argv(sys.argv[1:]):
        os.environ["KERAS_BACKEND"] = backend_from_argv(sys.argv[1:])
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_kd  # noqa: E402

# --- The recipe ------------------------------------------------------------

NUM_CLASSES = 100
EPOCHS = 240
BATCH_SIZE = 64
LEARNING_RATE = 0.05
# mdistiller's configurations for MobileNetV2 and ShuffleNet students
# (configs/cifar100/dkd/*_mv2.yaml, *_shuv1.yaml, *_shuv2.yaml).
SMALL_LEARNING_RATE = 0.01
SMALL_LEARNING_RATE_MODELS = ("mobilenetv2", "shufflenet_v1", "shufflenet_v2")
MILESTONES = (150, 180, 210)
DECAY_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
PADDING = 4
MEAN = np.array([0.5071, 0.4867, 0.4408], dtype="float32")
STD = np.array([0.2675, 0.2565, 0.2761], dtype="float32")

DEFAULT_TEACHER = "resnet32x4"
DEFAULT_STUDENT = "resnet8x4"
RESULTS_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "RESULTS_cifar100.md")

CSV_FIELDS = (
    "method", "teacher", "student", "epochs", "limit", "seed", "full_run",
    "test_top1", "best_test_top1", "best_epoch", "train_seconds",
    "pipeline", "pipeline_images_per_s", "step_images_per_s", "backend",
    "keras", "device", "teacher_source", "date", "command",
)


def learning_rate_for(student):
    """The recipe's base learning rate for a student architecture."""
    return (SMALL_LEARNING_RATE if student in SMALL_LEARNING_RATE_MODELS
            else LEARNING_RATE)


def milestones_for(epochs):
    """The epochs after which the learning rate is divided by 10: 150, 180
    and 210 of 240, scaled to shorter runs."""
    return [round(m * epochs / EPOCHS) for m in MILESTONES]


def learning_rate_schedule(base, epochs, steps_per_epoch):
    """A step-wise schedule: `base` until the first milestone epoch, then
    divided by 10 at each milestone (mdistiller's `adjust_learning_rate`).

    Keras evaluates a schedule at the optimizer's iteration count before the
    step, so the first step of epoch `m` (0-based iteration
    `m * steps_per_epoch`) must lie past the boundary.
    """
    boundaries = [m * steps_per_epoch - 1 for m in milestones_for(epochs)]
    values = [base * DECAY_RATE ** k for k in range(len(boundaries) + 1)]
    # A milestone at epoch 0 (very short runs) decays from the start.
    kept = [(b, v) for b, v in zip(boundaries, values[1:]) if b >= 0]
    start = base * DECAY_RATE ** (len(boundaries) - len(kept))
    if not kept:
        return start
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [b for b, _ in kept], [start] + [v for _, v in kept])


class _Held:
    """Holds a list out of sight of Keras' attribute tracking (an
    optimizer would otherwise add the listed variables to its own)."""

    def __init__(self, items=()):
        self.items = list(items)


@keras.saving.register_keras_serializable(package="keras_kd_benchmarks")
class CoupledWeightDecaySGD(keras.optimizers.SGD):
    """SGD with PyTorch's weight decay: `l2 * w` added to each gradient.

    `torch.optim.SGD(weight_decay=wd)`, which mdistiller trains with, adds
    `wd * w` to the gradient before the momentum; Keras' own
    `weight_decay` is decoupled (`w -= lr * wd * w` apart from the
    gradient and the momentum), which under momentum 0.9 decays about ten
    times less. This optimizer applies the coupled form to every variable
    it trains (batch-norm scales and offsets and biases included, as
    PyTorch does for every parameter given to it), so the user's model is
    left as it is: no regularizer is added to its layers.

    Keras' momentum keeps `lr * gradient` where PyTorch keeps the gradient,
    so the two differ for a few steps after each drop of the learning rate
    (by the old velocity, decaying as 0.9 per step) and are the same
    otherwise.

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        momentum: momentum, as in `keras.optimizers.SGD`.
        nesterov: Nesterov momentum, as in `keras.optimizers.SGD`.
        l2: the coupled weight decay (PyTorch's `weight_decay`), >= 0.
        **kwargs: other `keras.optimizers.Optimizer` arguments (not
            `loss_scale_factor`: the decay would be added to scaled
            gradients).

    Example:

    ```python
    optimizer = CoupledWeightDecaySGD(0.05, momentum=0.9, l2=5e-4)
    ```
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False,
                 l2=0.0, **kwargs):
        if kwargs.get("loss_scale_factor") is not None:
            raise ValueError(
                "CoupledWeightDecaySGD does not take `loss_scale_factor`: "
                "the decay would be added to the scaled gradients.")
        super().__init__(learning_rate=learning_rate, momentum=momentum,
                         nesterov=nesterov, **kwargs)
        if l2 < 0:
            raise ValueError(f"`l2` must be >= 0, got {l2!r}.")
        self.l2 = float(l2)
        self._decayed = _Held()

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._decayed.items = list(variables)

    def apply(self, grads, trainable_variables=None):
        if self.l2:
            variables = (self._decayed.items if trainable_variables is None
                         else list(trainable_variables))
            if trainable_variables is not None and not self.built:
                self.build(variables)
            grads = [
                g if g is None else g + ops.cast(self.l2, g.dtype)
                * ops.cast(v, g.dtype)
                for g, v in zip(grads, variables)
            ]
        return super().apply(grads, trainable_variables)

    def get_config(self):
        config = super().get_config()
        config["l2"] = self.l2
        return config


def make_optimizer(student, epochs, steps_per_epoch,
                   learning_rate=None):
    """The recipe's optimizer for `student` (an architecture name)."""
    base = learning_rate or learning_rate_for(student)
    return CoupledWeightDecaySGD(
        learning_rate_schedule(base, epochs, steps_per_epoch),
        momentum=MOMENTUM, l2=WEIGHT_DECAY)


# --- The methods -----------------------------------------------------------

def stage_names(teacher, student):
    """The `"stage<k>"` layers both models have, in order."""
    def stages(model):
        names = []
        k = 1
        while any(layer.name == f"stage{k}" for layer in model.layers):
            names.append(f"stage{k}")
            k += 1
        return names

    common = [n for n in stages(student) if n in stages(teacher)]
    if not common:
        raise ValueError(
            f"The teacher '{teacher.name}' and the student '{student.name}' "
            "share no layer named 'stage1', 'stage2', ...: feature methods "
            "read those (the layer names of keras_kd.models.cifar).")
    return common


def _ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _kd_terms(temperature, weight):
    return [keras_kd.Term(keras_kd.losses.KD(temperature=temperature),
                          weight=weight)]


def _kd(teachers, student):
    # Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    # Network" (arXiv:1503.02531); mdistiller's cfg.py: T = 4, KD 0.9,
    # CE 0.1.
    return {"terms": _kd_terms(4.0, 0.9), "student_loss_weight": 0.1}


def _at(teachers, student):
    # Zagoruyko & Komodakis, "Paying More Attention to Attention"
    # (arXiv:1612.03928); mdistiller's AT.py and cfg.py: p = 2, weight 1000
    # on each stage output after its activation but the stem
    # (feats[1:]), CE 1.
    names = stage_names(teachers[0], student)
    terms = [keras_kd.Term(keras_kd.losses.AttentionTransfer(p=2),
                           weight=1000.0, teacher_layer=n, student_layer=n,
                           name=f"at_{n}")
             for n in names]
    return {"terms": terms, "student_loss_weight": 1.0}


def _fitnet(teachers, student):
    # Romero et al., "FitNets: Hints for Thin Deep Nets" (arXiv:1412.6550);
    # mdistiller's FitNet.py and cfg.py: MSE hint on the output of stage 2
    # (HINT_LAYER = 2), weight 100, CE 1. mdistiller regresses the student
    # feature through a 1x1 convolution, batch norm and ReLU; keras-kd's
    # FeatureMSE adds a 1x1 adapter only when the channel counts differ.
    names = stage_names(teachers[0], student)
    hint = "stage2" if "stage2" in names else names[-1]
    terms = [keras_kd.Term(keras_kd.losses.FeatureMSE(), weight=100.0,
                           teacher_layer=hint, student_layer=hint,
                           name="fitnet")]
    return {"terms": terms, "student_loss_weight": 1.0}


def _dist(teachers, student):
    # Huang et al., "Knowledge Distillation from A Stronger Teacher"
    # (NeurIPS 2022, arXiv:2205.10536), CIFAR-100 setting: tau = 4,
    # beta = gamma = 1, DIST weight 2, CE 1.
    terms = [keras_kd.Term(keras_kd.losses.DIST(temperature=4.0), weight=2.0)]
    return {"terms": terms, "student_loss_weight": 1.0}


def _cmkd(teachers, student):
    # Niu et al., "Efficient and Robust Knowledge Distillation from A
    # Stronger Teacher Based on Correlation Matching" (arXiv:2410.06561).
    # The paper's loss weights for this pair are not recorded here; the
    # recipe takes those of DIST, which CMKD extends: tau = 4, weight 2,
    # CE 1.
    terms = [keras_kd.Term(keras_kd.losses.CMKD(temperature=4.0), weight=2.0)]
    return {"terms": terms, "student_loss_weight": 1.0}


def _lakd(teachers, student):
    # Zhang et al., "LAKD: Activation Mapping Distillation Based on Local
    # Learning" (arXiv:2408.11478): the student cut after every stage but
    # the last, each module aligned to the teacher's stage by the
    # activation mapping (alpha 1, beta 0.1, keras-kd's defaults), KD on the
    # last module as for KD above.
    names = stage_names(teachers[0], student)[:-1]
    return {
        "terms": _kd_terms(4.0, 0.9), "student_loss_weight": 0.1,
        "local_modules": keras_kd.LocalModules(
            split_at=names, teacher_layers=names, alpha=1.0, beta=0.1),
    }


def _layerwise(teachers, student):
    # Kokane, Uddin & Xu, "Improving Knowledge Distillation in Transfer
    # Learning with Layer-wise Learning Rates" (arXiv:2407.04871): KD as
    # above, each stage's block trained at a rate scaled by its Jacobian
    # divergence from the teacher's stage (the paper's best signal),
    # re-estimated every 50 steps.
    names = stage_names(teachers[0], student)
    return {
        "terms": _kd_terms(4.0, 0.9), "student_loss_weight": 0.1,
        "layerwise_lr": keras_kd.LayerwiseLearningRate(
            [(n, n) for n in names], signal="jacobian", update_every=50,
            scope="block"),
    }


def _ensemble(teachers, student):
    # Guo et al., "Why does Knowledge Distillation Work? Rethink its
    # Attention and Fidelity Mechanism" (arXiv:2405.00739): the mean over
    # the teachers of Hinton KD, tau = 10, hard-label weight 0.2.
    return {"terms": _kd_terms(10.0, 0.8), "student_loss_weight": 0.2,
            "ensemble": "losses"}


class Method:
    """A row of the benchmark: a name, its loss weights in words, and a
    function `(teachers, student) -> Distiller arguments` (`None` for the
    student trained alone)."""

    def __init__(self, label, recipe, build, teachers=1):
        self.label = label
        self.recipe = recipe
        self.build = build
        self.teachers = teachers


METHODS = {
    "vanilla": Method("student alone", "CE 1", None, teachers=0),
    "kd": Method("KD", "T = 4; KD 0.9, CE 0.1", _kd),
    "at": Method("AT", "p = 2; 1000 per stage, CE 1", _at),
    "fitnet": Method("FitNet", "hint at stage 2; MSE 100, CE 1", _fitnet),
    "dist": Method("DIST", "T = 4, beta = gamma = 1; DIST 2, CE 1", _dist),
    "cmkd": Method("CMKD", "T = 4; CMKD 2, CE 1 (DIST's weights)", _cmkd),
    "lakd": Method("LAKD", "modules cut after each stage but the last; "
                   "alpha 1, beta 0.1; KD 0.9, CE 0.1", _lakd),
    "layerwise": Method("KD + layer-wise LR",
                        "KD 0.9, CE 0.1; Jacobian signal, every 50 steps",
                        _layerwise),
    "ensemble": Method("ensemble of 2 teachers",
                       "mean over teachers of KD, T = 10; KD 0.8, CE 0.2",
                       _ensemble, teachers=2),
}


# --- Published figures ----------------------------------------------------

SOURCES = {
    "crd": (
        'Tian, Krishnan & Isola, "Contrastive Representation '
        'Distillation", ICLR 2020, arXiv:1910.10699, Table 1 (also the '
        "README of github.com/HobbitLong/RepDistiller, whose trained "
        "teachers mdistiller republishes)"),
    "mdistiller": (
        "mdistiller's README (github.com/megvii-research/mdistiller), "
        'from "Decoupled Knowledge Distillation", CVPR 2022, '
        "arXiv:2203.08679"),
    "dist": (
        'Huang et al., "Knowledge Distillation from A Stronger Teacher", '
        "NeurIPS 2022, arXiv:2205.10536 (mean of its runs; 76.31 ± 0.19 in "
        "the CIFAR-100 table of github.com/hunto/DIST_KD)"),
}

# (teacher, student) -> method -> (top-1 %, source key). Only figures read
# in the sources above; the teacher's own figure is under "teacher".
PUBLISHED = {
    ("resnet32x4", "resnet8x4"): {
        "teacher": (79.42, "crd"),
        "vanilla": (72.50, "crd"),
        "kd": (73.33, "mdistiller"),
        "at": (73.44, "crd"),
        "fitnet": (73.50, "crd"),
        "dist": (76.31, "dist"),
    },
}

# Why a method has no published figure here.
NOT_PUBLISHED = {
    "cmkd": ("not recorded: the paper (arXiv:2410.06561) reports CIFAR-100, "
             "but no figure of it for this pair has been checked for this "
             "page"),
    "lakd": ("not recorded: the paper (arXiv:2408.11478) reports CIFAR-100 "
             "with its own 300-epoch schedule, and no figure of it for this "
             "pair has been checked for this page"),
    "layerwise": ("not recorded: the paper (arXiv:2407.04871) reports "
                  "CIFAR-100 in a transfer setting, not this pair"),
    "ensemble": ("not published for this pair (the paper, arXiv:2405.00739, "
                 "distils two ResNet50 teachers into a ResNet18)"),
}


# --- Data ------------------------------------------------------------------

def load_cifar100(data_dir=None):
    """CIFAR-100 as uint8 images `(N, 32, 32, 3)` and int32 fine labels.

    Args:
        data_dir: `None` for `keras.datasets.cifar100` (downloaded once by
            Keras), or a folder holding `cifar100.npz` (arrays `x_train`,
            `y_train`, `x_test`, `y_test`) or the official archive's
            extracted `cifar-100-python/` folder (or that folder itself).

    Returns:
        `(x_train, y_train), (x_test, y_test)`.
    """
    if data_dir is None:
        (x_train, y_train), (x_test, y_test) = (
            keras.datasets.cifar100.load_data(label_mode="fine"))
    else:
        npz = os.path.join(data_dir, "cifar100.npz")
        python = next((d for d in (os.path.join(data_dir, "cifar-100-python"),
                                   data_dir)
                       if os.path.isfile(os.path.join(d, "train"))), None)
        if os.path.isfile(npz):
            with np.load(npz) as arrays:
                x_train, y_train = arrays["x_train"], arrays["y_train"]
                x_test, y_test = arrays["x_test"], arrays["y_test"]
        elif python is not None:
            (x_train, y_train), (x_test, y_test) = (
                _read_python_batch(os.path.join(python, part))
                for part in ("train", "test"))
        else:
            raise FileNotFoundError(
                f"--data-dir {data_dir!r} holds neither cifar100.npz nor the "
                "extracted cifar-100-python/ folder (with its 'train' and "
                "'test' files). Write the .npz where Keras can download "
                "CIFAR-100: `python benchmarks/cifar100.py --export-npz "
                "DIR`.")
    arrays = []
    for x, y, part in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        x = np.asarray(x)
        y = np.asarray(y).reshape(-1).astype("int32")
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) \
                or len(x) != len(y):
            raise ValueError(
                f"CIFAR-100 {part} images must be uint8 of shape "
                f"(N, 32, 32, 3) with N labels; got {x.dtype} "
                f"{x.shape} and {y.shape[0]} labels.")
        arrays.append((x, y))
    return arrays[0], arrays[1]


def _read_python_batch(path):
    with open(path, "rb") as file:
        batch = pickle.load(file, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8)
    images = images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"fine_labels"])


def export_npz(directory):
    """Writes `cifar100.npz` from Keras' copy of CIFAR-100, for machines
    without network access (`--data-dir`)."""
    (x_train, y_train), (x_test, y_test) = load_cifar100()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "cifar100.npz")
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)
    return path


def normalize(images):
    """uint8 images -> float32, per-channel normalized."""
    return (images.astype("float32") / 255.0 - MEAN) / STD


def augment_numpy(images, rng):
    """The recipe's augmentation of a uint8 batch, in NumPy.

    Each image is padded with `PADDING` black pixels on every side, cropped
    back to 32x32 at a random offset and flipped horizontally with
    probability 1/2, then normalized. The batch is done at once: one
    gather for all crops.

    Args:
        images: uint8 array `(batch, 32, 32, 3)`.
        rng: a `numpy.random.Generator`.

    Returns:
        float32 array `(batch, 32, 32, 3)`.
    """
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (PADDING, PADDING),
                             (PADDING, PADDING), (0, 0)))
    top = rng.integers(0, 2 * PADDING + 1, size=n)
    left = rng.integers(0, 2 * PADDING + 1, size=n)
    flip = rng.random(n) < 0.5
    cols = np.arange(w)
    cols = np.where(flip[:, None], w - 1 - cols, cols) + left[:, None]
    rows = top[:, None] + np.arange(h)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None],
                 cols[:, None, :]]
    return normalize(out)


def augment_tf(images, seed):
    """The same augmentation in TensorFlow ops, for `tf.data`.

    Args:
        images: uint8 tensor `(batch, 32, 32, 3)`.
        seed: int64 tensor of shape `(2,)` for the stateless random ops.

    Returns:
        float32 tensor `(batch, 32, 32, 3)`.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    size = images.shape[1]
    padded = tf.pad(images, [[0, 0], [PADDING, PADDING],
                             [PADDING, PADDING], [0, 0]])
    offsets = tf.random.stateless_uniform(
        (n, 2), seed, 0, 2 * PADDING + 1, dtype=tf.int32)
    flip = tf.random.stateless_uniform(
        (n,), seed + 1, 0, 1, dtype=tf.float32) < 0.5
    index = tf.range(size)
    rows = offsets[:, :1] + index
    cols = tf.where(flip[:, None], size - 1 - index, index) + offsets[:, 1:]
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    out = tf.gather(out, cols, axis=2, batch_dims=1)
    out = tf.cast(out, tf.float32) / 255.0
    return (out - MEAN) / STD


class NumpyBatches(keras.utils.PyDataset):
    """CIFAR batches made in NumPy, for machines without TensorFlow.

    Training batches are shuffled at every epoch and augmented with
    `augment_numpy`; test batches are only normalized. Keras prefetches
    them on `workers` threads.

    Args:
        images: uint8 array `(N, 32, 32, 3)`.
        labels: int array `(N,)`.
        batch_size: images per batch (the last batch may be smaller).
        train: shuffle and augment (True), or keep the order and only
            normalize (False).
        seed: seed of the shuffles and augmentations.
        **kwargs: `keras.utils.PyDataset` arguments (`workers`,
            `use_multiprocessing`, `max_queue_size`).

    Example:

    ```python
    batches = NumpyBatches(x_train, y_train, 64, train=True, seed=0,
                           workers=4)
    ```
    """

    def __init__(self, images, labels, batch_size, train, seed=0,
                 **kwargs):
        super().__init__(**kwargs)
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.order = self._order()

    def _order(self):
        if not self.train:
            return np.arange(len(self.images))
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.permutation(len(self.images))

    def __len__(self):
        return math.ceil(len(self.images) / self.batch_size)

    def __getitem__(self, index):
        chosen = self.order[index * self.batch_size:
                            (index + 1) * self.batch_size]
        images = self.images[chosen]
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            images = augment_numpy(images, rng)
        else:
            images = normalize(images)
        return images, self.labels[chosen]

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order()


def tensorflow_available():
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def make_pipelines(train, test, batch_size, seed, pipeline="auto",
                   workers=4, eval_batch_size=256):
    """The training and test inputs for `fit`.

    Args:
        train: `(images, labels)` of the training set (uint8 images).
        test: `(images, labels)` of the test set.
        batch_size: training batch size.
        seed: seed of the shuffles and augmentations.
        pipeline: `"tf"` (`tf.data`), `"numpy"` (`NumpyBatches`) or
            `"auto"` (`tf.data` when TensorFlow is installed).
        workers: threads of the NumPy pipeline.
        eval_batch_size: test batch size.

    Returns:
        `(train_data, test_data, name)` with `name` the pipeline used.
    """
    if pipeline == "auto":
        pipeline = "tf" if tensorflow_available() else "numpy"
    if pipeline == "numpy":
        return (NumpyBatches(*train, batch_size, True, seed, workers=workers),
                NumpyBatches(*test, eval_batch_size, False, workers=workers),
                "numpy")
    if pipeline != "tf":
        raise ValueError(
            f"--pipeline must be 'auto', 'tf' or 'numpy', got {pipeline!r}.")
    if not tensorflow_available():
        raise ImportError(
            "--pipeline tf needs TensorFlow; without it use --pipeline "
            "numpy (or auto).")
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    images, labels = train
    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True).batch(2)
    train_data = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size))
    train_data = (
        tf.data.Dataset.zip((train_data, seeds))
        .map(lambda batch, s: (augment_tf(batch[0], s), batch[1]),
             num_parallel_calls=autotune)
        .prefetch(autotune))
    test_data = (
        tf.data.Dataset.from_tensor_slices(test)
        .batch(eval_batch_size)
        .map(lambda x, y: ((tf.cast(x, tf.float32) / 255.0 - MEAN) / STD,
                           y), num_parallel_calls=autotune)
        .prefetch(autotune))
    return train_data, test_data, "tf"


def measure_pipeline(data, batches):
    """Images per second that `data` delivers alone, over `batches`
    batches after one warm-up batch (NumPy arrays, as `fit` receives
    them)."""
    def numpy_batches():
        while True:
            if isinstance(data, keras.utils.PyDataset):
                for index in range(len(data)):
                    yield data[index]
                data.on_epoch_end()
            else:
                yield from data.as_numpy_iterator()

    iterator = numpy_batches()
    next(iterator)
    count = 0
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
        count += len(images)
    return count / (time.perf_counter() - start)


class Throughput(keras.callbacks.Callback):
    """Images per second of the training steps (input pipeline included):
    the median interval between the batches of the first epoch trained,
    after `skip` batches (the compilation)."""

    def __init__(self, batch_size, skip=5):
        super().__init__()
        self.batch_size = batch_size
        self.skip = skip
        self.times = None
        self.images_per_s = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.times is None:
            self.times = [time.perf_counter()]

    def on_train_batch_end(self, batch, logs=None):
        if self.images_per_s is None and self.times is not None:
            self.times.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        if self.images_per_s is not None or self.times is None:
            return
        gaps = np.diff(self.times)[self.skip:]
        self.times = []  # measured once, in the first epoch trained
        self.images_per_s = 0.0
        if len(gaps):
            self.images_per_s = self.batch_size / statistics.median(gaps)
            print(f"\ntraining step: {self.images_per_s:,.0f} images/s "
                  f"(batch {self.batch_size}, median of {len(gaps)} "
                  "steps, input pipeline included)", flush=True)


# --- Models ----------------------------------------------------------------

def build_model(name, seed, architectures=None):
    """A fresh model of architecture `name`, initialized from `seed`."""
    builders = dict(architectures or {})
    if name not in builders:
        from keras_kd.models import cifar

        builder = getattr(cifar, name, None)
        if not callable(builder) or name.startswith("_") \
                or name == "load_torch_weights":
            known = sorted(
                n for n in dir(cifar) if not n.startswith("_")
                and callable(getattr(cifar, n))
                and n != "load_torch_weights") + sorted(builders)
            raise ValueError(
                f"Unknown architecture {name!r}: keras_kd.models.cifar has "
                f"{known}.")
        builders[name] = builder
    keras.utils.set_random_seed(seed)
    return builders[name](num_classes=NUM_CLASSES)


def load_weights(model, checkpoint):
    """Loads `checkpoint` into `model`: a PyTorch file (`.pth`, `.pt`) of
    the reference definitions through `load_torch_weights`, or a Keras
    `.weights.h5` file."""
    if checkpoint.endswith(".weights.h5"):
        model.load_weights(checkpoint)
    elif checkpoint.endswith((".pth", ".pt", ".pth.tar", ".tar")):
        from keras_kd.models.cifar import load_torch_weights

        load_torch_weights(model, checkpoint)
    else:
        raise ValueError(
            f"Checkpoint {checkpoint!r}: expected a PyTorch file (.pth, "
            ".pt) or Keras weights (.weights.h5).")
    return model


def top1(model, test_data, labels):
    """Top-1 test accuracy (%) of a model with logits outputs on the
    (unshuffled) `test_data`, whose labels are `labels`."""
    logits = model.predict(test_data, verbose=0)
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == labels))


# --- A run -----------------------------------------------------------------

def run_name(method, teacher, student, epochs, limit, seed):
    parts = [method, teacher, student, f"e{epochs}"]
    if limit:
        parts.append(f"limit{limit}")
    parts.append(f"s{seed}")
    return "_".join(p.replace(",", "+") for p in parts if p)


def _teacher_names(args):
    names = [n for n in args.teacher.split(",") if n]
    needed = METHODS[args.method].teachers
    if needed > len(names):
        # An ensemble of one architecture: its copies differ by seed.
        names = names + [names[-1]] * (needed - len(names))
    return names[:max(needed, 1)] if needed else []


def prepare_teachers(args, data, test, architectures, log):
    """The teachers of the run, each loaded from its checkpoint, from this
    script's earlier training, or trained now with the recipe.

    Args:
        args: the parsed command line.
        data: the whole data set, for a teacher trained here.
        test: `(test_data, labels)` to evaluate each teacher on.
        architectures: extra builders (see `run`).
        log: a function that prints a line.

    Returns:
        `(models, sources)`: the teachers and where each came from.
    """
    names = _teacher_names(args)
    checkpoints = list(args.teacher_checkpoint or [])
    if checkpoints and len(checkpoints) != len(names):
        raise ValueError(
            f"--method {args.method} reads {len(names)} teacher(s) "
            f"({', '.join(names)}) but {len(checkpoints)} "
            "--teacher-checkpoint were given: give one per teacher, or "
            "none to train them here.")
    models, sources = [], []
    for index, name in enumerate(names):
        seed = args.seed + index
        model = build_model(name, seed, architectures)
        if checkpoints:
            load_weights(model, checkpoints[index])
            source = f"checkpoint {checkpoints[index]}"
        else:
            path = os.path.join(
                args.out, "teachers",
                run_name("teacher", "", name, args.teacher_epochs,
                         args.limit, seed) + ".weights.h5")
            if not os.path.isfile(path):
                log(f"Training the teacher {name} (seed {seed}) first: "
                    f"{args.teacher_epochs} epochs; it is kept as {path}.")
                train_args = argparse.Namespace(**vars(args))
                train_args.method = "vanilla"
                train_args.student = name
                train_args.seed = seed
                train_args.epochs = args.teacher_epochs
                train_args.measure_pipeline = False
                trained = run(train_args, architectures, data=data,
                              role="teacher")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                trained.save_weights(path)
            model.load_weights(path)
            source = f"trained here ({path})"
        accuracy = top1(model, *test)
        log(f"teacher {index + 1}: {name}, {source}: test top-1 "
            f"{accuracy:.2f}%")
        models.append(model)
        sources.append(source)
    return models, sources


def run(args, architectures=None, data=None, role="student"):
    """Trains one method with the recipe and appends its result row.

    Args:
        args: the parsed command line (see `parse_args`).
        architectures: optional mapping of extra architecture names to
            builders `builder(num_classes=...) -> keras.Model`, looked up
            before `keras_kd.models.cifar`.
        data: optional `((x_train, y_train), (x_test, y_test))` already
            loaded.
        role: `"student"`, or `"teacher"` for a teacher trained first
            (recorded as the method `teacher`).

    Returns:
        The trained student, as a model of its own (not compiled).
    """
    def log(message):
        if args.verbose:
            print(message, flush=True)

    method = METHODS[args.method]
    method_name = "teacher" if role == "teacher" else args.method
    teacher_label = ",".join(_teacher_names(args))
    name = run_name(method_name, teacher_label, args.student, args.epochs,
                    args.limit, args.seed)
    folder = os.path.join(args.out, "runs", name)
    weights = os.path.join(folder, "student.weights.h5")
    if os.path.isfile(weights):
        log(f"{name} is complete (its result is in the CSV); delete "
            f"{folder} to run it again.")
        student = build_model(args.student, args.seed, architectures)
        student.load_weights(weights)
        return student

    if data is None:
        data = load_cifar100(args.data_dir)
    (x_train, y_train), (x_test, y_test) = data
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    train_data, test_data, pipeline = make_pipelines(
        (x_train, y_train), (x_test, y_test), args.batch_size, args.seed,
        args.pipeline, args.workers, args.eval_batch_size)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)

    pipeline_rate = None
    if args.measure_pipeline:
        pipeline_rate = measure_pipeline(
            train_data, min(args.measure_batches, steps_per_epoch))
        print(f"input pipeline ({pipeline}): {pipeline_rate:,.0f} images/s "
              f"(batch {args.batch_size}, augmentation included, no model)",
              flush=True)

    teachers, sources = [], []
    if method.teachers:
        teachers, sources = prepare_teachers(
            args, data, (test_data, y_test), architectures, log)
    student = build_model(args.student, args.seed, architectures)
    optimizer = make_optimizer(args.student, args.epochs, steps_per_epoch,
                               args.learning_rate)
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1"),
               keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]
    if method.build is None:
        model = student
    else:
        model = keras_kd.Distiller(
            teachers if len(teachers) > 1 else teachers[0], student,
            **method.build(teachers, student))
    model.compile(optimizer=optimizer, loss=_ce(), metrics=metrics,
                  run_eagerly=args.run_eagerly)

    os.makedirs(folder, exist_ok=True)
    epochs_log = os.path.join(folder, "epochs.csv")
    throughput = Throughput(args.batch_size)
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(folder, "backup")),
        keras.callbacks.CSVLogger(epochs_log, append=True),
        throughput,
    ]
    log(f"{name}: {method.label}, {args.epochs} epochs of "
        f"{steps_per_epoch} steps, {len(x_train)} training images, "
        f"pipeline {pipeline}; logs in {folder}")
    start = time.perf_counter()
    # The pipelines shuffle the training data themselves.
    model.fit(train_data, epochs=args.epochs, validation_data=test_data,
              shuffle=False,
              validation_freq=args.validation_freq, callbacks=callbacks,
              verbose=args.fit_verbose if args.verbose else 0)
    seconds = time.perf_counter() - start

    final = top1(student, test_data, y_test)
    best, best_epoch = _best_epoch(epochs_log, final, args.epochs)
    log(f"{name}: test top-1 {final:.2f}% after the last epoch, best "
        f"{best:.2f}% (epoch {best_epoch}); {seconds:.0f} s")
    record(args.results or os.path.join(args.out, "results_cifar100.csv"), {
        "method": method_name,
        "teacher": teacher_label,
        "student": args.student,
        "epochs": args.epochs,
        "limit": args.limit or "",
        "seed": args.seed,
        "full_run": int(args.epochs == EPOCHS and not args.limit),
        "test_top1": f"{final:.2f}",
        "best_test_top1": f"{best:.2f}",
        "best_epoch": best_epoch,
        "train_seconds": f"{seconds:.0f}",
        "pipeline": pipeline,
        "pipeline_images_per_s": _rate(pipeline_rate),
        "step_images_per_s": _rate(throughput.images_per_s),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "device": _device(),
        "teacher_source": "; ".join(sources),
        "date": datetime.date.today().isoformat(),
        "command": args.command,
    })
    # The student's weights alone (a copy without the optimizer), which
    # also marks the run complete.
    clean = build_model(args.student, args.seed, architectures)
    clean.set_weights(student.get_weights())
    clean.save_weights(weights)
    return clean


def _rate(value):
    return f"{value:.0f}" if value else ""


def _best_epoch(path, final, epochs):
    """The best top-1 (%) over the validated epochs of the epoch log and
    the last epoch's `final`, with its epoch (1-based)."""
    candidates = [(final, epochs)]
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            value = row.get("val_top1")
            if value not in (None, "", "NA"):
                candidates.append((100 * float(value), int(row["epoch"]) + 1))
    return max(candidates, key=lambda c: (c[0], -c[1]))


def _device():
    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return str(jax.devices()[0].device_kind)
        if backend == "torch":
            import torch

            return (torch.cuda.get_device_name(0)
                    if torch.cuda.is_available() else "cpu")
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else "cpu"
    except Exception:  # the record must not fail for a device name
        return platform.processor() or "unknown"


def record(path, row):
    """Appends `row` to the results CSV at `path` (with a header when the
    file is new)."""
    new = not os.path.isfile(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "a", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


# --- The results table -----------------------------------------------------

def _mean(values):
    text = f"{statistics.mean(values):.2f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.2f}"
    return text


def render_table(rows, pairs=None):
    """The Markdown results page: for each teacher-student pair, each
    method's published figure and its source beside this script's full
    runs.

    Args:
        rows: the results CSV as a list of dicts. Short runs (`full_run`
            0) are counted, never shown as results.
        pairs: `(teacher, student)` pairs to show; by default the
            benchmark's pair and every pair with a full run.

    Returns:
        The page as a string.
    """
    full = [r for r in rows if r.get("full_run") == "1"]
    short = len(rows) - len(full)
    if pairs is None:
        pairs = [(DEFAULT_TEACHER, DEFAULT_STUDENT)]
        for r in full:
            pair = (r["teacher"].split(",")[0], r["student"])
            if r["method"] != "teacher" and pair not in pairs:
                pairs.append(pair)
    lines = [
        "# CIFAR-100 benchmark",
        "",
        "Top-1 test accuracy (%) of each method with the recipe of "
        "`benchmarks/cifar100.py` (mdistiller's schedule: 240 epochs, "
        "batch 64, SGD 0.05 with momentum 0.9 divided by 10 at epochs "
        "150, 180 and 210, weight decay 5e-4, crop and flip). The "
        "published figures are the best epoch's, as mdistiller and the "
        "papers report them; the keras-kd column gives the best epoch "
        "and, after the slash, the last epoch, as mean ± sample standard "
        "deviation over seeds. Only complete 240-epoch runs on the full "
        "data appear; the page is written by "
        "`python benchmarks/cifar100.py --table` from the results CSV. "
        "See [docs/cifar100.md](../docs/cifar100.md) for the recipe and "
        "the commands.",
        "",
    ]
    for teacher, student in pairs:
        published = PUBLISHED.get((teacher, student), {})
        lines += [f"## {teacher} → {student}", "",
                  "| method | loss weights | published | keras-kd: best / "
                  "last epoch | runs | backend, device |",
                  "|---|---|---|---|---|---|"]
        entries = [("teacher", f"{teacher} alone", "CE 1")] + [
            (key, m.label, m.recipe) for key, m in METHODS.items()]
        for key, label, recipe in entries:
            if key == "teacher":
                mine = [r for r in full if r["method"] == "teacher"
                        and r["student"] == teacher]
            else:
                mine = [r for r in full if r["method"] == key
                        and r["student"] == student
                        and (key == "vanilla" or r["teacher"].split(",")[0]
                             == teacher)]
            if key in published:
                figure, source = published[key]
                cell = f"{figure:.2f} [{source}]"
            elif key in NOT_PUBLISHED:
                cell = NOT_PUBLISHED[key]
            else:
                cell = "not published for this pair"
            if mine:
                measured = (
                    _mean([float(r["best_test_top1"]) for r in mine])
                    + " / " + _mean([float(r["test_top1"]) for r in mine]))
                where = ", ".join(sorted({f"{r['backend']}, {r['device']}"
                                          for r in mine}))
            else:
                measured, where = "not measured yet", ""
            lines.append(f"| {label} | {recipe} | {cell} | {measured} | "
                         f"{len(mine)} | {where} |")
        lines.append("")
    lines += ["Sources of the published figures:", ""]
    lines += [f"- [{key}] {text}" for key, text in SOURCES.items()]
    lines += [
        "",
        f"The results CSV holds {len(full)} complete run(s) and {short} "
        "short run(s) (`--epochs` or `--limit`); short runs check the "
        "plumbing and are not results, so they are not shown.",
        "",
    ]
    if full:
        lines += ["Commands of the runs shown:", ""]
        lines += [f"- {r['date']}, {r['backend']} on {r['device']}: "
                  f"`{r['command']}`" for r in full]
        lines.append("")
    return "\n".join(lines)


def write_table(results, page=RESULTS_PAGE):
    rows = []
    if os.path.isfile(results):
        with open(results, newline="") as file:
            rows = list(csv.DictReader(file))
    with open(page, "w") as file:
        file.write(render_table(rows))
    return page


# --- Command line ----------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help="teacher architecture; a comma-separated list "
                             "for --method ensemble (one name: two copies "
                             "of it, seeds s and s + 1)")
    parser.add_argument("--student", default=DEFAULT_STUDENT)
    parser.add_argument("--method", default="kd", choices=list(METHODS))
    parser.add_argument("--teacher-checkpoint", action="append",
                        help="a PyTorch checkpoint (.pth) of the reference "
                             "model or Keras weights (.weights.h5); once per "
                             "teacher. Without it the teacher is trained "
                             "here first (and kept under <out>/teachers)")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help="epochs (the milestones scale with them); "
                             "fewer than 240 makes a short run")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="epochs of a teacher trained here (default: "
                             "--epochs)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first N training and test "
                             "images (a short run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="base learning rate (default: 0.05, or 0.01 "
                             "for MobileNetV2 and ShuffleNet students)")
    parser.add_argument("--validation-freq", type=int, default=1)
    parser.add_argument("--data-dir", default=None,
                        help="folder with cifar100.npz or cifar-100-python/ "
                             "(default: keras.datasets.cifar100)")
    parser.add_argument("--pipeline", default="auto",
                        choices=["auto", "tf", "numpy"])
    parser.add_argument("--workers", type=int, default=4,
                        help="threads of the NumPy pipeline")
    parser.add_argument("--measure-pipeline", action="store_true",
                        help="time the input pipeline alone before "
                             "training")
    parser.add_argument("--measure-batches", type=int, default=200)
    parser.add_argument("--out", default="cifar100_runs",
                        help="folder of the runs, teachers and results")
    parser.add_argument("--results", default=None,
                        help="results CSV (default: "
                             "<out>/results_cifar100.csv)")
    parser.add_argument("--run-eagerly", action="store_true")
    parser.add_argument("--fit-verbose", type=int, default=1,
                        choices=[0, 1, 2],
                        help="`fit`'s verbose: 1 a progress bar, 2 one "
                             "line per epoch (for log files)")
    parser.add_argument("--quiet", dest="verbose", action="store_false",
                        help="print nothing but errors")
    parser.add_argument("--backend", default=None,
                        help="Keras backend (read before Keras is "
                             "imported)")
    parser.add_argument("--table", action="store_true",
                        help="write benchmarks/RESULTS_cifar100.md from "
                             "the results CSV and exit")
    parser.add_argument("--export-npz", metavar="DIR", default=None,
                        help="write DIR/cifar100.npz from Keras' copy of "
                             "CIFAR-100 and exit")
    args = parser.parse_args(argv)
    if args.teacher_epochs is None:
        args.teacher_epochs = args.epochs
    if args.backend and args.backend != keras.backend.backend():
        parser.error(f"--backend {args.backend}: Keras already runs on "
                     f"{keras.backend.backend()}; set KERAS_BACKEND.")
    args.command = "python benchmarks/cifar100.py " + shlex.join(argv)
    return args


def main(argv=None, architectures=None):
    """Runs the command line.

    Args:
        argv: command-line arguments (defaults to `sys.argv[1:]`).
        architectures: optional mapping of extra architecture names to
            builders, looked up before `keras_kd.models.cifar`.

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.export_npz:
        print(export_npz(args.export_npz))
        return 0
    results = args.results or os.path.join(args.out, "results_cifar100.csv")
    if args.table:
        print(write_table(results))
        return 0
    run(args, architectures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

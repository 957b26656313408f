"""The step's side of a teacher cache: is a batch cached, the student's
inputs, and the teachers' `TeacherOutputs` read from the batch. The
training step imports this module alone."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_kd.cache.tag import CacheTag
from keras_kd.teachers.topk import TopKDistribution
from keras_kd.teachers import TeacherOutputs
from keras_kd._typing import Tensor

CACHE_KEY = "keras_kd_teacher_cache"
INPUTS_KEY = "inputs"

# Smallest probability given to a class outside the top k (when the top k
# hold all the mass up to float16 rounding): keeps the logits finite.
_MIN_PROBABILITY = 1e-30


def is_cached(x: Any) -> bool:
    """Whether `x` is a batch (or data) built by `TeacherCache.inputs`."""
    return isinstance(x, dict) and CACHE_KEY in x and INPUTS_KEY in x


def model_inputs(x: Any) -> Any:
    """`x` without its cached teacher outputs: the inputs the student
    sees."""
    return x[INPUTS_KEY] if is_cached(x) else x


def tag_and_entry(x):
    entries = x[CACHE_KEY]
    if not isinstance(entries, dict) or len(entries) != 1:
        raise ValueError(
            f"`x['{CACHE_KEY}']` must hold exactly one cache (a dict with "
            f"one tag), got {type(entries).__name__} "
            f"{list(entries) if isinstance(entries, dict) else ''}."
        )
    (tag, entry), = entries.items()
    return tag, entry


def feature_keys_of(entry):
    """`{(teacher index, layer name)}` of the features a cache entry (or its
    element spec) holds."""
    keys = set()
    for teacher, layers in dict(entry.get("features", {})).items():
        index = int(str(teacher).rsplit("_", 1)[-1])
        keys.update((index, name) for name in layers)
    return keys


def reconstruct_logits(log_probs: Tensor, indices: Tensor,
                       num_classes: int) -> Tensor:
    """Full logits from a top-k cache: the k stored log-probabilities at
    their indices, and the rest of the probability mass spread evenly over
    the other classes.

    The result is a log-probability vector: `softmax` of it (temperature 1)
    gives exactly the stored probabilities on the k classes (up to their
    float16 rounding) and `(1 - their sum) / (num_classes - k)` on each
    other class. Any loss on logits can read it.

    Args:
        log_probs: `(..., k)` log-softmax values of the k largest logits.
        indices: `(..., k)` their class indices.
        num_classes: the number of classes.

    Returns:
        A float32 tensor of shape `(..., num_classes)`.
    """
    log_probs = ops.cast(log_probs, "float32")
    k = log_probs.shape[-1]
    hot = ops.one_hot(ops.cast(indices, "int32"), num_classes,
                      dtype="float32")
    top_mass = ops.sum(ops.exp(log_probs), axis=-1, keepdims=True)
    rest = ops.maximum(1.0 - top_mass, 0.0) / float(num_classes - k)
    log_rest = ops.log(ops.maximum(rest, _MIN_PROBABILITY))
    placed = ops.sum(hot * ops.expand_dims(log_probs, -1), axis=-2)
    covered = ops.sum(hot, axis=-2)
    return placed + (1.0 - covered) * log_rest


class CacheReader:
    """The step's side of a cache: `TeacherOutputs` from a cached batch.

    Args:
        teachers: the distiller's `keras_kd.teachers.Teachers`.
        feature_terms: its terms on named layers, in order.
    """

    def __init__(self, teachers, feature_terms):
        self.teachers = teachers
        self.feature_layers = [t.teacher_layer for t in feature_terms]
        # Tags of the caches checked against the distiller
        # (`keras_kd.cache.check`), which its step may read.
        self.verified = set()

    def accept(self, tag):
        """Lets the step read batches of the cache `tag`, which the
        distiller has checked (`keras_kd.cache.check.check_data`)."""
        self.verified.add(str(tag))

    def outputs(self, x, augment=False):
        """The `keras_kd.teachers.source.TeacherSource` interface: the
        outputs `x` carries, or `None` (see `__call__`)."""
        return self(x, augment=augment)

    def __call__(self, x, augment=False):
        """The `TeacherOutputs` carried by `x`, or `None` when `x` carries
        no cache."""
        if not is_cached(x):
            return None
        tag, entry = tag_and_entry(x)
        if tag not in self.verified:
            raise ValueError(
                f"The batch carries the teacher cache '{tag}', which was not "
                "checked against this distiller's teachers. `fit`, "
                "`evaluate`, `train_on_batch` and `test_on_batch` check "
                "arrays, `tf.data` datasets, `PyDataset`s and generators; "
                "for other data (e.g. a PyTorch `DataLoader`) or a step run "
                "directly, call `distiller.check_teacher_cache(cache)` first."
            )
        if augment and has_teacher_augmentation(self.teachers):
            raise ValueError(AUGMENTATION_ERROR)
        info = CacheTag.parse(tag)
        count = len(self.teachers.teachers)
        if "outputs" in entry:
            stored = entry["outputs"]
            each = (None if info.mode == "mean"
                    else [stored[:, i] for i in range(count)])
        elif info.per_token:
            # Per-token top-k: the divergences read the sparse form; no
            # dense (batch, time, vocab) tensor is rebuilt.
            def sparse(*index):
                return TopKDistribution(
                    *(entry[key][(slice(None),) + index]
                      for key in ("indices", "log_probs", "tail_mass")))

            # `verify` lets an "each" cache (several teachers, built with
            # `ensemble="losses"`) reach only a distiller that ensembles
            # losses, and a "mean" cache only one that reads the mean.
            outputs = (sparse() if info.mode == "mean"
                       else [sparse(i) for i in range(count)])
            outputs, features = keras.tree.map_structure(
                ops.stop_gradient, (outputs, self._features(entry)))
            # No dense teacher logits: `verify` refuses diagnostics.
            return TeacherOutputs(outputs, features, None,
                                  [[] for _ in range(count)])
        else:
            stored = None
            if info.mode == "mean":
                stored = reconstruct_logits(
                    entry["log_probs"], entry["indices"], info.num_classes)
                each = None
            else:
                each = [reconstruct_logits(entry["log_probs"][:, i],
                                           entry["indices"][:, i],
                                           info.num_classes)
                        for i in range(count)]
        if each is None:
            mean = stored
        elif count == 1:
            mean = each[0]
        else:
            mean = ops.mean(ops.stack(each), axis=0)
        outputs = mean if (
            self.teachers.ensemble == "logits" or count == 1) else each
        return keras.tree.map_structure(
            ops.stop_gradient,
            TeacherOutputs(outputs, self._features(entry), mean,
                           [[] for _ in range(count)]))

    def _features(self, entry):
        """Per feature term, the cached teacher feature(s) it reads."""
        features = []
        for term_index, layer in enumerate(self.feature_layers):
            values = [
                _cached_feature(entry, teacher, layer)
                for teacher in self.teachers.term_teachers[term_index]
            ]
            features.append(values[0] if len(values) == 1 else values)
        return features


def _cached_feature(entry, teacher, layer):
    try:
        return entry["features"][f"teacher_{teacher}"][layer]
    except KeyError:
        raise ValueError(
            f"The teacher cache holds no feature of layer '{layer}' of "
            f"teacher {teacher}; build it with `layers=['{layer}']`."
        ) from None



AUGMENTATION_ERROR = (
    "A teacher cache holds the teachers' outputs on the inputs as they were "
    "when it was built, but this distiller augments the teachers' inputs "
    "(`teacher_augmentation`), so its teachers would see other inputs at "
    "every step. Drop `teacher_augmentation` to train from the cache (a "
    "`student_augmentation` is fine: the cache then holds the teachers' "
    "outputs on the clean inputs), or train with the live teachers."
)


def has_teacher_augmentation(teachers):
    augmentations = teachers.augmentations
    if not isinstance(augmentations, list):
        augmentations = [augmentations]
    return any(a is not None for a in augmentations)


"""Offline distillation: the teachers' outputs computed once over a data
set, stored, and read back by the `Distiller`'s step instead of running the
teachers.

`cache_teacher_outputs` runs the teachers once over the data, in inference
mode, and returns a `TeacherCache`. Its `inputs(x)` (or `dataset(x, y)`) is
what `Distiller.fit` takes in place of `x`: the dict

    {"inputs": x, "keras_kd_teacher_cache": {tag: {name: array}}}

whose leaves all hold one row per sample, so that every Keras data path
(NumPy arrays, `tf.data`, `keras.utils.PyDataset`) shuffles and batches the
cached outputs together with their samples. A step whose batch carries them
builds the teachers' `TeacherOutputs` from the batch and runs no teacher;
the student sees `x` alone.

The tag names the teachers' weights fingerprint, the number of classes,
`top_k` and how several teachers were stored, so that a batch says by its
structure which teachers it belongs to. `Distiller.fit` (and `evaluate`,
`train_on_batch`, `test_on_batch`) compares it with its own teachers before
the first step; a step refuses a cached batch whose tag was not checked.

Storage: in memory (NumPy arrays), or on disk, one `.npy` file per array
written by appending batches (NumPy's format leaves room in the header for
the first dimension to grow) and read back with `np.load(mmap_mode="r")`,
plus `manifest.json`. See `docs/teacher_cache.md`.
"""

import hashlib
import inspect
import json
import math
import os
import re
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_kd.losses.divergences import TokenDivergence
from keras_kd.teachers.topk import TopKDistribution
from keras_kd.teachers import TeacherOutputs, Teachers, as_teacher_list

CACHE_KEY = "keras_kd_teacher_cache"
INPUTS_KEY = "inputs"
MANIFEST = "manifest.json"
FORMAT = "keras_kd.teacher_cache"
VERSION = 1

# Smallest probability given to a class outside the top k (when the top k
# hold all the mass up to float16 rounding): keeps the logits finite.
_MIN_PROBABILITY = 1e-30
# Lowest top-k log-probability stored (float16 reaches -65504).
_MIN_LOG_PROBABILITY = -1e4
_INDEX_DTYPES = (("int16", 2**15 - 1), ("int32", 2**31 - 1))
_TAG = re.compile(r"^t([0-9a-f]{16})_c(\d+)_k(\d+)_(mean|each)"
                  r"(?:_tokens_tau([0-9.e+-]+))?$")

# Teacher names per fingerprint, for error messages.
_KNOWN_TEACHERS = {}


# The tag a cached batch carries.

class CacheTag(NamedTuple):
    """What a cached batch says about the cache it comes from.

    Attributes:
        fingerprint: 16 hex digits, the teachers' weights fingerprint
            (`teachers_fingerprint`).
        num_classes: size of the teachers' last output axis.
        top_k: the number of stored logits per sample, or 0 (full outputs).
        mode: `"mean"` (one array: the teachers' averaged outputs) or
            `"each"` (one per teacher).
        temperature: for a per-token top-k cache (outputs of shape
            `(batch, time, vocab)`), the temperature of its stored
            log-probabilities, which the divergences reading it must use;
            `None` for every other cache.
    """

    fingerprint: str
    num_classes: int
    top_k: int
    mode: str
    temperature: object = None

    @property
    def per_token(self):
        """Whether the cache holds per-token top-k distributions
        (`keras_kd.losses.TopKDistribution`)."""
        return self.temperature is not None

    def __str__(self):
        text = (f"t{self.fingerprint}_c{self.num_classes}_k{self.top_k}_"
                f"{self.mode}")
        if self.per_token:
            text += f"_tokens_tau{float(self.temperature)!r}"
        return text

    @classmethod
    def parse(cls, text):
        match = _TAG.match(str(text))
        if match is None:
            raise ValueError(
                f"'{text}' is not the tag of a keras_kd teacher cache; build "
                "the data with `TeacherCache.inputs` or "
                "`TeacherCache.dataset`."
            )
        fingerprint, classes, k, mode, temperature = match.groups()
        return cls(fingerprint, int(classes), int(k), mode,
                   None if temperature is None else float(temperature))


# Fingerprints.

def weights_fingerprint(model):
    """The SHA-256 digest of a model's weights (their order, dtypes, shapes
    and bytes, batch-norm statistics included), as 32 hex digits."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{value.dtype.str}{value.shape};".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()[:32]


def teachers_fingerprint(teachers):
    """The 16-hex-digit fingerprint of an ordered list of teachers, and the
    per-teacher `weights_fingerprint`s it combines."""
    each = [weights_fingerprint(t) for t in teachers]
    combined = hashlib.sha256("|".join(each).encode()).hexdigest()[:16]
    return combined, each


def _describe(fingerprint):
    names = _KNOWN_TEACHERS.get(fingerprint)
    if names:
        return f"teachers {names} (fingerprint {fingerprint})"
    return f"teachers with weights fingerprint {fingerprint}"


# Cached batches.

def is_cached(x):
    """Whether `x` is a batch (or data) built by `TeacherCache.inputs`."""
    return isinstance(x, dict) and CACHE_KEY in x and INPUTS_KEY in x


def model_inputs(x):
    """`x` without its cached teacher outputs: the inputs the student
    sees."""
    return x[INPUTS_KEY] if is_cached(x) else x


def _tag_and_entry(x):
    entries = x[CACHE_KEY]
    if not isinstance(entries, dict) or len(entries) != 1:
        raise ValueError(
            f"`x['{CACHE_KEY}']` must hold exactly one cache (a dict with "
            f"one tag), got {type(entries).__name__} "
            f"{list(entries) if isinstance(entries, dict) else ''}."
        )
    (tag, entry), = entries.items()
    return tag, entry


def _feature_keys(entry):
    """`{(teacher index, layer name)}` of the features a cache entry (or its
    element spec) holds."""
    keys = set()
    for teacher, layers in dict(entry.get("features", {})).items():
        index = int(str(teacher).rsplit("_", 1)[-1])
        keys.update((index, name) for name in layers)
    return keys


def reconstruct_logits(log_probs, indices, num_classes):
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
        # Tags checked against the teachers (`verify`).
        self.verified = set()

    def __call__(self, x, augment=False):
        """The `TeacherOutputs` carried by `x`, or `None` when `x` carries
        no cache."""
        if not is_cached(x):
            return None
        tag, entry = _tag_and_entry(x)
        if tag not in self.verified:
            raise ValueError(
                f"The batch carries the teacher cache '{tag}', which was not "
                "checked against this distiller's teachers. `fit`, "
                "`evaluate`, `train_on_batch` and `test_on_batch` check "
                "arrays, `tf.data` datasets, `PyDataset`s and generators; "
                "for other data (e.g. a PyTorch `DataLoader`) or a step run "
                "directly, call `cache.check(distiller)` first."
            )
        if augment and _has_teacher_augmentation(self.teachers):
            raise ValueError(_AUGMENTATION_ERROR)
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


# Checks against a distiller.

_AUGMENTATION_ERROR = (
    "A teacher cache holds the teachers' outputs on the inputs as they were "
    "when it was built, but this distiller augments the teachers' inputs "
    "(`teacher_augmentation`), so its teachers would see other inputs at "
    "every step. Drop `teacher_augmentation` to train from the cache (a "
    "`student_augmentation` is fine: the cache then holds the teachers' "
    "outputs on the clean inputs), or train with the live teachers."
)


def _has_teacher_augmentation(teachers):
    augmentations = teachers.augmentations
    if not isinstance(augmentations, list):
        augmentations = [augmentations]
    return any(a is not None for a in augmentations)


def verify(distiller, tag, feature_keys, memo=None):
    """Checks that a cache (its tag and the features it holds) fits a
    distiller, and lets the distiller's step read it.

    Raises:
        ValueError: the cache was built from other teachers (another
            fingerprint), for another ensemble mode, lacks a feature a term
            reads, or the distiller runs its teachers in a way a cache
            cannot replace (teacher augmentation, local modules, layer-wise
            learning rates, diagnostics on teacher layers).
    """
    info = CacheTag.parse(tag)
    memo = {} if memo is None else memo
    if "fingerprint" not in memo:
        memo["fingerprint"] = teachers_fingerprint(distiller.teachers)[0]
    fingerprint = memo["fingerprint"]
    names = [t.name for t in distiller.teachers]
    if fingerprint != info.fingerprint:
        raise ValueError(
            f"This teacher cache was built from {_describe(info.fingerprint)}"
            f", but the distiller '{distiller.name}' has teachers {names} "
            f"(fingerprint {fingerprint}): other teachers, or other weights. "
            "Rebuild the cache with `keras_kd.cache_teacher_outputs` from "
            "these teachers."
        )
    step = distiller.distillation_step
    teachers = step.teachers
    if _has_teacher_augmentation(teachers):
        raise ValueError(_AUGMENTATION_ERROR)
    for option in ("local_modules", "layerwise_lr"):
        if getattr(distiller, option, None) is not None:
            raise ValueError(
                f"`{option}` runs the teacher on the inputs within each step "
                "(its layers, module by module or for the divergence "
                f"signals), which a teacher cache cannot replace; train the "
                f"distiller with `{option}` from the live teacher."
            )
    if any(distiller.diagnostics_feed.teacher_layers):
        raise ValueError(
            "Diagnostics that read teacher layers (`AttentionIoU`) need the "
            "live teachers; a teacher cache holds their outputs and the "
            "cached features of the distillation terms only."
        )
    if (info.mode == "mean" and len(names) > 1
            and teachers.ensemble != "logits"):
        raise ValueError(
            "This teacher cache holds the averaged outputs of the "
            f"{len(names)} teachers (built with `ensemble=\"logits\"`), "
            "but the distiller uses `ensemble=\"losses\"`, which needs each "
            "teacher's outputs: "
            "build the cache with `ensemble=\"losses\"`."
        )
    if info.per_token:
        _verify_per_token(distiller, info, len(names))
    missing = []
    feature_terms = [b for b in step.terms if b.reads_features]
    for term, users in zip(feature_terms, teachers.term_teachers):
        for teacher in users:
            if (teacher, term.teacher_layer) not in feature_keys:
                missing.append((term.name, teacher, term.teacher_layer))
    if missing:
        layers = sorted({layer for _, _, layer in missing})
        raise ValueError(
            "Terms on teacher layers read their features from the batch when "
            "it carries a teacher cache, but this cache does not hold "
            + ", ".join(f"layer '{layer}' of teacher {teacher} (term "
                        f"'{name}')" for name, teacher, layer in missing)
            + f". Build the cache with `layers={layers}` (features take "
            "much more room than outputs), or train with the live teachers."
        )
    step.cache_reader.verified.add(str(tag))


def _verify_per_token(distiller, info, count):
    """The checks of a per-token top-k cache: only the token divergences
    read its sparse distributions, at the temperature it was built with, on
    a student of the same vocabulary."""
    step = distiller.distillation_step
    where = (f"This teacher cache holds per-token top-{info.top_k} "
             f"distributions (temperature {info.temperature:g})")
    if distiller.diagnostics_feed.metrics:
        raise ValueError(
            f"{where}, but the diagnostics compare full teacher logits; "
            "build the cache with `top_k=None`, or leave `diagnostics` out.")
    if info.mode == "each" and count > 1 and \
            step.teachers.ensemble == "logits":
        raise ValueError(
            f"{where} of each teacher, but the distiller averages its "
            "teachers' logits (`ensemble=\"logits\"`), which sparse "
            "distributions cannot give: build the cache with "
            "`ensemble=\"logits\"`.")
    for bound in step.terms:
        if bound.reads_features:
            continue
        loss = bound.loss
        if not isinstance(loss, TokenDivergence):
            raise ValueError(
                f"{where}; the term '{bound.name}' reads it with "
                f"{type(loss).__name__}, but only the token divergences "
                "(`keras_kd.losses.ForwardKL`, `ReverseKL`, "
                "`GeneralizedJSD`, `SkewKL`) read sparse teachers. Use one "
                "of them, or build the cache with `top_k=None`.")
        if not math.isclose(loss.temperature, info.temperature,
                            rel_tol=1e-6):
            raise ValueError(
                f"{where}; the term '{bound.name}' uses temperature "
                f"{loss.temperature:g}. A sparse teacher cannot be "
                "re-softened: build the cache with "
                f"`temperature={loss.temperature:g}`, or give the loss "
                f"`temperature={info.temperature:g}`.")
        if loss.teacher_lm_head is not None:
            raise ValueError(
                f"{where}, not teacher hidden states; leave "
                f"`teacher_lm_head` of the term '{bound.name}' unset.")
        student_shape = bound.student_choice.shape
        vocab = loss.vocab_sizes(None, student_shape)[1]
        if vocab is not None and vocab != info.num_classes:
            raise ValueError(
                f"{where} over {info.num_classes} tokens, but the student "
                f"'{bound.student_choice.model_name}' of the term "
                f"'{bound.name}' predicts {vocab}. A sparse cache needs "
                "equal vocabularies (`vocab_mapping` applies to dense "
                "teachers only).")


def _unpack_x(element):
    if isinstance(element, (tuple, list)):
        return element[0] if element else None
    return element


def _peek(iterator):
    """The first element of a generator, and a generator that yields it
    and the rest (as Keras' own generator adapter peeks)."""
    try:
        first = next(iterator)
    except StopIteration:
        return None, iter(())

    def restored():
        yield first
        yield from iterator

    return first, restored()


def _inspect(data):
    """`((tag, feature keys) or None, data)` for an `x` or a dataset:
    whether it carries a teacher cache, read from the arrays' keys, a
    `tf.data` element spec, or the first batch of a `PyDataset` or a
    generator (a generator comes back as a new generator that yields the
    peeked batch first). Other data (a PyTorch `DataLoader`, whose workers
    a peek would start) is left to the step's check."""
    if isinstance(data, CachedDataset):
        return (data.cache.tag, data.cache.feature_keys), data
    if _is_tf_dataset(data):
        sample = _unpack_x(data.element_spec)
    elif isinstance(data, keras.utils.PyDataset):
        sample = _unpack_x(data[0]) if len(data) else None
    elif inspect.isgenerator(data):
        first, data = _peek(data)
        sample = _unpack_x(first)
    else:
        sample = data
    if not is_cached(sample):
        return None, data
    tag, entry = _tag_and_entry(sample)
    return (str(tag), _feature_keys(entry)), data


def check_call(distiller, method, args, kwargs):
    """Checks the cached data given to `distiller.<method>(*args,
    **kwargs)` (`fit`, `evaluate`, `train_on_batch`, `test_on_batch`)
    before Keras runs a step; data without a cache passes.

    Returns:
        `(args, kwargs)` to call Keras with: the same, except that a
        generator it had to peek at is replaced by one that yields the
        peeked batch first.
    """
    if kwargs.get("_use_cached_eval_dataset"):
        return args, kwargs  # `fit`'s validation: checked by `fit`.
    try:
        bound = inspect.signature(getattr(keras.Model, method)).bind(
            distiller, *args, **kwargs)
    except TypeError:
        return args, kwargs  # Keras reports the wrong call.
    arguments = bound.arguments
    found = []
    if arguments.get("x") is not None:
        item, arguments["x"] = _inspect(arguments["x"])
        found.append(item)
    validation = arguments.get("validation_data")
    if isinstance(validation, (tuple, list)):
        found.append(_inspect(validation[0])[0])
    elif validation is not None:
        item, arguments["validation_data"] = _inspect(validation)
        found.append(item)
    memo = {}
    for item in found:
        if item is not None:
            verify(distiller, item[0], item[1], memo)
    return bound.args[1:], bound.kwargs


# Building a cache.

class _LayerRequest(NamedTuple):
    """A teacher layer to cache, in the form `Teachers` reads terms."""

    teacher_layer: str
    name: str


class _TeacherRunner(keras.Model):
    """The teachers' inference forward, compiled by `predict_on_batch`:
    each teacher's outputs, their mean (as the distiller averages them) and
    the requested layers."""

    def __init__(self, teachers, layers):
        super().__init__(name="teacher_cache_runner")
        self.teacher_models = list(teachers)
        self._side = Teachers(
            teachers, [_LayerRequest(n, n) for n in layers],
            ensemble="losses")
        self.built = True

    def call(self, x):
        out = self._side(x, training=False)
        each = out.outputs if isinstance(out.outputs, list) else [out.outputs]
        return {"each": each, "mean": out.mean_logits,
                "features": list(out.features)}


def _is_tf_dataset(x):
    return (type(x).__module__.startswith("tensorflow")
            and hasattr(x, "element_spec"))


def _as_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    return np.asarray(value)


def _batches(x, batch_size):
    """`(number of samples or None, number of batches or None, iterator of
    input batches as NumPy)`."""
    if _is_tf_dataset(x):
        batches = int(x.cardinality())
        iterator = (_unpack_x(e) for e in x.as_numpy_iterator())
        return None, (batches if batches >= 0 else None), iterator
    if isinstance(x, keras.utils.PyDataset):
        iterator = (_unpack_x(x[i]) for i in range(len(x)))
        return None, len(x), (keras.tree.map_structure(_as_numpy, b)
                              for b in iterator)
    leaves = keras.tree.flatten(x)
    if leaves and all(hasattr(a, "shape") for a in leaves):
        n = int(leaves[0].shape[0])
        for leaf in leaves:
            if int(leaf.shape[0]) != n:
                raise ValueError(
                    "The arrays of `x` hold different numbers of samples: "
                    f"{[int(a.shape[0]) for a in leaves]}."
                )

        def slices():
            for start in range(0, n, batch_size):
                yield keras.tree.map_structure(
                    lambda a: _as_numpy(a[start:start + batch_size]), x)

        return n, math.ceil(n / batch_size), slices()
    try:
        iterator = iter(x)
    except TypeError:
        raise TypeError(
            "`x` must be NumPy arrays (or a dict or list of them), a "
            "`tf.data.Dataset` or `keras.utils.PyDataset` of batches, or an "
            f"iterable of batches; got {type(x).__name__}."
        ) from None
    return None, None, (keras.tree.map_structure(_as_numpy, _unpack_x(b))
                        for b in iterator)


def _sample_digest(x, row):
    """A digest of sample `row` of a batch `x` (its values as float64, so
    that a change of dtype alone does not count)."""
    digest = hashlib.sha256()
    for leaf in keras.tree.flatten(x):
        value = np.asarray(_as_numpy(leaf)[row])
        if value.dtype.kind in "biuf":
            value = value.astype(np.float64)
        digest.update(repr(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


class _Appender:
    """An array grown one batch at a time along its first axis: chunks in
    memory, or a `.npy` file whose header is rewritten with the final length
    at the end (NumPy writes headers with room for the first dimension to
    grow). The file is written under a temporary name and renamed when
    complete, so that a memory map of an older file of that name (a cache
    being overwritten) keeps its data."""

    def __init__(self, path, dtype, row_shape):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self.chunks = []
        self.file = None
        if path is not None:
            self.file = open(path + ".partial", "wb")
            self._write_header()
            self.header_size = self.file.tell()

    def _write_header(self):
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows,) + self.row_shape,
        })

    def append(self, values):
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.rows += values.shape[0]
        if self.file is None:
            self.chunks.append(values)
        else:
            self.file.write(values.tobytes())

    def close(self):
        if self.file is None:
            if not self.chunks:
                return np.zeros((0,) + self.row_shape, self.dtype)
            return np.concatenate(self.chunks)
        self.file.seek(0)
        self._write_header()
        if self.file.tell() != self.header_size:  # pragma: no cover
            raise RuntimeError(f"The header of {self.path} changed size.")
        self.file.close()
        os.replace(self.path + ".partial", self.path)
        return np.load(self.path, mmap_mode="r")

    def abort(self):
        if self.file is not None:
            self.file.close()
            os.remove(self.path + ".partial")


def _top_k(outputs, k, temperature=1.0, with_tail=False):
    """`(log-probabilities float16, indices)` of the k largest logits of each
    row (last axis), largest first, under `softmax(outputs / temperature)`;
    with `with_tail`, also the float32 probability of all other entries
    together (`1 - sum(p_top)`, from float64).

    Rows are processed in blocks, so that a batch of (batch, time, vocab)
    logits needs float64 room for a block only."""
    classes = outputs.shape[-1]
    rows = np.reshape(outputs, (-1, classes))
    block = max(1, (2 ** 25) // classes)
    values, indices, tails = [], [], []
    for start in range(0, rows.shape[0], block):
        logits = rows[start:start + block].astype(np.float64) / temperature
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(
            np.exp(shifted).sum(axis=-1, keepdims=True))
        if k < classes:
            top = np.argpartition(-log_probs, k - 1, axis=-1)[..., :k]
        else:
            top = np.broadcast_to(np.arange(classes), log_probs.shape)
        picked = np.take_along_axis(log_probs, top, axis=-1)
        order = np.argsort(-picked, axis=-1, kind="stable")
        values.append(np.take_along_axis(picked, order, axis=-1))
        indices.append(np.take_along_axis(top, order, axis=-1))
        if with_tail:
            tails.append(np.clip(1.0 - np.exp(values[-1]).sum(axis=-1),
                                 0.0, 1.0))
    shape = outputs.shape[:-1] + (k,)
    index_dtype = next(d for d, most in _INDEX_DTYPES if classes - 1 <= most)
    values = np.concatenate(values).reshape(shape)
    result = (np.maximum(values, _MIN_LOG_PROBABILITY).astype(np.float16),
              np.concatenate(indices).reshape(shape).astype(index_dtype))
    if with_tail:
        result += (np.concatenate(tails).reshape(
            outputs.shape[:-1]).astype(np.float32),)
    return result


def _size(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024.0
    return f"{nbytes} B"  # pragma: no cover


def cache_teacher_outputs(teacher, x, batch_size=256, top_k=None,
                          layers=None, ensemble="logits", directory=None,
                          overwrite=False, verbose="auto", temperature=1.0):
    """Runs the teachers once over a data set (inference mode) and stores
    their outputs.

    Args:
        teacher: a `keras.Model` or a list of them, as given to the
            `Distiller`.
        x: the inputs, in the order the cache will be paired with them:
            NumPy arrays (or a dict or list of them), or a `tf.data.Dataset`,
            `keras.utils.PyDataset` or iterable of batches (elements `x` or
            `(x, y[, sample_weight])`; labels are ignored). A dataset must
            yield the same samples in the same order every time it is read:
            no shuffling.
        batch_size: batch size of the teachers' forward passes over arrays;
            the training batch size gives outputs equal, bit for bit, to
            those of the live teachers in a step (convolutions round
            differently at other batch sizes).
        top_k: `None` stores the outputs at full precision (training from
            them is exactly training with the live teachers). An integer
            `k` stores, per sample (and per teacher with
            `ensemble="losses"`), the k largest log-softmax values in float16
            and their class indices (int16 up to 32,767 classes, else int32);
            the step rebuilds the other classes' probabilities as the rest of
            the mass spread evenly (`reconstruct_logits`). The outputs must
            be logits, shape `(batch, classes)`, with `k < classes`; or, per
            token, `(batch, time, vocab)` with `k <= vocab`: then each
            token's k largest log-probabilities (float16), their indices and
            the tail mass `1 - sum(p_top)` (float32) are stored, and the
            step gives the token divergences (`keras_kd.losses.ForwardKL`
            and its siblings) a `keras_kd.losses.TopKDistribution`, with no
            dense logits rebuilt.
        layers: names of teacher layers whose outputs are cached too, for the
            terms that read them (every teacher that has the layer). Features
            are large: a warning gives their size.
        ensemble: with several teachers, `"logits"` stores their averaged
            outputs (for a distiller with `ensemble="logits"`), `"losses"`
            each teacher's outputs (for either mode).
        directory: `None` keeps the cache in memory; a path writes it there
            (one `.npy` file per array and `manifest.json`), to be opened
            again with `TeacherCache.load(directory)`.
        overwrite: replace a cache already in `directory`.
        verbose: `"auto"` or 1 shows a progress bar, 0 none.
        temperature: for a per-token top-k cache, the temperature `tau` of
            the stored log-probabilities (`log_softmax(z / tau)`); the
            divergences that read the cache must use the same temperature,
            since a sparse distribution cannot be re-softened. Other caches
            take 1.

    Returns:
        A `TeacherCache`.

    Example:

    >>> cache = keras_kd.cache_teacher_outputs(teacher, x_train, top_k=10)
    >>> distiller.fit(cache.inputs(x_train), y_train, epochs=30)
    """
    teachers = as_teacher_list(teacher)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(
                "`top_k` must be `None` or a positive integer, got "
                f"{top_k!r}.")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(
            f"`temperature` must be positive, got {temperature}.")
    if ensemble not in ("logits", "losses"):
        raise ValueError(
            f"`ensemble` must be 'logits' or 'losses', got {ensemble!r}.")
    layers = [layers] if isinstance(layers, str) else list(layers or [])
    for layer in layers:
        if not any(layer in [lay.name for lay in t.layers] for t in teachers):
            raise ValueError(
                f"No teacher has a layer named '{layer}' (teachers "
                f"{[t.name for t in teachers]})."
            )
    mode = "each" if len(teachers) > 1 and ensemble == "losses" else "mean"
    if directory is not None:
        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, MANIFEST)
        if os.path.exists(manifest_path):
            if not overwrite:
                raise FileExistsError(
                    f"'{directory}' already holds a teacher cache; pass "
                    "`overwrite=True` to replace it, or open it with "
                    "`TeacherCache.load`.")
            os.remove(manifest_path)
        os.makedirs(directory, exist_ok=True)

    fingerprint, each_fingerprint = teachers_fingerprint(teachers)
    runner = _TeacherRunner(teachers, layers)
    term_teachers = runner._side.term_teachers
    num_samples, num_batches, batches = _batches(x, batch_size)
    verbose = 1 if verbose == "auto" else int(verbose)
    progbar = keras.utils.Progbar(num_batches, verbose=verbose,
                                  unit_name="batch")
    probe_rows = (sorted({0, num_samples // 2, num_samples - 1})
                  if num_samples else [0])
    probes, last = {}, None
    appenders, files = {}, {}
    rows = 0
    try:
        for batch_index, x_batch in enumerate(batches):
            out = runner.predict_on_batch(x_batch)
            if not appenders:
                _check_outputs(out, top_k, temperature)
            arrays = _batch_arrays(out, mode, top_k, temperature,
                                   term_teachers, layers)
            if not appenders:
                _warn_feature_size(arrays, layers, num_samples)
                for key, value in arrays.items():
                    path = None
                    if directory is not None:
                        files[key] = _file_name(key, len(files))
                        path = os.path.join(directory, files[key])
                    appenders[key] = _Appender(path, value.dtype,
                                               value.shape[1:])
            for key, value in arrays.items():
                appenders[key].append(value)
            n = next(iter(arrays.values())).shape[0]
            for row in probe_rows:
                if rows <= row < rows + n:
                    probes[str(row)] = _sample_digest(x_batch, row - rows)
            last = (rows + n - 1, _sample_digest(x_batch, n - 1))
            rows += n
            progbar.update(batch_index + 1)
    except BaseException:
        for appender in appenders.values():
            appender.abort()
        raise
    if not rows:
        raise ValueError("`x` holds no sample: nothing to cache.")
    probes[str(last[0])] = last[1]
    stored = {key: a.close() for key, a in appenders.items()}
    outputs = out["mean"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teachers": [{"name": t.name, "fingerprint": f}
                     for t, f in zip(teachers, each_fingerprint)],
        "fingerprint": fingerprint,
        "ensemble": mode,
        "num_samples": rows,
        "num_classes": int(outputs.shape[-1]),
        "output_shape": list(outputs.shape[1:]),
        "top_k": top_k,
        "temperature": (float(temperature)
                        if "tail_mass" in stored else None),
        "arrays": {key: {"file": files.get(key),
                         "dtype": str(value.dtype),
                         "shape": list(value.shape)}
                   for key, value in stored.items()},
        "probes": probes,
    }
    if directory is not None:
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return TeacherCache(manifest, stored, directory)


def _file_name(key, index):
    if key.startswith("features/"):
        return f"feature_{index}.npy"
    return f"{key}.npy"


def _batch_arrays(out, mode, top_k, temperature, term_teachers, layers):
    """The arrays one batch adds to the cache, by key."""
    arrays = {}
    if mode == "mean":
        outputs = np.asarray(out["mean"])
    else:
        outputs = np.stack([np.asarray(o) for o in out["each"]], axis=1)
    if top_k is None:
        arrays["outputs"] = outputs
    elif np.ndim(out["mean"]) == 3:
        (arrays["log_probs"], arrays["indices"],
         arrays["tail_mass"]) = _top_k(outputs, top_k, temperature,
                                       with_tail=True)
    else:
        arrays["log_probs"], arrays["indices"] = _top_k(outputs, top_k)
    for layer, users, values in zip(layers, term_teachers, out["features"]):
        values = values if len(users) > 1 else [values]
        for teacher, value in zip(users, values):
            arrays[f"features/teacher_{teacher}/{layer}"] = np.asarray(value)
    return arrays


def _check_outputs(out, top_k, temperature):
    """Checks the first batch's outputs against `top_k` and
    `temperature`."""
    outputs = out["mean"]
    if isinstance(outputs, (list, tuple, dict)):
        raise ValueError(
            "A teacher cache stores one output tensor per teacher; these "
            "teachers return a structure of outputs.")
    if top_k is not None:
        rank = np.ndim(outputs)
        if rank not in (2, 3):
            raise ValueError(
                "`top_k` needs logits of shape (batch, classes) or, per "
                "token, (batch, time, vocab); the teachers output shape "
                f"{tuple(np.shape(outputs))}. Cache them at full precision "
                "(`top_k=None`).")
        if rank == 2 and top_k >= outputs.shape[-1]:
            raise ValueError(
                f"`top_k` must be smaller than the number of classes "
                f"({outputs.shape[-1]}), got {top_k}; use `top_k=None` to "
                "store every output.")
        if rank == 3 and top_k > outputs.shape[-1]:
            raise ValueError(
                f"`top_k` must be at most the vocabulary size "
                f"({outputs.shape[-1]}), got {top_k}.")
        if rank == 2 and temperature != 1.0:
            raise ValueError(
                "`temperature` applies to per-token top-k caches (outputs "
                "of shape (batch, time, vocab)); a (batch, classes) top-k "
                "cache stores log-probabilities at temperature 1, and the "
                "losses soften the rebuilt logits themselves. Leave "
                f"`temperature` at 1, got {temperature}.")
    elif temperature != 1.0:
        raise ValueError(
            "`temperature` applies to per-token top-k caches only; a cache "
            f"without `top_k` stores the outputs as they are, got "
            f"temperature={temperature}.")


def _warn_feature_size(arrays, layers, num_samples):
    if layers:
        n = next(iter(arrays.values())).shape[0]
        per_sample = {
            key: value.nbytes // n for key, value in arrays.items()}
        feature = sum(v for k, v in per_sample.items()
                      if k.startswith("features/"))
        output = sum(v for k, v in per_sample.items()
                     if not k.startswith("features/"))
        total = (f", {_size(feature * num_samples)} for the "
                 f"{num_samples} samples" if num_samples else "")
        warnings.warn(
            f"Caching the teacher layers {layers} stores {_size(feature)} per "
            f"sample{total}: {feature / max(output, 1):.0f}x the cached "
            "outputs. Features are stored at full precision; write a large "
            "cache to disk (`directory=`).",
            stacklevel=3,
        )


# The cache.

class TeacherCache:
    """The teachers' outputs on a data set, computed once by
    `cache_teacher_outputs` (or opened with `TeacherCache.load`).

    Pair it with the same samples, in the same order, as it was built on:
    `inputs(x)` returns the data `Distiller.fit` takes (NumPy arrays, or a
    `tf.data.Dataset` of single samples), `dataset(x, y)` a
    `keras.utils.PyDataset` that reads batches from the (memory-mapped)
    arrays, for data and caches larger than memory.

    Attributes:
        manifest: the description of the cache (teachers' names and
            fingerprints, number of samples, classes, `top_k`, arrays).
        arrays: `{key: array}`; NumPy memory maps for an on-disk cache.
        directory: where the cache is stored, or `None` (in memory).
    """

    def __init__(self, manifest, arrays, directory=None):
        self.manifest = manifest
        self.arrays = dict(arrays)
        self.directory = directory
        _KNOWN_TEACHERS[manifest["fingerprint"]] = self.teacher_names

    # Description.

    @property
    def num_samples(self):
        return int(self.manifest["num_samples"])

    def __len__(self):
        return self.num_samples

    @property
    def top_k(self):
        return self.manifest["top_k"]

    @property
    def teacher_names(self):
        return [t["name"] for t in self.manifest["teachers"]]

    @property
    def fingerprint(self):
        return self.manifest["fingerprint"]

    @property
    def tag(self):
        """The key under which a batch carries this cache (a `CacheTag`
        as text)."""
        return str(CacheTag(self.fingerprint,
                            int(self.manifest["num_classes"]),
                            int(self.top_k or 0), self.manifest["ensemble"],
                            self.manifest.get("temperature")))

    @property
    def feature_keys(self):
        """`{(teacher index, layer name)}` of the cached features."""
        return _feature_keys(self._entry(self.arrays))

    @property
    def nbytes(self):
        """Bytes of the stored arrays."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    def __repr__(self):
        where = f"'{self.directory}'" if self.directory else "memory"
        kind = f"top_k={self.top_k}" if self.top_k else "full outputs"
        return (f"<TeacherCache of {self.teacher_names}: {self.num_samples} "
                f"samples, {kind}, {_size(self.nbytes)} in {where}>")

    # Storage.

    @classmethod
    def load(cls, directory):
        """Opens a cache written by `cache_teacher_outputs(...,
        directory=...)` or `save`; its arrays are memory-mapped, read only."""
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"'{directory}' holds no complete teacher cache (no "
                f"{MANIFEST}; the manifest is written last, so a cache whose "
                "building was interrupted has none). Build it again.")
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or \
                manifest.get("version") != VERSION:
            raise ValueError(
                f"'{path}' is not a version-{VERSION} keras_kd teacher cache "
                f"(format {manifest.get('format')!r}, version "
                f"{manifest.get('version')!r}).")
        arrays = {}
        for key, spec in manifest["arrays"].items():
            array = np.load(os.path.join(directory, spec["file"]),
                            mmap_mode="r")
            if list(array.shape) != spec["shape"] or \
                    str(array.dtype) != spec["dtype"]:
                raise ValueError(
                    f"'{spec['file']}' in '{directory}' holds "
                    f"{array.dtype}{list(array.shape)}, but the manifest "
                    f"records {spec['dtype']}{spec['shape']}: the cache is "
                    "damaged; build it again.")
            arrays[key] = array
        return cls(manifest, arrays, directory)

    def save(self, directory, overwrite=False):
        """Writes the cache to `directory` and returns it opened from
        there (memory-mapped)."""
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(
                    f"'{directory}' already holds a teacher cache; pass "
                    "`overwrite=True` to replace it.")
            os.remove(path)
        os.makedirs(directory, exist_ok=True)
        manifest = json.loads(json.dumps(self.manifest))
        for index, (key, array) in enumerate(self.arrays.items()):
            name = _file_name(key, index)
            target = os.path.join(directory, name)
            with open(target + ".partial", "wb") as f:
                np.save(f, np.asarray(array))
            os.replace(target + ".partial", target)
            manifest["arrays"][key]["file"] = name
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
        return TeacherCache.load(directory)

    # Data.

    @staticmethod
    def _entry(arrays):
        """The nested dict a batch carries, from flat `{key: array}`."""
        entry = {}
        for key, value in arrays.items():
            parts = key.split("/")
            node = entry
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return entry

    def _wrap(self, x, arrays):
        return {INPUTS_KEY: x, CACHE_KEY: {self.tag: self._entry(arrays)}}

    def _check_samples(self, sample_at):
        for row, expected in self.manifest["probes"].items():
            x_row, local = sample_at(int(row))
            if x_row is None:
                continue
            if _sample_digest(x_row, local) != expected:
                raise ValueError(
                    f"Sample {row} of `x` differs from sample {row} of the "
                    "data the teacher cache was built on. Pair the cache with "
                    "the same samples in the same order (shuffle through "
                    "`fit`, not before); pass `check_samples=False` if the "
                    "student deliberately sees other inputs (e.g. another "
                    "resolution).")

    def _check_length(self, n, what="`x`"):
        if n != self.num_samples:
            raise ValueError(
                f"{what} holds {n} samples but the teacher cache holds "
                f"{self.num_samples} (built from teachers "
                f"{self.teacher_names}): a cache pairs with the data it was "
                "built on, sample by sample.")

    def inputs(self, x, check_samples=True):
        """`x` with this cache, as `Distiller.fit`, `evaluate` and
        `predict` take it.

        Args:
            x: the samples the cache was built on, in the same order: NumPy
                arrays (or a dict or list of them), or a `tf.data.Dataset`
                of single samples (not batched; elements `x` or `(x, y[,
                sample_weight])`), to be shuffled and batched after this.
            check_samples: compare a few samples of `x` (the first, middle
                and last) with those the cache was built on.

        Returns:
            For arrays, the dict `{"inputs": x, "keras_kd_teacher_cache":
            {tag: arrays}}` (pass it as `x`, with `y` and `sample_weight`
            as usual); for a dataset, the dataset with `x` replaced by that
            dict.

        Raises:
            ValueError: `x` holds another number of samples, or other
                samples.
        """
        if is_cached(x):
            raise ValueError("`x` already carries a teacher cache.")
        if _is_tf_dataset(x):
            return self._tf_inputs(x, check_samples)
        leaves = keras.tree.flatten(x)
        if not leaves or not all(hasattr(a, "shape") for a in leaves):
            raise TypeError(
                "`inputs` takes NumPy arrays (or a dict or list of them) or "
                "an unbatched `tf.data.Dataset`; for other data use "
                f"`dataset(x, y)`. Got {type(x).__name__}.")
        for leaf in leaves:
            self._check_length(int(leaf.shape[0]))
        if check_samples:
            self._check_samples(lambda row: (
                keras.tree.map_structure(lambda a: a[row:row + 1], x), 0))
        return self._wrap(x, self.arrays)

    def _tf_inputs(self, dataset, check_samples):
        import tensorflow as tf

        cardinality = int(dataset.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError("The dataset is infinite; give the finite, "
                             "unbatched dataset the cache was built on.")
        if cardinality >= 0:
            self._check_length(cardinality, "The dataset")
        else:
            dataset = dataset.apply(
                tf.data.experimental.assert_cardinality(self.num_samples))
        if check_samples:
            first = _unpack_x(next(iter(dataset.take(1))))
            self._check_samples(lambda row: (
                keras.tree.map_structure(lambda a: _as_numpy(a)[None], first),
                0) if row == 0 else (None, 0))
        entry = self._entry(self.arrays)
        if self.directory is None:
            cached = tf.data.Dataset.from_tensor_slices(entry)
        else:
            chunk = 4096

            def chunks():
                for start in range(0, self.num_samples, chunk):
                    yield keras.tree.map_structure(
                        lambda a: np.asarray(a[start:start + chunk]), entry)

            signature = keras.tree.map_structure(
                lambda a: tf.TensorSpec((None,) + a.shape[1:], a.dtype),
                entry)
            cached = tf.data.Dataset.from_generator(
                chunks, output_signature=signature).unbatch()
        tag = self.tag

        def attach(element, values):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
                element)
            x = {INPUTS_KEY: x, CACHE_KEY: {tag: values}}
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

        return tf.data.Dataset.zip((dataset, cached)).map(attach)

    def dataset(self, x, y=None, sample_weight=None, batch_size=32,
                shuffle=True, seed=None, check_samples=True, **kwargs):
        """A `keras.utils.PyDataset` of cached batches, read from the arrays
        (memory-mapped for an on-disk cache) batch by batch: for data and
        caches larger than memory, on every backend.

        Args:
            x: the samples the cache was built on, in the same order: NumPy
                arrays or memory maps (or a dict or list of them).
            y: optional labels, one row per sample.
            sample_weight: optional sample weights, one per sample.
            batch_size: samples per batch.
            shuffle: draw a new order of the samples every epoch.
            seed: seed of the shuffling.
            check_samples: as in `inputs`.
            **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
                `keras.utils.PyDataset`.

        Returns:
            A `CachedDataset`.
        """
        return CachedDataset(self, x, y, sample_weight, batch_size, shuffle,
                             seed, check_samples=check_samples, **kwargs)

    def check(self, distiller):
        """Checks that this cache fits `distiller` (its teachers'
        fingerprint, ensemble mode, cached features) and lets the
        distiller's step read it. `fit`, `evaluate`, `train_on_batch` and
        `test_on_batch` do this themselves; call it before running the
        distiller's steps any other way (e.g. `train_step` directly).

        Raises:
            ValueError: see `keras_kd.cache.verify`.
        """
        verify(distiller, self.tag, self.feature_keys)


class CachedDataset(keras.utils.PyDataset):
    """Batches of samples and their cached teacher outputs (see
    `TeacherCache.dataset`). Each batch reads its rows in increasing order,
    for the memory maps' sake; with `shuffle`, the batches hold a new
    random partition of the samples every epoch."""

    def __init__(self, cache, x, y=None, sample_weight=None, batch_size=32,
                 shuffle=True, seed=None, check_samples=True, **kwargs):
        super().__init__(**kwargs)
        if is_cached(x):
            raise ValueError("`x` already carries a teacher cache.")
        self.cache = cache
        self.x, self.y, self.sample_weight = x, y, sample_weight
        for name, value in (("`x`", x), ("`y`", y),
                            ("`sample_weight`", sample_weight)):
            for leaf in keras.tree.flatten(value) if value is not None else []:
                cache._check_length(int(leaf.shape[0]), name)
        if check_samples:
            cache._check_samples(lambda row: (
                keras.tree.map_structure(lambda a: a[row:row + 1], x), 0))
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = None
        if shuffle:
            self._order = self._rng.permutation(cache.num_samples)

    def __len__(self):
        return math.ceil(self.cache.num_samples / self.batch_size)

    def _rows(self, index):
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.cache.num_samples)
        if self._order is None:
            return slice(start, stop)
        return np.sort(self._order[start:stop])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self._rows(index)

        def take(value):
            return None if value is None else keras.tree.map_structure(
                lambda a: np.asarray(a[rows]), value)

        x = self.cache._wrap(take(self.x), {
            key: np.asarray(a[rows]) for key, a in self.cache.arrays.items()})
        batch = (x, take(self.y), take(self.sample_weight))
        if batch[2] is None:
            batch = batch[:2] if batch[1] is not None else batch[:1]
        return batch

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(self.cache.num_samples)

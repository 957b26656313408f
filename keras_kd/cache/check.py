"""The checks of a teacher cache against a distiller, before Keras runs a
step: the teachers' fingerprint, the ensemble mode, the cached features and
what a cache cannot replace.

The checks read a `CacheRequirements`, a record of what the distiller's
teachers and terms need, which the distiller builds (`requirements`) and
passes down; a cache that passes is accepted by the distiller's
`CacheReader`, which the distiller passes down too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

import keras

from keras_kd.cache._data import is_tf_dataset, unpack_x
from keras_kd.cache.reader import (AUGMENTATION_ERROR, feature_keys_of,
                                   has_teacher_augmentation, is_cached,
                                   tag_and_entry)
from keras_kd.cache.store import CachedDataset, TeacherCache
from keras_kd.cache.tag import (CacheTag, describe_teachers,
                                teachers_fingerprint)
from keras_kd.losses.divergences import TokenDivergence


class TermRequirement(NamedTuple):
    """What one distillation term reads from a teacher cache.

    Attributes:
        name: the term's log name.
        loss: the class name of its loss.
        teacher_layer: the teacher layer whose features it reads, or `None`
            (the final outputs).
        teachers: the indices of the teachers whose layer it reads (a term
            on the final outputs: `()`).
        sparse: whether its loss reads a per-token top-k teacher (the
            token divergences read `keras_kd.losses.TopKDistribution`).
        temperature: its loss's temperature, or `None`.
        teacher_lm_head: whether its loss sets a teacher LM head.
        student: the name of the student model it reads.
        student_vocab: the student's vocabulary size as the loss sees it
            (token divergences), or `None` where unknown.
    """

    name: str
    loss: str
    teacher_layer: object = None
    teachers: tuple = ()
    sparse: bool = False
    temperature: object = None
    teacher_lm_head: bool = False
    student: str = ""
    student_vocab: object = None


class CacheRequirements(NamedTuple):
    """What a teacher cache must match to stand in for a distiller's
    teachers, as the distiller describes them (`requirements`).

    Attributes:
        distiller: the distiller's name (for messages).
        teachers: the teachers' names, in order.
        fingerprint: the teachers' combined weights fingerprint
            (`keras_kd.cache.teachers_fingerprint`).
        ensemble: `"logits"` or `"losses"`.
        teacher_augmentation: whether the teachers see augmented inputs.
        extensions: the options set on the distiller that run teacher
            layers within the step (`"local_modules"`, `"layerwise_lr"`).
        teacher_diagnostics: whether diagnostics read teacher layers.
        diagnostics: whether there are diagnostics (they compare dense
            teacher logits).
        terms: a `TermRequirement` per term, in order.
    """

    distiller: str
    teachers: tuple
    fingerprint: str
    ensemble: str
    teacher_augmentation: bool
    extensions: tuple
    teacher_diagnostics: bool
    diagnostics: bool
    terms: tuple


def requirements(name: str, teachers: Sequence[Any], teacher_side: Any,
                 terms: Iterable[Any], diagnostics: Any,
                 extensions: Iterable[str] = ()) -> CacheRequirements:
    """The `CacheRequirements` of a distiller, from its parts.

    Args:
        name: the distiller's name.
        teachers: the teacher models, in order.
        teacher_side: their `keras_kd.teachers.Teachers`.
        terms: the distiller's `keras_kd.step.BoundTerm`s, in order.
        diagnostics: its `keras_kd.diagnostics.Diagnostics`.
        extensions: the names of the options set that run teacher layers
            within the step.

    Returns:
        A `CacheRequirements`. Computing the fingerprint hashes every
        teacher weight: build it only for data that carries a cache.
    """
    feature_teachers = iter(teacher_side.term_teachers)
    needs = []
    for bound in terms:
        loss = bound.loss
        sparse = isinstance(loss, TokenDivergence)
        if bound.reads_features:
            needs.append(TermRequirement(
                bound.name, type(loss).__name__, bound.teacher_layer,
                tuple(next(feature_teachers))))
            continue
        choice = bound.student_choice
        needs.append(TermRequirement(
            bound.name, type(loss).__name__, sparse=sparse,
            temperature=getattr(loss, "temperature", None),
            teacher_lm_head=getattr(loss, "teacher_lm_head", None)
            is not None,
            student=choice.model_name,
            student_vocab=(loss.vocab_sizes(None, choice.shape)[1]
                           if sparse else None)))
    return CacheRequirements(
        distiller=name,
        teachers=tuple(t.name for t in teachers),
        fingerprint=teachers_fingerprint(teachers)[0],
        ensemble=teacher_side.ensemble,
        teacher_augmentation=has_teacher_augmentation(teacher_side),
        extensions=tuple(extensions),
        teacher_diagnostics=any(diagnostics.teacher_layers),
        diagnostics=bool(diagnostics.metrics),
        terms=tuple(needs))


def verify(needs: CacheRequirements, tag: str,
           feature_keys: Collection[tuple[int, str]]) -> None:
    """Checks that a cache (its tag and the features it holds) fits a
    distiller's `CacheRequirements`.

    Raises:
        ValueError: the cache was built from other teachers (another
            fingerprint), for another ensemble mode, lacks a feature a term
            reads, or the distiller runs its teachers in a way a cache
            cannot replace (teacher augmentation, local modules, layer-wise
            learning rates, diagnostics on teacher layers).
    """
    info = CacheTag.parse(tag)
    names = list(needs.teachers)
    if needs.fingerprint != info.fingerprint:
        raise ValueError(
            "This teacher cache was built from "
            f"{describe_teachers(info.fingerprint)}, but the distiller "
            f"'{needs.distiller}' has teachers {names} (fingerprint "
            f"{needs.fingerprint}): other teachers, or other weights. "
            "Rebuild the cache with `keras_kd.cache_teacher_outputs` from "
            "these teachers."
        )
    if needs.teacher_augmentation:
        raise ValueError(AUGMENTATION_ERROR)
    for option in needs.extensions:
        raise ValueError(
            f"`{option}` runs the teacher on the inputs within each step "
            "(its layers, module by module or for the divergence "
            f"signals), which a teacher cache cannot replace; train the "
            f"distiller with `{option}` from the live teacher."
        )
    if needs.teacher_diagnostics:
        raise ValueError(
            "Diagnostics that read teacher layers (`AttentionIoU`) need the "
            "live teachers; a teacher cache holds their outputs and the "
            "cached features of the distillation terms only."
        )
    if (info.mode == "mean" and len(names) > 1
            and needs.ensemble != "logits"):
        raise ValueError(
            "This teacher cache holds the averaged outputs of the "
            f"{len(names)} teachers (built with `ensemble=\"logits\"`), "
            "but the distiller uses `ensemble=\"losses\"`, which needs each "
            "teacher's outputs: "
            "build the cache with `ensemble=\"losses\"`."
        )
    if info.per_token:
        _verify_per_token(needs, info)
    missing = [(term.name, teacher, term.teacher_layer)
               for term in needs.terms if term.teacher_layer is not None
               for teacher in term.teachers
               if (teacher, term.teacher_layer) not in feature_keys]
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


def _verify_per_token(needs, info):
    """The checks of a per-token top-k cache: only the token divergences
    read its sparse distributions, at the temperature it was built with, on
    a student of the same vocabulary."""
    where = (f"This teacher cache holds per-token top-{info.top_k} "
             f"distributions (temperature {info.temperature:g})")
    if needs.diagnostics:
        raise ValueError(
            f"{where}, but the diagnostics compare full teacher logits; "
            "build the cache with `top_k=None`, or leave `diagnostics` out.")
    if info.mode == "each" and len(needs.teachers) > 1 and \
            needs.ensemble == "logits":
        raise ValueError(
            f"{where} of each teacher, but the distiller averages its "
            "teachers' logits (`ensemble=\"logits\"`), which sparse "
            "distributions cannot give: build the cache with "
            "`ensemble=\"logits\"`.")
    for term in needs.terms:
        if term.teacher_layer is not None:
            continue
        if not term.sparse:
            raise ValueError(
                f"{where}; the term '{term.name}' reads it with "
                f"{term.loss}, but only the token divergences "
                "(`keras_kd.losses.ForwardKL`, `ReverseKL`, "
                "`GeneralizedJSD`, `SkewKL`) read sparse teachers. Use one "
                "of them, or build the cache with `top_k=None`.")
        if not math.isclose(term.temperature, info.temperature,
                            rel_tol=1e-6):
            raise ValueError(
                f"{where}; the term '{term.name}' uses temperature "
                f"{term.temperature:g}. A sparse teacher cannot be "
                "re-softened: build the cache with "
                f"`temperature={term.temperature:g}`, or give the loss "
                f"`temperature={info.temperature:g}`.")
        if term.teacher_lm_head:
            raise ValueError(
                f"{where}, not teacher hidden states; leave "
                f"`teacher_lm_head` of the term '{term.name}' unset.")
        vocab = term.student_vocab
        if vocab is not None and info.max_index is not None and \
                info.max_index >= vocab:
            # Out-of-range ids would give NaN on JAX, silently.
            raise ValueError(
                f"{where} with token ids up to {info.max_index}, but the "
                f"student '{term.student}' of the term '{term.name}' "
                f"predicts {vocab} tokens (ids 0 to {vocab - 1}). Rebuild "
                "the cache with `keras_kd.cache_teacher_outputs` from a "
                "teacher of the student's vocabulary.")
        if vocab is not None and vocab != info.num_classes:
            raise ValueError(
                f"{where} over {info.num_classes} tokens, but the student "
                f"'{term.student}' of the term '{term.name}' predicts "
                f"{vocab}. A sparse cache needs equal vocabularies "
                "(`vocab_mapping` applies to dense teachers only).")


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
    if isinstance(data, TeacherCache):
        return (data.tag, data.feature_keys), data
    if isinstance(data, CachedDataset):
        return (data.cache.tag, data.cache.feature_keys), data
    if is_tf_dataset(data):
        sample = unpack_x(data.element_spec)
    elif isinstance(data, keras.utils.PyDataset):
        sample = unpack_x(data[0]) if len(data) else None
    elif inspect.isgenerator(data):
        first, data = _peek(data)
        sample = unpack_x(first)
    else:
        sample = data
    if not is_cached(sample):
        return None, data
    tag, entry = tag_and_entry(sample)
    return (str(tag), feature_keys_of(entry)), data


def check_data(needs: Callable[[], CacheRequirements], reader: Any,
               data: Any) -> Any:
    """Checks data that may carry a teacher cache and lets `reader` read
    the caches that fit; data without a cache passes.

    Args:
        needs: a function that returns the distiller's
            `CacheRequirements` (called only when the data carries a
            cache).
        reader: the distiller step's `keras_kd.cache.CacheReader`.
        data: a `TeacherCache`, an `x` or a batch (`TeacherCache.inputs`),
            a `CachedDataset`, a `tf.data.Dataset`, a `PyDataset` or a
            generator.

    Returns:
        `data`, except that a generator it had to peek at is replaced by
        one that yields the peeked batch first.

    Raises:
        ValueError: a cache does not fit (see `verify`).
    """
    facts, data = _inspect(data)
    found = [facts] if facts is not None else []
    if found:
        record = needs()
        for tag, feature_keys in found:
            verify(record, tag, feature_keys)
            reader.accept(tag)
    return data


def _once(function):
    """`function` called at most once (the fingerprint hashes every teacher
    weight)."""
    result = []

    def once():
        if not result:
            result.append(function())
        return result[0]

    return once


def check_call(
    needs: Callable[[], CacheRequirements], reader: Any, method: str,
    args: tuple[Any, ...], kwargs: dict[str, Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Checks the cached data given to a distiller's `<method>(*args,
    **kwargs)` (`fit`, `evaluate`, `train_on_batch`, `test_on_batch`:
    `x`, and `fit`'s `validation_data`) before Keras runs a step; data
    without a cache passes.

    Args:
        needs, reader: as in `check_data`.
        method: the name of the `keras.Model` method called.
        args, kwargs: its arguments.

    Returns:
        `(args, kwargs)` to call Keras with: the same, except that a
        generator it had to peek at is replaced by one that yields the
        peeked batch first.
    """
    try:
        bound = inspect.signature(getattr(keras.Model, method)).bind(
            None, *args, **kwargs)
    except TypeError:
        return args, kwargs  # Keras reports the wrong call.
    arguments = bound.arguments
    needs = _once(needs)
    if arguments.get("x") is not None:
        arguments["x"] = check_data(needs, reader, arguments["x"])
    validation = arguments.get("validation_data")
    if isinstance(validation, (tuple, list)):
        check_data(needs, reader, validation[0])
    elif validation is not None:
        arguments["validation_data"] = check_data(needs, reader, validation)
    return bound.args[1:], bound.kwargs

"""The checks of a teacher cache against a distiller, before Keras runs a
step: the teachers' fingerprint, the ensemble mode, the cached features and
what a cache cannot replace."""

import inspect
import math

import keras

from keras_kd.cache._data import is_tf_dataset, unpack_x
from keras_kd.cache.reader import (AUGMENTATION_ERROR, feature_keys_of,
                                   has_teacher_augmentation, is_cached,
                                   tag_and_entry)
from keras_kd.cache.tag import CacheTag, describe_teachers, teachers_fingerprint
from keras_kd.losses.divergences import TokenDivergence


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
            f"This teacher cache was built from {describe_teachers(info.fingerprint)}"
            f", but the distiller '{distiller.name}' has teachers {names} "
            f"(fingerprint {fingerprint}): other teachers, or other weights. "
            "Rebuild the cache with `keras_kd.cache_teacher_outputs` from "
            "these teachers."
        )
    step = distiller.distillation_step
    teachers = step.teachers
    if has_teacher_augmentation(teachers):
        raise ValueError(AUGMENTATION_ERROR)
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


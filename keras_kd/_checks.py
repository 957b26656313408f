"""Checks of the numbers given to constructors: a NaN or infinite weight,
temperature or power would train to NaN, or run with a meaningless value,
so it is refused where it is given; and the checks of a `Distiller`'s
arguments taken together."""

import math


def _number(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a number, got {value!r}."
        ) from None


def finite(name, value):
    """`value` as a float; a `ValueError` when it is NaN or infinite."""
    value = _number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")
    return value


def non_negative(name, value):
    """`value` as a float; a `ValueError` unless it is finite and >= 0."""
    value = _number(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"`{name}` must be a finite number >= 0, got {value}."
        )
    return value


def positive(name, value):
    """`value` as a float; a `ValueError` unless it is finite and > 0."""
    value = _number(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"`{name}` must be a finite number > 0, got {value}."
        )
    return value


def one_extension(layerwise_lr, local_modules):
    """Refuses local modules together with layer-wise learning rates."""
    if local_modules is not None and layerwise_lr is not None:
        raise ValueError(
            "`local_modules` and `layerwise_lr` cannot be combined: "
            "local modules train each module by its own gradient and "
            "do not update layer-wise learning-rate scales."
        )


def something_trains(terms, student_loss_weight, local_modules, name):
    """Refuses a distiller in which every loss has weight 0: nothing would
    train the student (each backend would fail differently, or train on a
    zero loss without a word)."""
    if student_loss_weight or any(term.weight for term in terms) or \
            local_modules is not None:
        return
    raise ValueError(
        f"Every loss of the distiller '{name}' has weight 0 "
        f"(`student_loss_weight=0` and terms "
        f"{[term.name for term in terms]} all of weight 0), so nothing "
        "would train the student. Give the student loss or a term a "
        "positive weight."
    )

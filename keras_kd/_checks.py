"""Checks of the numbers given to constructors: a NaN or infinite weight,
temperature or power would train to NaN, or run with a meaningless value,
so it is refused where it is given."""

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

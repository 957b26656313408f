"""Ranks of tensor entries: exact ranks and a differentiable soft rank.

Everything here is written with `keras.ops`, so it runs unchanged on every
Keras backend and device; the backend-specific pieces are a faster sort on
TensorFlow (`keras_kd.ops.sort`), which returns the same permutation, and
the scatter that puts ranks back in place, a native op on PyTorch
(`keras_kd.ops.scatter`).

Both functions sort each slice once (O(n log n): `keras.ops.argsort`, or
on TensorFlow the key sort of `keras_kd.ops.sort`) and work on the sorted
values:

- `exact_rank` gives the ranks of `scipy.stats.rankdata` (1-based, ties get
  the average of the ranks they span). It has no gradient.
- `soft_rank` adds to those exact ranks a smooth correction computed from
  each element's `window` nearest neighbours on either side in sorted order,
  so its cost is O(n (log n + window)) time and O(n) extra memory per slice
  (O(n window) on PyTorch, see `keras_kd.ops.window`) instead of the O(n^2)
  of an all-pairs soft rank.
"""

from __future__ import annotations

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_kd.ops.scatter import scatter_rows
from keras_kd.ops.sort import sort_rows
from keras_kd.ops.window import window_brackets
from keras_kd._typing import Tensor

DEFAULT_STRENGTH = 0.1
DEFAULT_WINDOW = 16


def _to_rows(x, axis):
    """Moves `axis` last and flattens the other axes: returns rows, undo."""
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if not keras.backend.is_float_dtype(dtype):
        x, dtype = ops.cast(x, "float32"), "float32"
    elif dtype in ("float16", "bfloat16"):
        # Ranks are counts up to n: compute them in float32 (half precision
        # cannot even hold an `arange` on every backend) and cast back.
        x = ops.cast(x, "float32")
    ndim = len(x.shape)
    if ndim == 0:
        raise ValueError("Ranks need a tensor with at least one axis.")
    axis = axis % ndim
    n = x.shape[axis]
    if n is None:
        raise ValueError(
            "The ranked axis must have a static length; got shape "
            f"{x.shape} and axis={axis}."
        )
    last = axis == ndim - 1
    moved = x if last else ops.moveaxis(x, axis, -1)
    moved_shape = ops.shape(moved)
    rows = ops.reshape(moved, (-1, n))

    def undo(values):
        values = ops.cast(ops.reshape(values, moved_shape), dtype)
        return values if last else ops.moveaxis(values, -1, axis)

    return rows, n, undo


_TIE_REACH = 4  # runs of up to 5 equal values: averaged by neighbours


def _positions(rows):
    """1, 2, ..., n in every row."""
    n = rows.shape[-1]
    return ops.broadcast_to(
        ops.arange(1, n + 1, dtype=rows.dtype)[None, :], ops.shape(rows)
    )


def _tie_offsets(sorted_rows, reach):
    """Half the number of equal values among the `reach` entries just above
    each entry of a sorted row, minus half the number among the `reach`
    just below. Added to the positions this averages every run of at most
    `reach + 1` equal values; it is one elementwise pass (NaN padding
    compares unequal to everything)."""
    n = sorted_rows.shape[-1]
    padded = ops.pad(
        sorted_rows, [[0, 0], [reach, reach]], constant_values=float("nan")
    )
    offsets = None
    for k in range(1, reach + 1):
        above = ops.equal(sorted_rows, padded[:, reach + k: reach + k + n])
        below = ops.equal(sorted_rows, padded[:, reach - k: reach - k + n])
        step = ops.cast(above, sorted_rows.dtype) - ops.cast(
            below, sorted_rows.dtype
        )
        offsets = step if offsets is None else offsets + step
    return 0.5 * offsets


def _has_run_longer_than(sorted_rows, length):
    """Whether some sorted row holds more than `length` equal values."""
    return ops.any(
        ops.equal(sorted_rows[:, length:], sorted_rows[:, :-length])
    )


def _tied_ranks_of_sorted(sorted_rows, n):
    """1-based ranks, ties averaged, of rows that are already sorted."""
    positions = _positions(sorted_rows)
    if n == 1:
        return positions
    # Equal values are neighbours in a sorted row. Short runs (the usual
    # case for float logits: no ties, or a few pairs) are averaged by
    # comparing each entry with its nearest neighbours; the general
    # averaging runs only when some row has a longer run.
    reach = min(_TIE_REACH, n - 1)
    if keras.backend.backend() == "torch":
        return _torch_tied_ranks(sorted_rows, positions, n, reach)
    ranks = positions + _tie_offsets(sorted_rows, reach)
    return _with_long_run_correction(ranks, sorted_rows, positions, n, reach)


def _torch_tied_ranks(sorted_rows, positions, n, reach):
    """`_tied_ranks_of_sorted` on PyTorch, whose ops run eagerly: only the
    rows that hold a tie are averaged (a copy of those rows, then the
    general path), so a batch without ties costs one comparison of
    neighbours instead of the `4 * reach` passes of `_tie_offsets`."""
    import torch

    tied = torch.any(sorted_rows[:, 1:] == sorted_rows[:, :-1], dim=-1)
    rows = torch.nonzero(tied).squeeze(-1)
    if rows.numel() == 0:
        return positions
    subset = sorted_rows.index_select(0, rows)
    subset_positions = positions[: rows.numel()]
    subset_ranks = _with_long_run_correction(
        subset_positions + _tie_offsets(subset, reach),
        subset, subset_positions, n, reach,
    )
    return positions.contiguous().index_copy_(0, rows, subset_ranks)


def _with_long_run_correction(ranks, sorted_rows, positions, n, reach):
    """`ranks` (`positions` plus the tie offsets of `reach` neighbours, or
    the soft rank's brackets of a window of `reach`) plus what they miss of
    the averaged ranks: nothing unless some row has a run of more than
    `reach + 1` equal values, and only computed in that case.

    The check is a `keras.ops.cond` in a traced step. Where its value is
    already known (eager PyTorch and TensorFlow, JAX outside `jax.jit`) the
    branch is picked in Python: nothing is added to rows without long runs,
    and `jax.lax.cond` does not trace and compile both branches again on
    every eager call (new closures each time, about a second per call on
    CPU)."""
    if n <= reach + 1:
        return ranks

    def correction():
        return (_average_tied_positions(sorted_rows, positions, n)
                - positions - _tie_offsets(sorted_rows, reach))

    long_run = _has_run_longer_than(sorted_rows, reach + 1)
    known = _known_value(long_run)
    if known is None:
        return ranks + ops.cond(
            long_run, correction, lambda: ops.zeros_like(positions))
    return ranks + correction() if known else ranks


def _known_value(pred):
    """The Python bool of a scalar predicate when its value is available
    now (no trace in progress), else None."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        try:
            return bool(pred)
        except jax.errors.ConcretizationTypeError:  # traced under jit
            return None
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(pred) if tf.executing_eagerly() else None
    try:
        return bool(pred)
    except (TypeError, ValueError, RuntimeError):  # a symbolic value
        return None


def _average_tied_positions(sorted_rows, positions, n):
    """Equal values form contiguous runs in a sorted row; the rank of every
    element of a run is the mean of the run's 1-based positions. Runs are
    numbered with a cumulative sum and averaged with one `segment_sum`
    (O(n) per row, independent of the run lengths)."""
    shape = ops.shape(sorted_rows)
    num_rows = shape[0]
    differs = ops.not_equal(sorted_rows[:, 1:], sorted_rows[:, :-1])
    starts_run = ops.concatenate(
        [ops.ones_like(differs[:, :1]), differs], axis=-1
    )
    run_ids = ops.cumsum(ops.cast(starts_run, "int32"), axis=-1) - 1
    row_offsets = ops.expand_dims(ops.arange(num_rows, dtype="int32") * n, -1)
    run_ids = ops.reshape(run_ids + row_offsets, (-1,))
    ones = ops.ones_like(run_ids, dtype=sorted_rows.dtype)
    values = ops.stack([ops.reshape(positions, (-1,)), ones], axis=-1)
    # Per run: (sum of positions, length), read back by every member.
    totals = ops.take(
        ops.segment_sum(values, run_ids, num_segments=num_rows * n),
        run_ids,
        axis=0,
    )
    return ops.reshape(totals[:, 0] / totals[:, 1], shape)


def exact_rank(x: Tensor, axis: int = -1) -> Tensor:
    """Exact ranks along `axis`, 1-based, with ties averaged.

    Matches `scipy.stats.rankdata(x, axis=axis)` (the "average" method).
    Computed with `keras.ops` (one sort per slice), so it runs inside compiled
    training steps on any backend. The result carries no gradient.

    Args:
        x: tensor with a static length along `axis`. Integer inputs are cast
            to float32.
        axis: the axis along which entries are ranked.

    Returns:
        A float tensor of the shape of `x`.

    Example:

    >>> np.asarray(exact_rank(np.array([0.5, -1.0, 0.5, 3.0])))
    array([2.5, 1. , 2.5, 4. ])
    """
    x = ops.convert_to_tensor(x)  # NumPy input: torch cannot stop its gradient
    rows, n, undo = _to_rows(ops.stop_gradient(x), axis)
    sorted_rows, permutation = sort_rows(rows, index_dtype=None)
    ranks = _tied_ranks_of_sorted(sorted_rows, n)
    return ops.stop_gradient(undo(scatter_rows(ranks, permutation)))


def soft_rank(
    x: Tensor,
    regularization_strength: float = DEFAULT_STRENGTH,
    axis: int = -1,
    window: int | None = DEFAULT_WINDOW,
) -> Tensor:
    """Differentiable ranks along `axis` (1-based, ties averaged in the limit).

    An all-pairs soft rank writes the rank of `x_i` as
    `0.5 + sum_j sigmoid((x_i - x_j) / eps)`, which tends to the exact
    averaged rank as `eps -> 0` but costs O(n^2) per slice. This function
    keeps the exact ranks for free and only smooths comparisons between
    near neighbours:

        soft_rank(x)_i = rank(x)_i
            + sum_{j in W(i)} [sigmoid((x_i - x_j) / eps) - step(x_i - x_j)]

    where `rank` is the exact averaged rank (`exact_rank`), `step(d)` is 1, 0.5
    or 0 for `d` > 0, = 0 or < 0, and `W(i)` holds the `window` elements just
    below and the `window` elements just above `x_i` in sorted order. The
    pairs inside the window are exactly the terms of the all-pairs soft rank;
    the pairs outside it are counted as hard 0/1 comparisons. Properties:

    - As `eps -> 0` every bracket vanishes and the result equals
      `scipy.stats.rankdata` (ties averaged, since `sigmoid(0) = step(0) =
      0.5`); once `eps` is well below the smallest gap between distinct
      values it is exact up to float rounding.
    - `d soft_rank_i / d x_i = sum_{j in W(i)} sigmoid'((x_i - x_j) / eps)
      / eps > 0`, so the gradient is finite and nonzero for distinct inputs
      (unless all `2 * window` neighbours are dozens of `eps` away, where
      float32 underflows). It depends only on differences, so each row of
      the Jacobian sums to 0.
    - It differs from the all-pairs soft rank only by the dropped brackets
      of pairs more than `window` places apart in sorted order; each is
      below `sigmoid(-gap / eps)`, with `gap` the distance from `x_i` to its
      `window`-th neighbour. With `window >= n - 1` it *is* the all-pairs
      soft rank. The entries of a slice still sum to `n (n + 1) / 2`.
    - It is smooth as long as the sorted order does not change. Where two
      entries swap places (at a tie) their own windows shift by one place,
      so their values can jump by at most the size of a dropped bracket
      (negligible when the window spans several `eps`). For the same
      reason tied entries get equal soft ranks only up to such brackets,
      and exactly equal ones as `eps -> 0`.

    Cost: one sort per slice, one scatter to put the ranks back in place
    (`sorted_soft_rank` skips it), and for the window one exponential per
    entry plus a few multiplications per entry and window step, in one
    elementwise pass forward and one backward: O(n (log n + window)) time
    and O(n) extra memory per slice (the all-pairs form needs n x n). On
    PyTorch, whose ops run eagerly, the window is one sigmoid per pair
    instead, with its `window * (n + window)` pairs per slice kept for the
    backward pass (up to `keras_kd.ops.window.KEPT_PAIRS_BYTES` in all).
    On CPU the sort dominates (see `docs/ops.md` for timings).

    `eps` is in the units of `x`: scale it with the spread of your inputs
    (the losses in `keras_kd.losses.correlation` apply it to `logits / tau`).

    Args:
        x: float tensor with a static length along `axis`.
        regularization_strength: `eps > 0`, the width of the sigmoid. Smaller
            values give ranks closer to the exact ones and sharper (more
            local) gradients.
        axis: the axis along which entries are ranked.
        window: number of neighbours on each side compared softly. Larger
            values follow the all-pairs soft rank more closely at a linear
            cost; it is capped at `n - 1`.

    Returns:
        A tensor of the shape and float dtype of `x`.

    Example:

    >>> x = np.array([[0.3, -2.0, 0.31, 5.0]], "float32")
    >>> np.round(soft_rank(x, regularization_strength=1e-3), 3)  # ~ exact
    array([[2., 1., 3., 4.]], dtype=float32)
    >>> np.round(soft_rank(x, regularization_strength=0.1), 3)  # 0.3 ~ 0.31
    array([[2.475, 1.   , 2.525, 4.   ]], dtype=float32)
    """
    rows, n, undo = _to_rows(x, axis)
    _, ranks, permutation = _soft_rank_of_rows(
        rows, n, regularization_strength, window
    )
    return undo(scatter_rows(ranks, permutation))


def sorted_soft_rank(
    x: Tensor, regularization_strength: float = DEFAULT_STRENGTH,
    window: int | None = DEFAULT_WINDOW,
) -> tuple[Tensor, Tensor]:
    """`soft_rank` along the last axis, left in sorted order.

    Returns `(ranks, order)` with `order` the ascending sort permutation of
    every slice and `ranks[..., p]` the soft rank of `x[..., order[..., p]]`
    (so `ranks` is nondecreasing up to the smoothing). Quantities that are
    unchanged when both of their vectors are permuted together, such as a
    correlation with other ranks gathered by `order`, can use this form
    and skip the scatter that puts the ranks back in place.

    Args:
        x: float tensor with a static last dimension.
        regularization_strength: `eps > 0`, as for `soft_rank`.
        window: neighbours compared softly on each side, as for `soft_rank`.

    Returns:
        The soft ranks (shape and float dtype of `x`) and the int32 order.
    """
    _, ranks, order = sort_and_soft_rank(x, regularization_strength, window)
    return ranks, order


def sort_and_soft_rank(
    x: Tensor, regularization_strength: float = DEFAULT_STRENGTH,
    window: int | None = DEFAULT_WINDOW, index_dtype: str | None = "int32",
) -> tuple[Tensor, Tensor, Tensor]:
    """`sorted_soft_rank` that also returns the sorted values.

    Returns `(sorted_x, ranks, order)`: `sorted_x[..., p] = x[..., order[...,
    p]]` (differentiable with respect to `x`), and `ranks` and `order` as
    from `sorted_soft_rank`. For losses that compute several terms in the
    sorted order from one sort.

    Args:
        x: float tensor with a static last dimension.
        regularization_strength: `eps > 0`, as for `soft_rank`.
        window: neighbours compared softly on each side, as for `soft_rank`.
        index_dtype: dtype of `order`. `None` keeps the sort's own: int64
            on PyTorch (`torch.sort`), int32 elsewhere. The gather of
            `keras_kd.ops.scatter.gather_rows` reads that without a cast.

    Returns:
        The sorted values and the soft ranks (shape and float dtype of `x`),
        and the order (int32 unless `index_dtype` says otherwise).

    Example:

    >>> x = np.array([[0.3, -2.0, 5.0]], "float32")
    >>> values, ranks, order = sort_and_soft_rank(x, 1e-3)
    >>> np.asarray(values), np.asarray(ranks), np.asarray(order)
    (array([[-2. ,  0.3,  5. ]], dtype=float32), array([[1., 2., 3.]], dtype=float32), array([[1, 0, 2]], dtype=int32))
    """
    rows, n, undo = _to_rows(x, -1)
    sorted_rows, ranks, permutation = _soft_rank_of_rows(
        rows, n, regularization_strength, window
    )
    if index_dtype is not None:
        permutation = ops.cast(permutation, index_dtype)
    shape = ops.shape(x)
    return undo(sorted_rows), undo(ranks), ops.reshape(permutation, shape)


def _checked_strength(strength):
    """A Python or NumPy number (0-d arrays included) as a Python float,
    checked to be finite and positive; tensors pass through unchecked (their
    value is not known while a step is traced)."""
    if isinstance(strength, np.ndarray) and strength.ndim == 0:
        strength = strength.item()
    if isinstance(strength, (bool, np.bool_)):
        raise ValueError(
            "`regularization_strength` must be a positive number, got "
            f"{strength!r}."
        )
    if not isinstance(strength, numbers.Real):
        return strength
    strength = float(strength)  # used at full precision
    if not (strength > 0 and math.isfinite(strength)):
        raise ValueError(
            "`regularization_strength` must be positive and finite, got "
            f"{strength}."
        )
    return strength


def _soft_rank_of_rows(rows, n, regularization_strength, window):
    """Sorts `rows` (shape `(rows, n)`): returns the sorted rows, the soft
    ranks in sorted order and the sort permutation."""
    regularization_strength = _checked_strength(regularization_strength)
    window = int(window)
    if window < 1:
        raise ValueError(f"`window` must be at least 1, got {window}.")
    window = min(window, n - 1)
    sorted_rows, permutation = sort_rows(rows, index_dtype=None)
    positions = _positions(rows)
    if window < 1:  # one entry per row
        return sorted_rows, positions, permutation
    if isinstance(regularization_strength, float):
        inverse_strength = 1.0 / regularization_strength  # full precision
    else:
        inverse_strength = 1.0 / ops.cast(regularization_strength, rows.dtype)
    ranks = window_brackets(sorted_rows, inverse_strength, window,
                            start=positions)
    # A tied pair inside the window gets sigmoid(0) = 1/2 each way, which
    # averages its places exactly, as `_tie_offsets(window)` would; only
    # runs of more than `window + 1` equal values need a correction.
    frozen = ops.stop_gradient(sorted_rows)
    ranks = _with_long_run_correction(ranks, frozen, positions, n, window)
    return sorted_rows, ranks, permutation


def pairwise_soft_rank(x: Tensor,
                       regularization_strength: float = DEFAULT_STRENGTH,
                       axis: int = -1) -> Tensor:
    """All-pairs soft rank, `0.5 + sum_j sigmoid((x_i - x_j) / eps)`.

    The O(n^2) time and memory reference that `soft_rank` approximates
    (equal to `soft_rank(x, eps, window=n - 1)`). Only practical for small
    `n`; kept for tests and benchmarks.

    Args:
        x: float tensor with a static length along `axis`.
        regularization_strength: `eps > 0`.
        axis: the axis along which entries are ranked.

    Returns:
        A tensor of the shape of `x`.
    """
    rows, n, undo = _to_rows(x, axis)
    difference = rows[:, :, None] - rows[:, None, :]
    ranks = 0.5 + ops.sum(
        ops.sigmoid(difference / regularization_strength), axis=-1
    )
    return undo(ranks)


__all__ = [
    "exact_rank",
    "pairwise_soft_rank",
    "soft_rank",
    "sort_and_soft_rank",
    "sorted_soft_rank",
]

"""Ranks of tensor entries: exact ranks and a differentiable soft rank.

Everything here is written with `keras.ops`, so it runs unchanged on every
Keras backend and device; the one backend-specific piece is a faster sort
used only under TensorFlow with XLA (`keras_kd.ops.sort`), which returns
the same permutation.

Both functions sort each slice once (O(n log n): `keras.ops.argsort`, or
under TensorFlow with XLA the faster key sort of `keras_kd.ops.sort`) and
work on the sorted values:

- `exact_rank` gives the ranks of `scipy.stats.rankdata` (1-based, ties get
  the average of the ranks they span). It has no gradient.
- `soft_rank` adds to those exact ranks a smooth correction computed from
  each element's `window` nearest neighbours on either side in sorted order,
  so its cost is O(n (log n + window)) time and O(n) extra memory per slice
  instead of the O(n^2) of an all-pairs soft rank.
"""

import keras
from keras import ops

from keras_kd.ops.sort import argsort_rows

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


def _tied_ranks_of_sorted(sorted_rows, n):
    """1-based ranks, ties averaged, of rows that are already sorted."""
    if n == 1:
        return ops.ones_like(sorted_rows)
    positions = ops.broadcast_to(
        ops.arange(1, n + 1, dtype=sorted_rows.dtype)[None, :],
        ops.shape(sorted_rows),
    )
    # Rows of distinct values (the usual case for float logits) are ranked
    # by position; only when some row has a tie is the averaging run.
    has_tie = ops.any(
        ops.equal(sorted_rows[:, 1:], sorted_rows[:, :-1])
    )
    return ops.cond(
        has_tie,
        lambda: _average_tied_positions(sorted_rows, positions, n),
        lambda: positions,
    )


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


def _unsort(sorted_values, permutation, n):
    """Puts `sorted_values[r, p]` back at column `permutation[r, p]`."""
    shape = ops.shape(sorted_values)
    num_rows = shape[0]
    row_ids = ops.broadcast_to(
        ops.expand_dims(ops.arange(num_rows, dtype="int32"), -1), shape
    )
    indices = ops.stack(
        [ops.reshape(row_ids, (-1,)), ops.reshape(permutation, (-1,))],
        axis=-1,
    )
    return ops.scatter(indices, ops.reshape(sorted_values, (-1,)), shape)


def _sort_rows(rows):
    permutation = argsort_rows(rows)
    return permutation, ops.take_along_axis(rows, permutation, axis=-1)


def exact_rank(x, axis=-1):
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
    rows, n, undo = _to_rows(ops.stop_gradient(x), axis)
    permutation, sorted_rows = _sort_rows(rows)
    ranks = _tied_ranks_of_sorted(sorted_rows, n)
    return ops.stop_gradient(undo(_unsort(ranks, permutation, n)))


def soft_rank(
    x,
    regularization_strength=DEFAULT_STRENGTH,
    axis=-1,
    window=DEFAULT_WINDOW,
):
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

    Cost: one sort per slice, a few O(n) gathers and scatters (sorting,
    averaging ties, un-sorting) and `window` elementwise passes:
    O(n (log n + window)) time and O(n window) memory per slice for
    forward + backward (the all-pairs form needs n x n). On CPU the sort
    and the window passes dominate (see `docs/ops.md` for timings).

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
    if isinstance(regularization_strength, (int, float)) and not (
        regularization_strength > 0
    ):
        raise ValueError(
            "`regularization_strength` must be positive, got "
            f"{regularization_strength}."
        )
    window = int(window)
    if window < 1:
        raise ValueError(f"`window` must be at least 1, got {window}.")
    rows, n, undo = _to_rows(x, axis)
    permutation, sorted_rows = _sort_rows(rows)
    ranks = _tied_ranks_of_sorted(ops.stop_gradient(sorted_rows), n)
    inverse_strength = 1.0 / ops.cast(regularization_strength, rows.dtype)
    correction = ops.zeros_like(sorted_rows)
    for offset in range(1, min(window, n - 1) + 1):
        # Pairs (p, p + offset) in sorted order, so difference <= 0 and the
        # hard comparison is 0, or 0.5 for a tie.
        difference = sorted_rows[:, :-offset] - sorted_rows[:, offset:]
        tie = ops.cast(ops.equal(difference, 0.0), rows.dtype)
        bracket = ops.sigmoid(difference * inverse_strength) - 0.5 * tie
        # The lower element gains `bracket`, the upper one loses it.
        correction = (
            correction
            + ops.pad(bracket, [[0, 0], [0, offset]])
            - ops.pad(bracket, [[0, 0], [offset, 0]])
        )
    return undo(_unsort(ranks + correction, permutation, n))


def pairwise_soft_rank(x, regularization_strength=DEFAULT_STRENGTH, axis=-1):
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


__all__ = ["exact_rank", "soft_rank", "pairwise_soft_rank"]

"""Pearson correlation along an axis, plain or with one weight per
position, as used by the correlation losses (`PearsonCorrelation`, `DIST`,
`CMKD`, `SpearmanCorrelation` on ranks).

`rho(a, b)` is the cosine similarity of the mean-centred vectors, with the
product of their norms floored at `1e-8`, computed in float32 for
half-precision inputs. A vector whose spread is at rounding level (see
`_correlation`) counts as constant: its correlation is 0 up to that
rounding, and its norm counts as 1 in the gradient.
"""

import keras
import numpy as np
from keras import ops

EPSILON = 1e-8


def pearson_correlation(a, b, axis=-1, epsilon=EPSILON):
    """Pearson correlation of `a` and `b` along `axis`.

    The cosine similarity of the mean-centred vectors,
    `sum(a_c * b_c) / max(|a_c| |b_c|, epsilon)`. A constant vector, or one
    whose spread is at rounding level (the root mean square of its centred
    values at most `n + 4` machine epsilons of its dtype times that of its
    values, for `n` entries along `axis`; float32 epsilons for the `n` of
    half-precision inputs), has correlation 0 with anything (up to that
    rounding) and a bounded gradient.

    Args:
        a: tensor.
        b: tensor of the same shape.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the norms.

    Returns:
        The correlations, with `axis` removed.
    """

    a, b = ops.convert_to_tensor(a), ops.convert_to_tensor(b)

    def centre(x):
        return x - ops.mean(x, axis=axis, keepdims=True)

    return _correlation(
        a, b, centre, ops.sum, axis, epsilon, _length(a, axis)
    )


def weighted_pearson_correlation(a, b, weights, axis=0, epsilon=EPSILON):
    """Pearson correlation along `axis` with one weight per position.

    Means, covariance and variances are weighted by `weights` (non-negative,
    one per entry along `axis`). A position of weight 0 has no influence at
    all: the result equals the unweighted correlation of the other
    positions. With all weights equal it is `pearson_correlation`. If all
    weights are 0 the result is 0.

    Args:
        a: tensor.
        b: tensor of the same shape.
        weights: tensor of shape `(a.shape[axis],)`.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the weighted norms.

    Returns:
        The correlations, with `axis` removed.
    """
    shape = [1] * len(a.shape)
    shape[axis] = -1

    def weights_like(x):
        return ops.reshape(ops.cast(weights, x.dtype), shape)

    def centre(x):
        w = weights_like(x)
        total = ops.sum(w, axis=axis, keepdims=True)
        mean = ops.divide_no_nan(
            ops.sum(w * x, axis=axis, keepdims=True), total
        )
        return x - mean

    def weighted_sum(x, axis):
        return ops.sum(weights_like(x) * x, axis=axis)

    return _correlation(
        a, b, centre, weighted_sum, axis, epsilon, _length(a, axis)
    )


def _length(x, axis):
    """The number of entries of `x` along `axis` (static when known)."""
    n = x.shape[axis]
    return ops.shape(x)[axis] if n is None else n


# Rounding of the values themselves (a softmax, a division by C), in units
# of their dtype's machine epsilon; see `_correlation`.
_VALUE_ROUNDING = 4.0


def _correlation(a, b, centre, total, axis, epsilon, mean_terms):
    """Cosine similarity of `centre(a)` and `centre(b)` under the sum
    `total`, with the product of the norms floored at `epsilon` and rows at
    rounding level counted as constant.

    Args:
        a: tensor, not centred.
        b: tensor of the same shape, not centred.
        centre: function subtracting the (weighted) mean along `axis`.
        total: function `(x, axis)` summing (with the weights) along `axis`.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the norms.
        mean_terms: how many values `centre` sums to get the mean (0 when
            the mean is known without a sum); the rounding error of that
            mean grows with it.

    Returns:
        The correlations, with `axis` removed, in the dtype of `a`.
    """
    dtype = keras.backend.standardize_dtype(a.dtype)
    value_eps = _machine_epsilon(dtype)
    if dtype in ("float16", "bfloat16"):
        # Sums of squared deviations of probabilities (~1e-7) and their
        # products underflow in half precision: centre and compute in
        # float32.
        a, b = ops.cast(a, "float32"), ops.cast(b, "float32")
    sum_eps = _machine_epsilon(keras.backend.standardize_dtype(a.dtype))
    a_c, b_c = centre(a), centre(b)
    covariance = total(a_c * b_c, axis=axis)
    # A constant row (the all-zero logits of a zero-initialized head, their
    # softmax, their ranks) should centre to exactly 0, but its centred
    # values keep the rounding of the values (a softmax, 1 / C) and of a
    # computed mean: the mean of B equal values is off by up to about B / 2
    # machine epsilons of the value in recursive summation (measured: up to
    # B / 13 for TensorFlow's eager mean). With a norm of that residue
    # (~1e-9 for probabilities) the row's gradient is the other row's
    # direction divided by the residue or by the 1e-8 floor (measured up to
    # about 4e6 for a zero-initialized head). So a row counts as constant
    # when the root mean square of its centred values is at most
    # `tolerance` times that of its values: 4 epsilons of the values' dtype
    # plus `mean_terms` epsilons of the dtype the sums run in. Its norm
    # then counts as 1, so its gradient is the other row's direction. A
    # real spread that small is lost in the rounding of the mean anyway.
    tolerance = _VALUE_ROUNDING * value_eps + ops.cast(
        mean_terms, a.dtype
    ) * sum_eps
    squares_a = _squares_or_one(a, a_c, total, axis, tolerance)
    squares_b = _squares_or_one(b, b_c, total, axis, tolerance)
    norms = ops.sqrt(ops.maximum(squares_a * squares_b, epsilon**2))
    return ops.cast(covariance / norms, dtype)


def _machine_epsilon(dtype):
    if not keras.backend.is_float_dtype(dtype):
        return float(np.finfo("float32").eps)
    if dtype == "bfloat16":
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def _squares_or_one(x, x_c, total, axis, tolerance):
    """The (weighted) sum of squares of the centred `x_c`, or 1 where it is
    at most `tolerance^2` times that of `x` (a constant row, 0 <= 0
    included)."""
    squares = total(x_c * x_c, axis=axis)
    scale = total(x * x, axis=axis)
    constant = squares <= ops.square(tolerance) * scale
    return ops.where(constant, 1.0, squares)

def probability_correlation(a, b):
    """`pearson_correlation` of two probability vectors (last axis): each
    sums to 1, so both have mean `1 / C`."""

    def mean(x):
        return 1.0 / ops.cast(ops.shape(x)[-1], x.dtype)  # may be dynamic

    return correlation_with_known_mean(a, b, mean)


def correlation_with_known_mean(a, b, mean):
    """`pearson_correlation` along the last axis of two vectors whose mean
    is known: `mean(x)` gives it in the dtype of `x`. Centring by it gives
    the same value without two reductions and their gradients (and without
    the rounding of a computed mean)."""

    def centre(x):
        return x - mean(x)

    return _correlation(a, b, centre, ops.sum, -1, EPSILON, 0)

"""Pearson correlation along an axis, plain or with one weight per
position, as used by the correlation losses (`PearsonCorrelation`, `DIST`,
`CMKD`, `SpearmanCorrelation` on ranks).

`rho(a, b)` is the cosine similarity of the mean-centred vectors, with the
product of their norms floored at `1e-8`, computed in float32 for
half-precision inputs. A vector whose spread is at rounding level (see
`_correlation`) counts as constant: its correlation is 0 up to that
rounding, and its norm counts as 1 in the gradient.

On TensorFlow and JAX the correlation is written in `keras.ops` and
differentiated by the backend; XLA fuses it into a few passes. On PyTorch,
where every eager op is a pass over the inputs, it is one
`torch.autograd.Function` with the gradient written out (the same values
and gradients): for a known mean at 256 x 1000, 8 torch ops on the whole
batch forward and backward (43 in all), against 13 (53) for the
`keras.ops` form differentiated by autograd.
"""

import functools

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
    return _correlation(a, b, axis, epsilon, _length(a, axis))


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
    a, b = ops.convert_to_tensor(a), ops.convert_to_tensor(b)
    return _correlation(
        a, b, axis, epsilon, _length(a, axis), weights=weights
    )


def _length(x, axis):
    """The number of entries of `x` along `axis` (static when known)."""
    n = x.shape[axis]
    return ops.shape(x)[axis] if n is None else n


# Rounding of the values themselves (a softmax, a division by C), in units
# of their dtype's machine epsilon; see `_correlation`.
_VALUE_ROUNDING = 4.0


def _correlation(a, b, axis, epsilon, mean_terms, mean=None, weights=None):
    """Cosine similarity of the centred `a` and `b` along `axis`, with the
    product of the norms floored at `epsilon` and rows at rounding level
    counted as constant.

    Args:
        a: tensor, not centred.
        b: tensor of the same shape, not centred.
        axis: the axis along which the vectors lie.
        epsilon: floor of the product of the norms.
        mean_terms: how many values are summed to get the mean (0 when the
            mean is known without a sum); the rounding error of that mean
            grows with it.
        mean: `None` (the mean along `axis` is computed), or the known mean
            of both vectors, a Python number (with `weights`, their
            weighted mean: the constant-row test assumes the centred
            values have weighted sum 0).
        weights: `None`, or one non-negative weight per entry along `axis`:
            means and sums are then weighted.

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
    if isinstance(mean_terms, int):  # a Python number: no tensor, no sync
        tolerance = _VALUE_ROUNDING * value_eps + mean_terms * sum_eps
    else:  # a dynamic length
        tolerance = _VALUE_ROUNDING * value_eps + ops.cast(
            mean_terms, a.dtype
        ) * sum_eps
    if keras.backend.backend() == "torch":
        correlation = _torch_correlation(
            a, b, axis, epsilon, tolerance, mean, weights
        )
    else:
        correlation = _keras_correlation(
            a, b, axis, epsilon, tolerance, mean, weights
        )
    return ops.cast(correlation, dtype)


def _keras_correlation(a, b, axis, epsilon, tolerance, mean, weights):
    """`_correlation` in `keras.ops`, differentiated by the backend."""
    if weights is None:
        def total(x):
            return ops.sum(x, axis=axis)
    else:
        shape = [1] * len(a.shape)
        shape[axis] = -1
        w = ops.reshape(ops.cast(weights, a.dtype), shape)

        def total(x):
            return ops.sum(w * x, axis=axis)

    # The values' (weighted) sum of squares is `total(x_c * x_c) + count *
    # mean^2`, with `count` the (weighted) number of entries: the centred
    # values sum to 0 (`_squares_or_one`).
    if weights is None:
        count = a.shape[axis]
        if count is None:  # a dynamic length
            count = ops.cast(ops.shape(a)[axis], a.dtype)
    else:
        count = ops.sum(w, axis=axis, keepdims=True)

    def centre(x):
        if mean is not None:
            x_mean = mean
        elif weights is None:
            x_mean = ops.mean(x, axis=axis, keepdims=True)
        else:
            x_mean = ops.divide_no_nan(
                ops.sum(w * x, axis=axis, keepdims=True), count)
        mean_squares = count * x_mean * x_mean
        if mean is None or weights is not None:  # kept the axis
            mean_squares = ops.squeeze(mean_squares, axis=axis)
        return x - x_mean, mean_squares

    a_c, a_mean_squares = centre(a)
    b_c, b_mean_squares = centre(b)
    covariance = total(a_c * b_c)
    squares_a = _squares_or_one(total(a_c * a_c), a_mean_squares, tolerance)
    squares_b = _squares_or_one(total(b_c * b_c), b_mean_squares, tolerance)
    norms = ops.sqrt(ops.maximum(squares_a * squares_b, epsilon**2))
    return covariance / norms


def _machine_epsilon(dtype):
    if not keras.backend.is_float_dtype(dtype):
        return float(np.finfo("float32").eps)
    if dtype == "bfloat16":
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def _squares_or_one(squares, mean_squares, tolerance):
    """The (weighted) sum of squares `squares` of the centred vectors, or 1
    where it is at most `tolerance^2` times that of the values (a constant
    row, 0 <= 0 included). The values' sum of squares is `squares +
    mean_squares` (`count * mean^2`): the centred values sum to 0, so no
    pass over the values is needed for it."""
    constant = squares <= tolerance * tolerance * (squares + mean_squares)
    return ops.where(constant, 1.0, squares)


def _torch_correlation(a, b, axis, epsilon, tolerance, mean, weights):
    """`_correlation` on PyTorch: one autograd function (see the module
    docstring)."""
    import torch

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if weights is not None:
        shape = [1] * a.dim()
        shape[axis] = -1
        weights = torch.as_tensor(weights).to(a.dtype).reshape(shape)
    return _torch_function().apply(
        a, b, axis % a.dim(), float(epsilon), float(tolerance),
        None if mean is None else float(mean), weights,
    )


@functools.lru_cache(maxsize=None)
def _torch_function():
    import torch

    class Correlation(torch.autograd.Function):
        """`rho = cov / max(sqrt(S_a S_b), epsilon)` with `cov`, `S_a`,
        `S_b` the (weighted) sums of products of the centred vectors, and
        `S_x` replaced by 1 for a vector at rounding level.

        Gradient with respect to the centred `a` (the same for `b`, with
        the roles swapped): `w (b_c / N - rho a_c / S_a)`, without the
        second term where `S_a` was replaced by 1 or the norm floored.
        Centring by a computed mean adds `-w / sum(w)` times the sum of that
        gradient, which is 0 (both `a_c` and `b_c` have weighted sum 0),
        so it is left out."""

        @staticmethod
        def forward(ctx, a, b, axis, epsilon, tolerance, mean, weights):
            # As in `_keras_correlation`: the values' sum of squares is
            # `total(x_c, x_c) + count * mean^2`.
            if weights is None:
                count = a.shape[axis]
            else:
                count = weights.sum(dim=axis, keepdim=True)

            def centre(x):
                if mean is not None:
                    x_mean = mean
                elif weights is None:
                    x_mean = x.mean(dim=axis, keepdim=True)
                else:
                    weighted = (weights * x).sum(dim=axis, keepdim=True)
                    x_mean = torch.where(count == 0, 0.0, weighted / count)
                mean_squares = count * x_mean * x_mean
                if mean is None or weights is not None:  # kept the axis
                    mean_squares = mean_squares.squeeze(axis)
                return x - x_mean, mean_squares

            def total(x, y):
                if weights is None:
                    return torch.linalg.vecdot(x, y, dim=axis)
                return torch.linalg.vecdot(weights * x, y, dim=axis)

            bound = tolerance * tolerance

            def squares_or_one(x):
                x_c, mean_squares = centre(x)
                squares = total(x_c, x_c)
                constant = squares <= bound * (squares + mean_squares)
                return x_c, torch.where(constant, 1.0, squares), ~constant

            a_c, squares_a, varies_a = squares_or_one(a)
            b_c, squares_b, varies_b = squares_or_one(b)
            covariance = total(a_c, b_c)
            product = squares_a * squares_b
            unfloored = product > epsilon * epsilon
            norms = torch.sqrt(torch.clamp(product, min=epsilon * epsilon))
            correlation = covariance / norms
            ctx.axis = axis
            ctx.save_for_backward(
                a_c, b_c, weights, norms, correlation, squares_a, squares_b,
                varies_a & unfloored, varies_b & unfloored,
            )
            return correlation

        @staticmethod
        def backward(ctx, upstream):
            (a_c, b_c, weights, norms, correlation, squares_a, squares_b,
             active_a, active_b) = ctx.saved_tensors
            axis = ctx.axis
            scale = (upstream / norms).unsqueeze(axis)
            shrink = upstream * correlation

            def gradient(x_c, y_c, squares, active):
                coefficient = torch.where(active, -shrink / squares, 0.0)
                grad = torch.addcmul(
                    y_c * scale, x_c, coefficient.unsqueeze(axis)
                )
                return grad if weights is None else grad * weights

            grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_a = gradient(a_c, b_c, squares_a, active_a)
            if ctx.needs_input_grad[1]:
                grad_b = gradient(b_c, a_c, squares_b, active_b)
            return grad_a, grad_b, None, None, None, None, None

    return Correlation


def probability_correlation(a, b):
    """`pearson_correlation` of two probability vectors (last axis): each
    sums to 1, so both have mean `1 / C`."""
    classes = a.shape[-1]
    if classes is None:  # dynamic: the mean is a tensor
        mean = 1.0 / ops.cast(ops.shape(a)[-1], a.dtype)
        return _correlation(a, b, -1, EPSILON, 0, mean=mean)
    return correlation_with_known_mean(a, b, 1.0 / classes)


def correlation_with_known_mean(a, b, mean):
    """`pearson_correlation` along the last axis of two vectors whose mean
    is known: `mean`, a number. Centring by it gives the same value without
    two reductions and their gradients (and without the rounding of a
    computed mean)."""
    return _correlation(a, b, -1, EPSILON, 0, mean=mean)

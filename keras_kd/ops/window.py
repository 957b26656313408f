"""The smooth part of the windowed soft rank (`keras_kd.ops.rank.soft_rank`).

For sorted rows `x` and `b(i, j) = sigmoid((x_i - x_j) / eps)`, the soft
rank of the entry in sorted place `p` adds to its place the brackets

    sum_{k=1..window} b(p, p + k) - b(p - k, p)

(pairs past either end of the row count 0). `window_brackets` computes
them, with a hand-written gradient, in one of two forms that give the same
values and gradients:

- On TensorFlow and JAX, a running product of neighbour factors summed as
  blocks of fractions: no exponential per pair, and everything fuses into
  one elementwise pass per direction under XLA.
- On PyTorch, whose eager ops each make a pass over memory, one sigmoid per
  window step, added to the row at both ends of each pair in place: eight
  torch ops per step, forward and backward together (ten for inputs too
  large to keep the pairs between the passes), against about thirty for
  the running-product form run eagerly. The number of ops depends on
  `window` only, never on the size of the rows.
"""

from __future__ import annotations

import functools

import keras
from keras import ops

from keras_kd._typing import Tensor


def window_brackets(sorted_rows: Tensor, inverse_strength: float | Tensor,
                    window: int, start: Tensor | None = None) -> Tensor:
    """The soft rank's brackets of rows sorted in ascending order.

    Args:
        sorted_rows: float tensor of shape `(rows, n)`, each row ascending.
        inverse_strength: `1 / eps`: a Python number, or a scalar tensor
            (which then receives a gradient).
        window: neighbours compared softly on each side, `1 <= window < n`.
        start: optional tensor that broadcasts to `sorted_rows` (the soft
            rank's places), added to the brackets without a gradient. The
            PyTorch form adds the brackets into a copy of it: one pass
            fewer than adding it afterwards.

    Returns:
        A tensor of the shape and dtype of `sorted_rows`. Its gradient with
        respect to `sorted_rows` sums to 0 over each row.

    Example:

    >>> x = np.array([[0.0, 0.0, 10.0]], "float32")  # a tie, then a gap
    >>> np.round(np.asarray(window_brackets(x, 1.0, 2)), 3)
    array([[ 0.5, -0.5, -0. ]], dtype=float32)

    Added to the places 1, 2, 3 this gives the tied pair 1.5 each.
    """
    if keras.backend.backend() == "torch":
        return _torch_brackets(sorted_rows, inverse_strength, window, start)
    brackets = _running_product_brackets(sorted_rows, inverse_strength, window)
    return brackets if start is None else brackets + ops.stop_gradient(start)


def _running_product_brackets(sorted_rows, inverse_strength, window):
    """`sum_k b(p, p + k) - b(p - k, p)` over `k = 1..window`, where
    `b(i, j) = sigmoid((x_i - x_j) / eps)` for sorted rows `x`.

    No pair needs its own exponential: with `f_j = exp((x_j - x_{j+1}) /
    eps)` (in (0, 1] for sorted rows), `u = exp((x_p - x_{p+k}) / eps)` is
    the running product `f_p ... f_{p+k-1}` and `b = u / (1 + u)`. The
    brackets of up to `_BLOCK` steps are summed as one fraction
    (`_fraction_sum`), so a whole block costs multiplications and a single
    division, and all of it fuses into one elementwise pass per direction.
    The gradient is written out the same way: for the pair `(p, p + k)`,
    `d b / d x_p = -d b / d x_{p+k} = b (1 - b) / eps = u / (1 + u)^2 / eps`.
    The brackets depend on `x / eps` only, so the gradient with respect to
    a tensor `1 / eps` is `sum_p x_p g_p / (1 / eps)` (`g` the gradient with
    respect to `x`).

    `inverse_strength` is `1 / eps`: a Python number, or a tensor (which
    then receives a gradient).
    """
    n = sorted_rows.shape[-1]
    w = window

    def steps(factors):
        """Factors padded with `w` zeros on each side (`f_j` in column
        `j + w`), read `k` places up and down: the `k`-th step multiplies
        `u` by `f_{p+k-1}` going up, by `f_{p-k}` going down. Steps past
        either end are 0, and so are the brackets behind them."""
        up = [factors[:, w + k - 1: w + k - 1 + n] for k in range(1, w + 1)]
        down = [factors[:, w - k: w - k + n] for k in range(1, w + 1)]
        return up, down

    def brackets_and_grad(x, scale):
        lower, upper = x[:, :-1], x[:, 1:]
        # Equal neighbours are a tie (factor 1), infinite ones included:
        # inf - inf would make the factor, and every product through it, NaN.
        gaps = ops.where(ops.equal(lower, upper), 0.0, lower - upper)
        factors = ops.pad(ops.exp(gaps * scale), [[0, 0], [w, w]])
        up, down = steps(factors)
        total = _fraction_sum(up, None) - _fraction_sum(down, None)

        def grad_x(upstream):
            upstream = ops.cast(upstream, x.dtype)
            # The same factors (max with 0 changes nothing), but not the
            # same expression: a compiler that merged the running products
            # with the forward pass's would keep every one of them in memory
            # between the passes. (`relu`, not `maximum(factors, 0.0)`: on
            # torch Keras computes `maximum` of float64 tensors in float32.)
            up, down = steps(ops.relu(factors))
            g = ops.pad(upstream, [[0, 0], [w, w]])
            # dL/db for the pair (p, p + k) is upstream_p - upstream_{p+k}.
            g_up = [upstream - g[:, w + k: w + k + n] for k in range(1, w + 1)]
            g_down = [g[:, w - k: w - k + n] - upstream
                      for k in range(1, w + 1)]
            result = _fraction_sum(up, g_up, squared=True) - _fraction_sum(
                down, g_down, squared=True
            )
            return result * scale

        return total, grad_x

    if isinstance(inverse_strength, (int, float)):

        @ops.custom_gradient
        def brackets(x):
            total, grad_x = brackets_and_grad(x, inverse_strength)

            def grad(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                return grad_x(upstream)

            return total, grad

        return brackets(sorted_rows)

    @ops.custom_gradient
    def brackets_with_strength(x, scale):
        total, grad_x = brackets_and_grad(x, scale)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            g = grad_x(upstream)
            # Each row of g sums to 0, so subtracting a constant per row (the
            # median of the sorted row) changes nothing but the rounding.
            centred = x - x[:, n // 2: n // 2 + 1]
            finite = ops.where(ops.isfinite(centred), centred, 0.0)
            return g, ops.cast(ops.sum(finite * g) / scale, scale.dtype)

        return total, grad

    return brackets_with_strength(sorted_rows, inverse_strength)


_BLOCK = 8  # steps per fraction: keeps the denominator below 4 ** 8


def _fraction_sum(steps, coefficients, squared=False):
    """`sum_k c_k u_k / (1 + u_k) ** e` with `u_k` the product of the
    first `k` steps (each in [0, 1]), `c_k` = 1 when `coefficients` is
    None and `e` = 2 if `squared` else 1. Each block of `_BLOCK` terms is
    added up as one fraction, `num / den` with `den = prod (1 + u_k) ** e`."""
    total = u = None
    for start in range(0, len(steps), _BLOCK):
        num = den = None
        for k in range(start, min(start + _BLOCK, len(steps))):
            u = steps[k] if u is None else u * steps[k]
            scale = 1.0 + u
            if squared:
                scale = scale * scale
            term = u if coefficients is None else coefficients[k] * u
            num = term if num is None else num * scale + term * den
            den = scale if den is None else den * scale
        total = num / den if total is None else total + num / den
    return total


def _torch_brackets(sorted_rows, inverse_strength, window, start=None):
    """The PyTorch form: per window step `k`, the pairs `(p, p + k)` of
    every row as one tensor `b`, added at `p` and subtracted at `p + k`.
    The forward pass keeps the `window` tensors `b` for the backward pass
    while they fit in `KEPT_PAIRS_BYTES`, and the backward pass computes
    them again otherwise: `d b / d x_p = -d b / d x_{p+k} = b (1 - b) /
    eps`."""
    import torch

    x = torch.as_tensor(sorted_rows)
    if start is not None:
        start = torch.as_tensor(start).detach()
    if isinstance(inverse_strength, (int, float)):
        return _torch_function().apply(
            x, float(inverse_strength), window, start)
    scale = torch.as_tensor(inverse_strength, dtype=x.dtype,
                            device=x.device)
    return _torch_function().apply(x, scale, window, start)


# The PyTorch form keeps the window's pairs for the backward pass while
# they take at most this much memory (`window` tensors of the rows' size:
# 16 MB at 256 x 1000 in float32 with a window of 16); larger inputs
# compute them again in the backward pass, two more passes per step.
KEPT_PAIRS_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=None)
def _torch_function():
    import torch

    def scaled_rows(x, scale):
        """`x / eps`, with infinities (and anything beyond a quarter of the
        dtype's range) clipped to +-max / 4: then the difference of two equal
        infinities is 0, a tie, not NaN, and no difference overflows."""
        bound = torch.finfo(x.dtype).max / 4
        return torch.clamp(x * scale, -bound, bound)

    def pairs(scaled, k):
        """`b(p, p + k)` for `p = 0..n-k-1`."""
        return torch.sigmoid(scaled[:, :-k] - scaled[:, k:])

    class Brackets(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, window, start):
            scaled = scaled_rows(x, scale)
            if start is None:
                total = torch.zeros_like(x)
            else:
                total = torch.empty_like(x).copy_(start)
            keep = window * x.numel() * x.element_size() <= KEPT_PAIRS_BYTES
            kept = []
            for k in range(1, window + 1):
                b = pairs(scaled, k)
                # In place on views (`t[...] += b` would copy back).
                total[:, :-k].add_(b)
                total[:, k:].sub_(b)
                if keep:
                    kept.append(b)
            ctx.window, ctx.kept = window, len(kept)
            if isinstance(scale, torch.Tensor):
                ctx.save_for_backward(scaled, x, scale, *kept)
                ctx.scale = None
            else:
                ctx.save_for_backward(scaled, *kept)
                ctx.scale = scale
            return total

        @staticmethod
        def backward(ctx, upstream):
            saved = ctx.saved_tensors
            kept = saved[len(saved) - ctx.kept:]
            if ctx.scale is None:
                scaled, x, scale = saved[:3]
            else:
                scaled, scale = saved[0], ctx.scale
            upstream = upstream.to(scaled.dtype)
            grad = torch.zeros_like(scaled)
            for k in range(1, ctx.window + 1):
                b = kept[k - 1] if kept else pairs(scaled, k)
                slope = torch.addcmul(b, b, b, value=-1.0)  # b (1 - b)
                # dL/db for the pair (p, p + k) is upstream_p - upstream_{p+k}.
                coefficient = upstream[:, :-k] - upstream[:, k:]
                grad[:, :-k].addcmul_(coefficient, slope)
                grad[:, k:].addcmul_(coefficient, slope, value=-1.0)
            grad = grad * scale
            grad_scale = None
            if ctx.scale is None and ctx.needs_input_grad[1]:
                # The brackets depend on x / eps only: each row of `grad`
                # sums to 0, so centring on the row's middle entry changes
                # nothing but the rounding.
                n = x.shape[-1]
                centred = x - x[:, n // 2: n // 2 + 1]
                finite = torch.where(torch.isfinite(centred), centred, 0.0)
                grad_scale = ((finite * grad).sum() / scale).to(scale.dtype)
            return grad, grad_scale, None, None

    return Brackets

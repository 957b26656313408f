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
- On PyTorch, whose eager ops each make a pass over memory, all the pairs
  of all window steps in one table (one subtraction and one sigmoid), and
  their two ends added up by two sums over the steps: five passes over
  the table forward and four backward, whatever the window, against about
  thirty passes per step for the running-product form run eagerly. Inputs
  whose table would pass `KEPT_PAIRS_BYTES` take one sigmoid per step
  instead (ten passes per step forward and backward). The number of ops
  depends on `window` and on which side of `KEPT_PAIRS_BYTES` the input
  falls, never otherwise on the size of the rows.
"""

from __future__ import annotations

import functools
import threading

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
    """The PyTorch form: the pairs `(p, p + k)` of every row, `b`, added at
    `p` and subtracted at `p + k`, with `d b / d x_p = -d b / d x_{p+k} =
    b (1 - b) / eps`.

    While all `window` steps fit in `KEPT_PAIRS_BYTES`, they are computed
    as one tensor of shape `(window, rows, n + window)` (`_grouped_function`):
    one subtraction and one sigmoid make every pair, and two sums over the
    steps add them at both ends, so the forward pass is five passes over
    that tensor and the backward pass four, whatever the window. The
    tensor is kept for the backward pass. Larger inputs take one sigmoid
    per step, added in place at both ends of each pair, and compute the
    pairs again in the backward pass (`_stepwise_function`)."""
    import torch

    x = torch.as_tensor(sorted_rows)
    if start is not None:
        start = torch.as_tensor(start).detach()
    if not isinstance(inverse_strength, (int, float)):
        inverse_strength = torch.as_tensor(
            inverse_strength, dtype=x.dtype, device=x.device)
    else:
        inverse_strength = float(inverse_strength)
    rows, n = x.shape
    table_bytes = window * rows * (n + window) * x.element_size()
    grouped = 0 < table_bytes <= KEPT_PAIRS_BYTES  # (no rows: stepwise)
    function = _grouped_function() if grouped else _stepwise_function()
    return function.apply(x, inverse_strength, window, start)


# The PyTorch form holds all the window's pairs in one tensor, kept for the
# backward pass, while it takes at most this much memory (`window * rows *
# (n + window)` entries: 17 MB at 256 x 1000 in float32 with a window of
# 16); larger inputs take the pairs one step at a time.
KEPT_PAIRS_BYTES = 64 * 2**20


def _scaled_rows(x, scale):
    """`x / eps`, with infinities (and anything beyond a quarter of the
    dtype's range) clipped to +-max / 4: then the difference of two equal
    infinities is 0, a tie, not NaN, and no difference overflows."""
    import torch

    bound = torch.finfo(x.dtype).max / 4
    return torch.clamp(x * scale, -bound, bound)


def _scale_gradient(x, grad, scale):
    """The gradient with respect to a tensor `1 / eps`, from the gradient
    `grad` with respect to `x`: the brackets depend on `x / eps` only, and
    each row of `grad` sums to 0, so centring on the row's middle entry
    changes nothing but the rounding."""
    import torch

    n = x.shape[-1]
    centred = x - x[:, n // 2: n // 2 + 1]
    finite = torch.where(torch.isfinite(centred), centred, 0.0)
    return ((finite * grad).sum() / scale).to(scale.dtype)


def _save(ctx, kept, x, scale, window):
    """Keeps `kept` (and `x` and a tensor `scale`, for the gradient with
    respect to it) for the backward pass."""
    import torch

    ctx.window = window
    if isinstance(scale, torch.Tensor):
        ctx.scale_value = None
        ctx.save_for_backward(kept, x, scale)
    else:
        ctx.scale_value = scale
        ctx.save_for_backward(kept)


def _gradients(ctx, grad):
    """The backward pass's results from the gradient with respect to the
    scaled rows: with respect to the rows, to a tensor `1 / eps`, and None
    for the other arguments."""
    if ctx.scale_value is not None:
        return grad * ctx.scale_value, None, None, None
    _, x, scale = ctx.saved_tensors
    grad = grad * scale
    grad_scale = None
    if ctx.needs_input_grad[1]:
        grad_scale = _scale_gradient(x, grad, scale)
    return grad, grad_scale, None, None


def _step_table(left, right, window, op, table=None):
    """`op(left[:, q], right[:, q + k])` for every step `k = 1..window` and
    column `q = 0..m-1`, as a flat tensor `t` of `1 + window * rows * m`
    entries: `t[0]` is 0 and `t[1:]` has shape `(window, rows, m)`. `left`
    has shape `(rows, m)`, `right` `(rows, m + window)`."""
    import torch

    rows, m = left.shape
    if table is None:
        table = torch.empty(1 + window * rows * m, dtype=left.dtype,
                            device=left.device)
    table[:1] = 0
    shifted = right.as_strided((window, rows, m), (1, right.stride(0), 1),
                               right.storage_offset() + 1)
    op(left.expand(window, rows, m), shifted,
       out=table[1:].view(window, rows, m))
    return table


def _ends_of_pairs(table, window, rows, m):
    """From a `_step_table` of pair values `v(q, q + k)` whose last
    `window` columns are padding (0 for every pair that starts there):
    `sum_k v(p, p + k) - v(p - k, p)` at every column `p`, shape `(rows,
    m)`. Both sums are sums over the steps of a view of the table: in the
    flat table, `v(p - k, p)` for step `k` sits `(k - 1) * (rows * m - 1)`
    entries after the column's place in the first step, and the pairs that
    would start before column 0 read the padding of the previous row (or
    `t[0]`), never another row's values: a NaN stays in its own row."""
    size = rows * m
    up = table[1:].view(window, size).sum(0)
    down = table.as_strided((window, size), (size - 1, 1),
                            table.storage_offset()).sum(0)
    return up.sub_(down).view(rows, m)


_SCRATCH = threading.local()


def _scratch(like):
    """A flat tensor of the size, dtype and device of `like` (a
    `_step_table`) for the backward pass's products: on CPU, the start of
    one table per thread and dtype, kept between calls and grown only when
    a call needs more (at most `KEPT_PAIRS_BYTES`); GPU memory is already
    cached by PyTorch.

    A fresh table of several megabytes per call is memory the system has
    to map again: at 256 x 1000 a Spearman step took 30.8 ms with a fresh
    table and 25.3 ms with this one (`benchmarks/RESULTS_losses.md`)."""
    import torch

    if like.device.type != "cpu":
        return torch.empty_like(like)
    tables = _SCRATCH.__dict__.setdefault("tables", {})
    held = tables.get(like.dtype)
    if held is None or held.numel() < like.numel():
        held = tables[like.dtype] = torch.empty_like(like)
    return held[: like.numel()]


@functools.lru_cache(maxsize=None)
def _grouped_function():
    import torch

    class GroupedBrackets(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, window, start):
            scaled = _scaled_rows(x, scale)
            rows, n = scaled.shape
            # `window` columns past the row: -max / 2 on the left, +max / 2
            # on the right, so every pair that reaches them has b = 0, even
            # from an entry clipped to +max / 4, and no difference
            # overflows.
            far = torch.finfo(x.dtype).max / 2
            m = n + window
            left = torch.nn.functional.pad(scaled, (0, window), value=-far)
            right = torch.nn.functional.pad(scaled, (0, 2 * window),
                                            value=far)
            table = _step_table(left, right, window, torch.sub)
            pairs = table[1:]  # the steps (t[0] stays 0)
            pairs.sigmoid_()
            ends = _ends_of_pairs(table, window, rows, m)[:, :n]
            total = ends.clone() if start is None else start + ends
            if any(ctx.needs_input_grad[:2]):  # else nothing is kept
                pairs.addcmul_(pairs, pairs, value=-1.0)  # b (1 - b), kept
                _save(ctx, table, x, scale, window)
            return total

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, upstream):
            table = ctx.saved_tensors[0]
            window = ctx.window
            upstream = upstream.to(table.dtype)
            rows, n = upstream.shape
            # dL/db for the pair (p, p + k) is upstream_p - upstream_{p+k}
            # (0 in the padding, whose slopes are 0 anyway).
            left = torch.nn.functional.pad(upstream, (0, window))
            right = torch.nn.functional.pad(upstream, (0, 2 * window))
            products = _step_table(left, right, window, torch.sub,
                                   _scratch(table))
            products[1:].mul_(table[1:])
            grad = _ends_of_pairs(products, window, rows, n + window)[:, :n]
            return _gradients(ctx, grad)

    return GroupedBrackets


@functools.lru_cache(maxsize=None)
def _stepwise_function():
    import torch

    def pairs(scaled, k):
        """`b(p, p + k)` for `p = 0..n-k-1`."""
        return torch.sigmoid(scaled[:, :-k] - scaled[:, k:])

    class StepwiseBrackets(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, window, start):
            scaled = _scaled_rows(x, scale)
            if start is None:
                total = torch.zeros_like(x)
            else:
                total = torch.empty_like(x).copy_(start)
            for k in range(1, window + 1):
                b = pairs(scaled, k)
                # In place on views (`t[...] += b` would copy back).
                total[:, :-k].add_(b)
                total[:, k:].sub_(b)
            _save(ctx, scaled, x, scale, window)
            return total

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, upstream):
            scaled = ctx.saved_tensors[0]
            upstream = upstream.to(scaled.dtype)
            grad = torch.zeros_like(scaled)
            for k in range(1, ctx.window + 1):
                b = pairs(scaled, k)
                slope = torch.addcmul(b, b, b, value=-1.0)  # b (1 - b)
                # dL/db for the pair (p, p + k) is upstream_p - upstream_{p+k}.
                coefficient = upstream[:, :-k] - upstream[:, k:]
                grad[:, :-k].addcmul_(coefficient, slope)
                grad[:, k:].addcmul_(coefficient, slope, value=-1.0)
            return _gradients(ctx, grad)

    return StepwiseBrackets

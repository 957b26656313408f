"""The log-softmax of logits on the `k + 1` bins of a sparse (top-k)
teacher: `k` listed columns of each row, then one bin for all the others.

A divergence against a `keras_kd.teachers.topk.TopKDistribution` reads the
student on these bins. Written as a log-softmax over the whole row followed
by a gather and a masked log-sum-exp, and differentiated by the backend, it
cost as much as the dense divergence. `log_softmax_bins` takes instead one
sum over the columns that are not listed (the rest bin: a sum of its own,
so that a tiny rest is not lost to rounding as it would be in
`1 - sum(p)`), and gets the row's normalizer from it and the `k` listed
logits, relative to a shift `m` per row:

    rest  = log(sum_{v not listed} exp(z_v / tau - m))
    total = logaddexp(rest, logsumexp(z_j / tau - m, j listed))
    bins  = (z_j / tau - m - total for j listed, rest - total)

so the full log-softmax is never formed, and its gradient is written out:

    d/dz_v = exp(z_v / tau - m - rest) (g_rest - G q) / tau  (v not listed)
    d/dz_j = (g_j - G p_j) / tau                             (j listed)

with `g` the upstream gradient of the bins, `G` its sum, `p_j` and `q` the
probabilities of the bins.

On TensorFlow and JAX this is `keras.ops` under `keras.ops.custom_gradient`.
XLA on CPU gives each reduction over the rows a materialized input, so the
passes are few: the shift is the row's largest logit (a reduction of the
logits themselves), the rest's sum is one masked pass, the gradient one
pass plus a scatter of the `k` listed entries; only when some row's rest is
too small for that shift (below exp(-60) of the largest logit's
probability, where terms could underflow) is the sum taken again relative
to the largest unlisted logit. Eager PyTorch runs every op as a pass over
the `(..., n)` logits, so there the function is a `torch.autograd.Function`
whose forward writes one `(..., n)` buffer (the rest's exponentials,
relative to the largest unlisted logit) and whose backward rescales that
buffer in place and adds the listed entries' gradients.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_kd._typing import Tensor
from keras_kd.ops.probabilities import LOG_FLOOR
from keras_kd.ops.scatter import mark_columns


def log_softmax_bins(logits: Tensor, indices: Tensor,
                     temperature: float = 1.0) -> Tensor:
    """`log_softmax(logits / temperature)` gathered at `indices`, then the
    log of the probability of every other column.

    Args:
        logits: `(..., n)` float tensor, finite.
        indices: `(..., k)` integer tensor of column numbers in `[0, n)`,
            distinct within a row, with `k < n`.
        temperature: `tau > 0`; the softmax is taken of `logits / tau`.

    Returns:
        A `(..., k + 1)` tensor of the dtype of `logits`: entry `j < k` is
        `log p[indices[..., j]]`, entry `k` is `log(1 - sum_j p[indices[...,
        j]])` computed as a log-sum-exp over the other columns, where
        `p = softmax(logits / tau)`. Differentiable with respect to
        `logits`; on PyTorch its backward can run once per forward (the
        backward reuses the forward's buffer).

    Example:

    >>> logits = np.log(np.array([[0.5, 0.3, 0.2]], "float32"))
    >>> log_softmax_bins(logits, np.array([[1]]))
    ... # [[log(0.3), log(0.7)]]
    """
    logits = ops.convert_to_tensor(logits)
    indices = ops.convert_to_tensor(indices)
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"`temperature` must be positive, got {temperature}.")
    n, k = logits.shape[-1], indices.shape[-1]
    if None not in (n, k) and k >= n:
        raise ValueError(
            f"`log_softmax_bins` needs fewer listed columns than columns "
            f"(k < n, so that the rest bin is not empty); got k={k}, n={n}.")
    if keras.backend.backend() == "torch":
        return _torch_function().apply(logits, indices, temperature)
    return _keras_log_softmax_bins(logits, indices, temperature)


def _keras_log_softmax_bins(logits, indices, temperature):
    """`log_softmax_bins` in `keras.ops`, with its gradient written out: the
    gradient of the gather of the listed logits alone would be a scatter
    into a zero `(..., n)` tensor and an add."""
    inverse = 1.0 / temperature
    n, k = logits.shape[-1], indices.shape[-1]
    indices = ops.cast(indices, "int32")
    listed = mark_columns(indices, n)

    @ops.custom_gradient
    def bins(logits, indices, listed):
        z = logits if inverse == 1.0 else logits * inverse
        picked = ops.take_along_axis(z, indices, axis=-1)
        # Each pass over the row is its own expression of `z` (and the
        # marks), which XLA fuses into the pass; a shared one would be kept
        # as an `(..., n)` tensor instead.
        shift, total_rest = _rest_sum(z, listed)
        # In coordinates relative to `shift` (the largest logit, or the
        # largest unlisted one), where the log-sums are small numbers.
        picked = picked - shift
        rest = ops.log(total_rest)
        total = ops.logaddexp(rest, ops.logsumexp(picked, axis=-1,
                                                  keepdims=True))
        result = ops.concatenate([picked, rest], axis=-1) - total

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            probabilities = ops.exp(result)
            upstream_sum = ops.sum(upstream, axis=-1, keepdims=True)
            rest_scale = (upstream[..., k:]
                          - upstream_sum * probabilities[..., k:]) * inverse
            # At the unlisted columns exp(z - shift - rest) <= 1; the listed
            # ones (where it may overflow) are overwritten with their own
            # gradient, so this pass needs no marks.
            z = logits if inverse == 1.0 else logits * inverse
            others_grad = ops.exp((z - shift) - rest) * rest_scale
            listed_grad = (upstream[..., :k]
                           - upstream_sum * probabilities[..., :k]) * inverse
            return (_set_columns(others_grad, indices, listed_grad), None,
                    None)

        return result, grad

    return bins(logits, indices, listed)


# The rest's sum is taken relative to the row's largest logit, a reduction
# of the logits alone. Its terms then underflow below exp(-87); while the
# sum is at least exp(-_DEPTH), those it loses are at most `n * exp(-27)`
# of it. A smaller sum (every unlisted logit more than about `_DEPTH` below
# the largest) is taken again relative to the largest unlisted logit, which
# costs one more pass over the rows.
_DEPTH = 60.0


def _rest_sum(z, listed):
    """`(shift, sum)` with `sum = sum_v exp(z_v - shift)` over the columns
    `v` not marked in `listed`, each `(..., 1)`: `shift` is the largest
    logit of the row, or, if the sum of some row is then below
    `exp(-_DEPTH)`, the largest unlisted logit of each row (so that no
    term the sum needs underflows)."""
    peak = ops.max(z, axis=-1, keepdims=True)
    total = ops.sum(ops.where(listed, 0.0, ops.exp(z - peak)), axis=-1,
                    keepdims=True)

    def exact():
        m = ops.max(ops.where(listed, LOG_FLOOR, z), axis=-1, keepdims=True)
        return m, ops.sum(ops.where(listed, 0.0, ops.exp(z - m)), axis=-1,
                          keepdims=True)

    return ops.cond(ops.all(total >= math.exp(-_DEPTH)),
                    lambda: (peak, total), exact)


def _set_columns(x, indices, values):
    """`x` with `values[..., j]` at column `indices[..., j]` of every row
    (one `keras.ops.scatter_update` over the flattened rows)."""
    shape = ops.shape(x)
    n, k = x.shape[-1], indices.shape[-1]
    rows_x = ops.reshape(x, (-1, n))
    rows = ops.shape(rows_x)[0]
    row_ids = ops.repeat(ops.arange(rows, dtype="int32")[:, None], k, axis=1)
    coordinates = ops.stack(
        [ops.reshape(row_ids, (-1,)), ops.reshape(indices, (-1,))], axis=-1)
    return ops.reshape(ops.scatter_update(
        rows_x, coordinates, ops.reshape(values, (-1,))), shape)


_TORCH_FUNCTION: list[type] = []  # the class below, once made


def _torch_function():
    """The PyTorch `autograd.Function` of `log_softmax_bins` (made on first
    use, so that importing this module does not import torch)."""
    if not _TORCH_FUNCTION:
        _TORCH_FUNCTION.append(_make_torch_function())
    return _TORCH_FUNCTION[0]


def _make_torch_function():
    import torch
    from torch.autograd.function import once_differentiable

    class LogSoftmaxBins(torch.autograd.Function):
        """Forward: `e = exp((z - m) / tau)` over the rows with the listed
        columns set to `-inf` first (so `e` is 0 there), `m` the largest of
        the other logits; `rest = log(sum e)`, relative to `m / tau`.
        Backward (notation of the module docstring):
        `(e / sum e) * (g_rest - G q) / tau` at the other columns, computed
        in `e`'s buffer, and `(g_j - G p_j) / tau` added at the listed
        ones."""

        @staticmethod
        def forward(ctx, logits, indices, temperature):
            inverse = 1.0 / temperature
            indices = indices.to(device=logits.device, dtype=torch.int64)
            e = logits.scatter(-1, indices, float("-inf"))
            m = e.amax(dim=-1, keepdim=True)
            # exp((e - m) / tau), in e's buffer: one pass for the shift and
            # the scale (torch.add reads e and writes it in place).
            torch.add(m * -inverse, e, alpha=inverse, out=e)
            e.exp_()
            total_rest = e.sum(dim=-1, keepdim=True)
            # Relative to m / tau, where the log-sums are small numbers.
            rest = torch.log(total_rest)
            picked = (logits.gather(-1, indices) - m) * inverse
            total = torch.logaddexp(rest, picked.logsumexp(-1, keepdim=True))
            bins = torch.cat([picked, rest], dim=-1) - total
            ctx.save_for_backward(e, total_rest, indices, bins)
            ctx.inverse = inverse
            return bins

        @staticmethod
        @once_differentiable
        def backward(ctx, grad):
            e, total_rest, indices, bins = ctx.saved_tensors
            k = indices.shape[-1]
            probabilities = torch.exp(bins)
            grad_sum = grad.sum(dim=-1, keepdim=True)
            rest_scale = ((grad[..., k:] - grad_sum * probabilities[..., k:])
                          * (ctx.inverse / total_rest))
            # e is no longer needed after this: the gradient is built in
            # its buffer (e is 0 at the listed columns).
            grad_logits = e.mul_(rest_scale)
            listed = (grad[..., :k] - grad_sum * probabilities[..., :k]) \
                * ctx.inverse
            grad_logits.scatter_add_(-1, indices, listed)
            return grad_logits, None, None

    return LogSoftmaxBins

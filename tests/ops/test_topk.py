"""`keras_kd.ops.topk.log_softmax_bins` against a float64 NumPy reference
and against the autodiff of the log-softmax it replaces (values and
gradients), eagerly and compiled, on the current backend; a rest too small
for a sum relative to the largest logit; the arguments it refuses."""

import numpy as np
import pytest
from backend_utils import evaluate
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import value_and_grad
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.ops.probabilities import LOG_FLOOR
from keras_kd.ops.topk import log_softmax_bins


def np_bins_and_grad(z, indices, tau, weights):
    """Float64 bins of `softmax(z / tau)` and the gradient of
    `sum(bins * weights)` with respect to `z`, written out."""
    z = z.astype("float64") / tau
    log_p = z - z.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    listed = np.zeros(z.shape, bool)
    np.put_along_axis(listed, indices, True, axis=-1)
    others = np.where(listed, -np.inf, log_p)
    top = others.max(-1, keepdims=True)
    rest = top + np.log(np.exp(others - top).sum(-1, keepdims=True))
    bins = np.concatenate(
        [np.take_along_axis(log_p, indices, axis=-1), rest], axis=-1)
    w_listed, w_rest = weights[..., :-1], weights[..., -1:]
    # d bins_j / dz = onehot(j) - p; d rest / dz = [unlisted] p / q - p.
    grad = -weights.sum(-1, keepdims=True) * p
    grad = grad + np.where(listed, 0.0, p / np.exp(rest)) * w_rest
    np.put_along_axis(
        grad, indices,
        np.take_along_axis(grad, indices, axis=-1) + w_listed, axis=-1)
    return bins, grad / tau


def log_softmax_then_mask(z, indices, tau):
    """The former reading of the student: the full log-softmax, a gather
    and a masked log-sum-exp, differentiated by the backend."""
    log_p = ops.log_softmax(z / tau, axis=-1)
    picked = ops.take_along_axis(log_p, indices, axis=-1)
    columns = ops.arange(z.shape[-1], dtype="int32")
    listed = ops.any(ops.equal(columns[:, None], indices[..., None, :]),
                     axis=-1)
    rest = ops.logsumexp(ops.where(listed, LOG_FLOOR, log_p), axis=-1)
    return ops.concatenate([picked, rest[..., None]], axis=-1)


def case(shape, k, scale, seed=0):
    rng = np.random.default_rng(seed)
    z = (scale * rng.normal(size=shape)).astype("float32")
    indices = np.argsort(-rng.normal(size=shape), axis=-1)[..., :k]
    weights = rng.normal(size=shape[:-1] + (k + 1,)).astype("float32")
    return z, indices.astype("int32"), weights


CASES = [
    # shape, k, logit scale, temperature
    ((4, 50), 5, 3.0, 1.0),
    ((2, 3, 40), 7, 3.0, 2.5),
    ((3, 30), 1, 30.0, 1.0),  # log-probabilities far below 0
    ((2, 2, 200), 10, 10.0, 0.5),
]


@pytest.mark.parametrize("shape, k, scale, tau", CASES)
def test_matches_float64_reference(shape, k, scale, tau):
    z, indices, weights = case(shape, k, scale)
    expected, expected_grad = np_bins_and_grad(z, indices, tau, weights)

    def loss(x):
        return ops.sum(log_softmax_bins(x, indices, tau)
                       * ops.convert_to_tensor(weights))

    gradient = value_and_grad_fn(loss)
    eager = evaluate((log_softmax_bins(z, indices, tau), gradient(z)[1][0]))
    compiled = evaluate((
        jit(lambda x: log_softmax_bins(x, indices, tau))(z),
        jit(gradient)(z)[1][0]))
    for bins, grad in (eager, compiled):
        assert bins.shape == shape[:-1] + (k + 1,)
        np.testing.assert_allclose(bins, expected, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("shape, k, scale, tau", CASES)
def test_equals_the_log_softmax_it_replaces(shape, k, scale, tau):
    z, indices, weights = case(shape, k, scale, seed=1)

    def loss(fn):
        return lambda x: ops.sum(fn(x, ops.convert_to_tensor(indices), tau)
                                 * ops.convert_to_tensor(weights))

    new_value, (new_grad,) = value_and_grad(loss(log_softmax_bins), z)
    old_value, (old_grad,) = value_and_grad(loss(log_softmax_then_mask), z)
    np.testing.assert_allclose(new_value, old_value, rtol=1e-5)
    np.testing.assert_allclose(new_grad, old_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_tiny_rest_is_not_lost(compiled):
    """Listed logits 100 above the others: the rest's probability is about
    `n e^-100`, below what a sum relative to the largest logit holds in
    float32. One row of the batch is ordinary; both must be right."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2, 40)).astype("float32")
    indices = np.array([[3, 17], [5, 30]], "int32")
    z[0, indices[0]] += 100.0
    weights = rng.normal(size=(2, 3)).astype("float32")
    expected, expected_grad = np_bins_and_grad(z, indices, 1.0, weights)
    assert expected[0, -1] < -90.0

    gradient = value_and_grad_fn(
        lambda x: ops.sum(log_softmax_bins(x, indices)
                          * ops.convert_to_tensor(weights)))
    bins_fn = (lambda x: log_softmax_bins(x, indices))
    if compiled:
        gradient, bins_fn = jit(gradient), jit(bins_fn)
    bins, grad = evaluate((bins_fn(z), gradient(z)[1][0]))
    np.testing.assert_allclose(bins, expected, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_refuses_as_many_listed_columns_as_columns():
    z = np.zeros((2, 4), "float32")
    with pytest.raises(ValueError, match="k < n"):
        log_softmax_bins(z, np.tile(np.arange(4, dtype="int32"), (2, 1)))
    with pytest.raises(ValueError, match="temperature"):
        log_softmax_bins(z, np.zeros((2, 1), "int32"), temperature=0.0)


@pytest.mark.backends("torch")
def test_torch_backward_runs_once_per_forward():
    """The PyTorch backward builds the gradient in the forward's buffer: a
    second backward through the same graph is refused, not wrong."""
    import torch

    z = torch.tensor(case((3, 20), 4, 3.0)[0], requires_grad=True)
    value = ops.sum(log_softmax_bins(z, np.array([[1, 2, 3, 4]] * 3)))
    (first,) = torch.autograd.grad(value, z, retain_graph=True)
    assert np.isfinite(to_numpy(first)).all()
    with pytest.raises(RuntimeError):
        torch.autograd.grad(value, z)

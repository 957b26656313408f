"""The PyTorch form of the correlation (`keras_kd.ops.correlation`, one
autograd function with its gradient written out) against the formula
written in plain torch ops and differentiated by autograd: the same values
and gradients, in float64, for ordinary rows and for every special case of
the formula. (The `keras.ops` form is not the reference here: on PyTorch
Keras takes the `maximum` of a float64 tensor and a Python float in
float32.)"""

import numpy as np
import pytest

import keras_kd.ops.correlation as correlation
from keras_kd.ops.correlation import EPSILON

pytestmark = pytest.mark.backends("torch")


def _rows(level=0.25):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 40))
    b = rng.normal(size=(6, 40))
    a[1] = level  # constant
    b[2] = level + 1e-16 * rng.normal(size=40)  # constant up to rounding
    a[3] = 1e-6 * rng.normal(size=40)  # below the floor with b[3]
    b[3] = 1e-6 * rng.normal(size=40)
    b[4] = 2.0 * a[4] + 1.0  # perfectly correlated
    return a, b


def _reference(a, b, axis, epsilon, tolerance, mean, weights):
    """`keras_kd.ops.correlation._keras_correlation`, in torch ops."""
    import torch

    w = 1.0 if weights is None else weights.reshape(
        [-1 if d == axis % a.dim() else 1 for d in range(a.dim())])

    def total(x):
        return (w * x).sum(dim=axis)

    def centre(x):
        if mean is not None:
            return x - mean
        if weights is None:
            return x - x.mean(dim=axis, keepdim=True)
        weight_sum = (w * torch.ones_like(x)).sum(dim=axis, keepdim=True)
        weighted = (w * x).sum(dim=axis, keepdim=True)
        empty = weight_sum == 0  # divide_no_nan
        return x - torch.where(
            empty, 0.0, weighted / torch.where(empty, 1.0, weight_sum))

    def squares_or_one(x, x_c):
        squares = total(x_c * x_c)
        constant = squares <= tolerance**2 * total(x * x)
        return torch.where(constant, 1.0, squares)

    a_c, b_c = centre(a), centre(b)
    product = squares_or_one(a, a_c) * squares_or_one(b, b_c)
    norms = torch.sqrt(torch.maximum(product, torch.tensor(epsilon**2,
                                                           dtype=a.dtype)))
    return total(a_c * b_c) / norms


def _both_forms(a, b, upstream, **kwargs):
    """Values and gradients of the torch form and of the reference."""
    import torch

    results = []
    for form in (correlation._torch_correlation, _reference):
        x = torch.tensor(a, requires_grad=True)
        y = torch.tensor(b, requires_grad=True)
        value = form(x, y, **kwargs)
        grads = torch.autograd.grad(value, (x, y), torch.tensor(upstream))
        results.append([value.detach().numpy()]
                       + [g.numpy() for g in grads])
    return results


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("centring", ["computed", "known", "weighted"])
def test_torch_form_equals_the_keras_form(axis, centring):
    import torch

    a, b = _rows()
    if axis == 0:
        a, b = a.T.copy(), b.T.copy()
    n = a.shape[axis]
    weights = None
    mean = None
    if centring == "known":
        mean = 0.25  # the level of the constant rows
    elif centring == "weighted":
        weights = torch.tensor(np.linspace(0.0, 2.0, n))  # one weight 0
    upstream = np.random.default_rng(1).normal(size=a.shape[1 + axis])
    kwargs = dict(axis=axis, epsilon=EPSILON, tolerance=1e-12, mean=mean,
                  weights=weights)
    torch_form, keras_form = _both_forms(a, b, upstream, **kwargs)
    for got, expected in zip(torch_form, keras_form):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # The constant vectors (exact and at rounding level) count as constant.
    np.testing.assert_allclose(torch_form[0][1:3], 0.0, atol=1e-9)
    if mean is None:  # (a known mean that is not the row's is no centring)
        np.testing.assert_allclose(torch_form[0][4], 1.0, rtol=1e-12)


def test_all_zero_weights_give_zero_and_a_finite_gradient():
    import torch

    a, b = _rows()
    weights = torch.zeros(a.shape[0], dtype=torch.float64)
    kwargs = dict(axis=0, epsilon=EPSILON, tolerance=1e-12, mean=None,
                  weights=weights)
    torch_form, keras_form = _both_forms(a, b, np.ones(a.shape[1]), **kwargs)
    np.testing.assert_array_equal(torch_form[0], 0.0)
    for got, expected in zip(torch_form, keras_form):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)

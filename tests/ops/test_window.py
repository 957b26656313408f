"""The soft rank's window brackets: the PyTorch forms (all steps in one
table, or one sigmoid per window step updated in place) against the
running-product form that TensorFlow and JAX use, in values and in
gradients."""

import numpy as np
import pytest

from keras_kd.ops import window

pytestmark = pytest.mark.backends("torch")


def _rows(kind):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 41))
    if kind == "ties":
        x = np.round(x, 1)  # runs of equal values
    elif kind == "infinities":
        x[:, ::5] = -np.inf  # masked logits: a long run of equal -inf
        x[:, 1] = np.inf
    return np.sort(x, axis=-1)


def _value_and_grads(fn, x, strength_tensor):
    import torch

    rows = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    inputs = [rows]
    scale = 7.0
    if strength_tensor:
        scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
        inputs.append(scale)
    upstream = torch.tensor(
        np.random.default_rng(6).normal(size=x.shape), dtype=torch.float64)
    value = fn(rows, scale, 9)
    grads = torch.autograd.grad((value * upstream).sum(), inputs)
    return [value.detach().numpy()] + [g.numpy() for g in grads]


@pytest.mark.parametrize("kind", ["distinct", "ties", "infinities"])
@pytest.mark.parametrize("strength_tensor", [False, True])
@pytest.mark.parametrize("grouped", [True, False])
def test_torch_form_equals_running_product_form(kind, strength_tensor,
                                                grouped, monkeypatch):
    # With no memory for the table, the steps are taken one at a time.
    if not grouped:
        monkeypatch.setattr(window, "KEPT_PAIRS_BYTES", 0)
    x = _rows(kind)
    ours = _value_and_grads(window._torch_brackets, x, strength_tensor)
    reference = _value_and_grads(window._running_product_brackets, x,
                                 strength_tensor)
    assert len(ours) == len(reference) == 2 + strength_tensor
    for a, b in zip(ours, reference):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
    # Tied neighbours get half a place each way: the brackets are not
    # all zero, and each row of the gradient sums to 0.
    assert np.abs(ours[0]).max() > 0.1
    np.testing.assert_allclose(ours[1].sum(axis=-1), 0.0, atol=1e-9)


def test_public_function_uses_torch_form():
    import torch

    x = torch.tensor(_rows("distinct"))
    calls = []
    original = window._torch_brackets

    def spy(*args):
        calls.append(args)
        return original(*args)

    window._torch_brackets = spy
    try:
        window.window_brackets(x, 3.0, 4)
    finally:
        window._torch_brackets = original
    assert len(calls) == 1


@pytest.mark.parametrize("grouped", [True, False])
def test_torch_form_groups_the_steps_only_within_the_memory_bound(
        grouped, monkeypatch):
    import torch

    # 6 rows of 41 in float64, a window of 9: a table of 9 x 6 x (41 + 9)
    # entries, 21,600 bytes.
    monkeypatch.setattr(window, "KEPT_PAIRS_BYTES",
                        21_600 if grouped else 21_599)
    rows = torch.tensor(_rows("distinct"), requires_grad=True)
    value = window._torch_brackets(rows, 7.0, 9)
    name = type(value.grad_fn).__name__
    saved = value.grad_fn.saved_tensors
    if not grouped:
        assert name.startswith("StepwiseBrackets")
        return
    assert name.startswith("GroupedBrackets")
    # The kept table holds the slopes b (1 - b) of every pair, step k = 3
    # in its third block; pairs past the end of a row have slope 0.
    table = saved[0].detach().numpy()
    assert table.shape == (1 + 9 * 6 * 50,) and table[0] == 0
    b = torch.sigmoid(7.0 * (rows[:, :-3] - rows[:, 3:])).detach().numpy()
    step = table[1:].reshape(9, 6, 50)[2]
    np.testing.assert_allclose(step[:, :38], b * (1 - b), rtol=1e-12)
    np.testing.assert_array_equal(step[:, 38:], 0.0)


@pytest.mark.parametrize("grouped", [True, False])
def test_start_is_added_without_a_gradient(grouped, monkeypatch):
    import torch

    if not grouped:
        monkeypatch.setattr(window, "KEPT_PAIRS_BYTES", 0)
    x = torch.tensor(_rows("distinct"), requires_grad=True)
    start = torch.arange(1.0, 42.0, dtype=torch.float64).expand(6, 41)
    upstream = torch.tensor(
        np.random.default_rng(8).normal(size=x.shape))
    plain = window.window_brackets(x, 3.0, 4)
    started = window.window_brackets(x, 3.0, 4, start=start)
    np.testing.assert_allclose(started.detach().numpy(),
                               (plain + start).detach().numpy(), rtol=1e-12)
    (g_plain,) = torch.autograd.grad((plain * upstream).sum(), x)
    (g_started,) = torch.autograd.grad((started * upstream).sum(), x)
    assert np.abs(g_plain.numpy()).max() > 0.1
    np.testing.assert_allclose(g_started.numpy(), g_plain.numpy(), rtol=1e-12)


@pytest.mark.parametrize("grouped", [True, False])
def test_a_nan_stays_in_its_row(grouped, monkeypatch):
    import torch

    if not grouped:
        monkeypatch.setattr(window, "KEPT_PAIRS_BYTES", 0)
    clean = _rows("distinct")
    dirty = clean.copy()
    dirty[2, -3:] = np.nan  # NaNs sort last: the columns a wrap would read
    upstream = torch.tensor(np.random.default_rng(9).normal(size=clean.shape))

    def value_and_grad(rows):
        rows = torch.tensor(rows, requires_grad=True)
        value = window._torch_brackets(rows, 7.0, 9)
        (grad,) = torch.autograd.grad((value * upstream).sum(), rows)
        return value.detach().numpy(), grad.numpy()

    (value, grad), (dirty_value, dirty_grad) = map(value_and_grad,
                                                   (clean, dirty))
    others = [0, 1, 3, 4, 5]
    np.testing.assert_array_equal(dirty_value[others], value[others])
    np.testing.assert_array_equal(dirty_grad[others], grad[others])
    assert np.isnan(dirty_value[2]).any()


def test_backward_products_reuse_one_scratch_table_per_thread():
    import torch

    x = torch.tensor(_rows("distinct"))
    upstream = torch.tensor(
        np.random.default_rng(7).normal(size=(12, x.shape[1])))

    def gradient(rows):
        rows = rows.clone().requires_grad_(True)
        value = window._torch_brackets(rows, 7.0, 9)
        assert type(value.grad_fn).__name__.startswith("GroupedBrackets")
        (grad,) = torch.autograd.grad(
            (value * upstream[: len(rows)]).sum(), rows)
        table = window._SCRATCH.tables[torch.float64]
        # The gradient is a tensor of its own, not a view of the table.
        assert (grad.untyped_storage().data_ptr()
                != table.untyped_storage().data_ptr())
        return grad.numpy().copy(), table

    window._SCRATCH.__dict__.pop("tables", None)
    first, scratch = gradient(x)
    assert scratch.numel() == 1 + 9 * 6 * 50
    second, again = gradient(x)
    assert again is scratch  # the same table, written again
    np.testing.assert_array_equal(second, first)
    # Fewer rows use the start of it; more rows grow it.
    fewer, same = gradient(x[:3])
    assert same is scratch
    np.testing.assert_allclose(fewer, first[:3], rtol=1e-12)
    _, grown = gradient(torch.cat([x, x]))
    assert grown is not scratch and grown.numel() == 1 + 9 * 12 * 50


def test_without_a_gradient_the_grouped_form_gives_the_same_values():
    import torch

    x = torch.tensor(_rows("ties"))
    with torch.no_grad():
        plain = window._torch_brackets(x, 7.0, 9)
    tracked = window._torch_brackets(x.clone().requires_grad_(True), 7.0, 9)
    assert plain.grad_fn is None and tracked.grad_fn is not None
    np.testing.assert_array_equal(plain.numpy(), tracked.detach().numpy())

import keras
import numpy as np
import pytest
import scipy.special
import scipy.stats
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import value_and_grad
from backend_utils import evaluate
from backend_utils import float64_context
from backend_utils import value_and_grad_fn
from keras import ops

from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import pairwise_soft_rank
from keras_kd.ops.rank import soft_rank
from keras_kd.ops.rank import sort_and_soft_rank
from keras_kd.ops.rank import sorted_soft_rank


def np_pairwise_soft_rank(x, eps):
    """All-pairs soft rank along the last axis, written out in NumPy."""
    d = (x[..., :, None] - x[..., None, :]) / eps
    return 0.5 + scipy.special.expit(d).sum(-1)


@pytest.fixture
def float64():
    """float64 tensors stay float64 during the test (JAX included)."""
    with float64_context():
        yield


def row_jacobian(fn, x):
    """`J[b, i, j] = d fn(x)[b, i] / d x[b, j]` for a function that maps
    every row of `x` on its own (as `tf.GradientTape.batch_jacobian`).

    One gradient: the batch is repeated once per output column `i`, and
    copy `i` contributes only its outputs in column `i`."""
    batch, n = x.shape
    copies = np.tile(x, (n, 1))  # row i * batch + b is x[b]
    picks = np.repeat(np.eye(n, dtype=x.dtype), batch, axis=0)
    _, (grad,) = value_and_grad(
        lambda a: ops.sum(ops.multiply(fn(a), picks)), copies)
    return grad.reshape(n, batch, n).transpose(1, 0, 2)


@pytest.fixture
def tied():
    # Small integers: many ties, including runs longer than the window.
    rng = np.random.default_rng(1)
    return rng.integers(0, 4, size=(3, 4, 40)).astype("float32")


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_exact_rank_matches_rankdata_with_ties(tied, axis):
    np.testing.assert_array_equal(
        np.asarray(exact_rank(tied, axis=axis)),
        scipy.stats.rankdata(tied, axis=axis),
    )


def test_exact_rank_vector_distinct_and_all_equal():
    x = np.random.default_rng(2).normal(size=50).astype("float32")
    np.testing.assert_array_equal(exact_rank(x), scipy.stats.rankdata(x))
    np.testing.assert_array_equal(exact_rank(np.full((2, 9), 3.0)),
                                  np.full((2, 9), 5.0))
    np.testing.assert_array_equal(exact_rank(np.array([[7.0]])), [[1.0]])


@pytest.mark.parametrize("axis", [0, 2, -1])
def test_soft_rank_reaches_rankdata_with_ties(tied, axis):
    # Gaps are >= 1 and ties are exact, so eps = 1e-3 is exact up to fp.
    ranks = soft_rank(tied, regularization_strength=1e-3, axis=axis,
                      window=4)
    np.testing.assert_allclose(ranks, scipy.stats.rankdata(tied, axis=axis),
                               atol=1e-4)


def test_soft_rank_converges_as_strength_shrinks():
    # Distinct values 0.1 apart, shuffled.
    rng = np.random.default_rng(3)
    x = np.stack([rng.permutation(64) for _ in range(4)]).astype("float32")
    x = 0.1 * x
    exact = scipy.stats.rankdata(x, axis=-1)
    errors = [
        np.abs(np.asarray(soft_rank(x, eps)) - exact).max()
        for eps in (1.0, 0.1, 0.01, 1e-3)
    ]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[0] > 1.0
    assert errors[3] < 1e-3


def test_full_window_is_the_all_pairs_soft_rank():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 30)).astype("float32")
    x[0, :5] = 0.25  # ties too
    expected = np_pairwise_soft_rank(x.astype("float64"), 0.3)
    np.testing.assert_allclose(soft_rank(x, 0.3, window=29), expected,
                               atol=1e-4)
    np.testing.assert_allclose(pairwise_soft_rank(x, 0.3), expected,
                               atol=1e-4)
    # A short window only drops the brackets of pairs more than `window`
    # places apart in sorted order; with distinct values 0.1 apart and
    # eps = 0.02 each dropped bracket is below sigmoid(-4 * 0.1 / 0.02).
    x = 0.1 * np.stack([rng.permutation(30) for _ in range(3)])
    x = x.astype("float32")
    short = np.asarray(soft_rank(x, 0.02, window=3))
    np.testing.assert_allclose(short, np_pairwise_soft_rank(x, 0.02),
                               atol=1e-6 * 30)
    # The ranks of a row always sum to n (n + 1) / 2.
    np.testing.assert_allclose(short.sum(-1), 30 * 31 / 2, rtol=1e-6)


def test_soft_rank_gradient_finite_and_nonzero():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 20)).astype("float32")
    jacobian = row_jacobian(
        lambda a: soft_rank(a, regularization_strength=0.5), x)
    assert np.all(np.isfinite(jacobian))
    # Each soft rank increases with its own input and decreases with the
    # others': the diagonal is positive and rows sum to 0 (shift invariance).
    assert np.all(np.diagonal(jacobian, axis1=1, axis2=2) > 1e-3)
    np.testing.assert_allclose(jacobian.sum(-1), 0.0, atol=1e-5)
    # The exact ranks carry no gradient.
    _, (grad,) = value_and_grad(lambda a: ops.sum(exact_rank(a) * a), x)
    np.testing.assert_allclose(grad, to_numpy(exact_rank(x)), atol=0)


def test_soft_rank_gradient_matches_finite_differences(float64):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 12)).astype("float64")
    w = rng.normal(size=(1, 12))
    _, (grad,) = value_and_grad(
        lambda a: ops.sum(ops.multiply(soft_rank(a, 0.4, window=3), w)), x)
    h = 1e-6
    numeric = np.zeros_like(x)
    for j in range(12):
        step = np.zeros_like(x)
        step[0, j] = h
        up = np.sum(np.asarray(soft_rank(x + step, 0.4, window=3)) * w)
        down = np.sum(np.asarray(soft_rank(x - step, 0.4, window=3)) * w)
        numeric[0, j] = (up - down) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_full_window_gradient_is_the_all_pairs_gradient(compiled, float64):
    # window=23 spans three blocks of the folded fractions, both ways.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 24))
    x[0, 1:3] = 0.5  # a tie
    w = rng.normal(size=(3, 24))

    def gradient(rank_fn):
        fn = value_and_grad_fn(
            lambda a: ops.sum(ops.multiply(rank_fn(a), w)))
        fn = jit(fn) if compiled else fn
        _, (grad,) = evaluate(fn(x))
        return grad

    windowed = gradient(lambda x: soft_rank(x, 0.3, window=23))
    all_pairs = gradient(lambda x: pairwise_soft_rank(x, 0.3))
    np.testing.assert_allclose(windowed, all_pairs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("compiled", [False, True])
def test_exact_rank_with_short_and_long_runs_of_ties(compiled):
    rng = np.random.default_rng(9)
    rows = rng.permutation(60).astype("float32")[None].repeat(5, 0)
    rows[0, 10:12] = rows[0, 30]  # pairs and a triple, no longer run
    rows[0, 40:42] = rows[0, 50]
    rows[2, :5] = rows[2, 20]  # a run of 6 equal values
    rows[3, ::4] = 7.0  # a run of 15
    # Rows 1 and 4 have no ties (PyTorch averages only the tied rows).
    fn = jit(exact_rank) if compiled else exact_rank
    np.testing.assert_array_equal(
        to_numpy(fn(rows)), scipy.stats.rankdata(rows, axis=-1)
    )


def test_sort_and_soft_rank_index_dtype():
    x = np.random.default_rng(11).normal(size=(3, 40)).astype("float32")
    _, ranks, order = sort_and_soft_rank(x, 0.2, window=5)
    _, own_ranks, own_order = sort_and_soft_rank(x, 0.2, window=5,
                                                 index_dtype=None)
    assert keras.backend.standardize_dtype(order.dtype) == "int32"
    own = keras.backend.standardize_dtype(own_order.dtype)
    assert own == ("int64" if keras.backend.backend() == "torch" else "int32")
    np.testing.assert_array_equal(to_numpy(own_order), to_numpy(order))
    np.testing.assert_array_equal(to_numpy(own_ranks), to_numpy(ranks))


def test_sorted_soft_rank_is_soft_rank_in_sorted_order():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 3, 40)).astype("float32")
    ranks, order = sorted_soft_rank(x, 0.2, window=5)
    order = np.asarray(order)
    np.testing.assert_array_equal(order, np.argsort(x, axis=-1))
    np.testing.assert_allclose(
        ranks,
        np.take_along_axis(np.asarray(soft_rank(x, 0.2, window=5)), order, -1),
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("compiled", [False, True])
def test_sort_and_soft_rank_returns_the_sorted_values(compiled, dtype):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 40)).astype(dtype)
    c = rng.normal(size=(3, 40)).astype(dtype)

    def sort_and_rank(x):
        return sort_and_soft_rank(x, 0.2, window=5)

    gradient = value_and_grad_fn(
        lambda x: ops.sum(ops.multiply(c, sort_and_rank(x)[0])))
    if compiled:
        sort_and_rank, gradient = jit(sort_and_rank), jit(gradient)
    with float64_context(dtype == "float64"):
        values, ranks, order = evaluate(sort_and_rank(x))
        _, (grad,) = evaluate(gradient(x))
        expected_ranks, expected_order = evaluate(
            sorted_soft_rank(x, 0.2, window=5))
    assert values.dtype == ranks.dtype == grad.dtype == x.dtype
    np.testing.assert_array_equal(values, np.sort(x, axis=-1))
    np.testing.assert_array_equal(order, expected_order)
    np.testing.assert_allclose(ranks, expected_ranks,
                               atol=1e-2 if dtype == "float16" else 1e-5)
    # d sum(c * sorted(x)) / dx puts c back in the original columns.
    expected_grad = np.empty_like(grad)
    np.put_along_axis(expected_grad, order, c, -1)
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("mode", [
    "eager",
    # A TensorFlow graph without XLA; the other backends have no such mode.
    pytest.param("graph", marks=pytest.mark.backends("tensorflow")),
    "xla",
])
def test_gradient_with_respect_to_a_tensor_strength(mode, float64):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(3, 12))
    w = rng.normal(size=(3, 12))
    eps = np.array(0.3)  # a tensor inside the differentiated function

    def gradient(rank_fn):
        fn = value_and_grad_fn(
            lambda e: ops.sum(ops.multiply(rank_fn(x, e), w)))
        if mode == "graph":
            import tensorflow as tf

            fn = tf.function(fn)
        elif mode == "xla":
            fn = jit(fn)
        _, (grad,) = evaluate(fn(eps))
        return grad

    windowed = gradient(lambda x, e: soft_rank(x, e, window=11))
    all_pairs = gradient(lambda x, e: pairwise_soft_rank(x, e))
    assert all_pairs is not None and abs(float(all_pairs)) > 0.1
    np.testing.assert_allclose(float(windowed), float(all_pairs), rtol=1e-9)


def test_repeated_infinities_are_ties_not_nan():
    # -inf is how logits are masked; equal infinities tie like equal values.
    x = np.array([[-np.inf, 1, -np.inf, 2, 0.5, -np.inf, 3, -np.inf, -1, 0]],
                 "float32")
    expected = scipy.stats.rankdata(x, axis=-1)
    for window in (2, 16):
        ranks = np.asarray(soft_rank(x, 1e-3, window=window))
        np.testing.assert_allclose(ranks, expected, atol=1e-4)


@pytest.mark.backends("tensorflow")  # only TF traces unknown sizes
def test_soft_rank_compiles_with_xla_and_dynamic_batch():
    import tensorflow as tf

    x = np.random.default_rng(7).normal(size=(5, 33)).astype("float32")
    fn = tf.function(
        lambda a: soft_rank(a, 0.1, window=2),
        input_signature=[tf.TensorSpec([None, 33])],
        jit_compile=True,
    )
    np.testing.assert_allclose(fn(x), soft_rank(x, 0.1, window=2),
                               atol=1e-4)


def test_soft_rank_rejects_bad_arguments():
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_rank(np.ones((2, 3)), 0.0)
    with pytest.raises(ValueError, match="window"):
        soft_rank(np.ones((2, 3)), 0.1, window=0)


@pytest.mark.parametrize("strength", [
    np.float32(-0.1), np.int64(0), np.array(-0.1), True, np.True_,
    float("inf"), float("nan"),
])
def test_soft_rank_rejects_bad_number_strengths(strength):
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_rank(np.ones((2, 3)), strength)


@pytest.mark.backends("torch")
def test_a_predicate_that_cannot_be_read_goes_to_a_compiled_branch():
    import torch

    from keras_kd.ops import rank

    class Symbolic:
        def __bool__(self):
            raise RuntimeError("no value while tracing")

    assert rank._known_value(Symbolic()) is None
    assert rank._known_value(torch.tensor(True)) is True
    assert rank._known_value(torch.tensor(False)) is False

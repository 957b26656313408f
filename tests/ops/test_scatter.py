"""The row-wise scatters of `keras_kd.ops.scatter` against the
`keras.ops.scatter` formulations they replace (values and gradients), on
the current backend, eagerly and compiled."""

import numpy as np
import pytest
from backend_utils import evaluate
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import value_and_grad
from backend_utils import value_and_grad_fn
from keras import ops

import keras_kd.ops.rank as rank_module
from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import soft_rank
from keras_kd.ops.scatter import gather_rows
from keras_kd.ops.scatter import mark_columns
from keras_kd.ops.scatter import scatter_rows


def keras_scatter_rows(values, permutation):
    """The former `scatter_rows`: one `keras.ops.scatter` over the
    flattened rows."""
    values = ops.convert_to_tensor(values)
    permutation = ops.convert_to_tensor(permutation)
    shape = ops.shape(values)
    n = values.shape[-1]
    offsets = ops.expand_dims(ops.arange(shape[0], dtype="int32") * n, -1)
    flat_indices = ops.reshape(permutation + offsets, (-1, 1))
    return ops.reshape(
        ops.scatter(flat_indices, ops.reshape(values, (-1,)), (shape[0] * n,)),
        shape,
    )


def keras_mark_columns(indices, n):
    """The former top-k marking of `topk_bins`: ones scattered at every
    (row, index) pair of the flattened rows."""
    k = indices.shape[-1]
    flat = ops.reshape(indices, (-1, 1))
    rows = ops.shape(flat)[0] // k
    row_ids = ops.reshape(ops.repeat(ops.arange(rows, dtype="int32")[:, None],
                                     k, axis=1), (-1, 1))
    marks = ops.scatter(ops.concatenate([row_ids, flat], axis=-1),
                        ops.ones(ops.shape(flat)[:1], "float32"), (rows, n))
    return ops.reshape(marks, tuple(indices.shape[:-1]) + (n,)) > 0


def random_permutations(rows, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.normal(size=(rows, n)), axis=-1).astype("int32")


@pytest.mark.parametrize("rows, n", [(1, 1), (3, 7), (6, 50)])
def test_scatter_rows_equals_keras_scatter(rows, n):
    rng = np.random.default_rng(rows)
    values = rng.normal(size=(rows, n)).astype("float32")
    weights = rng.normal(size=(rows, n)).astype("float32")
    permutation = random_permutations(rows, n, seed=n)

    def loss(fn):
        return lambda v: ops.sum(ops.multiply(fn(v, permutation), weights))

    new_value, (new_grad,) = value_and_grad(loss(scatter_rows), values)
    old_value, (old_grad,) = value_and_grad(loss(keras_scatter_rows), values)
    np.testing.assert_array_equal(
        to_numpy(scatter_rows(values, permutation)),
        to_numpy(keras_scatter_rows(values, permutation)))
    np.testing.assert_allclose(new_value, old_value, rtol=1e-6)
    np.testing.assert_array_equal(new_grad, old_grad)
    # The gradient is the upstream gradient gathered by the permutation.
    np.testing.assert_array_equal(
        new_grad, np.take_along_axis(weights, permutation, axis=-1))


def test_scatter_rows_undoes_a_sort_and_compiles():
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(5, 40)).astype("float32")
    order = np.argsort(rows, axis=-1).astype("int32")
    sorted_rows = np.take_along_axis(rows, order, axis=-1)
    weights = np.arange(40, dtype="float32")
    gradient = value_and_grad_fn(
        lambda v: ops.sum(ops.multiply(scatter_rows(v, order), weights)))
    eager = evaluate((scatter_rows(sorted_rows, order),
                      gradient(sorted_rows)[1][0]))
    compiled = evaluate((jit(scatter_rows)(sorted_rows, order),
                         jit(gradient)(sorted_rows)[1][0]))
    for result in (eager, compiled):
        np.testing.assert_array_equal(result[0], rows)
        np.testing.assert_array_equal(
            result[1], np.broadcast_to(weights[order], rows.shape))


def test_gather_rows_is_take_along_axis_and_undoes_scatter_rows():
    rng = np.random.default_rng(5)
    values = rng.normal(size=(4, 30)).astype("float32")
    weights = rng.normal(size=(4, 30)).astype("float32")
    permutation = random_permutations(4, 30, seed=6)
    expected = np.take_along_axis(values, permutation, axis=-1)
    gradient = value_and_grad_fn(lambda v: ops.sum(
        ops.multiply(gather_rows(v, permutation), weights)))
    for run, grad in ((gather_rows, gradient),
                      (jit(gather_rows), jit(gradient))):
        got, (got_grad,) = evaluate((run(values, permutation),
                                     grad(values)[1]))
        np.testing.assert_array_equal(got, expected)
        # The gradient puts the upstream gradient back in place.
        np.testing.assert_array_equal(
            got_grad, to_numpy(scatter_rows(weights, permutation)))
    np.testing.assert_array_equal(
        to_numpy(scatter_rows(gather_rows(values, permutation),
                              permutation)), values)


def test_ranks_equal_those_with_keras_scatter(monkeypatch):
    """`exact_rank` and the differentiated `soft_rank` give the values and
    gradients they gave with the former `keras.ops.scatter`."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 30)).astype("float32")
    x[0, :6] = 0.5  # a tie run longer than the short-run averaging
    weights = rng.normal(size=(4, 30)).astype("float32")

    def results():
        ranks = to_numpy(exact_rank(x))
        value, (grad,) = value_and_grad(
            lambda a: ops.sum(
                ops.multiply(soft_rank(a, 0.3, window=4), weights)), x)
        return ranks, value, grad

    new = results()
    monkeypatch.setattr(rank_module, "scatter_rows", keras_scatter_rows)
    old = results()
    np.testing.assert_array_equal(new[0], old[0])
    np.testing.assert_allclose(new[1], old[1], rtol=1e-6)
    np.testing.assert_allclose(new[2], old[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 6), (3, 1)])
def test_mark_columns_equals_keras_scatter(shape):
    n = 11
    rng = np.random.default_rng(len(shape))
    indices = np.argsort(rng.normal(size=shape[:-1] + (n,)), axis=-1)
    indices = indices[..., :shape[-1]].astype("int32")
    marks = to_numpy(mark_columns(indices, n))
    assert marks.dtype == bool and marks.shape == shape[:-1] + (n,)
    np.testing.assert_array_equal(
        marks, to_numpy(keras_mark_columns(indices, n)))
    expected = np.zeros(marks.shape, bool)
    np.put_along_axis(expected, indices, True, axis=-1)
    np.testing.assert_array_equal(marks, expected)
    np.testing.assert_array_equal(to_numpy(jit(
        lambda i: mark_columns(i, n))(indices)), expected)


def test_mark_columns_allows_repeats():
    indices = np.array([[0, 0, 3], [2, 2, 2]], "int32")
    np.testing.assert_array_equal(
        to_numpy(mark_columns(indices, 4)),
        [[True, False, False, True], [False, False, True, False]])

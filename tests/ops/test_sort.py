"""Sorting: the TensorFlow key sort of `argsort_rows` (eager, in a graph
and under XLA) and the ranks built on it, and the same checks compiled on
the other backends."""

import numpy as np
import pytest
import scipy.stats
from backend_utils import BACKEND
from backend_utils import jit
from backend_utils import to_numpy
from backend_utils import evaluate
from backend_utils import float64_context
from backend_utils import value_and_grad_fn
from keras import ops

import keras_kd.ops.sort as sort_module
from keras_kd.ops.rank import exact_rank
from keras_kd.ops.rank import soft_rank
from keras_kd.ops.sort import argsort_rows


def _awkward_rows():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(6, 300)).astype("float32") * 10.0
    rows[0, :40] = 0.0  # a long run of ties
    rows[0, 40:60] = -0.0  # ... that -0.0 joins
    rows[1, ::3] = rows[1, 1]  # ties spread across the row
    rows[2, :5] = [np.inf, -np.inf, 1e-30, -1e-30, 3.4e38]
    rows[3] = np.round(rows[3])  # small integers, many ties
    rows[4] = -np.abs(rows[4])  # negatives only
    return rows


@pytest.fixture
def fast_sort_calls(monkeypatch):
    """Records the shape of every row batch sent to the key sort."""
    calls = []
    fast = sort_module._tensorflow_key_sort

    def spy(rows):
        calls.append(rows.shape)
        return fast(rows)

    monkeypatch.setattr(sort_module, "_tensorflow_key_sort", spy)
    return calls


def _assert_sorts_with_ties_in_column_order(rows, permutation):
    assert permutation.dtype == np.int32
    for row, order in zip(rows, permutation):
        assert sorted(order) == list(range(rows.shape[1]))
        np.testing.assert_array_equal(row[order], np.sort(row))
        # Equal values keep column order (-0.0 sorts just before +0.0, so
        # ties are equal bit patterns).
        ties = np.diff(row[order].view(np.int32)) == 0
        assert np.all(np.diff(order)[ties] > 0)


@pytest.mark.backends("tensorflow")  # the key sort is TensorFlow's
def test_key_sort_runs_eagerly_in_a_graph_and_under_xla(fast_sort_calls):
    import tensorflow as tf

    rows = _awkward_rows()
    x = tf.constant(rows)
    for run in (argsort_rows, tf.function(argsort_rows), jit(argsort_rows)):
        _assert_sorts_with_ties_in_column_order(rows, run(x).numpy())
    assert len(fast_sort_calls) == 3
    # float64 has no room for the index bits: `argsort`.
    argsort_rows(tf.constant(rows.astype("float64")))
    assert len(fast_sort_calls) == 3


@pytest.mark.backends("tensorflow")
def test_xla_sorts_the_keys_as_one_tensor_without_stability():
    """XLA compiles the key sort to an unstable sort of one int64 operand:
    not a sort of (value, index) pairs, and not the stable sort that
    `tf.sort` (a `TopK`) compiles to, several times slower on CPU."""
    import re

    import tensorflow as tf

    x = tf.constant(_awkward_rows())
    compiled = tf.function(argsort_rows, jit_compile=True)
    hlo = compiled.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    sorts = [line for line in hlo.splitlines() if " sort(" in line]
    assert len(sorts) == 1, hlo
    # One s64 result of one operand (a pair sort reads
    # "= (f32[...], s32[...]) sort(%values, %iota)").
    assert re.search(r"= s64\[[^\]]*\]\S* sort\(%[^,)]+\)", sorts[0]), hlo
    assert "is_stable=true" not in sorts[0], hlo


@pytest.mark.backends("tensorflow")
def test_key_sort_without_xla_sort_falls_back_to_tf_sort(monkeypatch):
    """Where TensorFlow does not expose XLA's sort, `tf.sort` sorts the
    keys: the same permutation, eagerly and under XLA."""
    import tensorflow as tf

    monkeypatch.setattr(sort_module, "_key_sort_function", lambda: None)
    rows = _awkward_rows()
    x = tf.constant(rows)
    for run in (argsort_rows, jit(argsort_rows)):
        _assert_sorts_with_ties_in_column_order(rows, run(x).numpy())
    compiled = tf.function(argsort_rows, jit_compile=True)
    hlo = compiled.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    assert "is_stable=true" in hlo  # it really took the other path


def test_xla_argsort_sorts_every_row():
    rows = _awkward_rows()
    permutation = to_numpy(jit(argsort_rows)(rows))
    assert permutation.dtype == np.int32
    if BACKEND == "tensorflow":
        _assert_sorts_with_ties_in_column_order(rows, permutation)
        return
    # Elsewhere the order of ties is left to `keras.ops.argsort`.
    for row, order in zip(rows, permutation):
        assert sorted(order) == list(range(rows.shape[1]))
        np.testing.assert_array_equal(row[order], np.sort(row))


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_exact_rank_under_xla_matches_rankdata(dtype):
    rows = _awkward_rows().astype(dtype)
    rows[np.isinf(rows)] = 7.0  # keep float16 finite after the cast
    rows[2, 4] = 3.0
    with float64_context(dtype == "float64"):
        ranks = to_numpy(jit(lambda x: exact_rank(x, axis=-1))(rows))
    np.testing.assert_array_equal(ranks, scipy.stats.rankdata(rows, axis=-1))


def test_soft_rank_and_gradient_under_xla_equal_eager():
    # Distinct values: where values tie, which tied entry takes which
    # sorted place is up to the sort, and soft ranks depend on the place.
    x = _awkward_rows()[4:]

    def ranks(x):
        return soft_rank(x, regularization_strength=0.5)

    weights = np.arange(300, dtype=x.dtype)
    gradient = value_and_grad_fn(
        lambda x: ops.sum(ops.multiply(ranks(x), weights)))
    eager = evaluate((ranks(x), gradient(x)[1][0]))
    compiled = evaluate((jit(ranks)(x), jit(gradient)(x)[1][0]))
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)


@pytest.mark.backends("tensorflow")  # the key sort is TensorFlow's
def test_distiller_with_jit_compile_uses_the_key_sort(fast_sort_calls):
    import keras

    import keras_kd

    calls = fast_sort_calls

    def model(name):
        inputs = keras.Input((6,))
        return keras.Model(inputs, keras.layers.Dense(12)(inputs), name=name)

    distiller = keras_kd.Distiller(
        model("teacher"), model("student"),
        terms=[keras_kd.Term(keras_kd.losses.SpearmanCorrelation())],
    )
    distiller.compile(optimizer="sgd", jit_compile=True)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    history = distiller.fit(x, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert len(calls) == 2  # teacher ranks and student soft ranks


@pytest.mark.backends("torch")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_sort_rows_sorts_float32_as_int32_keys(dtype, monkeypatch):
    import torch

    rows = _awkward_rows().astype(dtype)
    keys_sorted = []
    sort = torch.sort

    def spy(x, *args, **kwargs):
        keys_sorted.append(x.dtype)
        return sort(x, *args, **kwargs)

    monkeypatch.setattr(torch, "sort", spy)
    x = torch.tensor(rows, requires_grad=True)
    values, permutation = sort_module.sort_rows(x, index_dtype=None)
    assert keys_sorted == [torch.int32 if dtype == "float32" else x.dtype]
    assert permutation.dtype == torch.int64
    np.testing.assert_array_equal(values.detach().numpy(),
                                  np.sort(rows, axis=-1))
    np.testing.assert_array_equal(
        np.take_along_axis(rows, permutation.numpy(), -1), np.sort(rows, -1))
    # The gradient puts the upstream gradient back in the original columns.
    upstream = np.random.default_rng(1).normal(size=rows.shape)
    (grad,) = torch.autograd.grad(
        (values * torch.tensor(upstream, dtype=values.dtype)).sum(), x)
    expected = np.empty_like(upstream)
    np.put_along_axis(expected, permutation.numpy(), upstream, -1)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6)
    # Ranks on top of it still count -0.0 and +0.0 as one run of ties.
    np.testing.assert_array_equal(
        to_numpy(exact_rank(rows)), scipy.stats.rankdata(rows, axis=-1))

"""Sorting under XLA: the TensorFlow fast path of `argsort_rows` and the
ranks built on it, and the same checks compiled on the other backends."""

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
    """Records the shape of every row batch sent to the XLA fast path."""
    calls = []
    fast = sort_module._tensorflow_xla_sort

    def spy(rows):
        calls.append(rows.shape)
        return fast(rows)

    monkeypatch.setattr(sort_module, "_tensorflow_xla_sort", spy)
    return calls


@pytest.mark.backends("tensorflow")  # the fast path is TensorFlow's
def test_fast_path_is_taken_only_under_xla(fast_sort_calls):
    import tensorflow as tf

    calls = fast_sort_calls
    x = tf.constant(_awkward_rows())
    argsort_rows(x)
    tf.function(argsort_rows)(x)
    assert calls == []
    jit(argsort_rows)(x)
    assert len(calls) == 1


def test_xla_argsort_sorts_every_row():
    rows = _awkward_rows()
    permutation = to_numpy(jit(argsort_rows)(rows))
    assert permutation.dtype == np.int32
    for row, order in zip(rows, permutation):
        assert sorted(order) == list(range(rows.shape[1]))
        np.testing.assert_array_equal(row[order], np.sort(row))
        if BACKEND == "tensorflow":
            # The fast path keeps equal values in column order (-0.0 sorts
            # just before +0.0, so ties are equal bit patterns); elsewhere
            # the order of ties is left to `keras.ops.argsort`.
            ties = np.diff(row[order].view(np.int32)) == 0
            assert np.all(np.diff(order)[ties] > 0)


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


@pytest.mark.backends("tensorflow")  # the fast path is TensorFlow's
def test_distiller_with_jit_compile_uses_the_fast_sort(fast_sort_calls):
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

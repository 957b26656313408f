"""Row-wise sorting for the rank functions, with a fast path on TensorFlow.

`argsort_rows(rows)` returns, for a 2-D tensor, the permutation that sorts
every row in ascending order (as `keras.ops.argsort(rows, axis=-1)`, as
int32); `sort_rows(rows)` returns the sorted rows, differentiable, and that
permutation. On JAX they are `keras.ops.argsort` and
`keras.ops.take_along_axis`. On PyTorch `sort_rows` is one `torch.sort`
of int32 keys for float32 rows (the same order-preserving keys as below;
`torch.sort` is faster on them than on floats) and a `torch.gather` of the
values, and one `torch.sort` of the values for other dtypes (no
`take_along_axis`, whose Keras form adds index checks as eager ops).

On TensorFlow they sort integer keys instead. TensorFlow lowers `argsort`
to a `TopK` of every element, which XLA compiles (`jit_compile=True`) to a
sort of (value, index) pairs with a general comparator; on CPU that sort is
several times slower than XLA's sort of a single integer tensor. So each
float32 value and its column index are packed into one int64 key whose
integer order is the order of (value, index); the keys are sorted alone,
and the indices are read back from the keys' low bits and the values from
their high bits (no gather). Values are mapped to integers with the usual
order-preserving bit trick (flip all bits but the sign of negative floats),
so the order is exact: no rounding, and equal values keep ascending column
order. `-0.0` sorts just before `+0.0`; the rank functions compare the
sorted values themselves, so the two still count as a tie. The gradient of
the sorted values is one scatter back to the original columns.

The keys are unique, so the sort need not be stable; but `tf.sort` (a
`TopK`) compiles to XLA's *stable* sort, which on CPU took 3.7x as long as
the unstable one at 256 x 1000 (`benchmarks/losses.py` prints the key sort
beside `tf.argsort`). The keys are therefore sorted by XLA's own sort
(`XlaSort`, unstable), in a small function compiled with
`jit_compile=True`: inside an XLA step it is inlined, and called eagerly or
from a plain `tf.function` it runs as its own compiled cluster, so nothing
has to tell the contexts apart. `XlaSort` is exposed only by TensorFlow's
`tensorflow.compiler.tf2xla` module, the one TensorFlow-internal import of
the library: where that import fails, the keys are sorted with `tf.sort`
(the same result, slower under XLA). float64 inputs and rows too long for
the packing use `keras.ops.argsort`.
"""

import functools

import keras
from keras import ops

from keras_kd.ops.scatter import scatter_rows

_FAST_DTYPES = ("float16", "bfloat16", "float32")


def _tensorflow_key_sort(rows):
    """Sorted float32 rows and their permutation, from one key sort."""
    import tensorflow as tf

    n = rows.shape[-1]
    index_bits = max(1, (n - 1).bit_length())
    index_mask = (1 << index_bits) - 1
    bits = tf.bitcast(tf.cast(rows, "float32"), tf.int32)
    keys = tf.bitwise.left_shift(
        tf.cast(_flip_negative(bits), tf.int64), index_bits
    )
    keys = _sort_keys(keys + tf.range(n, dtype=tf.int64)[None, :])
    permutation = tf.cast(tf.bitwise.bitwise_and(keys, index_mask), "int32")
    # The high bits hold the values themselves: no gather needed.
    high = tf.cast(tf.bitwise.right_shift(keys, index_bits), tf.int32)
    return tf.bitcast(_flip_negative(high), tf.float32), permutation


@functools.lru_cache(maxsize=None)
def _key_sort_function():
    """The unstable XLA sort of int64 keys along the last axis, compiled
    (`jit_compile=True`), or `None` where TensorFlow does not expose it."""
    import tensorflow as tf

    try:
        from tensorflow.compiler.tf2xla.python import xla
    except ImportError:
        return None
    if not callable(getattr(xla, "sort", None)):
        return None
    return tf.function(xla.sort, jit_compile=True, autograph=False)


def _sort_keys(keys):
    """Ascending sort of int64 keys along the last axis."""
    import tensorflow as tf

    compiled = _key_sort_function()
    if compiled is None:
        return tf.sort(keys, axis=-1)
    return compiled(keys)


def _torch_sort_rows(rows):
    """`torch.sort` of the rows, with float32 rows sorted as int32 keys.

    The keys are the values' bits, with the bits other than the sign
    flipped in negative floats (`_flip_negative`): their integer order is
    the order of the values, and `torch.sort` takes about a fifth less time
    on int32 than on float32 on CPU (4.7 against 5.8 ms at 256 x 1000).
    The sorted values are then a gather by the permutation, differentiable
    like the sort's own. As with the TensorFlow key sort, `-0.0` sorts
    just before `+0.0` (the rank functions still count them as a tie), and
    NaNs with the sign bit set sort first instead of last."""
    import torch

    rows = torch.as_tensor(rows)
    if rows.dtype != torch.float32:
        return torch.sort(rows, dim=-1)
    bits = rows.detach().contiguous().view(torch.int32)
    keys = torch.bitwise_xor(bits, (bits >> 31) & 0x7FFFFFFF)
    permutation = torch.sort(keys, dim=-1).indices
    return torch.gather(rows, -1, permutation), permutation


def _flip_negative(bits):
    """Order-preserving map between float32 bit patterns and int32 (its
    own inverse): negative floats count down as their magnitude grows, so
    their bits other than the sign are flipped."""
    import tensorflow as tf

    return tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, 0x7FFFFFFF), bits)


def _use_fast_path(rows):
    n = rows.shape[-1]
    return (
        keras.backend.backend() == "tensorflow"
        and keras.backend.standardize_dtype(rows.dtype) in _FAST_DTYPES
        and n is not None
        and (n - 1).bit_length() <= 31
    )


def argsort_rows(rows):
    """Ascending sort permutation of every row of a 2-D tensor (int32).

    Equal to `keras.ops.argsort(rows, axis=-1)` up to the order of equal
    values; on TensorFlow, equal values keep ascending column order and
    the sort is faster under XLA (see the module docstring).
    The result carries no gradient.

    Args:
        rows: float tensor of shape `(rows, n)` with a static `n`.

    Returns:
        An int32 tensor of the same shape.
    """
    rows = ops.stop_gradient(ops.convert_to_tensor(rows))
    if _use_fast_path(rows):
        return _tensorflow_key_sort(rows)[1]
    return ops.cast(ops.argsort(rows, axis=-1), "int32")


def sort_rows(rows, index_dtype="int32"):
    """Sorts every row of a 2-D tensor: returns `(sorted_rows, permutation)`.

    `sorted_rows[r, p] = rows[r, permutation[r, p]]`, ascending, with
    `permutation` as from `argsort_rows` up to the order of equal values
    (on PyTorch, from `torch.sort` of the order-preserving int32 keys of
    float32 rows: `-0.0` sorts before `+0.0`, and NaNs with the sign bit
    set first). The gradient with respect to `rows` puts the upstream
    gradient back in the original columns. On TensorFlow the sorted values
    are read from the sorted keys themselves and the gradient is one
    scatter; on PyTorch they are a `torch.gather` by the permutation (for
    float32; other dtypes come with it from `torch.sort`); on JAX they are
    a `take_along_axis` by the permutation, differentiated by the
    backend.

    Args:
        rows: float tensor of shape `(rows, n)` with a static `n`.
        index_dtype: dtype of the permutation. `None` keeps the sort's own:
            int64 on PyTorch, int32 elsewhere (`keras_kd.ops.scatter`'s
            functions take either; on PyTorch int64 needs no cast).

    Returns:
        The sorted rows (dtype of `rows`) and the permutation (int32 unless
        `index_dtype` says otherwise).
    """
    sorted_rows, permutation = _sort_rows(rows)
    if index_dtype is not None:
        permutation = ops.cast(permutation, index_dtype)
    return sorted_rows, permutation


def _sort_rows(rows):
    """`sort_rows` with the permutation in the sort's own dtype."""
    if keras.backend.backend() == "torch":
        return _torch_sort_rows(rows)
    if not _use_fast_path(rows):
        permutation = argsort_rows(rows)
        return ops.take_along_axis(rows, permutation, axis=-1), permutation
    dtype = rows.dtype
    sorted_rows, permutation = _tensorflow_key_sort(ops.stop_gradient(rows))

    @ops.custom_gradient
    def _sorted(rows):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return ops.cast(scatter_rows(upstream, permutation), dtype)

        return ops.cast(sorted_rows, dtype), grad

    return _sorted(rows), permutation

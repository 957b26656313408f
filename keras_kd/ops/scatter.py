"""Row-wise scatters (and the gather they undo) that run as one vectorised
op on every backend.

`keras.ops.scatter` is one op on TensorFlow (`tf.scatter_nd`) and on JAX
(`.at[].add`), but the PyTorch backend of Keras 3 adds the values one
index row at a time in a Python loop: a scatter of a `256 x 1000` batch
launches hundreds of thousands of small torch ops, and its backward more.
The two scatters keras-kd needs put values into known columns of each
row, which is what `torch.Tensor.scatter` does in one call; so on PyTorch
these functions call it, and elsewhere they keep `keras.ops.scatter`
(`keras.ops.scatter_update` of booleans for the marks).

- `scatter_rows(values, permutation)` undoes a row-wise sort (the rank
  functions put ranks back in the original columns with it; its gradient
  is a gather on every backend).
- `mark_columns(indices, n)` marks the listed columns of each row (the
  top-k bins of a sparse teacher).
- `gather_rows(values, permutation)` reads every row in a permutation's
  order: `keras.ops.take_along_axis` on the last axis, which on PyTorch
  is `torch.gather` alone (Keras' PyTorch form first checks and wraps the
  indices, four more eager passes over them).
"""

import keras
from keras import ops


def _is_torch():
    return keras.backend.backend() == "torch"


def scatter_rows(values, permutation):
    """Puts `values[r, p]` at column `permutation[r, p]` of row `r`.

    The inverse of sorting: `scatter_rows(sorted_rows, permutation)` is
    `rows` again. Differentiable with respect to `values` (the gradient
    is the upstream gradient gathered by `permutation`).

    Args:
        values: tensor of shape `(rows, n)`.
        permutation: integer tensor of the same shape, a permutation of
            `0..n-1` in every row.

    Returns:
        A tensor of the shape and dtype of `values`.
    """
    values = ops.convert_to_tensor(values)
    permutation = ops.convert_to_tensor(permutation)
    if _is_torch():
        import torch

        # Every column is written: no zeros needed.
        return torch.empty_like(values).scatter_(
            -1, permutation.long(), values)
    shape = ops.shape(values)
    n = values.shape[-1]
    offsets = ops.expand_dims(ops.arange(shape[0], dtype="int32") * n, -1)
    flat_indices = ops.reshape(
        ops.cast(permutation, "int32") + offsets, (-1, 1))
    return ops.reshape(
        ops.scatter(flat_indices, ops.reshape(values, (-1,)), (shape[0] * n,)),
        shape,
    )


def gather_rows(values, permutation):
    """`values[r, permutation[r, p]]` at `[r, p]`: each row read in the
    order of its permutation (the inverse of `scatter_rows`).

    Args:
        values: tensor of shape `(rows, n)`.
        permutation: integer tensor of the same shape, column numbers in
            `[0, n)`.

    Returns:
        A tensor of the shape and dtype of `values`, differentiable with
        respect to `values`.

    Example:

    >>> np.asarray(gather_rows(np.array([[10.0, 20.0, 30.0]]),
    ...                        np.array([[2, 0, 1]])))
    array([[30., 10., 20.]])
    """
    if _is_torch():
        import torch

        return torch.gather(torch.as_tensor(values), -1,
                            torch.as_tensor(permutation).long())
    return ops.take_along_axis(values, permutation, axis=-1)


def mark_columns(indices, n):
    """A boolean mask that is True at the listed columns of every row.

    Args:
        indices: integer tensor of shape `(..., k)`, column numbers in
            `[0, n)`; repeats are allowed.
        n: the number of columns (a Python int).

    Returns:
        A bool tensor of shape `(..., n)`: entry `[..., j]` is True where
        `j` is one of `indices[..., :]`.
    """
    indices = ops.convert_to_tensor(indices)
    shape = tuple(ops.shape(indices)[:-1]) + (n,)
    if _is_torch():
        import torch

        marks = torch.zeros(shape, dtype=torch.bool, device=indices.device)
        return marks.scatter(-1, indices.long(), True)
    k = indices.shape[-1]
    flat = ops.reshape(ops.cast(indices, "int32"), (-1,))
    rows = ops.shape(flat)[0] // k
    row_ids = ops.reshape(
        ops.repeat(ops.arange(rows, dtype="int32")[:, None], k, axis=1),
        (-1,))
    # Booleans set in place: a quarter of the memory of float32 ones added
    # into zeros (`keras.ops.scatter`), and no comparison afterwards.
    marks = ops.scatter_update(ops.zeros((rows, n), "bool"),
                               ops.stack([row_ids, flat], axis=-1),
                               ops.ones((rows * k,), "bool"))
    return ops.reshape(marks, shape)

"""Digests of samples, recorded when a cache is built and compared when
it is paired with data.

Two kinds:

- the probes (`sample_digest`): a SHA-256 of a few samples (the first, the
  middle and the last), compared when the cache is paired with data;
- the row digests (`row_digests`), one per sample, compared with every
  batch as it is read (`TeacherCache.inputs` on arrays compares them all
  at once). A row's digest is, for each numeric input (in
  `keras.tree.flatten` order), three float64 sums over the row's values
  `v_i` (as float64): `sum(v_i * a_i)`, `sum(v_i * b_i)` and
  `sum(|v_i|)`, with fixed weights `a_i = 1 + frac(i * 0.618...)` and
  `b_i = 1 + frac(i * 0.414...)` that tell positions apart. One
  multiply-add per value and input, so it costs far less than reading the
  data; two rows swapped (or a row shifted) give other sums unless the
  rows are equal. The sums are compared to a relative `1e-9` of the row's
  `sum(|v_i|)`, as the summation order differs between NumPy and
  `tf.data`; inputs that are not numbers (strings) are left out. Caches
  built before the row digests (manifests without `row_digests`) are
  checked with the probes alone.
"""

import hashlib

import keras
import numpy as np

from keras_kd.cache._data import as_numpy

METHOD = "float64 weighted sums, v1"
# Golden-ratio and sqrt(2) fractions: weights that differ at every
# position.
_STEPS = (0.6180339887498949, 0.41421356237309515)
_RELATIVE_TOLERANCE = 1e-9


def sample_digest(x, row):
    """A digest of sample `row` of a batch `x` (its values as float64, so
    that a change of dtype alone does not count)."""
    digest = hashlib.sha256()
    for leaf in keras.tree.flatten(x):
        value = np.asarray(as_numpy(leaf)[row])
        if value.dtype.kind in "biuf":
            value = value.astype(np.float64)
        digest.update(repr(value.shape).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def _weights(size):
    position = np.arange(size, dtype=np.float64)
    return [1.0 + (position * step - np.floor(position * step))
            for step in _STEPS]


def row_digests(x):
    """The row digests of a batch `x` (arrays, or a dict or list of them):
    a float64 array of shape `(rows, 3 * numeric inputs)`."""
    columns = []
    rows = None
    for leaf in keras.tree.flatten(x):
        value = as_numpy(leaf)
        rows = value.shape[0]
        if value.dtype.kind not in "biuf":
            continue
        flat = value.reshape(rows, -1).astype(np.float64)
        first, second = _weights(flat.shape[1])
        columns += [flat @ first, flat @ second, np.abs(flat).sum(axis=1)]
    if not columns:
        return np.zeros((rows or 0, 0), np.float64)
    return np.stack(columns, axis=1)


def tf_row_digest(x):
    """The row digest of one sample `x` (unbatched), in TensorFlow ops for
    a `tf.data` pipeline: a float64 vector, as `row_digests` gives per
    row."""
    import tensorflow as tf

    columns = []
    for leaf in keras.tree.flatten(x):
        leaf = tf.convert_to_tensor(leaf)
        if not (leaf.dtype.is_floating or leaf.dtype.is_integer
                or leaf.dtype.is_bool):
            continue
        flat = tf.reshape(tf.cast(leaf, tf.float64), [-1])
        position = tf.cast(tf.range(tf.size(flat)), tf.float64)
        for step in _STEPS:
            scaled = position * step
            columns.append(tf.reduce_sum(
                flat * (1.0 + scaled - tf.floor(scaled))))
        columns.append(tf.reduce_sum(tf.abs(flat)))
    if not columns:
        return tf.zeros([0], tf.float64)
    return tf.stack(columns)


def _tolerance(expected, found, xp=np):
    """Per column, `1e-9` of the larger `sum(|v|)` of the row's input."""
    scale = xp.maximum(xp.abs(expected[..., 2::3]), xp.abs(found[..., 2::3]))
    return _RELATIVE_TOLERANCE * 2.0 * xp.repeat(scale, 3, axis=-1)


def mismatched_rows(expected, found):
    """The indices of the rows whose digests differ (`expected` and
    `found` of the same shape)."""
    if expected.shape != found.shape:
        return np.arange(found.shape[0])
    close = (np.abs(expected - found) <= _tolerance(expected, found)) | (
        expected == found) | (np.isnan(expected) & np.isnan(found))
    return np.flatnonzero(~np.all(close, axis=1))


def tf_digest_matches(expected, found):
    """Whether one row's digests match, in TensorFlow ops."""
    import tensorflow as tf

    if expected.shape[-1] != found.shape[-1]:
        return tf.constant(False)
    scale = tf.maximum(tf.abs(expected[2::3]), tf.abs(found[2::3]))
    tolerance = _RELATIVE_TOLERANCE * 2.0 * tf.repeat(scale, 3)
    close = (tf.abs(expected - found) <= tolerance) | tf.equal(
        expected, found) | (tf.math.is_nan(expected)
                            & tf.math.is_nan(found))
    return tf.reduce_all(close)


def sample_error(row, what="`x`"):
    """The error for sample `row` of `what` that is not the sample the
    cache was built on."""
    return ValueError(
        f"Sample {row} of {what} differs from sample {row} of the data the "
        "teacher cache was built on. Pair the cache with the same samples "
        "in the same order (shuffle through `fit`, not before); pass "
        "`check_samples=False` if the student deliberately sees other "
        "inputs (e.g. another resolution).")

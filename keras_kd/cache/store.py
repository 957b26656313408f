"""A built cache: `TeacherCache` (its arrays in memory or memory-mapped
from disk, the data it pairs with) and `CachedDataset`, batches read from
its arrays."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import keras
import numpy as np

from keras_kd.cache._data import as_numpy, is_tf_dataset, unpack_x
from keras_kd.cache.digest import (mismatched_rows, row_digests,
                                   sample_digest, sample_error,
                                   tf_digest_matches, tf_row_digest)
from keras_kd.cache.files import (DIGESTS_FILE, MANIFEST, file_name, open_array,
                                  read_manifest, size_text)
from keras_kd.cache.reader import (CACHE_KEY, INPUTS_KEY, feature_keys_of,
                                   is_cached)
from keras_kd.cache.tag import KNOWN_TEACHERS, CacheTag

# Rows read at a time from the arrays (checks, on-disk `tf.data`).
_BLOCK = 4096


class TeacherCache:
    """The teachers' outputs on a data set, computed once by
    `cache_teacher_outputs` (or opened with `TeacherCache.load`).

    Pair it with the same samples, in the same order, as it was built on:
    `inputs(x)` returns the data `Distiller.fit` takes (NumPy arrays, or a
    `tf.data.Dataset` of single samples), `dataset(x, y)` a
    `keras.utils.PyDataset` that reads batches from the (memory-mapped)
    arrays, for data and caches larger than memory.

    Attributes:
        manifest: the description of the cache (teachers' names and
            fingerprints, number of samples, classes, `top_k`, arrays).
        arrays: `{key: array}`; NumPy memory maps for an on-disk cache.
        directory: where the cache is stored, or `None` (in memory).
        row_digests: the digest of each sample's inputs
            (`keras_kd.cache.digest.row_digests`), compared with the data
            as it is read; `None` for a cache written without them.
    """

    def __init__(self, manifest: dict[str, Any],
                 arrays: dict[str, Any],
                 directory: str | os.PathLike[str] | None = None,
                 row_digests: Any = None) -> None:
        self.manifest = manifest
        self.arrays = dict(arrays)
        self.directory = directory
        self.row_digests = row_digests
        KNOWN_TEACHERS[manifest["fingerprint"]] = self.teacher_names

    # Description.

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def __len__(self):
        return self.num_samples

    @property
    def top_k(self) -> int | None:
        return self.manifest["top_k"]

    @property
    def teacher_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["teachers"]]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def tag(self) -> str:
        """The key under which a batch carries this cache (a `CacheTag`
        as text)."""
        temperature = self.manifest.get("temperature")
        return str(CacheTag(self.fingerprint,
                            int(self.manifest["num_classes"]),
                            int(self.top_k or 0), self.manifest["ensemble"],
                            temperature,
                            None if temperature is None else self.max_index))

    @property
    def max_index(self) -> int | None:
        """The largest stored class or token index of a top-k cache (from
        the manifest; a cache written without it reads its indices once),
        or `None`."""
        if "indices" not in self.arrays:
            return None
        if "max_index" not in self.manifest:
            self.manifest["max_index"] = int(np.max(self.arrays["indices"]))
        return int(self.manifest["max_index"])

    @property
    def feature_keys(self) -> set[tuple[int, str]]:
        """`{(teacher index, layer name)}` of the cached features."""
        return feature_keys_of(self._entry(self.arrays))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    def __repr__(self):
        where = f"'{self.directory}'" if self.directory else "memory"
        kind = f"top_k={self.top_k}" if self.top_k else "full outputs"
        return (f"<TeacherCache of {self.teacher_names}: {self.num_samples} "
                f"samples, {kind}, {size_text(self.nbytes)} in {where}>")

    # Storage.

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TeacherCache:
        """Opens a cache written by `cache_teacher_outputs(...,
        directory=...)` or `save`; its arrays are memory-mapped, read only."""
        directory = os.fspath(directory)
        manifest = read_manifest(directory)
        arrays = {key: open_array(directory, spec)
                  for key, spec in manifest["arrays"].items()}
        digests = None
        if manifest.get("row_digests") is not None:
            digests = open_array(directory, manifest["row_digests"])
        return cls(manifest, arrays, directory, row_digests=digests)

    def save(self, directory: str | os.PathLike[str],
             overwrite: bool = False) -> TeacherCache:
        """Writes the cache to `directory` and returns it opened from
        there (memory-mapped)."""
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(
                    f"'{directory}' already holds a teacher cache; pass "
                    "`overwrite=True` to replace it.")
            os.remove(path)
        os.makedirs(directory, exist_ok=True)
        manifest = json.loads(json.dumps(self.manifest))
        for index, (key, array) in enumerate(self.arrays.items()):
            name = file_name(key, index)
            target = os.path.join(directory, name)
            with open(target + ".partial", "wb") as f:
                np.save(f, np.asarray(array))
            os.replace(target + ".partial", target)
            manifest["arrays"][key]["file"] = name
        if self.row_digests is not None:
            target = os.path.join(directory, DIGESTS_FILE)
            with open(target + ".partial", "wb") as f:
                np.save(f, np.asarray(self.row_digests))
            os.replace(target + ".partial", target)
            manifest["row_digests"]["file"] = DIGESTS_FILE
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
        return TeacherCache.load(directory)

    # Data.

    @staticmethod
    def _entry(arrays):
        """The nested dict a batch carries, from flat `{key: array}`."""
        entry = {}
        for key, value in arrays.items():
            parts = key.split("/")
            node = entry
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return entry

    def _wrap(self, x, arrays):
        return {INPUTS_KEY: x, CACHE_KEY: {self.tag: self._entry(arrays)}}

    def _check_samples(self, sample_at):
        for row, expected in self.manifest["probes"].items():
            x_row, local = sample_at(int(row))
            if x_row is None:
                continue
            if sample_digest(x_row, local) != expected:
                raise sample_error(row)

    def check_rows(self, x: Any, rows: Any, what: str = "`x`") -> None:
        """Compares the digests of a batch `x` with those recorded for
        `rows` (a slice or indices) when the cache was built; a cache
        written without row digests passes.

        Raises:
            ValueError: naming the first sample of `x` that is not the
                sample the cache was built on.
        """
        if self.row_digests is None:
            return
        expected = np.asarray(self.row_digests[rows])
        bad = mismatched_rows(expected, row_digests(x))
        if bad.size:
            numbers = np.arange(self.num_samples)[rows]
            raise sample_error(int(numbers[bad[0]]), what)

    def _check_length(self, n, what="`x`"):
        if n != self.num_samples:
            raise ValueError(
                f"{what} holds {n} samples but the teacher cache holds "
                f"{self.num_samples} (built from teachers "
                f"{self.teacher_names}): a cache pairs with the data it was "
                "built on, sample by sample.")

    def inputs(self, x: Any, check_samples: bool = True) -> Any:
        """`x` with this cache, as `Distiller.fit`, `evaluate` and
        `predict` take it.

        Args:
            x: the samples the cache was built on, in the same order: NumPy
                arrays (or a dict or list of them), or a `tf.data.Dataset`
                of single samples (not batched; elements `x` or `(x, y[,
                sample_weight])`), to be shuffled and batched after this.
            check_samples: compare `x` with the data the cache was built
                on: a few samples (the first, middle and last) at once, and
                every row's digest (`keras_kd.cache.digest`): all rows of
                arrays at once, each sample of a dataset as it is read.

        Returns:
            For arrays, the dict `{"inputs": x, "keras_kd_teacher_cache":
            {tag: arrays}}` (pass it as `x`, with `y` and `sample_weight`
            as usual); for a dataset, the dataset with `x` replaced by that
            dict.

        Raises:
            ValueError: `x` holds another number of samples, or other
                samples. (A dataset whose length `tf.data` cannot tell
                beforehand raises `tf.errors.InvalidArgumentError` as it
                is read, at its first other sample, or at its end when it
                is shorter or longer than the cache.)
        """
        if is_cached(x):
            raise ValueError("`x` already carries a teacher cache.")
        if is_tf_dataset(x):
            return self._tf_inputs(x, check_samples)
        leaves = keras.tree.flatten(x)
        if not leaves or not all(hasattr(a, "shape") for a in leaves):
            raise TypeError(
                "`inputs` takes NumPy arrays (or a dict or list of them) or "
                "an unbatched `tf.data.Dataset`; for other data use "
                f"`dataset(x, y)`. Got {type(x).__name__}.")
        for leaf in leaves:
            self._check_length(int(leaf.shape[0]))
        if check_samples:
            self._check_samples(lambda row: (
                keras.tree.map_structure(lambda a: a[row:row + 1], x), 0))
            # Every row, a block at a time.
            for start in range(0, self.num_samples, _BLOCK):
                rows = slice(start, start + _BLOCK)
                self.check_rows(keras.tree.map_structure(
                    lambda a: np.asarray(a[rows]), x), rows)
        return self._wrap(x, self.arrays)

    def _tf_inputs(self, dataset, check_samples):
        import tensorflow as tf

        n = self.num_samples
        cardinality = int(dataset.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError("The dataset is infinite; give the finite, "
                             "unbatched dataset the cache was built on.")
        if cardinality >= 0:
            self._check_length(cardinality, "The dataset")
        if check_samples:
            first = unpack_x(next(iter(dataset.take(1))))
            self._check_samples(lambda row: (
                keras.tree.map_structure(lambda a: as_numpy(a)[None], first),
                0) if row == 0 else (None, 0))
        entry = self._entry(self.arrays)
        if self.directory is None:
            cached = tf.data.Dataset.from_tensor_slices(entry)
        else:
            def chunks():
                for start in range(0, n, _BLOCK):
                    yield keras.tree.map_structure(
                        lambda a: np.asarray(a[start:start + _BLOCK]), entry)

            signature = keras.tree.map_structure(
                lambda a: tf.TensorSpec((None,) + a.shape[1:], a.dtype),
                entry)
            cached = tf.data.Dataset.from_generator(
                chunks, output_signature=signature).unbatch()
        digests = self.row_digests if check_samples else None
        if digests is None:
            digests = np.zeros((n, 0), np.float64)
        # Each sample's row of the cache: values, row number, digest.
        side = tf.data.Dataset.zip((
            cached, tf.data.Dataset.range(n),
            tf.data.Dataset.from_tensor_slices(np.asarray(digests))))
        # Each sample, and whether it is the end mark.
        samples = tf.data.Dataset.zip((
            dataset, tf.data.Dataset.from_tensors(False).repeat()))
        if cardinality < 0:
            # A length `tf.data` cannot tell beforehand: a row past the
            # cache's end (row number n) meets a sample beyond it, and an
            # end mark after the last sample (a copy of the first) meets a
            # row before n when the dataset is shorter; a dataset of n
            # samples pairs its end mark with row n, which is dropped.
            # (The result's length stays unknown, so that Keras reads to
            # the end and a longer dataset is never cut silently.)
            side = side.concatenate(side.take(1).map(
                lambda values, row, digest: (
                    values, tf.constant(n, tf.int64), digest)))
            samples = samples.concatenate(tf.data.Dataset.zip((
                dataset.take(1), tf.data.Dataset.from_tensors(True))))
            paired = tf.data.Dataset.zip((samples, side)).filter(
                lambda sample, row: tf.logical_not(
                    sample[1] & tf.equal(row[1], n)))
        else:
            # Lengths checked: a length Keras can read beforehand.
            paired = tf.data.Dataset.zip((samples, side)).apply(
                tf.data.experimental.assert_cardinality(n))
        tag = self.tag
        checked = self.row_digests is not None and check_samples

        def attach(sample, row):
            (element, end), (values, index, digest) = sample, row
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
                element)
            checks = [
                tf.debugging.Assert(tf.logical_not(end), [
                    "The dataset holds", index, "samples, but the teacher "
                    f"cache holds {n}: a cache pairs with the data it was "
                    "built on, sample by sample."]),
                tf.debugging.Assert(index < n, [
                    f"The dataset holds more than {n} samples, but the "
                    f"teacher cache holds {n}: a cache pairs with the data "
                    "it was built on, sample by sample."]),
            ]
            if checked:
                checks.append(tf.debugging.Assert(
                    end | (index >= n)
                    | tf_digest_matches(digest, tf_row_digest(x)), [
                        "Sample", index, "of the dataset differs from the "
                        "sample of that row of the data the teacher cache "
                        "was built on. Pair the cache with the same samples "
                        "in the same order (shuffle after `cache.inputs`, "
                        "not before); pass `check_samples=False` if the "
                        "student deliberately sees other inputs."]))
            with tf.control_dependencies(checks):
                values = tf.nest.map_structure(tf.identity, values)
            x = {INPUTS_KEY: x, CACHE_KEY: {tag: values}}
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)

        return paired.map(attach)

    def dataset(self, x: Any, y: Any = None, sample_weight: Any = None,
                batch_size: int = 32, shuffle: bool = True,
                seed: int | None = None, check_samples: bool = True,
                **kwargs: Any) -> CachedDataset:
        """A `keras.utils.PyDataset` of cached batches, read from the arrays
        (memory-mapped for an on-disk cache) batch by batch: for data and
        caches larger than memory, on every backend.

        Args:
            x: the samples the cache was built on, in the same order: NumPy
                arrays or memory maps (or a dict or list of them).
            y: optional labels, one row per sample.
            sample_weight: optional sample weights, one per sample.
            batch_size: samples per batch.
            shuffle: draw a new order of the samples every epoch.
            seed: seed of the shuffling.
            check_samples: as in `inputs`.
            **kwargs: `workers`, `use_multiprocessing`, `max_queue_size` of
                `keras.utils.PyDataset`.

        Returns:
            A `CachedDataset`.
        """
        return CachedDataset(self, x, y, sample_weight, batch_size, shuffle,
                             seed, check_samples=check_samples, **kwargs)


class CachedDataset(keras.utils.PyDataset):
    """Batches of samples and their cached teacher outputs (see
    `TeacherCache.dataset`). Each batch reads its rows in increasing order,
    for the memory maps' sake; with `shuffle`, the batches hold a new
    random partition of the samples every epoch."""

    def __init__(self, cache, x, y=None, sample_weight=None, batch_size=32,
                 shuffle=True, seed=None, check_samples=True, **kwargs):
        super().__init__(**kwargs)
        if is_cached(x):
            raise ValueError("`x` already carries a teacher cache.")
        self.cache = cache
        self.x, self.y, self.sample_weight = x, y, sample_weight
        for name, value in (("`x`", x), ("`y`", y),
                            ("`sample_weight`", sample_weight)):
            for leaf in keras.tree.flatten(value) if value is not None else []:
                cache._check_length(int(leaf.shape[0]), name)
        self.check_samples = check_samples
        if check_samples:
            cache._check_samples(lambda row: (
                keras.tree.map_structure(lambda a: a[row:row + 1], x), 0))
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._order = None
        if shuffle:
            self._order = self._rng.permutation(cache.num_samples)

    def __len__(self):
        return math.ceil(self.cache.num_samples / self.batch_size)

    def _rows(self, index):
        start = index * self.batch_size
        stop = min(start + self.batch_size, self.cache.num_samples)
        if self._order is None:
            return slice(start, stop)
        return np.sort(self._order[start:stop])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self._rows(index)

        def take(value):
            return None if value is None else keras.tree.map_structure(
                lambda a: np.asarray(a[rows]), value)

        inputs = take(self.x)
        if self.check_samples:
            self.cache.check_rows(inputs, rows)
        x = self.cache._wrap(inputs, {
            key: np.asarray(a[rows]) for key, a in self.cache.arrays.items()})
        batch = (x, take(self.y), take(self.sample_weight))
        if batch[2] is None:
            batch = batch[:2] if batch[1] is not None else batch[:1]
        return batch

    def on_epoch_end(self):
        if self.shuffle:
            self._order = self._rng.permutation(self.cache.num_samples)

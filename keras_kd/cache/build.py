"""Building a cache: the teachers run once over the data (inference mode)
and their outputs are stored, in memory or on disk."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import keras
import numpy as np

from keras_kd.cache._data import as_numpy, is_tf_dataset, unpack_x
from keras_kd.cache.digest import METHOD as DIGEST_METHOD
from keras_kd.cache.digest import row_digests, sample_digest
from keras_kd.cache.files import (DIGESTS_FILE, FORMAT, MANIFEST, VERSION,
                                  Appender, file_name, size_text)
from keras_kd.cache.store import TeacherCache
from keras_kd.cache.tag import teachers_fingerprint
from keras_kd.teachers import Teachers, as_teacher_list
from keras_kd._typing import Tensor

# Lowest top-k log-probability stored (float16 reaches -65504).
_MIN_LOG_PROBABILITY = -1e4
_INDEX_DTYPES = (("int16", 2**15 - 1), ("int32", 2**31 - 1))


class _LayerRequest(NamedTuple):
    """A teacher layer to cache, in the form `Teachers` reads terms."""

    teacher_layer: str
    name: str


class _TeacherRunner(keras.Model):
    """The teachers' inference forward, compiled by `predict_on_batch`:
    each teacher's outputs, their mean (as the distiller averages them) and
    the requested layers."""

    def __init__(self, teachers, layers):
        super().__init__(name="teacher_cache_runner")
        self.teacher_models = list(teachers)
        self._side = Teachers(
            teachers, [_LayerRequest(n, n) for n in layers],
            ensemble="losses")
        self.built = True

    def call(self, x):
        out = self._side(x, training=False)
        each = out.outputs if isinstance(out.outputs, list) else [out.outputs]
        return {"each": each, "mean": out.mean_logits,
                "features": list(out.features)}



def _batches(x, batch_size):
    """`(number of samples or None, number of batches or None, iterator of
    input batches as NumPy)`."""
    if is_tf_dataset(x):
        batches = int(x.cardinality())
        iterator = (unpack_x(e) for e in x.as_numpy_iterator())
        return None, (batches if batches >= 0 else None), iterator
    if isinstance(x, keras.utils.PyDataset):
        iterator = (unpack_x(x[i]) for i in range(len(x)))
        return None, len(x), (keras.tree.map_structure(as_numpy, b)
                              for b in iterator)
    leaves = keras.tree.flatten(x)
    if leaves and all(hasattr(a, "shape") for a in leaves):
        n = int(leaves[0].shape[0])
        for leaf in leaves:
            if int(leaf.shape[0]) != n:
                raise ValueError(
                    "The arrays of `x` hold different numbers of samples: "
                    f"{[int(a.shape[0]) for a in leaves]}."
                )

        def slices():
            for start in range(0, n, batch_size):
                yield keras.tree.map_structure(
                    lambda a: as_numpy(a[start:start + batch_size]), x)

        return n, math.ceil(n / batch_size), slices()
    try:
        iterator = iter(x)
    except TypeError:
        raise TypeError(
            "`x` must be NumPy arrays (or a dict or list of them), a "
            "`tf.data.Dataset` or `keras.utils.PyDataset` of batches, or an "
            f"iterable of batches; got {type(x).__name__}."
        ) from None
    return None, None, (keras.tree.map_structure(as_numpy, unpack_x(b))
                        for b in iterator)



def _top_k(outputs, k, temperature=1.0, with_tail=False):
    """`(log-probabilities float16, indices)` of the k largest logits of each
    row (last axis), largest first, under `softmax(outputs / temperature)`;
    with `with_tail`, also the float32 probability of all other entries
    together (`1 - sum(p_top)`, from float64).

    Rows are processed in blocks, so that a batch of (batch, time, vocab)
    logits needs float64 room for a block only."""
    classes = outputs.shape[-1]
    rows = np.reshape(outputs, (-1, classes))
    block = max(1, (2 ** 25) // classes)
    values, indices, tails = [], [], []
    for start in range(0, rows.shape[0], block):
        logits = rows[start:start + block].astype(np.float64) / temperature
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(
            np.exp(shifted).sum(axis=-1, keepdims=True))
        if k < classes:
            top = np.argpartition(-log_probs, k - 1, axis=-1)[..., :k]
        else:
            top = np.broadcast_to(np.arange(classes), log_probs.shape)
        picked = np.take_along_axis(log_probs, top, axis=-1)
        order = np.argsort(-picked, axis=-1, kind="stable")
        values.append(np.take_along_axis(picked, order, axis=-1))
        indices.append(np.take_along_axis(top, order, axis=-1))
        if with_tail:
            tails.append(np.clip(1.0 - np.exp(values[-1]).sum(axis=-1),
                                 0.0, 1.0))
    shape = outputs.shape[:-1] + (k,)
    index_dtype = next(d for d, most in _INDEX_DTYPES if classes - 1 <= most)
    values = np.concatenate(values).reshape(shape)
    result = (np.maximum(values, _MIN_LOG_PROBABILITY).astype(np.float16),
              np.concatenate(indices).reshape(shape).astype(index_dtype))
    if with_tail:
        result += (np.concatenate(tails).reshape(
            outputs.shape[:-1]).astype(np.float32),)
    return result



def cache_teacher_outputs(
    teacher: keras.Model | Sequence[keras.Model],
    x: Any,
    batch_size: int = 256,
    top_k: int | None = None,
    layers: str | Sequence[str] | None = None,
    ensemble: str = "logits",
    directory: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    verbose: str | int = "auto",
    temperature: float = 1.0,
) -> TeacherCache:
    """Runs the teachers once over a data set (inference mode) and stores
    their outputs.

    Args:
        teacher: a `keras.Model` or a list of them, as given to the
            `Distiller`.
        x: the inputs, in the order the cache will be paired with them:
            NumPy arrays (or a dict or list of them), or a `tf.data.Dataset`,
            `keras.utils.PyDataset` or iterable of batches (elements `x` or
            `(x, y[, sample_weight])`; labels are ignored). A dataset must
            yield the same samples in the same order every time it is read:
            no shuffling.
        batch_size: batch size of the teachers' forward passes over arrays;
            the training batch size gives outputs equal, bit for bit, to
            those of the live teachers in a step (convolutions round
            differently at other batch sizes).
        top_k: `None` stores the outputs at full precision (training from
            them is exactly training with the live teachers). An integer
            `k` stores, per sample (and per teacher with
            `ensemble="losses"`), the k largest log-softmax values in float16
            and their class indices (int16 up to 32,767 classes, else int32);
            the step rebuilds the other classes' probabilities as the rest of
            the mass spread evenly (`reconstruct_logits`). The outputs must
            be logits, shape `(batch, classes)`, with `k < classes`; or, per
            token, `(batch, time, vocab)` with `k <= vocab`: then each
            token's k largest log-probabilities (float16), their indices and
            the tail mass `1 - sum(p_top)` (float32) are stored, and the
            step gives the token divergences (`keras_kd.losses.ForwardKL`
            and its siblings) a `keras_kd.losses.TopKDistribution`, with no
            dense logits rebuilt.
        layers: names of teacher layers whose outputs are cached too, for the
            terms that read them (every teacher that has the layer). Features
            are large: a warning gives their size.
        ensemble: with several teachers, `"logits"` stores their averaged
            outputs (for a distiller with `ensemble="logits"`), `"losses"`
            each teacher's outputs (for either mode).
        directory: `None` keeps the cache in memory; a path writes it there
            (one `.npy` file per array and `manifest.json`), to be opened
            again with `TeacherCache.load(directory)`.
        overwrite: replace a cache already in `directory`.
        verbose: `"auto"` or 1 shows a progress bar, 0 none.
        temperature: for a per-token top-k cache, the temperature `tau` of
            the stored log-probabilities (`log_softmax(z / tau)`); the
            divergences that read the cache must use the same temperature,
            since a sparse distribution cannot be re-softened. Other caches
            take 1.

    Returns:
        A `TeacherCache`.

    Example:

    >>> cache = keras_kd.cache_teacher_outputs(teacher, x_train, top_k=10)
    >>> distiller.fit(cache.inputs(x_train), y_train, epochs=30)
    """
    teachers = as_teacher_list(teacher)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(
                "`top_k` must be `None` or a positive integer, got "
                f"{top_k!r}.")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(
            f"`temperature` must be positive, got {temperature}.")
    if ensemble not in ("logits", "losses"):
        raise ValueError(
            f"`ensemble` must be 'logits' or 'losses', got {ensemble!r}.")
    layers = [layers] if isinstance(layers, str) else list(layers or [])
    for layer in layers:
        if not any(layer in [lay.name for lay in t.layers] for t in teachers):
            raise ValueError(
                f"No teacher has a layer named '{layer}' (teachers "
                f"{[t.name for t in teachers]})."
            )
    mode = "each" if len(teachers) > 1 and ensemble == "losses" else "mean"
    if directory is not None:
        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, MANIFEST)
        if os.path.exists(manifest_path):
            if not overwrite:
                raise FileExistsError(
                    f"'{directory}' already holds a teacher cache; pass "
                    "`overwrite=True` to replace it, or open it with "
                    "`TeacherCache.load`.")
            os.remove(manifest_path)
        os.makedirs(directory, exist_ok=True)

    fingerprint, each_fingerprint = teachers_fingerprint(teachers)
    runner = _TeacherRunner(teachers, layers)
    term_teachers = runner._side.term_teachers
    num_samples, num_batches, batches = _batches(x, batch_size)
    verbose = 1 if verbose == "auto" else int(verbose)
    progbar = keras.utils.Progbar(num_batches, verbose=verbose,
                                  unit_name="batch")
    probe_rows = (sorted({0, num_samples // 2, num_samples - 1})
                  if num_samples else [0])
    probes, last = {}, None
    appenders: dict[str, Any] = {}
    files: dict[str, Any] = {}
    digests = None
    max_index = -1
    rows = 0
    try:
        for batch_index, x_batch in enumerate(batches):
            out = runner.predict_on_batch(x_batch)
            if not appenders:
                _check_outputs(out, top_k, temperature)
            arrays = _batch_arrays(out, mode, top_k, temperature,
                                   term_teachers, layers)
            if not appenders:
                _warn_feature_size(arrays, layers, num_samples)
                for key, value in arrays.items():
                    path = None
                    if directory is not None:
                        files[key] = file_name(key, len(files))
                        path = os.path.join(directory, files[key])
                    appenders[key] = Appender(path, value.dtype,
                                               value.shape[1:])
            for key, value in arrays.items():
                appenders[key].append(value)
            if "indices" in arrays:
                max_index = max(max_index, int(np.max(arrays["indices"])))
            batch_digests = row_digests(x_batch)
            if digests is None:
                digests = Appender(
                    None if directory is None
                    else os.path.join(directory, DIGESTS_FILE),
                    batch_digests.dtype, batch_digests.shape[1:])
            digests.append(batch_digests)
            n = next(iter(arrays.values())).shape[0]
            if batch_digests.shape[0] != n:
                raise ValueError(
                    f"A batch of `x` holds {batch_digests.shape[0]} samples, "
                    f"but the teachers returned {n} outputs.")
            for row in probe_rows:
                if rows <= row < rows + n:
                    probes[str(row)] = sample_digest(x_batch, row - rows)
            last = (rows + n - 1, sample_digest(x_batch, n - 1))
            rows += n
            progbar.update(batch_index + 1)
    except BaseException:
        for appender in list(appenders.values()) + [digests]:
            if appender is not None:
                appender.abort()
        raise
    if not rows:
        raise ValueError("`x` holds no sample: nothing to cache.")
    assert last is not None and digests is not None  # rows > 0
    probes[str(last[0])] = last[1]
    stored = {key: a.close() for key, a in appenders.items()}
    stored_digests = digests.close()
    outputs = out["mean"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "teachers": [{"name": t.name, "fingerprint": f}
                     for t, f in zip(teachers, each_fingerprint)],
        "fingerprint": fingerprint,
        "ensemble": mode,
        "num_samples": rows,
        "num_classes": int(outputs.shape[-1]),
        "output_shape": list(outputs.shape[1:]),
        "top_k": top_k,
        "temperature": (float(temperature)
                        if "tail_mass" in stored else None),
        "arrays": {key: {"file": files.get(key),
                         "dtype": str(value.dtype),
                         "shape": list(value.shape)}
                   for key, value in stored.items()},
        "probes": probes,
        "row_digests": {"file": (DIGESTS_FILE if directory is not None
                                 else None),
                        "dtype": str(stored_digests.dtype),
                        "shape": list(stored_digests.shape),
                        "method": DIGEST_METHOD},
    }
    if max_index >= 0:
        manifest["max_index"] = max_index
    if directory is not None:
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return TeacherCache(manifest, stored, directory,
                        row_digests=stored_digests)



def _batch_arrays(out, mode, top_k, temperature, term_teachers, layers):
    """The arrays one batch adds to the cache, by key."""
    arrays = {}
    if mode == "mean":
        outputs = np.asarray(out["mean"])
    else:
        outputs = np.stack([np.asarray(o) for o in out["each"]], axis=1)
    if top_k is None:
        arrays["outputs"] = outputs
    elif np.ndim(out["mean"]) == 3:
        (arrays["log_probs"], arrays["indices"],
         arrays["tail_mass"]) = _top_k(outputs, top_k, temperature,
                                       with_tail=True)
    else:
        arrays["log_probs"], arrays["indices"] = _top_k(outputs, top_k)
    for layer, users, values in zip(layers, term_teachers, out["features"]):
        values = values if len(users) > 1 else [values]
        for teacher, value in zip(users, values):
            arrays[f"features/teacher_{teacher}/{layer}"] = np.asarray(value)
    return arrays


def _check_outputs(out, top_k, temperature):
    """Checks the first batch's outputs against `top_k` and
    `temperature`."""
    outputs = out["mean"]
    if isinstance(outputs, (list, tuple, dict)):
        raise ValueError(
            "A teacher cache stores one output tensor per teacher; these "
            "teachers return a structure of outputs.")
    if top_k is not None:
        rank = np.ndim(outputs)
        if rank not in (2, 3):
            raise ValueError(
                "`top_k` needs logits of shape (batch, classes) or, per "
                "token, (batch, time, vocab); the teachers output shape "
                f"{tuple(np.shape(outputs))}. Cache them at full precision "
                "(`top_k=None`).")
        if rank == 2 and top_k >= outputs.shape[-1]:
            raise ValueError(
                f"`top_k` must be smaller than the number of classes "
                f"({outputs.shape[-1]}), got {top_k}; use `top_k=None` to "
                "store every output.")
        if rank == 3 and top_k > outputs.shape[-1]:
            raise ValueError(
                f"`top_k` must be at most the vocabulary size "
                f"({outputs.shape[-1]}), got {top_k}.")
        if rank == 2 and temperature != 1.0:
            raise ValueError(
                "`temperature` applies to per-token top-k caches (outputs "
                "of shape (batch, time, vocab)); a (batch, classes) top-k "
                "cache stores log-probabilities at temperature 1, and the "
                "losses soften the rebuilt logits themselves. Leave "
                f"`temperature` at 1, got {temperature}.")
    elif temperature != 1.0:
        raise ValueError(
            "`temperature` applies to per-token top-k caches only; a cache "
            f"without `top_k` stores the outputs as they are, got "
            f"temperature={temperature}.")


def _warn_feature_size(arrays, layers, num_samples):
    if layers:
        n = next(iter(arrays.values())).shape[0]
        per_sample = {
            key: value.nbytes // n for key, value in arrays.items()}
        feature = sum(v for k, v in per_sample.items()
                      if k.startswith("features/"))
        output = sum(v for k, v in per_sample.items()
                     if not k.startswith("features/"))
        total = (f", {size_text(feature * num_samples)} for the "
                 f"{num_samples} samples" if num_samples else "")
        warnings.warn(
            f"Caching the teacher layers {layers} stores {size_text(feature)} per "
            f"sample{total}: {feature / max(output, 1):.0f}x the cached "
            "outputs. Features are stored at full precision; write a large "
            "cache to disk (`directory=`).",
            stacklevel=3,
        )


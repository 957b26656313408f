"""Offline distillation: the teachers' outputs computed once over a data
set, stored, and read back by the `Distiller`'s step instead of running the
teachers.

`cache_teacher_outputs` runs the teachers once over the data, in inference
mode, and returns a `TeacherCache`. Its `inputs(x)` (or `dataset(x, y)`) is
what `Distiller.fit` takes in place of `x`: the dict

    {"inputs": x, "keras_kd_teacher_cache": {tag: {name: array}}}

whose leaves all hold one row per sample, so that every Keras data path
(NumPy arrays, `tf.data`, `keras.utils.PyDataset`) shuffles and batches the
cached outputs together with their samples. A step whose batch carries them
builds the teachers' `TeacherOutputs` from the batch and runs no teacher;
the student sees `x` alone.

The tag names the teachers' weights fingerprint, the number of classes,
`top_k` and how several teachers were stored, so that a batch says by its
structure which teachers it belongs to. `Distiller.fit` (and `evaluate`,
`train_on_batch`, `test_on_batch`) compares it with its own teachers before
the first step; a step refuses a cached batch whose tag was not checked.

Storage: in memory (NumPy arrays), or on disk, one `.npy` file per array
written by appending batches (NumPy's format leaves room in the header for
the first dimension to grow) and read back with `np.load(mmap_mode="r")`,
plus `manifest.json`. See `docs/teacher_cache.md`.

The modules, one concept each:

- `tag`: `CacheTag` and the teachers' weights fingerprints;
- `reader`: what the training step needs (`CacheReader`, `is_cached`,
  `model_inputs`, `reconstruct_logits`);
- `check`: the checks of a cache against a distiller;
- `build`: `cache_teacher_outputs`;
- `store`: `TeacherCache` and `CachedDataset`;
- `files`, `digest`: the files on disk, the sample digests.
"""

from keras_kd.cache.build import cache_teacher_outputs
from keras_kd.cache.check import (CacheRequirements, TermRequirement,
                                  check_call, check_data, requirements,
                                  verify)
from keras_kd.cache.files import FORMAT, MANIFEST, VERSION
from keras_kd.cache.reader import (CACHE_KEY, INPUTS_KEY, CacheReader,
                                   is_cached, model_inputs, reconstruct_logits)
from keras_kd.cache.store import CachedDataset, TeacherCache
from keras_kd.cache.tag import (CacheTag, teachers_fingerprint,
                                weights_fingerprint)

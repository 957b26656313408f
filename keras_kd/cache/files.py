"""A cache's files: the manifest, arrays appended batch by batch to `.npy`
files and opened again memory-mapped, and sizes for messages."""

import json
import os

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "keras_kd.teacher_cache"
VERSION = 1
# The per-row digests of the inputs (`keras_kd.cache.digest`), apart from
# the arrays a batch carries.
DIGESTS_FILE = "row_digests.npy"


class Appender:
    """An array grown one batch at a time along its first axis: chunks in
    memory, or a `.npy` file whose header is rewritten with the final length
    at the end (NumPy writes headers with room for the first dimension to
    grow). The file is written under a temporary name and renamed when
    complete, so that a memory map of an older file of that name (a cache
    being overwritten) keeps its data."""

    def __init__(self, path, dtype, row_shape):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self.chunks = []
        self.file = None
        if path is not None:
            self.file = open(path + ".partial", "wb")
            self._write_header()
            self.header_size = self.file.tell()

    def _write_header(self):
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.rows,) + self.row_shape,
        })

    def append(self, values):
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.rows += values.shape[0]
        if self.file is None:
            self.chunks.append(values)
        else:
            self.file.write(values.tobytes())

    def close(self):
        if self.file is None:
            if not self.chunks:
                return np.zeros((0,) + self.row_shape, self.dtype)
            return np.concatenate(self.chunks)
        self.file.seek(0)
        self._write_header()
        if self.file.tell() != self.header_size:  # pragma: no cover
            raise RuntimeError(f"The header of {self.path} changed size.")
        self.file.close()
        os.replace(self.path + ".partial", self.path)
        return np.load(self.path, mmap_mode="r")

    def abort(self):
        if self.file is not None:
            self.file.close()
            os.remove(self.path + ".partial")



def file_name(key, index):
    if key.startswith("features/"):
        return f"feature_{index}.npy"
    return f"{key}.npy"


def size_text(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes} B"
        nbytes /= 1024.0
    return f"{nbytes} B"  # pragma: no cover



def damaged(directory, name, what):
    """The error for a damaged file of the cache in `directory`."""
    return ValueError(
        f"The teacher cache in '{directory}' is damaged: its file '{name}' "
        f"{what}. Rebuild it with `keras_kd.cache_teacher_outputs(..., "
        f"directory='{directory}', overwrite=True)`.")


def read_manifest(directory):
    """The manifest of the cache in `directory`, checked to be one.

    Raises:
        FileNotFoundError: no manifest (a build was interrupted).
        ValueError: the manifest is not valid JSON, or not a keras_kd
            teacher cache's of this version.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"'{directory}' holds no complete teacher cache (no "
            f"{MANIFEST}; the manifest is written last, so a cache whose "
            "building was interrupted has none). Build it again.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise damaged(directory, MANIFEST,
                      f"is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or \
            manifest.get("format") != FORMAT or \
            manifest.get("version") != VERSION:
        found = manifest if isinstance(manifest, dict) else {}
        raise ValueError(
            f"'{path}' is not a version-{VERSION} keras_kd teacher cache "
            f"(format {found.get('format')!r}, version "
            f"{found.get('version')!r}).")
    if not isinstance(manifest.get("arrays"), dict) or not all(
            isinstance(spec, dict) and {"file", "shape", "dtype"} <= set(spec)
            for spec in manifest["arrays"].values()):
        raise damaged(directory, MANIFEST, "does not list the arrays' "
                      "files, shapes and dtypes")
    return manifest


def open_array(directory, spec):
    """The array described by a manifest entry `spec` (`file`, `shape`,
    `dtype`), memory-mapped read only.

    Raises:
        ValueError: the file is missing, truncated, not a `.npy` file, or
            holds another shape or dtype than the manifest records.
    """
    name = spec["file"]
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise damaged(directory, name, "is missing")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise damaged(directory, name,
                      f"cannot be read as an array ({error}); it may be "
                      "truncated") from None
    if list(array.shape) != list(spec["shape"]) or \
            str(array.dtype) != spec["dtype"]:
        raise damaged(directory, name,
                      f"holds {array.dtype}{list(array.shape)}, but the "
                      f"manifest records {spec['dtype']}{spec['shape']}")
    return array

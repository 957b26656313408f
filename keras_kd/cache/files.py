"""A cache's files: the manifest's constants, arrays appended batch by
batch to `.npy` files, and sizes for messages."""

import os

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "keras_kd.teacher_cache"
VERSION = 1


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


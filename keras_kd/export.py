"""Exporting a trained student as a TensorFlow SavedModel from any backend.

A SavedModel is a TensorFlow format, so TensorFlow must be installed
whichever backend trained the student. On TensorFlow and JAX,
`keras.Model.export` writes it (JAX through `jax2tf`). On PyTorch, Keras'
exporter needs `torch_xla`; without it, the student is saved as a `.keras`
file and a Python process on the TensorFlow backend loads and exports it.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import keras

_EXPORT_SCRIPT = """
import sys
import keras
model = keras.saving.load_model(sys.argv[1], compile=False)
model.export(sys.argv[2], format="tf_saved_model",
             verbose=sys.argv[3] == "1")
"""


def _has(module):
    return importlib.util.find_spec(module) is not None


def export_saved_model(model, filepath, verbose=True, **kwargs):
    """Writes `model` as a TensorFlow SavedModel with a `serve` endpoint.

    Args:
        model: a built `keras.Model`.
        filepath: directory to write.
        verbose: print a summary of the exported endpoints.
        **kwargs: passed on to `keras.Model.export` (TensorFlow and JAX, and
            PyTorch with `torch_xla`).

    Returns:
        `filepath`.

    Raises:
        ImportError: TensorFlow is not installed.
    """
    backend = keras.backend.backend()
    if not _has("tensorflow"):
        raise ImportError(
            f"Exporting the student '{model.name}' as a SavedModel needs "
            f"TensorFlow, which is not installed (Keras runs on '{backend}')."
            " Install it with `pip install tensorflow` (or "
            "`pip install keras-kd[tensorflow]`); training can stay on "
            f"{backend}."
        )
    if backend != "torch" or _has("torch_xla"):
        model.export(filepath, format="tf_saved_model", verbose=verbose,
                     **kwargs)
        return filepath
    if kwargs:
        raise ValueError(
            "Export options other than `verbose` need `torch_xla` on the "
            f"PyTorch backend; got {sorted(kwargs)}."
        )
    with tempfile.TemporaryDirectory() as scratch:
        saved = os.path.join(scratch, "student.keras")
        model.save(saved)
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        proc = subprocess.run(
            [sys.executable, "-c", _EXPORT_SCRIPT, saved,
             os.fspath(filepath), "1" if verbose else "0"],
            env=env, capture_output=True, text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(
            f"Exporting the student '{model.name}' through a TensorFlow "
            "process failed (PyTorch backend without torch_xla). Its "
            f"error:\n{proc.stderr[-2000:]}"
        )
    if verbose and proc.stdout:
        print(proc.stdout, end="")
    return filepath

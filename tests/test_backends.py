"""The backends against each other, each in a process of its own.

These tests start TensorFlow, JAX and PyTorch processes themselves, so they
run once, in the TensorFlow pass of the suite.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.backends("tensorflow")

SCRIPT = os.path.join(os.path.dirname(__file__), "backend_check.py")
BACKENDS = ("tensorflow", "jax", "torch")


def installed(backend):
    return importlib.util.find_spec(backend) is not None


def run(backend, *args):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True,
        env=dict(os.environ, KERAS_BACKEND=backend), timeout=900)
    assert proc.returncode == 0, f"{backend}:\n{proc.stderr[-3000:]}"
    assert f"DONE {backend}" in proc.stdout


def test_one_sgd_step_agrees_across_backends(tmp_path):
    backends = [b for b in BACKENDS if installed(b)]
    if len(backends) < 2:
        pytest.skip("needs at least two Keras backends installed")
    weights = {}
    for backend in backends:
        out = tmp_path / f"{backend}.npz"
        run(backend, "step", str(out))
        with np.load(out) as data:
            weights[backend] = [data[k] for k in sorted(
                data.files, key=lambda k: int(k.split("_")[1]))]
    reference = weights["tensorflow"]
    initial_gap = 0.0
    for backend in backends[1:]:
        assert len(weights[backend]) == len(reference)
        for a, b in zip(reference, weights[backend]):
            np.testing.assert_allclose(b, a, atol=1e-5, err_msg=backend)
            initial_gap = max(initial_gap, float(np.abs(a).max()))
    assert initial_gap > 0.1  # the weights are not trivially small


def test_saved_on_tensorflow_loads_and_trains_on_jax(tmp_path):
    if not installed("jax"):
        pytest.skip("jax is not installed")
    run("tensorflow", "save", str(tmp_path))
    run("jax", "resume", str(tmp_path))
    with np.load(tmp_path / "saved.npz") as saved, \
            np.load(tmp_path / "resumed.npz") as resumed:
        weights = sorted((k for k in saved.files if k.startswith("w")),
                         key=lambda k: int(k[1:]))
        assert weights and len(weights) == len(
            [k for k in resumed.files if k.startswith("w")])
        for key in weights:
            np.testing.assert_array_equal(resumed[key], saved[key],
                                          err_msg=key)
        assert list(resumed["keys"]) == list(saved["keys"])
        np.testing.assert_allclose(resumed["logs"], saved["logs"],
                                   rtol=1e-4, atol=1e-6)
        assert int(resumed["iterations"]) == int(saved["iterations"]) > 0
        assert np.all(np.isfinite(resumed["loss"]))
        assert bool(resumed["student_changed"])
        assert bool(resumed["teacher_unchanged"])

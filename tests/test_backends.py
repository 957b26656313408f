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


# A `.keras` file is backend-free: saved on one backend, it loads and trains
# on another (the optimizer under its public class, not PyTorch's or JAX's
# own; `jit_compile` resolved for the backend that loads it).
SAVE_LOAD = [("tensorflow", "jax", ""), ("torch", "tensorflow", ""),
             ("torch", "jax", ""), ("jax", "torch", "layerwise")]


@pytest.mark.parametrize("saved_on,loaded_on,options", SAVE_LOAD)
def test_saved_on_one_backend_loads_and_trains_on_another(
        tmp_path, saved_on, loaded_on, options):
    for backend in (saved_on, loaded_on):
        if not installed(backend):
            pytest.skip(f"{backend} is not installed")
    run(saved_on, "save", str(tmp_path), *filter(None, [options]))
    run(loaded_on, "resume", str(tmp_path))
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
        if loaded_on == "torch":
            # Saved with the default `jit_compile="auto"`: no
            # `torch.compile` on PyTorch, whatever the saving backend
            # resolved it to.
            assert not bool(resumed["jit_compile"])
        assert bool(resumed["teacher_unchanged"])

"""Runs the test suite once per Keras backend: TensorFlow, JAX, PyTorch.

Usage: `python tests/all_backends.py [pytest arguments]`. Each backend runs
in its own process (Keras picks its backend at import). Backends that are
not installed are reported and skipped, unless `KERAS_KD_REQUIRE_BACKENDS=1`
(set by CI), which makes a missing backend an error. Exits with the first
non-zero pytest status, or 0.
"""

import importlib.util
import os
import subprocess
import sys
import time

BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def main(argv):
    tests = os.path.dirname(os.path.abspath(__file__))
    require = os.environ.get("KERAS_KD_REQUIRE_BACKENDS") == "1"
    status, times = 0, {}
    for backend, module in BACKENDS.items():
        if importlib.util.find_spec(module) is None:
            print(f"== {backend}: not installed", flush=True)
            if require:
                status = status or 1
            continue
        print(f"== KERAS_BACKEND={backend}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(
            [sys.executable, "-m", "pytest", tests, *argv],
            env=dict(os.environ, KERAS_BACKEND=backend),
        )
        times[backend] = time.perf_counter() - start
        status = status or rc
    for backend, seconds in times.items():
        print(f"== {backend}: {seconds / 60:.1f} min", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Execute every example notebook top to bottom at a small size."""

import glob
import importlib.util
import os

import pytest

from backend_utils import BACKEND

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
NOTEBOOKS = sorted(glob.glob(os.path.join(EXAMPLES, "*.ipynb")))
# Notebooks that need an optional extra: the module they import.
NEEDS = {"language_models.ipynb": "keras_hub"}


def test_examples_exist():
    assert any(p.endswith("quickstart.ipynb") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    needed = NEEDS.get(os.path.basename(path))
    if needed and importlib.util.find_spec(needed) is None:
        pytest.skip(f"the notebook needs {needed}, which is not installed")
    # The kernel inherits the environment, so it runs on this backend.
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    monkeypatch.setenv("KERAS_KD_SMALL", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

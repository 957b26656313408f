"""The example notebooks: their small run shows what each is about, their
Colab path runs, and they install the released keras-kd and nothing else.

`test_notebook_shows_its_point` executes every notebook top to bottom at
the small size (`KERAS_KD_SMALL=1`, scikit-learn's digits) and checks the
numbers its summary cell prints: a teacher far above chance (0.1 on ten
classes) and the comparison the notebook is about. The same checks run on
the outputs saved in the committed notebooks, without executing them.
"""

import glob
import importlib.util
import json
import math
import os
import re
import sys

import pytest

from backend_utils import BACKEND

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.join(os.path.dirname(__file__), "..")
EXAMPLES = os.path.join(ROOT, "examples")
NOTEBOOKS = sorted(glob.glob(os.path.join(EXAMPLES, "*.ipynb")))
# Notebooks that need an optional extra: the module they import.
NEEDS = {"language_models.ipynb": "keras_hub"}


def _version():
    namespace = {}
    with open(os.path.join(ROOT, "keras_kd", "_version.py")) as file:
        exec(file.read(), namespace)
    return namespace["__version__"]


def _extras():
    if sys.version_info < (3, 11):
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11)")
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        project = tomllib.load(file)["project"]
    return set(project["optional-dependencies"])


# What each notebook's small run must show, from its summary cell (a JSON
# object). Accuracies are on the 540 held-out digits; chance is 0.1.
def _quickstart(r):
    assert r["teacher"] > 0.9
    assert r["student_alone"] > 0.3
    # The point: the distilled student beats the student alone, which has
    # 30 labels, by a clear margin. Seed 0, then seed 1: 0.976 against
    # 0.813, 0.963 against 0.793 on TensorFlow; 0.974 against 0.750, 0.974
    # against 0.746 on JAX; 0.954 against 0.770, 0.970 against 0.739 on
    # PyTorch.
    assert r["student_distilled"] > r["student_alone"] + 0.1
    assert r["student_distilled"] > 0.9


def _local_modules(r):
    assert r["teacher"] > 0.9
    assert r["student_lakd"] > 0.8


def _teacher_cache(r):
    assert r["teacher"] > 0.9
    for key in ("student_live", "student_cache", "student_top3_cache"):
        assert r[key] > 0.8, key
    # The cache stands in for the live teacher, and the top-3 cache for
    # the full one, at a fraction of its size.
    assert abs(r["student_cache"] - r["student_live"]) < 0.05
    assert r["student_top3_cache"] > r["student_cache"] - 0.05
    assert r["top3_cache_bytes"] < 0.5 * r["cache_bytes"]


def _ensembles(r):
    # The strong preset is a large shift on 8x8 digits (see its affinity).
    # Seed 0: weak-view teacher 0.956 on TensorFlow, 0.846 on JAX.
    assert r["t_weak"] > 0.8 and r["t_strong"] > 0.6
    # TensorFlow, seed 0: student 0.79, agreement 0.81, ECE 0.15.
    assert r["student"] > 0.6
    assert r["val_top1_agreement"] > 0.6
    assert r["val_teacher_kl"] >= 0.0
    assert 0.0 <= r["val_ece"] < 0.3
    for key in ("val_teacher_iou", "val_teacher_student_iou"):
        assert 0.0 < r[key] <= 1.0, key


def _correlation(r):
    assert r["teacher"] > 0.9
    # The three recipes train (TensorFlow, seed 0, six epochs: 0.81 to
    # 0.90; the notebook runs eight); which is best is not shown here.
    for key in ("KD", "DIST", "CMKD"):
        assert r[key] > 0.7, key


def _layerwise(r):
    assert r["teacher"] > 0.9
    assert r["student"] > 0.7  # TensorFlow, seed 0: 0.85 after six epochs
    for key in ("lr_scale/s_stage1", "lr_scale/s_stage2"):
        assert 0.5 <= r[key] <= 2.0, key


def _language_models(r):
    assert r["teacher"] < r["student_alone"]
    # The size tests/test_keras_hub.py checks: distillation lowers the
    # student's held-out perplexity by more than 10%.
    assert r["student_distilled"] < 0.9 * r["student_alone"]


CHECKS = {
    "quickstart.ipynb": _quickstart,
    "local_modules.ipynb": _local_modules,
    "teacher_cache.ipynb": _teacher_cache,
    "ensembles_and_diagnostics.ipynb": _ensembles,
    "correlation_matching.ipynb": _correlation,
    "layerwise_learning_rates.ipynb": _layerwise,
    "language_models.ipynb": _language_models,
}
# Notebooks whose Colab path is CIFAR-10 from keras.datasets (the language
# model notebook's downloads two Keras Hub presets instead).
CIFAR = sorted(name for name in CHECKS if name != "language_models.ipynb")


def _read(path):
    return nbformat.read(path, as_version=4)


def _code(cell):
    return cell.cell_type == "code"


def _summary(notebook):
    """The JSON object printed by the cell tagged `summary`."""
    cells = [c for c in notebook.cells
             if "summary" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "one cell must be tagged 'summary'"
    text = "".join(o.get("text", "") for o in cells[0].get("outputs", [])
                   if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")
    lines = text.strip().splitlines()
    assert lines, "the summary cell printed nothing"
    return json.loads(lines[-1])


def _execute(notebook, tmp_path, monkeypatch, small):
    # The kernel inherits the environment, so it runs on this backend.
    monkeypatch.setenv("KERAS_BACKEND", BACKEND)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    if small:
        monkeypatch.setenv("KERAS_KD_SMALL", "1")
    else:
        monkeypatch.delenv("KERAS_KD_SMALL", raising=False)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return notebook


def _skip_without_needs(name):
    needed = NEEDS.get(name)
    if needed and importlib.util.find_spec(needed) is None:
        pytest.skip(f"the notebook needs {needed}, which is not installed")


def test_every_notebook_is_checked():
    names = sorted(os.path.basename(p) for p in NOTEBOOKS)
    assert "quickstart.ipynb" in names
    assert names == sorted(CHECKS)


# The backends on which CI executes each notebook's small run. PyTorch's
# eager steps take these runs 4-5 times as long as TensorFlow and JAX, so
# there only the quickstart runs (the PyTorch suite covers the API every
# notebook uses); the language-model notebook runs the size that
# tests/test_keras_hub.py already trains on every backend, so it runs on
# JAX only. `KERAS_KD_ALL_NOTEBOOKS=1` runs every notebook on every backend.
EXECUTED_ON = {"quickstart.ipynb": ("tensorflow", "jax", "torch"),
               "language_models.ipynb": ("jax",)}
DEFAULT_BACKENDS = ("tensorflow", "jax")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_shows_its_point(path, tmp_path, monkeypatch):
    name = os.path.basename(path)
    _skip_without_needs(name)
    backends = EXECUTED_ON.get(name, DEFAULT_BACKENDS)
    if (BACKEND not in backends
            and os.environ.get("KERAS_KD_ALL_NOTEBOOKS") != "1"):
        pytest.skip(f"{name}'s small run is executed on {backends} "
                    "(KERAS_KD_ALL_NOTEBOOKS=1 runs it here too)")
    notebook = _execute(_read(path), tmp_path, monkeypatch, small=True)
    CHECKS[name](_summary(notebook))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_saved_outputs_are_a_small_run_that_shows_the_point(path):
    """The committed notebook holds the outputs of a full small run: every
    code cell ran, in order, without an error, and its summary passes the
    same checks as a fresh run."""
    notebook = _read(path)
    counts = [c.get("execution_count") for c in notebook.cells if _code(c)]
    assert counts == list(range(1, len(counts) + 1))
    for cell in filter(_code, notebook.cells):
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", cell.source
    CHECKS[os.path.basename(path)](_summary(notebook))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_header_in_keras_io_style(path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown"
    lines = first.source.splitlines()
    assert lines[0].startswith("# ")
    fields = {}
    for line in lines[1:]:
        match = re.match(r"\*\*(.+?):\*\* (.+?)(<br>)?$", line)
        if match:
            fields[match.group(1)] = match.group(2)
    assert fields.get("Authors") == "keras-kd contributors"
    for key in ("Date created", "Last modified"):
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", fields.get(key, "")), key
    assert fields["Date created"] <= fields["Last modified"]
    assert fields.get("Description", "").strip()
    assert lines[-1].startswith("**Description:**")


PIP = re.compile(r"(%pip|!pip|pip install|-m pip|subprocess)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_installs_this_release_only(path):
    """One cell installs packages: `%pip install "keras-kd[...]==<version>"`
    (this project, this version, its own extras), only when keras_kd is not
    importable (so never in these tests), and a comment says how to install
    the wheel built from the repository instead."""
    version = _version()
    notebook = _read(path)
    installing = [c for c in filter(_code, notebook.cells)
                  if PIP.search(c.source)]
    assert len(installing) == 1
    lines = installing[0].source.splitlines()
    code = [line for line in lines if not line.lstrip().startswith("#")]
    commands = [line.strip() for line in code if PIP.search(line)]
    assert len(commands) == 1, commands
    match = re.fullmatch(
        r'%pip install -q "keras-kd(?:\[([a-z,]+)\])?==([^"]+)"',
        commands[0])
    assert match, commands[0]
    extras, pinned = match.groups()
    assert pinned == version
    assert set((extras or "").split(",")) - {""} <= _extras()
    # Guarded: indented under the check that keras_kd is missing.
    assert 'if importlib.util.find_spec("keras_kd") is None:' in code
    assert code[-1].startswith("    %pip")
    wheel = f"dist/keras_kd-{version}-py3-none-any.whl"
    comments = "\n".join(line for line in lines if line.startswith("#"))
    assert wheel in comments and "python -m build" in comments
    intro = "\n".join(c.source for c in notebook.cells[:3]
                      if c.cell_type == "markdown")
    assert f"keras-kd {version}, the released package" in intro


# Run in the kernel before the notebook's own cells: CIFAR-10 becomes
# random uint8 images of the real per-image shape, fewer of them.
FAKE_CIFAR = """\
import keras
import numpy as np


def _fake_cifar10_load_data(num_train=128, num_test=64):
    rng = np.random.default_rng(0)

    def part(count):
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)[:, None]
        return images, labels

    return part(num_train), part(num_test)


keras.datasets.cifar10.load_data = _fake_cifar10_load_data
"""
# Run after the data cell: every epoch count the notebook set becomes 1.
ONE_EPOCH = """\
assert x_train.shape[1:] == (32, 32, 3), x_train.shape
for _name in [n for n in globals() if n.startswith("epochs")]:
    globals()[_name] = 1
"""


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("name", CIFAR)
def test_colab_path_runs(name, tmp_path, monkeypatch):
    """The path a Colab user runs (no KERAS_KD_SMALL: CIFAR-10 from
    keras.datasets, the notebook's default TensorFlow backend), with the
    download replaced by synthetic arrays of CIFAR-10's shapes and dtype
    and one epoch per fit. Chance-level numbers; only shapes and API calls
    are under test."""
    notebook = _read(os.path.join(EXAMPLES, name))
    data_cells = [i for i, c in enumerate(notebook.cells)
                  if _code(c) and "cifar10.load_data()" in c.source]
    assert len(data_cells) == 1
    notebook.cells.insert(data_cells[0] + 1, nbformat.v4.new_code_cell(
        ONE_EPOCH))
    notebook.cells.insert(0, nbformat.v4.new_code_cell(FAKE_CIFAR))
    notebook = _execute(notebook, tmp_path, monkeypatch, small=False)
    summary = _summary(notebook)
    assert summary and all(math.isfinite(v) for v in summary.values())

"""Type information of the public API (PEP 561).

The package ships a `py.typed` marker, so a type checker reads the
annotations of keras-kd. Every public function, and every public method of
a public class (those the class defines itself), annotates each parameter
and its return: a signature that loses an annotation fails here. `mypy`
(the type-check stage of `.ci/run`, configured in `pyproject.toml`) checks
that the annotations agree with the code.
"""

import importlib
import inspect
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every public object of these modules.
PUBLIC_MODULES = ("keras_kd", "keras_kd.losses", "keras_kd.ops",
                  "keras_kd.metrics")
# The public functions of these modules.
PUBLIC_FUNCTION_MODULES = ("keras_kd.cache", "keras_kd.augment")


def _public(module):
    return {
        name: value for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def _methods(cls):
    """`(name, function)` for the methods and properties `cls` defines."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__call__"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            yield name, value.__func__
        elif isinstance(value, property):
            yield name, value.fget
        elif inspect.isfunction(value):
            yield name, value


def public_signatures():
    """`{qualified name: function}` of the public API's signatures."""
    found = {}
    for module_name in PUBLIC_MODULES + PUBLIC_FUNCTION_MODULES:
        module = importlib.import_module(module_name)
        for name, value in _public(module).items():
            if inspect.isclass(value) and module_name in PUBLIC_MODULES:
                for method_name, function in _methods(value):
                    key = f"{value.__module__}.{value.__qualname__}"
                    found[f"{key}.{method_name}"] = function
            elif inspect.isfunction(value):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def missing_annotations(function):
    """Names of the parameters (and `return`) that have no annotation."""
    annotations = getattr(function, "__annotations__", {})
    parameters = list(inspect.signature(function).parameters.values())
    if parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    missing = [p.name for p in parameters if p.name not in annotations]
    if "return" not in annotations:
        missing.append("return")
    return missing


def test_the_public_api_is_found():
    names = public_signatures()
    for expected in ("keras_kd.distiller.Distiller.__init__",
                     "keras_kd.distiller.Distiller.export_student",
                     "keras_kd.term.Term.__init__",
                     "keras_kd.losses.logits.KD.call",
                     "keras_kd.ops.rank.soft_rank",
                     "keras_kd.metrics.TeacherKL.update_state",
                     "keras_kd.cache.build.cache_teacher_outputs",
                     "keras_kd.augment.strong"):
        assert expected in names
    assert len(names) > 100


def test_every_public_signature_is_annotated():
    problems = [
        f"{name}: {', '.join(missing)}"
        for name, function in sorted(public_signatures().items())
        if (missing := missing_annotations(function))
    ]
    assert not problems, "missing annotations:\n" + "\n".join(problems)


def test_a_signature_without_annotations_is_reported():
    def annotated(x: int, *args: int, flag: bool = False) -> int:
        return x

    def bare(x, y: int = 0):
        return x

    assert missing_annotations(annotated) == []
    assert missing_annotations(bare) == ["x", "return"]


def test_the_package_is_marked_typed():
    assert (ROOT / "keras_kd" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["keras_kd"]
    mypy = config["tool"]["mypy"]
    assert "keras_kd" in mypy["files"]


def test_ci_runs_the_type_check():
    script = (ROOT / ".ci" / "run").read_text()
    assert "\npython -m mypy\n" in script

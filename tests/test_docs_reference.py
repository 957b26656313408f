"""The documentation site's generated pages (tools/docs_pages.py) and its
link rewriting (tools/docs_hooks.py), without MkDocs: every public object
of the four documented modules gets a reference page, and the pages copied
from outside docs/ keep working links. `mkdocs build --strict` in .ci/run
then renders the pages and fails on a reference it cannot resolve or a
broken link."""

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("keras_kd", "keras_kd.losses", "keras_kd.ops", "keras_kd.metrics")


def load_tool(name):
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


docs_pages = load_tool("docs_pages")
docs_hooks = load_tool("docs_hooks")


def public(module):
    """Names in the namespace not starting with `_`, modules excluded."""
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }


def reference_path(module_name, name):
    return f"reference/{module_name.replace('.', '/')}/{name}.md"


def test_every_public_object_has_a_reference_page():
    pages = docs_pages.reference_pages(docs_pages.public_objects())
    summary = pages["reference/SUMMARY.md"]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = public(module)
        assert names, module_name
        index = pages[reference_path(module_name, "index")]
        for name in names:
            page = pages[reference_path(module_name, name)]
            assert page.strip() == f"::: {module_name}.{name}"
            assert f"]({name}.md)" in index, (module_name, name)
            assert reference_path(module_name, name)[
                len("reference/"):] in summary
    # Nothing else: one page per object, one index per module.
    expected = sum(len(public(importlib.import_module(m))) + 1
                   for m in MODULES)
    assert len(pages) == expected + 1  # and SUMMARY.md


def test_a_new_public_object_gets_a_page_without_a_list(monkeypatch):
    import keras_kd.losses

    class NewLoss(keras_kd.losses.KD):
        """A loss added later."""

    monkeypatch.setattr(keras_kd.losses, "NewLoss", NewLoss, raising=False)
    monkeypatch.setattr(keras_kd.losses, "_private", NewLoss, raising=False)
    objects = docs_pages.public_objects()
    assert objects["keras_kd.losses"]["NewLoss"] == "A loss added later."
    assert "_private" not in objects["keras_kd.losses"]
    assert "correlation" not in objects["keras_kd.losses"]  # a submodule
    pages = docs_pages.reference_pages(objects)
    assert reference_path("keras_kd.losses", "NewLoss") in pages


def test_every_public_object_has_its_own_docstring():
    # Its reference page is rendered from it: without one the page is
    # empty (a class does not count its base class's docstring).
    for module_name, names in docs_pages.public_objects().items():
        for name, summary in names.items():
            assert summary, f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize("page, markdown, expected", [
    # docs/ pages keep links within docs/ and reach the copies.
    ("index.md", "[b](../benchmarks/README.md) [k](losses/kd.md#x)",
     "[b](benchmarks/README.md) [k](losses/kd.md#x)"),
    ("losses/cmkd.md",
     "[r](../../benchmarks/RESULTS_losses.md) [n](../../examples/a.ipynb)",
     "[r](../benchmarks/RESULTS_losses.md) [n](../examples/a.ipynb)"),
    # The README (getting_started.md in the site) links docs/ by path.
    ("getting_started.md",
     "[d](docs/losses/dist.md) [b](benchmarks/README.md)",
     "[d](losses/dist.md) [b](benchmarks/README.md)"),
    # The benchmark pages, copied as they are, reach docs/ pages.
    ("benchmarks/README.md",
     "[r](RESULTS_losses.md) [d](../docs/losses/dist.md#eps)",
     "[r](RESULTS_losses.md) [d](../losses/dist.md#eps)"),
    # URLs, anchors, targets outside the site and code stay as written.
    ("index.md", "[u](https://keras.io) [a](#top) [s](../keras_kd/cli.py)",
     "[u](https://keras.io) [a](#top) [s](../keras_kd/cli.py)"),
    ("index.md", "```\n[b](../benchmarks/README.md)\n```",
     "```\n[b](../benchmarks/README.md)\n```"),
])
def test_links_are_rewritten_for_the_site(page, markdown, expected):
    mirrored = {
        "README.md": "getting_started.md",
        "benchmarks/README.md": "benchmarks/README.md",
        "benchmarks/RESULTS_losses.md": "benchmarks/RESULTS_losses.md",
        "examples/a.ipynb": "examples/a.ipynb",
    }
    assert docs_hooks.rewrite_links(markdown, page, mirrored) == expected


def test_the_site_copies_the_readme_benchmarks_and_notebooks():
    mirrored = docs_pages.mirrored_files()
    assert mirrored["README.md"] == "getting_started.md"
    for path in ("benchmarks/README.md", "benchmarks/RESULTS_losses.md",
                 "examples/quickstart.ipynb"):
        assert mirrored[path] == path

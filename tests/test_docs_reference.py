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


# Signatures written in docs/api.md, checked against the code so that the
# page cannot go stale: a heading (`## `keras_kd.Term(...)``) must list
# every parameter (all but `**kwargs`) with its default, in order; a
# signature elsewhere on the page (`KD(temperature=4.0)`, a bullet that
# shows the main arguments only) may leave parameters out, but those it
# names must exist, in the code's order, with the code's defaults. A
# default written as `...` is not compared. Calls that are examples rather
# than signatures (an argument that is not a bare name) are skipped.
API_PAGE = ROOT / "docs" / "api.md"


def documented_signatures(text):
    """`(is_heading, name, [(parameter, default or _NO_DEFAULT)])` for every
    code span of `text` that reads as a call signature."""
    import ast
    import re

    # Code blocks hold examples, and their fences would pair up the
    # backticks of inline spans wrongly.
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    found = []
    for match in re.finditer(r"(^## )?`([^`]+)`", text, flags=re.M):
        span = " ".join(match.group(2).split())
        try:
            call = ast.parse(span, mode="eval").body
        except SyntaxError:
            continue
        if not isinstance(call, ast.Call):
            continue
        if not all(isinstance(a, ast.Name) or (
                isinstance(a, ast.Constant) and a.value is Ellipsis)
                for a in call.args):
            continue
        params = []
        try:
            for arg in call.args:
                params.append((arg.id, _NO_DEFAULT) if isinstance(
                    arg, ast.Name) else ("...", _NO_DEFAULT))
            for keyword in call.keywords:
                params.append(
                    ("**" + keyword.value.id, _NO_DEFAULT)
                    if keyword.arg is None
                    else (keyword.arg, ast.literal_eval(keyword.value)))
        except (ValueError, AttributeError):
            continue
        found.append((bool(match.group(1)), ast.unparse(call.func), params))
    return found


_NO_DEFAULT = object()


def resolve(name):
    """The keras_kd object a documented name stands for, or `None`."""
    import keras_kd

    owners = [keras_kd, keras_kd.losses, keras_kd.metrics, keras_kd.augment,
              keras_kd.ops, keras_kd.Distiller, keras_kd.TeacherCache]
    aliases = {"keras_kd": [keras_kd], "cache": [keras_kd.TeacherCache],
               "distiller": [keras_kd.Distiller]}
    *prefix, last = name.split(".")
    if prefix and prefix[0] in aliases:
        owners = aliases[prefix[0]]
        prefix = prefix[1:]
    elif prefix:
        return None  # e.g. keras.losses.MeanSquaredError
    for owner in owners:
        value = owner
        for part in [*prefix, last]:
            value = getattr(value, part, None)
        # Only keras_kd's own: not a method the Distiller inherits from
        # Keras (`loss`, `fit`), which differ by backend.
        if callable(value) and getattr(
                value, "__module__", "").startswith("keras_kd"):
            return value
    return None


def code_parameters(obj):
    """`[(parameter, default or _NO_DEFAULT)]` of `obj`, without `self`;
    `**name` for a variable-keyword parameter."""
    params = []
    for p in inspect.signature(obj).parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.VAR_KEYWORD:
            params.append(("**" + p.name, _NO_DEFAULT))
        elif p.kind is not p.VAR_POSITIONAL:
            params.append((p.name, _NO_DEFAULT if p.default is p.empty
                           else p.default))
    return params


def test_the_api_page_reads_signatures():
    found = documented_signatures(
        "## `keras_kd.Term(loss, weight=1.0)`\n"
        "`KD(temperature=4.0)`, `weak(...)`, `f(**kwargs)` and not "
        "`Term(keras_kd.losses.KD())` or `distiller.save(\"d.keras\")`.")
    assert not documented_signatures("```python\nf(x)\n```\n")
    assert [(h, n, [p for p, _ in ps]) for h, n, ps in found] == [
        (True, "keras_kd.Term", ["loss", "weight"]),
        (False, "KD", ["temperature"]),
        (False, "weak", ["..."]),
        (False, "f", ["**kwargs"]),
    ]
    assert resolve("keras_kd.Term") is resolve("Term")
    assert resolve("class_activation_map") is not None
    assert resolve("cache.dataset") is not None
    assert resolve("keras.losses.MeanSquaredError") is None
    assert resolve("summary") is None and resolve("loss") is None


def check_signature(is_heading, name, documented):
    """Compares one documented signature with the code; returns the
    problems found (an empty list when they agree)."""
    obj = resolve(name)
    if obj is None:
        return [f"`{name}` is a heading but names nothing in keras_kd"] \
            if is_heading else []
    code = code_parameters(obj)
    documented = [(p, d) for p, d in documented if p != "..."]
    if is_heading:
        # `**kwargs` may be left out of a heading (Keras' own arguments).
        expected = [(p, d) for p, d in code if not p.startswith("**")
                    or (p, d) in documented]
        if [p for p, _ in documented] != [p for p, _ in expected]:
            return [f"`{name}`: the heading lists "
                    f"{[p for p, _ in documented]}, the code has "
                    f"{[p for p, _ in expected]}"]
    names = [p for p, _ in code]
    problems = []
    for parameter, default in documented:
        if parameter not in names:
            problems.append(f"`{name}` has no parameter `{parameter}` "
                            f"(it has {names})")
    if problems:
        return problems
    order = [names.index(p) for p, _ in documented]
    if order != sorted(order):
        problems.append(f"`{name}`: parameters out of order, the code has "
                        f"{names}")
    for parameter, default in documented:
        actual = dict(code)[parameter]
        if default is Ellipsis or (default is _NO_DEFAULT
                                   and not is_heading):
            continue
        same = default is actual or (
            _NO_DEFAULT not in (default, actual) and default == actual)
        if not same:
            problems.append(
                f"`{name}`, parameter `{parameter}`: documented with "
                f"{_shown(default)}, the code has {_shown(actual)}")
    return problems


def _shown(default):
    return "no default" if default is _NO_DEFAULT else f"default {default!r}"


def test_api_page_signatures_match_the_code():
    found = documented_signatures(API_PAGE.read_text(encoding="utf-8"))
    headings = [n for h, n, _ in found if h]
    assert "keras_kd.Term" in headings and "keras_kd.Distiller" in headings
    problems = [problem for entry in found
                for problem in check_signature(*entry)]
    assert not problems, "docs/api.md is stale:\n" + "\n".join(problems)


def test_the_term_heading_is_the_term_signature():
    # The example from the issue: a heading that lost parameters fails.
    import keras_kd

    stale = documented_signatures(
        "## `keras_kd.Term(loss, weight=1.0, teacher_layer=None, "
        "student_layer=None, name=None)`")
    assert check_signature(*stale[0])
    current = [entry for entry in documented_signatures(
        API_PAGE.read_text(encoding="utf-8"))
        if entry[0] and entry[1] == "keras_kd.Term"]
    assert len(current) == 1
    assert [p for p, _ in current[0][2]] == list(
        inspect.signature(keras_kd.Term).parameters)
    assert check_signature(*current[0]) == []
    # A renamed parameter in a partial signature fails too.
    assert check_signature(False, "class_activation_map",
                           [("feature", _NO_DEFAULT),
                            ("kernel", _NO_DEFAULT)])

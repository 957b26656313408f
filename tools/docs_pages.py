"""Pages of the documentation site that are not files under `docs/`.

`mkdocs build` runs this file through the mkdocs-gen-files plugin
(`mkdocs.yml`). It adds to the site, without writing into the work tree:

- one API reference page per public object of `keras_kd`,
  `keras_kd.losses`, `keras_kd.ops` and `keras_kd.metrics`, rendered by
  mkdocstrings from the object's docstring, one index page per module, and
  `reference/SUMMARY.md`, the navigation of the reference section (read by
  mkdocs-literate-nav);
- copies of files kept outside `docs/` so that they read well on GitHub:
  the README as the "Getting started" page, `benchmarks/` (results pages and
  their figure) and the example notebooks (as downloads).

Public objects are found by importing the modules: a public object is a
name in the module's namespace that does not start with `_` and is not a
module. A new public object therefore gets its page without any list to
update. Importing needs a Keras backend: the one in `KERAS_BACKEND`, else
the first of TensorFlow, JAX and PyTorch that is installed, else NumPy
(enough to import); no GPU is needed. mkdocstrings itself reads the
sources statically.

The links of the copied pages are rewritten for the site by
`tools/docs_hooks.py`, from `mirrored_files()` below.
"""

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REFERENCE_MODULES = (
    "keras_kd",
    "keras_kd.losses",
    "keras_kd.ops",
    "keras_kd.metrics",
)
REFERENCE_DIR = "reference"

# Files outside docs/ that the site shows, by their path in the
# repository: where they go in the site.
SITE_PATHS = {
    "README.md": "getting_started.md",
}
MIRRORED_DIRS = {
    "benchmarks": ("*.md", "*.png"),
    "examples": ("*.ipynb",),
}


def choose_backend():
    """Sets `KERAS_BACKEND` for the import when it is not set, without
    importing any backend. Returns the backend's name."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    for backend, module in (
        ("tensorflow", "tensorflow"),
        ("jax", "jax"),
        ("torch", "torch"),
    ):
        if importlib.util.find_spec(module) is not None:
            break
    else:
        backend = "numpy"
    os.environ["KERAS_BACKEND"] = backend
    return backend


def public_names(module):
    """Sorted public names of `module`: names in its namespace that do not
    start with `_` and are not modules (submodules or imported ones)."""
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    )


def public_objects():
    """`{module name: {public name: its docstring's first paragraph}}` for
    every module of the reference. Imports the modules from this work tree
    (mkdocstrings reads its sources), not from an installed copy."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    choose_backend()
    objects = {}
    for module_name in REFERENCE_MODULES:
        module = importlib.import_module(module_name)
        objects[module_name] = {
            name: summary_line(getattr(module, name))
            for name in public_names(module)
        }
    return objects


def summary_line(obj):
    """The first paragraph of `obj`'s own docstring on one line ('' when
    it has none)."""
    doc = inspect.getdoc(obj) if _has_own_doc(obj) else None
    paragraph = (doc or "").strip().split("\n\n")[0]
    line = " ".join(paragraph.split())
    return line.replace("|", "\\|")  # inside a table row


def _has_own_doc(obj):
    # `inspect.getdoc` falls back to a base class's docstring; a page shows
    # the object's own.
    return bool(getattr(obj, "__doc__", None)) and (
        not inspect.isclass(obj) or "__doc__" in vars(obj)
    )


def module_dir(module_name):
    """`keras_kd.losses` -> `reference/keras_kd/losses`."""
    return "/".join([REFERENCE_DIR, *module_name.split(".")])


def reference_pages(objects):
    """The reference pages, `{path under docs: markdown}`, for `objects`
    (`{module name: {name: one-line summary}}`, as `public_objects`
    returns), and `reference/SUMMARY.md`."""
    pages = {}
    summary = []
    for module_name, names in objects.items():
        base = module_dir(module_name)
        index = [
            f"# `{module_name}`",
            "",
            f"::: {module_name}",
            "    options:",
            "      members: false",
            "      show_root_heading: false",
            "      show_root_toc_entry: false",
            "",
            "| object | summary |",
            "|---|---|",
        ]
        summary.append(f"* [{module_name}]({_relative(base, 'index.md')})")
        for name, line in names.items():
            path = f"{base}/{name}.md"
            pages[path] = f"::: {module_name}.{name}\n"
            index.append(f"| [`{name}`]({name}.md) | {line} |")
            summary.append(f"    * [{name}]({_relative(base, name + '.md')})")
        pages[f"{base}/index.md"] = "\n".join(index) + "\n"
    pages[f"{REFERENCE_DIR}/SUMMARY.md"] = "\n".join(summary) + "\n"
    return pages


def _relative(base, name):
    """`base/name` relative to `reference/`."""
    return f"{base}/{name}"[len(REFERENCE_DIR) + 1:]


def mirrored_files():
    """`{repository path: site path}` of every file copied into the site."""
    files = dict(SITE_PATHS)
    for directory, patterns in MIRRORED_DIRS.items():
        for pattern in patterns:
            for path in sorted((ROOT / directory).glob(pattern)):
                relative = path.relative_to(ROOT).as_posix()
                files[relative] = relative
    return files


def main():
    import mkdocs_gen_files

    for path, text in reference_pages(public_objects()).items():
        with mkdocs_gen_files.open(path, "w") as page:
            page.write(text)
    for source, target in mirrored_files().items():
        binary = not source.endswith(".md")
        with mkdocs_gen_files.open(target, "wb" if binary else "w") as page:
            data = (ROOT / source).read_bytes()
            page.write(data if binary else data.decode("utf-8"))


if __name__ in ("__main__", "<run_path>"):
    main()

"""The README's layout table names every module and package of keras_kd,
and every keras_kd path it names exists."""

import re
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
CODE = re.compile(r"`([^`]+)`")


def layout_rows(text):
    """`[(first cell, rest of the row)]` of the table under `## Layout`."""
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows.append((cells[0], " | ".join(cells[1:])))
    return rows


def named_paths(rows):
    """The repository paths the table names (`keras_kd/...`, folders end
    with `/`) and, per package row, the package's folder."""
    paths, packages = set(), []
    for first, rest in rows:
        folder = PurePosixPath(".")
        for span in CODE.findall(first):
            if "/" in span.rstrip("/") or span.endswith("/"):
                path = span
                folder = PurePosixPath(span.rstrip("/")).parent
            else:
                path = str(folder / span)
            paths.add(path)
            if span.endswith("/") and span.startswith("keras_kd/"):
                packages.append(span)
                # Inside a package's row, `name.py` and `sub/` are in it.
                for inner in CODE.findall(rest):
                    if re.fullmatch(r"[\w/]+(\.py|/)", inner):
                        paths.add(span + inner)
    return {p for p in paths if p.startswith("keras_kd")}, packages


def package_modules():
    """Every module and package under keras_kd/, as repository paths
    (`__init__.py` stands for its package; caches left out)."""
    found = set()
    for path in (ROOT / "keras_kd").rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if "__pycache__" in relative:
            continue
        if path.is_dir():
            found.add(relative + "/")
        elif path.suffix == ".py" and path.name != "__init__.py":
            found.add(relative)
    return found


def readme_paths():
    return named_paths(layout_rows((ROOT / "README.md").read_text()))[0]


def test_the_table_is_read():
    named = readme_paths()
    for expected in ("keras_kd/distiller.py", "keras_kd/export.py",
                     "keras_kd/losses/", "keras_kd/losses/logits.py",
                     "keras_kd/models/", "keras_kd/models/cifar/weights.py"):
        assert expected in named


def test_every_module_of_the_package_is_in_the_table():
    missing = sorted(package_modules() - readme_paths())
    assert not missing, (
        "README.md's layout table does not name: " + ", ".join(missing))


def test_every_path_the_table_names_exists():
    gone = sorted(p for p in readme_paths() if not (ROOT / p).exists())
    assert not gone, "README.md's layout table names: " + ", ".join(gone)


def test_a_module_left_out_or_made_up_is_found():
    text = """
## Layout

| path | what |
|---|---|
| `keras_kd/losses/` | `logits.py` (KD), `ghost.py` |
| `keras_kd/augment.py`, `export.py` | presets; export |

## Next
"""
    named, packages = named_paths(layout_rows(text))
    assert packages == ["keras_kd/losses/"]
    assert "keras_kd/export.py" in named
    assert "keras_kd/losses/ghost.py" in named  # then reported as missing
    assert "keras_kd/distiller.py" not in named

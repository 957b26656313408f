"""The pages a user reads speak of the library and its measurements only.

A result page names its machine, command, date and run; a paper is cited by
its title and arXiv id. Words about how the project was worked on (who ran a
measurement, internal issue numbers, internal note files or paper numbers)
have no place in the README, the release files, the documentation, the
benchmark pages and scripts, the notebooks or the package's docstrings.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The user-facing files, as glob patterns from the repository root.
USER_FACING = (
    "README.md",
    "CHANGELOG.md",
    "CONTRIBUTING.md",
    "CITATION.cff",
    "docs/**/*.md",
    "benchmarks/**/*.md",
    "benchmarks/**/*.py",
    "examples/**/*.ipynb",
    "keras_kd/**/*.py",
    "keras_kd_cli.py",
)

# Whole words only, so that code such as `keras.backend.clear_session()`
# or a word like "excellent" is not hit. A `.` or `_` just before "session"
# marks an API name (`tf.compat.v1.Session`, `clear_session`).
FORBIDDEN = {
    "session": re.compile(r"(?<![._])\bsessions?\b", re.IGNORECASE),
    "reviewer": re.compile(r"\breviewers?(?:'s)?\b", re.IGNORECASE),
    "lent": re.compile(r"\blent\b", re.IGNORECASE),
    "workplace": re.compile(r"\bworkplaces?\b", re.IGNORECASE),
    "paper number": re.compile(r"\bpapers?\s+0\d\d\b", re.IGNORECASE),
    "internal notes": re.compile(r"\bmethods\.md\b|\bshared/(?:papers|docs)\b"),
    "issue number": re.compile(r"\bissues?\s+#?\d+|\(#\d+\)", re.IGNORECASE),
}


def user_facing_files():
    files = set()
    for pattern in USER_FACING:
        files.update(path for path in ROOT.glob(pattern) if path.is_file())
    return sorted(files)


def findings(text):
    """`[(line number, label, matched text)]` for every forbidden word."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for label, pattern in FORBIDDEN.items():
            for match in pattern.finditer(line):
                found.append((number, label, match.group(0)))
    return found


def test_the_user_facing_files_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in user_facing_files()}
    for expected in ("README.md", "benchmarks/README.md", "docs/index.md",
                     "keras_kd/distiller.py", "examples/quickstart.ipynb"):
        assert expected in names


def test_no_user_facing_file_speaks_of_how_the_project_was_made():
    problems = [
        f"{path.relative_to(ROOT).as_posix()}:{number}: {label}: {word!r}"
        for path in user_facing_files()
        for number, label, word in findings(path.read_text(encoding="utf-8"))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("sentence", [
    "## JAX backend (2026-12-01, session 5)",
    "Fourth session, 2026-11-23, same machine.",
    "No GPU was available to this project's sessions so far.",
    "Independent check by a reviewer, 25 rounds (reviewer's check).",
    "For the machine this project is lent (Python 3.12) that is keras.",
    "paper 001's finding in miniature on digits",
    "method notes in `methods.md`, section 001",
    "The project's only text of it is `shared/papers/003_x.txt`.",
    "# Teacher cache against the student alone (issue 14)",
    "Targets (issue #16): chunked memory",
    "LAKD memory on JAX (#13)",
])
def test_the_words_are_caught(sentence):
    assert findings(sentence)


@pytest.mark.parametrize("sentence", [
    "keras.backend.clear_session()",
    "with tf.compat.v1.Session() as sess:",
    "an excellent student; the relentless optimizer",
    "An independent run of 25 interleaved rounds on a quiet machine.",
    "Known issues: none; see issue tracker.",
    "the papers' own code (Guo et al., 2024, arXiv:2405.00739)",
])
def test_legitimate_words_pass(sentence):
    assert not findings(sentence)

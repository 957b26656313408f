"""The workflows for a public repository host (.github/workflows): CI runs
the test command of the README (and so of .ci/run) once per backend, and a
release checks its tag against keras_kd/_version.py before publishing."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip(
    "yaml", reason="PyYAML reads the workflow files (the [test] extra)")

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
BACKENDS = ["tensorflow", "jax", "torch"]


def load(name):
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow):
    # PyYAML reads the key `on` as the boolean True (YAML 1.1).
    return workflow.get("on", workflow.get(True))


def readme_test_command():
    """The README's test command, as .ci/run finds it."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r'^pip install "\.\[test\]".*$', text, re.MULTILINE)
    assert match, "README.md has no 'pip install \".[test]\" ...' line"
    install, run = match.group(0).split(" && ")
    return install, run


def run_lines(job):
    return [step["run"] for step in job["steps"] if "run" in step]


def joined(script):
    """A `run:` script with its line continuations joined."""
    return re.sub(r"\\\n\s*", "", script)


def test_ci_tests_every_backend_after_the_readme_install():
    install, run = readme_test_command()
    assert run.startswith("python tests/all_backends.py")
    pytest_args = run[len("python tests/all_backends.py"):].strip()
    job = load("ci.yml")["jobs"]["tests"]
    assert job["strategy"]["matrix"]["backend"] == BACKENDS
    assert job["strategy"]["fail-fast"] is False
    scripts = [joined(s) for s in run_lines(job)]
    install_lines = [line.strip() for s in scripts for line in s.splitlines()
                     if line.strip().startswith('pip install ".[test]"')]
    assert len(install_lines) == 1
    # The README's install, plus PyTorch's CPU index.
    assert install_lines[0].startswith(install + " ")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in (
        install_lines[0])
    test_step = next(step for step in job["steps"]
                     if "pytest" in step.get("run", ""))
    # What tests/all_backends.py runs for each backend.
    assert test_step["run"].strip() == f"python -m pytest tests {pytest_args}"
    assert test_step["env"]["KERAS_BACKEND"] == "${{ matrix.backend }}"


def test_ci_runs_the_other_stages_of_ci_run():
    jobs = load("ci.yml")["jobs"]
    scripts = {name: "\n".join(run_lines(job)) for name, job in jobs.items()}
    assert "python -m mypy" in scripts["types"]
    assert "mkdocs build --strict" in scripts["docs"]
    assert "python -m build" in scripts["package"]
    assert "twine check --strict dist/*" in scripts["package"]
    ci_run = (ROOT / ".ci" / "run").read_text()
    for command in ("python -m mypy", "mkdocs build --strict",
                    "twine check --strict"):
        assert command in ci_run
    on = triggers(load("ci.yml"))
    assert "pull_request" in on and on["push"]["branches"] == ["main"]


def test_release_builds_checks_the_tag_and_publishes():
    workflow = load("release.yml")
    assert triggers(workflow)["push"]["tags"] == ["v*"]
    build, publish = workflow["jobs"]["build"], workflow["jobs"]["publish"]
    script = "\n".join(run_lines(build))
    assert "python -m build" in script
    assert "twine check --strict dist/*" in script
    assert publish["needs"] == "build"
    assert publish["permissions"] == {"id-token": "write"}
    uses = [step.get("uses", "") for step in publish["steps"]]
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in uses)
    # Trusted publishing: no token or password is passed.
    assert "password" not in str(publish) and "secrets." not in str(publish)


def tag_check_script():
    steps = load("release.yml")["jobs"]["build"]["steps"]
    return next(s["run"] for s in steps if "GITHUB_REF_NAME" in s.get("run", ""))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_release_refuses_a_tag_that_is_not_the_version(tmp_path):
    from keras_kd._version import __version__

    # `python` on the PATH is this interpreter.
    (tmp_path / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def run(tag):
        return subprocess.run(
            ["bash", "-e", "-c", tag_check_script()], cwd=ROOT,
            env=dict(env, GITHUB_REF_NAME=tag), capture_output=True,
            text=True)

    assert run(f"v{__version__}").returncode == 0
    wrong = run("v99.0.0")
    assert wrong.returncode != 0
    assert f"v{__version__}" in wrong.stdout

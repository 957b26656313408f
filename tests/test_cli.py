"""The `keras-kd` command line: `--version` and `--help` import no Keras
and no backend (they answer at once), subcommands are dispatched with their
own arguments. The demo itself is tested in tests/test_demo.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import keras_kd
import keras_kd_cli

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"keras", "tensorflow", "jax", "torch"}

# Calls the console script's function as the installed `keras-kd` script
# does, then prints the exit status and every module loaded by then.
PROBE = """
import importlib, json, sys
module, function, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
main = getattr(importlib.import_module(module), function)
try:
    status = main(argv)
except SystemExit as exit:
    status = exit.code
sys.stdout.flush()
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


def console_script():
    """`(module, function)` of the `keras-kd` entry in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^keras-kd\s*=\s*"([\w.]+):(\w+)"\s*$', text, re.M)
    assert match, "pyproject.toml has no keras-kd console script"
    return match.groups()


def run_console_script(*arguments, cwd):
    module, function = console_script()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module, function, *arguments],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr
    *printed, last = done.stdout.rstrip("\n").split("\n")
    result = json.loads(last)
    loaded = {name.partition(".")[0] for name in result["modules"]}
    return result["status"], "\n".join(printed), loaded


@pytest.mark.parametrize("argument", ["--version", "--help"])
def test_version_and_help_import_no_keras_and_no_backend(argument, tmp_path):
    status, printed, loaded = run_console_script(argument, cwd=tmp_path)
    assert status == 0
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
    if argument == "--version":
        assert printed == f"keras-kd {keras_kd.__version__}"
    else:
        assert printed.startswith("usage: keras-kd ")
        assert re.search(r"^\s+demo\s+distil", printed, re.M)


def test_the_version_is_read_without_importing_the_package():
    assert keras_kd_cli.package_version() == keras_kd.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", keras_kd.__version__)


def test_a_subcommand_parses_its_own_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        keras_kd_cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: keras-kd demo ")
    with pytest.raises(SystemExit) as exit_info:
        keras_kd_cli.main(["demo", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-option" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["train"], "invalid choice: 'train'"),
    (["--quick", "demo"], "unrecognized arguments: --quick"),
])
def test_usage_errors_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        keras_kd_cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_keras_kd_cli_main_is_the_same_command(capsys):
    from keras_kd import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"keras-kd {keras_kd.__version__}\n"

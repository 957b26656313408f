"""The `keras-kd` command line (the console script's entry point).

This module lives beside the `keras_kd` package, not inside it: importing
`keras_kd` imports Keras and its backend (seconds with TensorFlow), and
`keras-kd --version` and `keras-kd --help` need neither. They import only
the standard library here. A subcommand imports what it needs when it runs:
`keras-kd demo ...` hands its arguments to `keras_kd.cli.demo_main`, which
also prints the demo's own `--help`.

Subcommands:

* `keras-kd demo`: distils a small CNN into a tiny one on scikit-learn's
  digits, prints the held-out accuracies and exports the distilled student
  (see `keras_kd.demo.run_demo`).
"""

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys

# Subcommand name -> (one-line help, "module:function" that runs it on the
# arguments after the name and returns the exit status).
COMMANDS = {
    "demo": (
        "distil a CNN on scikit-learn's digits and export the student",
        "keras_kd.cli:demo_main",
    ),
}


def package_version():
    """The version of the `keras_kd` package that `import keras_kd` would
    load, read without importing it.

    Returns:
        The version string of `keras_kd/_version.py`, or, when that file
        cannot be found, the installed distribution's version.
    """
    # For a top-level package, find_spec locates it without running its
    # `__init__.py`.
    spec = importlib.util.find_spec("keras_kd")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "_version.py")
        if os.path.isfile(path):
            version_spec = importlib.util.spec_from_file_location(
                "_keras_kd_version", path)
            module = importlib.util.module_from_spec(version_spec)
            version_spec.loader.exec_module(module)
            return module.__version__
    return importlib.metadata.version("keras-kd")


def build_parser():
    """Builds the parser of the `keras-kd` command itself.

    It knows `--help`, `--version` and the subcommands' names; each
    subcommand parses its own arguments (see `COMMANDS`).

    Returns:
        An `argparse.ArgumentParser`.
    """
    parser = argparse.ArgumentParser(
        prog="keras-kd",
        description="Knowledge distillation for Keras 3.",
        epilog="Run `keras-kd COMMAND --help` for the options of a command.",
    )
    parser.add_argument(
        "--version", action="version", version=f"keras-kd {package_version()}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, (summary, _) in COMMANDS.items():
        subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None):
    """Entry point of the `keras-kd` console script.

    Args:
        argv: command-line arguments without the program name; defaults to
            `sys.argv[1:]`.

    Returns:
        The exit status (0 on success). `--help`, `--version` and usage
        errors exit through `SystemExit`, as with `argparse`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return _run(argv[0], argv[1:])
    # No subcommand first: `--help`, `--version` or a usage error (a missing
    # or unknown command, an unknown option) exit in `parse_args`.
    args = build_parser().parse_args(argv)
    # Left: a command after `--` (`keras-kd -- demo`).
    return _run(args.command, argv[argv.index(args.command) + 1:])


def _run(command, arguments):
    """Imports the subcommand `command` and runs it on `arguments`."""
    module_name, function_name = COMMANDS[command][1].split(":")
    run = getattr(importlib.import_module(module_name), function_name)
    return run(arguments)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

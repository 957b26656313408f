"""The subcommands of the `keras-kd` command line.

The command itself is `keras_kd_cli` (a module beside this package, so that
`keras-kd --version` and `--help` import no Keras); it hands the arguments
of a subcommand to the function here that runs it.

Subcommands:

* `keras-kd demo`: distils a small CNN into a tiny one on scikit-learn's
  digits, prints the held-out accuracies and exports the distilled student
  (see `keras_kd.demo.run_demo`).
"""

import argparse
import sys

import keras_kd_cli


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_demo_parser():
    """Builds the argument parser of `keras-kd demo`.

    Returns:
        An `argparse.ArgumentParser` for the arguments after `demo`.
    """
    # Imported here for the defaults only; demo.py itself imports no
    # optional dependency at module level.
    from keras_kd import demo

    demo_parser = argparse.ArgumentParser(
        prog="keras-kd demo",
        description=(
            "Trains a small CNN teacher on all labelled training images of "
            "scikit-learn's digits, a tiny student alone on a few hundred "
            "labels, and the same student distilled from the teacher on all "
            "training images without labels; prints their held-out test "
            "accuracies and exports the distilled student as a SavedModel. "
            'Needs scikit-learn: pip install "keras-kd[demo]".'
        ),
    )
    demo_parser.add_argument(
        "--epochs", type=_positive_int, default=None,
        help=(
            "epochs over the full training set for the teacher and the "
            f"distillation (default {demo.DEFAULT_EPOCHS}, "
            f"{demo.QUICK_EPOCHS} with --quick); the student alone gets "
            "about as many optimizer steps"
        ),
    )
    demo_parser.add_argument(
        "--labels", type=_positive_int, default=None,
        help=(
            "labelled training images for the student alone (default "
            f"{demo.DEFAULT_LABELS}, {demo.QUICK_LABELS} with --quick)"
        ),
    )
    demo_parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the split, the labelled subset and the weights "
             "(default 0)",
    )
    demo_parser.add_argument(
        "--temperature", type=_positive_float,
        default=demo.DEFAULT_TEMPERATURE,
        help=f"KD temperature (default {demo.DEFAULT_TEMPERATURE:g})",
    )
    demo_parser.add_argument(
        "--feature-term", action="store_true",
        help="also distil an intermediate feature map (FitNet hint)",
    )
    demo_parser.add_argument(
        "--output", default=demo.DEFAULT_OUTPUT,
        help=(
            "directory the distilled student's SavedModel is written to "
            f"(default ./{demo.DEFAULT_OUTPUT})"
        ),
    )
    demo_parser.add_argument(
        "--quick", action="store_true",
        help=(
            "a tiny run (a few seconds of training) that checks the "
            "install only: its accuracies are not a comparison"
        ),
    )
    verbosity = demo_parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=1,
        help="Keras fit verbosity: 0 silent, 1 progress bars (default), "
             "2 one line per epoch",
    )
    verbosity.add_argument(
        "--quiet", action="store_const", const=0, dest="verbose",
        help="same as --verbose 0: print only the table and the export path",
    )
    return demo_parser


def demo_main(argv):
    """Runs `keras-kd demo`.

    Args:
        argv: the command-line arguments after `demo`.

    Returns:
        The exit status (0 on success); `--help` and usage errors exit
        through `SystemExit`.
    """
    from keras_kd import demo

    parser = build_demo_parser()
    args = parser.parse_args(argv)
    labels = args.labels
    if labels is None:
        labels = demo.QUICK_LABELS if args.quick else demo.DEFAULT_LABELS
    # Fail early, with a usage error rather than a traceback, when the
    # data cannot be loaded or `--labels` is out of range.
    try:
        demo.load_digits_data(seed=args.seed, num_labels=labels)
    except (ImportError, ValueError) as err:
        parser.exit(2, f"keras-kd demo: error: {err}\n")
    demo.run_demo(
        epochs=args.epochs,
        labels=labels,
        seed=args.seed,
        output=args.output,
        quick=args.quick,
        temperature=args.temperature,
        feature_term=args.feature_term,
        verbose=args.verbose,
    )
    return 0


def main(argv=None):
    """The `keras-kd` command, as `keras_kd_cli.main` (kept here so that
    `python -m keras_kd.cli` and `keras_kd.cli.main` work as before).

    Args:
        argv: command-line arguments without the program name; defaults to
            `sys.argv[1:]`.

    Returns:
        The exit status (0 on success).
    """
    return keras_kd_cli.main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

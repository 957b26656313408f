"""The `keras-kd` command line.

Subcommands:

* `keras-kd demo`: distils a small CNN into a tiny one on scikit-learn's
  digits, prints the held-out accuracies and exports the distilled student
  (see `keras_kd.demo.run_demo`).
"""

import argparse
import sys

from keras_kd import __version__


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


def build_parser():
    """Builds the argument parser of the `keras-kd` command.

    Returns:
        An `argparse.ArgumentParser` with the `demo` subcommand.
    """
    # Imported here for the defaults only; demo.py itself imports no
    # optional dependency at module level.
    from keras_kd import demo

    parser = argparse.ArgumentParser(
        prog="keras-kd",
        description="Knowledge distillation for Keras 3.",
    )
    parser.add_argument(
        "--version", action="version", version=f"keras-kd {__version__}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True

    demo_parser = subparsers.add_parser(
        "demo",
        help="distil a CNN on scikit-learn's digits and export the student",
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
        help="a tiny run (a few seconds of training) to check the install",
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
    return parser


def main(argv=None):
    """Entry point of the `keras-kd` console script.

    Args:
        argv: command-line arguments without the program name; defaults to
            `sys.argv[1:]`.

    Returns:
        The exit status (0 on success).
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        from keras_kd import demo

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

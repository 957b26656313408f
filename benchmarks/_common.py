"""What several benchmark scripts share. They run as `python
benchmarks/<script>.py`, so this folder is on `sys.path`."""


def backend_from_argv(argv):
    """The value of a `--backend` argument in `argv` (`--backend jax` or
    `--backend=jax`), or `None`. Scripts read it before Keras is imported,
    since Keras picks its backend at import."""
    for index, arg in enumerate(argv):
        if arg == "--backend" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None

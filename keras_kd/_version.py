"""The version of keras-kd, in one place: `keras_kd.__version__`, the build
(pyproject.toml reads it) and `keras-kd --version` (which reads this file
without importing the package) all take it from here."""

__version__ = "0.1.0"

"""Plotting the distillation diagnostics of a `fit` history (matplotlib,
the `[plots]` extra, imported only when a plot is drawn)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from keras_kd import metrics as kd_metrics

_DEFAULT_PREFIXES = tuple(kd_metrics._BY_NAME) + ("attention_iou",)


def _as_dict(history):
    """The `{key: list of values}` dict of a `History` or a dict."""
    if hasattr(history, "history"):
        return dict(history.history)
    if isinstance(history, dict):
        return dict(history)
    raise TypeError(
        "`history` must be a `keras.callbacks.History` (returned by `fit`), "
        "a dict of per-epoch lists, or a dict mapping run labels to either; "
        f"got {type(history).__name__}."
    )


def _diagnostic_names(history):
    """Names of the diagnostics a `History` holds: the distiller's metrics
    when the history knows its model, otherwise every key starting with a
    default diagnostic name."""
    model = getattr(history, "model", None)
    metrics = getattr(model, "diagnostics", None)
    if metrics:
        return [m.name for m in metrics]
    keys = _as_dict(history)
    return [k for k in keys
            if not k.startswith("val_") and k.startswith(_DEFAULT_PREFIXES)]


def _runs(history):
    """`{label: history}`: one run unless given a dict of histories."""
    if isinstance(history, dict) and history and all(
        hasattr(h, "history") or isinstance(h, dict)
        for h in history.values()
    ):
        return dict(history)
    return {None: history}


def plot_diagnostics(history: Any, path: str | os.PathLike[str],
                     names: Sequence[str] | None = None,
                     dpi: int = 100) -> str | os.PathLike[str]:
    """Writes a PNG with one panel per diagnostic over the epochs.

    Each panel shows the training values (solid) and, when present, the
    validation values (`val_` keys, dashed). Several runs can share the
    panels: pass a dict mapping a label to each run's history.

    Args:
        history: the `History` returned by `Distiller.fit`, its `.history`
            dict, or a dict `{label: history}` of several runs.
        path: file to write (PNG).
        names: diagnostic keys to plot (without `val_`). Defaults to the
            distiller's diagnostics, or to every key that starts with a
            default diagnostic name (`top1_agreement`, `teacher_kl`,
            `mutual_information`, `ece`, `attention_iou`).
        dpi: resolution of the image.

    Returns:
        `path`.

    Example:

    >>> history = distiller.fit(x, y, validation_data=(x_val, y_val),
    ...                         epochs=10)
    >>> keras_kd.plot_diagnostics(history, "diagnostics.png")
    """
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:  # pragma: no cover - depends on the extra
        raise ImportError(
            "`plot_diagnostics` needs matplotlib: `pip install "
            "keras-kd[plots]`."
        ) from err

    runs = _runs(history)
    if names is None:
        names = []
        for run in runs.values():
            for name in _diagnostic_names(run):
                if name not in names:
                    names.append(name)
    names = list(names)
    if not names:
        raise ValueError(
            "No diagnostic to plot: the history has none of the default "
            "diagnostic keys. Pass `names=[...]`, or distil with "
            "`Distiller(..., diagnostics=[...])`."
        )
    data = {label: _as_dict(run) for label, run in runs.items()}
    for name in names:
        if not any(name in values for values in data.values()):
            raise ValueError(
                f"'{name}' is not in the history. Its keys: "
                f"{sorted(next(iter(data.values())))}."
            )

    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    # A standalone Figure (no pyplot): the global backend is left alone.
    figure = Figure(figsize=(4.2 * columns, 3.2 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, name in zip(axes.flat, names):
        for i, (label, values) in enumerate(data.items()):
            color = colors[i % len(colors)]
            prefix = "" if label is None else f"{label} "
            for key, style, suffix in ((name, "-", "train"),
                                       (f"val_{name}", "--", "val")):
                if key in values:
                    series = [float(v) for v in values[key]]
                    panel.plot(range(1, len(series) + 1), series, style,
                               color=color, label=f"{prefix}{suffix}")
        panel.set_title(name)
        panel.set_xlabel("epoch")
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.3)
    for panel in list(axes.flat)[len(names):]:
        panel.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 6:
        figure.legend(handles, labels, loc="lower center",
                      ncol=min(4, len(labels)), fontsize="small")
        legend_rows = math.ceil(len(labels) / 4)
        bottom = min(0.5, (0.22 * legend_rows + 0.2) / (3.2 * rows))
        figure.tight_layout(rect=(0, bottom, 1, 1))
    else:
        axes.flat[0].legend(fontsize="small")
        figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    return path

"""Draw the figures of the benchmark results pages from their tables.

The numbers are read from the markdown tables of the results pages, so a
figure always shows what its page records:

- `losses_cost.png`: the cost of each loss's forward and backward pass
  relative to KD, one group of bars per backend, from the table under
  "Cost relative to KD" in `RESULTS_losses.md`;
- `lakd_memory.png`: the peak memory of a LAKD step against an end-to-end
  KD step, from the table under "Peak memory" in `RESULTS_lakd.md`.

Needs matplotlib (the `plots` extra). Run from the repository root:
    python benchmarks/plot_results.py            # PNGs next to the pages
    python benchmarks/plot_results.py --out DIR  # PNGs in DIR
"""

import argparse
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_table(path, heading):
    """Read the first markdown table under a heading of a page.

    Args:
        path: the markdown page.
        heading: text that the heading line (starting with `#`) contains.

    Returns:
        A list of rows, each a dict from column name to cell text.

    Raises:
        ValueError: when the page has no such heading or no table under it.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    start = None
    for i, line in enumerate(lines):
        if line.startswith("#") and heading in line:
            start = i + 1
            break
    if start is None:
        raise ValueError(f"{path}: no heading containing {heading!r}")
    table = []
    for line in lines[start:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    if len(table) < 3:
        raise ValueError(f"{path}: no table under the heading {heading!r}")

    def cells(line):
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    names = cells(table[0])
    return [dict(zip(names, cells(line))) for line in table[2:]]


def number(cell):
    """The first number of a table cell, or None (e.g. "not run")."""
    match = NUMBER.search(cell.replace(",", ""))
    return float(match.group()) if match else None


def plot_losses_cost(page, out):
    """Bars of each loss's cost relative to KD, per backend and clock."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_table(page, "Cost relative to KD")
    columns = [name for name in rows[0] if name.endswith("x KD")]
    labels = [row["loss"] for row in rows]
    y = np.arange(len(labels))
    height = 0.8 / len(columns)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for i, column in enumerate(columns):
        values = [number(row[column]) for row in rows]
        ax.barh(
            y + i * height,
            [np.nan if v is None else v for v in values],
            height,
            label=column.replace(" x KD", ""),
        )
    ax.set_xscale("log")
    ax.axvline(10, color="black", linestyle="--", linewidth=1,
               label="target: 10x KD")
    ax.set_yticks(y + height * (len(columns) - 1) / 2, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time relative to KD (log scale), forward + backward")
    ax.set_title("Correlation losses, B=256, C=1000, CPU")
    ax.set_xticks([1, 2, 5, 10, 20, 50], ["1", "2", "5", "10", "20", "50"])
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_lakd_memory(page, out):
    """Bars of LAKD's and end-to-end KD's peak memory for each split."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = read_table(page, "Peak memory")
    splits = [row["split"].replace("`", "") for row in rows]
    measures = [
        ("peak RSS", "end-to-end peak RSS (MiB)", "LAKD peak RSS (MiB)"),
        (
            "live tensors",
            "end-to-end live-tensor peak (MiB)",
            "LAKD live-tensor peak (MiB)",
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.5), sharey=True)
    x = np.arange(len(splits))
    for ax, (title, e2e, lakd) in zip(axes, measures):
        ax.bar(x - 0.2, [number(r[e2e]) for r in rows], 0.4,
               label="end-to-end KD")
        ax.bar(x + 0.2, [number(r[lakd]) for r in rows], 0.4,
               label="LAKD")
        ax.set_xticks(x, splits, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("MiB, median over processes")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("LAKD vs end-to-end KD, batch 256, TensorFlow CPU",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default=str(HERE),
                        help="folder of the RESULTS_*.md pages")
    parser.add_argument("--out", default=str(HERE),
                        help="folder the PNGs are written to")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    pages, out = Path(args.pages), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_losses_cost(pages / "RESULTS_losses.md", out / "losses_cost.png")
    plot_lakd_memory(pages / "RESULTS_lakd.md", out / "lakd_memory.png")
    for name in ("losses_cost.png", "lakd_memory.png"):
        print(out / name)


if __name__ == "__main__":
    main()

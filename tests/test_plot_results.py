"""`benchmarks/plot_results.py`: the results pages' figures from their tables.

The parser is checked on a page written here and on the recorded pages
(a few of their cells, copied by hand from the recorded outputs); the plot
script must run from the pages into a temporary folder.
"""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script():
    spec = importlib.util.spec_from_file_location(
        "plot_results", BENCHMARKS / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_read_table_takes_the_table_under_the_heading(tmp_path):
    plot_results = load_script()
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n| a | b |\n|---|---|\n| 0 | 0 |\n\n"
        "## Wanted table\n\nText.\n\n"
        "| name | value x KD |\n|---|---|\n| one | 1.5 |\n"
        "| two | not run |\n\nAfter.\n\n| c |\n|---|\n| 9 |\n")
    rows = plot_results.read_table(page, "Wanted")
    assert rows == [{"name": "one", "value x KD": "1.5"},
                    {"name": "two", "value x KD": "not run"}]
    assert plot_results.number(rows[0]["value x KD"]) == 1.5
    assert plot_results.number(rows[1]["value x KD"]) is None
    assert plot_results.number("1,118 ms") == 1118.0
    with pytest.raises(ValueError, match="no heading"):
        plot_results.read_table(page, "Missing")
    page.write_text("# Page\n\n## Wanted\n\nNo table.\n\n## Next\n")
    with pytest.raises(ValueError, match="no table"):
        plot_results.read_table(page, "Wanted")


def test_read_table_reads_the_recorded_pages():
    plot_results = load_script()
    losses = plot_results.read_table(
        BENCHMARKS / "RESULTS_losses.md", "Cost relative to KD")
    cmkd = next(row for row in losses if row["loss"] == "CMKD")
    # TensorFlow run D and the JAX quick run of the recorded outputs.
    assert cmkd["TensorFlow wall x KD"] == "7.7"
    assert cmkd["TensorFlow CPU x KD"] == "11.0"
    assert cmkd["JAX wall x KD"] == "60.4"
    lakd = plot_results.read_table(
        BENCHMARKS / "RESULTS_lakd.md", "Peak memory")
    assert [row["split"] for row in lakd] == [
        "`stages` (4 modules)", "`blocks` (8 modules)"]
    # The medians of the TensorFlow run's summary tables.
    assert plot_results.number(lakd[1]["LAKD peak RSS (MiB)"]) == 399.8
    assert plot_results.number(
        lakd[1]["end-to-end peak RSS (MiB)"]) == 504.6


def test_plot_script_writes_both_figures(tmp_path):
    pytest.importorskip("matplotlib")
    plot_results = load_script()
    plot_results.main(["--out", str(tmp_path)])
    for name in ("losses_cost.png", "lakd_memory.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG")
        assert len(data) < 100_000


@pytest.mark.parametrize(
    "page, image",
    [
        ("RESULTS_losses.md", "losses_cost.png"),
        ("RESULTS_lakd.md", "lakd_memory.png"),
        ("RESULTS_ensembles.md", "ensemble_study.png"),
    ],
)
def test_pages_embed_their_figures(page, image):
    assert f"]({image})" in (BENCHMARKS / page).read_text(encoding="utf-8")
    assert (BENCHMARKS / image).is_file()

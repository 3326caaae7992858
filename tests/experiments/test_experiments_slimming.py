"""The network-slimming study in its quick form: the three tables, the |γ| report and the plot."""

import csv

import numpy as np
import pytest

from experiments import slimming


def test_slimming_quick_run_prints_the_tables_and_drives_gamma_down(tmp_path, capsys):
    payload = slimming.main(["--quick", "--no-progress", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    for title in ("accuracy", "parameters", "FLOPs (one example)", "BatchNorm scales: fraction with |γ| < 0.01"):
        assert f"\n{title}\n" in out
    names = [row["model"] for row in payload["rows"]]
    ratios = ["30%", "50%", "70%"]
    assert names == ["original", "sparse (s=0.05)"] + [
        n for r in ratios for n in (f"pruned {r}", f"pruned {r} + fine-tune")
    ]
    rows = {row["model"]: row for row in payload["rows"]}
    for row in payload["rows"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and np.isfinite(row["test_loss"])
    # sparsity training changes no size; pruning more removes more; fine-tuning keeps the size
    assert rows["sparse (s=0.05)"]["params"] == rows["original"]["params"]
    params = [rows[f"pruned {r}"]["params"] for r in ratios]
    flops = [rows[f"pruned {r}"]["flops"] for r in ratios]
    assert params == sorted(params, reverse=True) and params[0] < rows["original"]["params"]
    assert flops == sorted(flops, reverse=True) and flops[0] < rows["original"]["flops"]
    for r in ratios:
        assert rows[f"pruned {r} + fine-tune"]["params"] == rows[f"pruned {r}"]["params"]
        assert rows[f"pruned {r}"]["params_ratio"] == pytest.approx(
            rows[f"pruned {r}"]["params"] / rows["original"]["params"]
        )
    # L1 on the BatchNorm scales pushes γ towards zero
    small, median = payload["small_gamma_fraction"], payload["median_gamma"]
    assert small["sparse"] > small["original"]
    assert median["sparse"] < 0.5 * median["original"]
    with open(payload["files"]["table"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["model"] for row in table] == names and {"params", "flops", "test_accuracy"} <= set(table[0])
    assert payload["timing"]["total_seconds"] > 0  # recorded; speed belongs in benchmarks/, not in a test


def test_slimming_plot_of_sorted_gammas(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import image

    payload = slimming.main(
        ["--quick", "--no-progress", "--results", str(tmp_path), "--ratios", "0.5", "--epochs", "2"]
    )
    pixels = image.imread(payload["files"]["figure"])
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and float(np.asarray(pixels).std()) > 0.01


def test_slimming_shows_help(capsys):
    with pytest.raises(SystemExit) as done:
        slimming.main(["--help"])
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out

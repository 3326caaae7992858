"""Smoke-sized runs of every study (outputs exist and are well-formed), the removal order of the
criteria comparison, and the data loaders (MNIST-format files written here; CIFAR-10 only with a
real copy). Everything is written under pytest's tmp_path, never into the repository."""

import csv
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

from experiments import compare_criteria, low_data, prune_during_training, prune_untrained
from experiments.common import removal_order, reproducible
from experiments.data import load_dataset, read_idx

TINY_CNN = ["--epochs", "1", "--widths", "4,6", "--hidden", "8", "--no-progress", "--batch-size", "128"]


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _png_ok(path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import image

    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.asarray(pixels).std()) > 0.01  # not a blank canvas


def test_compare_criteria_smoke_and_removal_order(tmp_path):
    payload = compare_criteria.main(
        [
            "--results",
            str(tmp_path),
            *TINY_CNN,
            "--criteria",
            "random,weight_norm,taylor,shapley,shapley_2std",
            "--n-seeds",
            "2",
            "--sv-samples",
            "1",
            "--verify-points",
            "1",
            "--train-seeds",
            "1",
        ]
    )
    folder = tmp_path / "compare_criteria" / "digits_cnn_seed0"
    curves = _rows(folder / "curves.csv")
    summary = _rows(folder / "summary.csv")
    assert set(curves[0]) == {
        "model_seed",
        "layer",
        "criterion",
        "seed",
        "removed",
        "unit",
        "test_loss",
        "test_accuracy",
    }
    assert {row["criterion"] for row in summary} == {"random", "weight_norm", "taylor", "shapley", "shapley_2std"}
    assert {row["seeds"] for row in summary if row["criterion"] in ("random", "shapley")} == {"2"}
    _png_ok(folder / "compare_criteria.png")
    results = json.loads((folder / "results.json").read_text())
    assert {"summary", "curves", "verification", "timing"} <= set(results)
    assert results["verification"]["max_abs_loss_diff"] < 1e-4  # masked removal == real removal

    # The removal order really is the score order: lowest score first, every unit once.
    for curve in payload["curves"]:
        scores = np.asarray(curve["scores"])
        removed = [
            int(row["unit"])
            for row in curves
            if row["layer"] == curve["layer"]
            and row["criterion"] == curve["criterion"]
            and int(row["seed"]) == curve["seed"]
            and int(row["removed"]) > 0
        ]
        assert removed == curve["order"][: len(removed)]
        assert len(removed) == curve["units"] - 1 and len(set(removed)) == len(removed)
        assert np.all(np.diff(scores[removed]) >= 0)
    # Recorded scores are the metric's: weight norm recomputed from the cached trained model.
    from experiments.models import load_or_train
    from torchpruner import WeightNormAttributionMetric

    splits = load_dataset("digits")
    with reproducible(1):  # the checkpoint's recipe names the thread count it was trained with
        model, info = load_or_train(
            "cnn",
            splits,
            tmp_path,
            epochs=1,
            batch_size=128,
            model_options={"widths": (4, 6), "hidden": 8},
            progress=False,
        )
    assert info["cached"]
    recorded = next(c for c in payload["curves"] if c["criterion"] == "weight_norm" and c["layer"] == "conv2")
    expected = WeightNormAttributionMetric(model, None, None, "cpu").run(model.conv2)
    np.testing.assert_allclose(recorded["scores"], expected, rtol=1e-6)


def test_removal_order_breaks_ties_by_index():
    assert removal_order(np.array([0.5, 0.1, 0.5, -1.0])).tolist() == [3, 1, 0, 2]


def test_prune_during_training_smoke(tmp_path):
    payload = prune_during_training.main(
        [
            "--results",
            str(tmp_path),
            *TINY_CNN,
            "--epochs",
            "3",
            "--every",
            "1",
            "--events",
            "2",
            "--fraction",
            "0.3",
            "--criterion",
            "weight_norm",
            "--latency-batch",
            "8",
        ]
    )
    folder = next((tmp_path / "prune_during_training").iterdir())
    history = _rows(folder / "history.csv")
    assert {"variant", "epoch", "test_accuracy", "params", "flops", "latency_ms"} <= set(history[0])
    pruned = [row for row in history if row["variant"] == "pruned"]
    params = [int(row["params"]) for row in pruned]
    assert params[0] > params[1] > params[2] == params[3]  # rows are epochs 0..3; pruned after epochs 1 and 2
    summary = {row["variant"]: row for row in _rows(folder / "summary.csv")}
    assert summary["scratch"]["params"] == summary["pruned"]["params"] != summary["unpruned"]["params"]
    _png_ok(next(folder.glob("*.png")))
    assert payload is not None


def _t_interval(values):
    """Mean and 95% t-interval, computed here with the tabulated t quantiles (independent of experiments.stats)."""
    quantiles = {1: 12.7062047362, 2: 4.3026527297}
    values = np.asarray(values, dtype=np.float64)
    half = quantiles[len(values) - 1] * values.std(ddof=1) / np.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


def test_low_data_smoke_with_intervals_over_seeds(tmp_path, monkeypatch):
    drawn = []

    def few_per_class(dataset, per_class, seed=0):
        drawn.append((per_class, seed))
        return real_few_per_class(dataset, per_class, seed=seed)

    real_few_per_class = low_data.few_per_class
    monkeypatch.setattr(low_data, "few_per_class", few_per_class)
    payload = low_data.main(
        [
            "--results",
            str(tmp_path),
            *TINY_CNN,
            "--criteria",
            "random,weight_norm",
            "--keep",
            "0.5,1.0",
            "--per-class",
            "2",
            "--finetune-epochs",
            "1",
            "--n-seeds",
            "2",
        ]
    )
    assert drawn == [(2, 0), (2, 1)]  # one subset per seed
    folder = next((tmp_path / "low_data").iterdir())
    runs = _rows(folder / "runs.csv")
    assert len(runs) == 2 * 2 * 2  # every criterion (seeded or not) x 2 seeds (each its own subset) x 2 keep ratios
    full = [row for row in runs if float(row["keep"]) == 1.0]
    half = [row for row in runs if float(row["keep"]) == 0.5]
    assert len({row["params"] for row in full}) == 1 and int(half[0]["params"]) < int(full[0]["params"])
    assert all(0.0 <= float(row["accuracy"]) <= 1.0 for row in runs)
    results = json.loads((folder / "results.json").read_text())
    assert results["per_class"] == 2 and len(results["summary"]) == 4 and results["seeds"] == [0, 1]
    # the summary's intervals and paired differences, recomputed from the per-run rows
    summary = {(row["criterion"], float(row["keep"])): row for row in _rows(folder / "summary.csv")}
    for (criterion, keep), row in summary.items():
        assert int(row["seeds"]) == 2
        for column in ("accuracy", "accuracy_finetuned"):
            mine = {
                r["seed"]: float(r[column]) for r in runs if r["criterion"] == criterion and float(r["keep"]) == keep
            }
            reference = {
                r["seed"]: float(r[column]) for r in runs if r["criterion"] == "random" and float(r["keep"]) == keep
            }
            expected = _t_interval(list(mine.values()))
            got = [float(row[column + suffix]) for suffix in ("", "_low", "_high")]
            assert np.allclose(got, expected, atol=1e-9, equal_nan=True)
            difference = [float(row[column + "_minus_random" + s]) for s in ("", "_low", "_high")]
            if criterion == "random":
                assert np.isnan(difference).all()
            else:
                expected = _t_interval([mine[seed] - reference[seed] for seed in mine])
                assert np.allclose(difference, expected, atol=1e-9, equal_nan=True)
    assert "95% t-interval over 2 seeds" in payload["table"] and "minus random" in payload["table"]
    _png_ok(folder / "low_data.png")


def test_low_data_seeds_draw_their_own_subsets():
    from experiments.data import few_per_class

    train = load_dataset("digits").train
    first, second = (set(few_per_class(train, 3, seed=seed).indices) for seed in (0, 1))
    assert len(first) == len(second) == 30 and first != second


def test_low_data_refuses_no_seeds(tmp_path):
    with pytest.raises(SystemExit, match="--n-seeds"):
        low_data.main(["--results", str(tmp_path), *TINY_CNN, "--n-seeds", "0"])


def test_prune_untrained_smoke_with_intervals_over_initialisations(tmp_path):
    payload = prune_untrained.main(
        [
            "--results",
            str(tmp_path),
            "--hidden",
            "12,10",
            "--n-seeds",
            "2",
            "--sv-samples",
            "2",
            "--score-examples",
            "64",
            "--no-progress",
        ]
    )
    runs = payload["runs"]
    assert [run["seed"] for run in runs] == [0, 1]
    for run in runs:
        assert run["params_after"] < run["params_before"]
        widths = [int(w) for w in run["widths_after"].split("/")]
        assert all(1 <= w for w in widths) and widths != [12, 10]
    folder = next((tmp_path / "prune_untrained").iterdir())
    assert _rows(folder / "runs.csv")[0]["widths_before"] == "12/10"
    summary = {row["quantity"]: row for row in _rows(folder / "summary.csv")}
    assert set(summary) == {"params", "loss", "accuracy"}
    for quantity, row in summary.items():
        before = [run[quantity + "_before"] for run in runs]
        after = [run[quantity + "_after"] for run in runs]
        for key, values in (("before", before), ("after", after), ("change", [a - b for a, b in zip(after, before)])):
            got = [float(row[key + suffix]) for suffix in ("", "_low", "_high")]
            assert np.allclose(got, _t_interval(values), atol=1e-6)
    assert "95% t-interval over 2 initialisations" in payload["table"]
    _png_ok(folder / "prune_untrained.png")


def _write_idx(path, array, compress=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    array = np.asarray(array)
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def _in_val(index, splits, train_images):
    """Whether raw training image ``index`` went to the validation split (matched by its pixels)."""
    val = splits.val.tensors[0][:, 0].numpy()
    raw = train_images[index] / 255.0
    ordered = np.corrcoef(val.reshape(len(val), -1), raw.reshape(1, -1))[-1, :-1]
    return bool(np.any(ordered > 1 - 1e-6))


@pytest.mark.parametrize("name, folder, compress", [("mnist", "MNIST", False), ("fashion-mnist", "FashionMNIST", True)])
def test_idx_loader_reads_torchvision_layout(tmp_path, name, folder, compress):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    train_images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    train_labels = np.tile(np.arange(10, dtype=np.uint8), 6)
    test_images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    test_labels = np.tile(np.arange(10, dtype=np.uint8), 2)
    _write_idx(raw / "train-images-idx3-ubyte", train_images, compress)
    _write_idx(raw / "train-labels-idx1-ubyte", train_labels, compress)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_images, compress)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_labels, compress)
    suffix = ".gz" if compress else ""
    np.testing.assert_array_equal(read_idx(raw / f"train-labels-idx1-ubyte{suffix}"), train_labels)
    splits = load_dataset(name, tmp_path, val_size=10)
    assert splits.input_size == (1, 28, 28) and splits.num_classes == 10
    assert len(splits.train) == 50 and len(splits.val) == 10 and len(splits.test) == 20
    images, labels = splits.test.tensors
    # standardised with the training split's statistics (pixels scaled to [0, 1] first)
    train_pixels = splits.train.tensors[0]
    assert images.dtype == torch.float32 and abs(float(train_pixels.mean())) < 1e-4
    assert abs(float(train_pixels.std()) - 1.0) < 1e-2
    fit = train_images[[i for i in range(60) if not _in_val(i, splits, train_images)]] / 255.0
    np.testing.assert_allclose(
        images[3, 0].numpy(), (test_images[3] / 255.0 - fit.mean()) / fit.std(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_array_equal(labels.numpy(), test_labels)
    assert sorted(np.bincount(splits.val.tensors[1].numpy()).tolist()) == [1] * 10  # stratified


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.skipif(not os.environ.get("CIFAR10_ROOT"), reason="needs a real CIFAR-10 copy in $CIFAR10_ROOT")
def test_cifar10_real_copy():
    splits = load_dataset("cifar10", os.environ["CIFAR10_ROOT"])
    assert splits.input_size == (3, 32, 32) and len(splits.test) == 10000


@pytest.mark.parametrize("script", ["compare_criteria", "prune_during_training", "low_data", "prune_untrained"])
def test_scripts_show_help(script, capsys):
    module = {
        "compare_criteria": compare_criteria,
        "prune_during_training": prune_during_training,
        "low_data": low_data,
        "prune_untrained": prune_untrained,
    }[script]
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--seed" in text and "--device" in text and "--results" in text and "--no-progress" in text


def test_script_runs_as_a_file(tmp_path):
    """``python experiments/X.py`` works from any folder (the script puts the repository on sys.path)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "experiments" / "prune_untrained.py"
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "--seed" in done.stdout


def test_ddp_prune_smoke_gloo(tmp_path):
    """experiments/ddp_prune.py on spawned CPU ranks, under a hard timeout (a hang fails). One rank keeps it
    cheap; tests/test_distributed.py checks two ranks against single-process references."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable,
        "-m",
        "experiments.ddp_prune",
        "--epochs",
        "2",
        "--prune-epoch",
        "1",
        "--widths",
        "4,6",
        "--hidden",
        "8",
        "--nproc",
        "1",
        "--results",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters identical on every rank: True" in done.stdout
    results = json.loads((tmp_path / "ddp_prune" / "results.json").read_text())
    assert results["rows"][0]["pruned"] == "yes"  # at the end of epoch 1
    assert results["rows"][1]["parameters"] == results["rows"][0]["parameters"] < results["parameters_before"]
    assert results["prune_seconds"] > 0 and 0.0 <= results["test_accuracy"] <= 1.0

"""The criteria study is reproducible by construction (same torch version and threads: the same
tables, bitwise), averages over trained models exactly as separate runs would, and its paired
statistics are the ones recomputed here from the recorded curves."""

import numpy as np
import pytest
import torch

from experiments import compare_criteria
from experiments.stats import bootstrap_ci, sign_test

TINY = [
    "--epochs",
    "1",
    "--widths",
    "4,6",
    "--hidden",
    "8",
    "--no-progress",
    "--batch-size",
    "128",
    "--criteria",
    "random,weight_norm,bn_scale,taylor,shapley",
    "--n-seeds",
    "2",
    "--sv-samples",
    "1",
    "--verify-points",
    "0",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """The same two-model study run twice, each in a fresh results folder (so each trains)."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    runs = [
        compare_criteria.main(["--results", str(tmp_path_factory.mktemp(f"run{i}")), *TINY, "--train-seeds", "2"])
        for i in range(2)
    ]
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    return runs, before, after


def test_two_fresh_runs_print_identical_tables(two_models):
    (first, second), _, _ = two_models
    assert not any(model["cached"] for run in (first, second) for model in run["models"])  # both trained
    assert first["tables"] == second["tables"]
    assert [c["loss_increase"] for c in first["curves"]] == [c["loss_increase"] for c in second["curves"]]
    for a, b in zip(first["models"], second["models"]):
        weights_a = torch.load(a["checkpoint"], weights_only=True)
        weights_b = torch.load(b["checkpoint"], weights_only=True)
        assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    assert first["environment"]["threads"] == 1 and first["environment"]["deterministic"]


def test_the_study_leaves_torch_settings_as_it_found_them(two_models):
    _, before, after = two_models
    assert after == before


def test_checkpoints_name_what_their_weights_depend_on(two_models):
    recipe = two_models[0][0]["models"][0]["recipe"]
    assert (recipe["torch"], recipe["threads"], recipe["device"]) == (torch.__version__, 1, "cpu")


def test_averaged_run_is_the_separate_runs_model_for_model(two_models, tmp_path):
    single = compare_criteria.main(["--results", str(tmp_path), *TINY, "--train-seeds", "1", "--seed", "1"])
    assert not single["models"][0]["cached"]
    from_average = [c for c in two_models[0][0]["curves"] if c["model_seed"] == 1]
    assert [(c["layer"], c["criterion"], c["seed"], c["order"], c["loss_increase"]) for c in from_average] == [
        (c["layer"], c["criterion"], c["seed"], c["order"], c["loss_increase"]) for c in single["curves"]
    ]


def test_paired_statistics_are_recomputed_from_the_curves(two_models):
    payload = two_models[0][0]
    curves = payload["curves"]

    def per_pair(name):
        pairs = {}
        for c in curves:
            if c["criterion"] == name:
                pairs.setdefault((c["model_seed"], c["layer"]), []).append(c["loss_increase"])
        return {pair: sum(v) / len(v) for pair, v in pairs.items()}

    random = per_pair("random")
    for row in payload["paired"]:
        if row["reference"] != "random":
            continue
        mine = per_pair(row["criterion"])
        differences = np.array([mine[p] - random[p] for p in sorted(mine)])
        assert row["pairs"] == len(differences) == (4 if row["criterion"] == "bn_scale" else 6)
        assert row["mean_difference"] == pytest.approx(differences.mean(), rel=1e-12)
        test = sign_test(differences)
        assert (row["lower"], row["higher"], row["p_value"]) == (test.negative, test.positive, test.p_value)
        assert (row["ci_low"], row["ci_high"]) == bootstrap_ci(differences, 0.95, 10000, 0)
        excludes_zero = not row["ci_low"] <= 0.0 <= row["ci_high"]
        assert (row["significant"] != "") == (row["p_value"] < 0.05 and excludes_zero)
    # The summary's mean is the mean over models of the mean over layers.
    taylor = per_pair("taylor")
    row = next(r for r in payload["summary"] if r["criterion"] == "taylor")
    by_model = [np.mean([v for (m, _), v in taylor.items() if m == seed]) for seed in (0, 1)]
    assert row["loss_increase"] == pytest.approx(np.mean(by_model), rel=1e-12)
    assert row["loss_increase_low"] < row["loss_increase"] < row["loss_increase_high"]


def test_bn_scale_scores_the_conv_layers_by_their_batchnorm_and_skips_fc1(two_models):
    payload = two_models[0][0]
    assert {c["layer"] for c in payload["curves"] if c["criterion"] == "bn_scale"} == {"conv1", "conv2"}
    model_info = payload["models"][0]
    state = torch.load(model_info["checkpoint"], weights_only=True)
    recorded = next(
        c for c in payload["curves"] if c["criterion"] == "bn_scale" and c["layer"] == "conv2" and c["model_seed"] == 0
    )
    np.testing.assert_allclose(recorded["scores"], state["bn2.weight"].abs().double().numpy(), rtol=1e-12)


def test_paired_comparisons_mark_significance_by_sign_test_and_interval():
    # 3 models x 3 layers; "clear" is lower than random on all 9 pairs, "mostly" on 8 of 9, "noise" on 5.
    rng = np.random.default_rng(0)
    curves = []
    for model_seed in range(3):
        for layer in ("a", "b", "c"):
            base = float(rng.uniform(0.5, 1.0))
            index = 3 * model_seed + "abc".index(layer)
            for name, value in (
                ("random", base),
                ("clear", base - 0.2),
                ("mostly", base - (0.2 if index else -0.01)),
                ("noise", base + (0.01 if index % 2 else -0.01)),
            ):
                curves.append(
                    {
                        "model_seed": model_seed,
                        "layer": layer,
                        "criterion": name,
                        "seed": 0,
                        "loss_increase": value,
                        "accuracy_drop": 0.0,
                    }
                )
    rows = {
        row["criterion"]: row
        for row in compare_criteria.paired_comparisons(curves, ["random", "clear", "mostly", "noise"], "random")
    }
    assert (rows["clear"]["lower"], rows["clear"]["p_value"], rows["clear"]["significant"]) == (9, 2 / 512, "**")
    assert (rows["mostly"]["lower"], rows["mostly"]["significant"]) == (8, "*")  # p = 20/512 > 0.05/3
    assert rows["mostly"]["p_value"] == pytest.approx(20 / 512)
    assert (rows["noise"]["lower"], rows["noise"]["higher"], rows["noise"]["significant"]) == (5, 4, "")
    summary = compare_criteria.summarise(curves, ["random", "clear", "mostly", "noise"], {})
    assert [row["criterion"] for row in summary][:2] == ["clear", "mostly"]
    assert compare_criteria.best_criterion(summary) == "clear"


def test_combined_single_model_runs_print_the_averaged_tables(two_models, tmp_path):
    singles = [
        compare_criteria.main(["--results", str(tmp_path), *TINY, "--train-seeds", "1", "--seed", str(seed)])
        for seed in (1, 0)
    ]  # any order
    combined = compare_criteria.main(
        ["--results", str(tmp_path), "--combine", *[single["files"]["results"] for single in singles]]
    )
    together = two_models[0][0]
    assert combined["tables"] == together["tables"]
    untimed = [
        [{k: v for k, v in row.items() if k != "score_seconds"} for row in payload["summary"]]
        for payload in (combined, together)
    ]
    assert untimed[0] == untimed[1] and combined["paired"] == together["paired"]
    assert (tmp_path / "compare_criteria" / "digits_cnn_seeds0-1_combined" / "compare_criteria.png").is_file()
    other = compare_criteria.main(
        ["--results", str(tmp_path / "other"), *TINY, "--train-seeds", "1", "--seed", "0", "--sv-samples", "2"]
    )
    with pytest.raises(SystemExit, match="sv_samples"):
        compare_criteria.main(
            ["--results", str(tmp_path), "--combine", singles[0]["files"]["results"], other["files"]["results"]]
        )
    with pytest.raises(SystemExit, match="more than once"):
        compare_criteria.main(
            ["--results", str(tmp_path), "--combine", singles[1]["files"]["results"], singles[1]["files"]["results"]]
        )

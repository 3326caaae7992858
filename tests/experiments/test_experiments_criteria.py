"""Every criterion of the criteria study: the two captum rows are the layer attributions they name
(checked by completeness, independently of captum), and ``--groups`` scores each layer's coupled
group, which for the study's plain-chain models gives the layer's own scores where the group metric
is defined at the same point (Taylor, sensitivity, Shapley, random) and the group's definitions
where they differ (weight norm over every slice removed with the unit, APoZ at what the consumers
read)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import compare_criteria
from experiments.common import DEFAULT_CRITERIA, UnitMask, reproducible
from experiments.data import load_dataset
from experiments.models import load_or_train, prunable_layers

TINY = [
    "--epochs",
    "2",
    "--widths",
    "4,6",
    "--hidden",
    "8",
    "--no-progress",
    "--batch-size",
    "128",
    "--n-seeds",
    "1",
    "--sv-samples",
    "1",
    "--verify-points",
    "1",
    "--train-seeds",
    "1",
]


def test_the_default_study_runs_every_criterion():
    assert {
        "conductance",
        "integrated_gradients",
        "leave_one_out",
        "thinet",
        "fpgm",
        "bn_scale",
        "shapley_2std",
        "taylor_signed",
    } <= set(DEFAULT_CRITERIA)


@torch.no_grad()
def _mean_loss(model, loader, mask=None, zero_input=False):
    total, count = 0.0, 0
    for inputs, targets in loader:
        inputs = torch.zeros_like(inputs) if zero_input else inputs
        if mask is None:
            logits = model(inputs)
        else:
            with mask:
                logits = model(inputs)
        total += F.cross_entropy(logits.double(), targets, reduction="sum").item()
        count += len(targets)
    return total / count


def test_captum_rows_are_complete_attributions_of_the_loss(tmp_path):
    payload = compare_criteria.main(
        ["--results", str(tmp_path), *TINY, "--criteria", "random,conductance,integrated_gradients"]
    )
    splits = load_dataset("digits")
    with reproducible(1):
        model, _ = load_or_train(
            "cnn",
            splits,
            tmp_path,
            epochs=2,
            batch_size=128,
            model_options={"widths": (4, 6), "hidden": 8},
            progress=False,
        )
    _, val_loader, _ = splits.loaders(batch_size=128)
    loss = _mean_loss(model, val_loader)
    for layer in prunable_layers(model):
        scores = {c["criterion"]: np.sum(c["scores"]) for c in payload["curves"] if c["layer"] == layer.name}
        # integrated gradients of -loss at the activation from a zero activation: the scores sum to
        # loss(every unit zeroed) - loss(model)
        mask = UnitMask(layer.activation, layer.num_units)
        mask.drop(range(layer.num_units))
        assert scores["integrated_gradients"] == pytest.approx(_mean_loss(model, val_loader, mask) - loss, rel=0.03)
        # conductance follows the path from a zero input: the scores sum to loss(zero input) - loss(model)
        assert scores["conductance"] == pytest.approx(_mean_loss(model, val_loader, zero_input=True) - loss, rel=0.03)


def test_groups_mode_scores_the_chain_groups(tmp_path):
    criteria = "random,weight_norm,apoz,sensitivity,taylor,shapley,bn_scale,conductance"
    layers = compare_criteria.main(["--results", str(tmp_path), *TINY, "--criteria", criteria])
    groups = compare_criteria.main(["--results", str(tmp_path), *TINY, "--criteria", criteria, "--groups"])
    assert "each layer scored as its coupled group" in groups["tables"]
    by_layer = {(c["layer"], c["criterion"]): np.asarray(c["scores"]) for c in layers["curves"]}
    by_group = {(c["layer"], c["criterion"]): np.asarray(c["scores"]) for c in groups["curves"]}
    assert {name for _, name in by_group} == set(criteria.split(",")) - {"conductance"}  # captum: no groups
    assert set(by_group) == {key for key in by_layer if key[1] != "conductance"}  # bn_scale: the conv layers only
    for (layer, name), scores in by_group.items():
        # APoZ of a group counts zeros in what the consumers read: after conv2's max pool, not at its ReLU
        if name in ("random", "sensitivity", "taylor", "shapley") or (name == "apoz" and layer != "conv2"):
            np.testing.assert_allclose(scores, by_layer[layer, name], rtol=1e-5, atol=1e-7, err_msg=f"{layer} {name}")
    assert np.all(by_group["conv2", "apoz"] >= by_layer["conv2", "apoz"])  # a max over a window is positive more often
    # the group weight norm also counts the consumer's input columns, normalised per layer
    assert not np.allclose(by_group["conv1", "weight_norm"], by_layer["conv1", "weight_norm"])
    assert groups["verification"]["max_abs_loss_diff"] < 1e-4  # plan_groups removes what the mask zeroes

"""Checkpoints and schedules refuse bad input before anything changes.

- ``load_pruned`` checks the manifest and the state dict against each other (stale manifest, extra
  or missing key, wrong-shaped tensor) on a copy before the fresh model is resized; a manifest that
  is not a JSON object, a malformed ``param:`` record or an impossible Dropout ``p`` is refused.
- ``prune_groups`` / ``select_units`` / ``IterativePruning`` check their numbers (``round_to``,
  ``fraction``, ``ratios``, ``steps``, ``every``, ``target``, ``min_units``), the layers ``ratios``
  names, and the scores (NaN), before the model, the optimizer or the schedule changes.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.pruner import Pruner
from torchpruner.pruner.checkpoint import load_pruned, pruning_manifest, resize_to_manifest, save_pruned
from torchpruner.schedule import IterativePruning, prune_groups, select_units

from oracles import assert_state_matches, assert_unchanged, snapshot


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.conv2(h)).mean((2, 3))
        return self.fc(self.drop(h))


def _pruned(conv1_units=(1, 2), conv2_units=(0,)):
    torch.manual_seed(0)
    net = ConvNet()
    pruner = Pruner(net, input_size=(3, 6, 6))
    pruner.prune_model(net.conv1, list(conv1_units))
    if conv2_units:
        pruner.prune_model(net.conv2, list(conv2_units))
    return net.eval()


def _fresh():
    torch.manual_seed(1)
    return ConvNet()


def _refused_load(path, error, match):
    """``load_pruned`` raises ``error`` matching ``match`` and leaves the fresh model bit for bit as it was."""
    fresh = _fresh()
    before = snapshot(fresh)
    with pytest.raises(error, match=match):
        load_pruned(fresh, path)
    assert_unchanged(before, fresh)


def test_the_round_trip_still_loads(tmp_path):
    net = _pruned()
    save_pruned(net, tmp_path / "net.pt")
    fresh = load_pruned(_fresh(), tmp_path / "net.pt")
    assert repr(fresh) == repr(net)
    assert_state_matches(fresh, net)


def test_a_stale_manifest_is_refused_before_the_model_is_resized(tmp_path):
    save_pruned(_pruned(), tmp_path / "net.pt")
    # the weights of a later, further pruned model next to the earlier manifest
    torch.save(_pruned(conv2_units=(0, 4)).state_dict(), tmp_path / "net.pt")
    _refused_load(tmp_path / "net.pt", ValueError, r"conv2\.weight.*\[4, 6, 3, 3\].*\[5, 6, 3, 3\]")


def _add_a_key(state):
    state["head.weight"] = torch.zeros(2)


def _drop_a_key(state):
    del state["fc.bias"]


def _reshape_a_tensor(state):
    state["fc.weight"] = torch.zeros(3, 7)


@pytest.mark.parametrize(
    "edit, match",
    [
        (_add_a_key, r"unexpected.*'head\.weight'"),
        (_drop_a_key, r"missing.*'fc\.bias'"),
        (_reshape_a_tensor, r"fc\.weight.*\[3, 7\].*\[3, 5\]"),
    ],
)
def test_a_state_dict_that_does_not_fit_the_manifest_is_refused(tmp_path, edit, match):
    net = _pruned()
    save_pruned(net, tmp_path / "net.pt")
    state = net.state_dict()
    edit(state)
    torch.save(state, tmp_path / "net.pt")
    _refused_load(tmp_path / "net.pt", ValueError, match)


def test_a_state_dict_that_is_not_a_dict_is_refused(tmp_path):
    net = _pruned()
    save_pruned(net, tmp_path / "net.pt")
    torch.save([net.fc.weight.detach()], tmp_path / "net.pt")
    _refused_load(tmp_path / "net.pt", TypeError, "state dict")


@pytest.mark.parametrize("text", ["[]", "null", "3", '"kept_units"'])
def test_a_manifest_that_is_not_a_json_object_is_refused(tmp_path, text):
    net = _pruned()
    manifest_path = save_pruned(net, tmp_path / "net.pt")
    manifest_path.write_text(text)
    _refused_load(tmp_path / "net.pt", TypeError, "manifest must be a JSON object")
    fresh = _fresh()
    before = snapshot(fresh)
    with pytest.raises(TypeError, match="manifest must be a JSON object"):
        resize_to_manifest(fresh, json.loads(text))
    assert_unchanged(before, fresh)


def test_a_manifest_that_is_not_json_names_the_file(tmp_path):
    manifest_path = save_pruned(_pruned(), tmp_path / "net.pt")
    manifest_path.write_text("{not json")
    _refused_load(tmp_path / "net.pt", ValueError, "net.pt.manifest.json")


@pytest.mark.parametrize(
    "key", ["param:weight", "param::0", "param:weight:x", "param:weight:0:1", "param:weight:1.0", "sideways"]
)
def test_a_malformed_record_key_is_refused(key):
    manifest = pruning_manifest(_pruned())
    manifest["kept_units"]["conv1"][key] = [0, 1]
    fresh = _fresh()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=f"'conv1'.*'{key}'"):
        resize_to_manifest(fresh, manifest)
    assert_unchanged(before, fresh)


@pytest.mark.parametrize("p", [5.0, -1.0, float("nan"), True, "0.5"])
def test_an_impossible_dropout_p_is_refused(tmp_path, p):
    net = _pruned()
    manifest_path = save_pruned(net, tmp_path / "net.pt")
    manifest = json.loads(manifest_path.read_text())
    manifest["dropout_p"]["drop"] = p
    manifest_path.write_text(json.dumps(manifest))
    _refused_load(tmp_path / "net.pt", ValueError, r"'drop'.*p.*\[0, 1\]")


def test_a_dropout_p_for_a_layer_the_model_lacks_is_refused():
    manifest = pruning_manifest(_pruned())
    manifest["dropout_p"]["head_drop"] = 0.1
    fresh = _fresh()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="'head_drop'"):
        resize_to_manifest(fresh, manifest)
    assert_unchanged(before, fresh)


@pytest.mark.parametrize("ids", [[0, 1.5], [0, True], "012", [0, 0, 3]])
def test_kept_ids_that_are_not_distinct_integers_are_refused(ids):
    manifest = pruning_manifest(_pruned())
    manifest["kept_units"]["conv1"]["out"] = ids
    fresh = _fresh()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="'conv1'"):
        resize_to_manifest(fresh, manifest)
    assert_unchanged(before, fresh)


# --------------------------------------------------------------------------------------------
# prune_groups / select_units
# --------------------------------------------------------------------------------------------


def _mlp_with_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(5, 4)), torch.tensor([0, 1, 0, 1, 1])).backward()
    optimizer.step()
    return model, optimizer, Pruner(model, input_size=(4,), optimizer=optimizer)


def _refused_prune(error, match, ratios_of=None, **kwargs):
    """``prune_groups(pruner, **kwargs)`` on a trained MLP raises ``error`` matching ``match`` ({0}, {1}:
    the indices of its two groups) and changes neither model nor optimizer; ``ratios_of(model)`` gives
    ``ratios``."""
    model, optimizer, pruner = _mlp_with_optimizer()
    match = match.format(*(group.index for group in pruner.groups()))
    if ratios_of is not None:
        kwargs["ratios"] = ratios_of(model)
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        prune_groups(pruner, **kwargs)
    assert_unchanged(before, model, optimizer)
    return model, pruner


@pytest.mark.parametrize(
    "round_to, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (2.0, TypeError), (True, TypeError)]
)
def test_round_to_must_be_a_positive_int(round_to, error):
    _, pruner = _refused_prune(error, "round_to", fraction=0.5, round_to=round_to)
    with pytest.raises(error, match="round_to"):
        select_units(pruner.groups(), fraction=0.5, round_to=round_to)


@pytest.mark.parametrize("min_units, error", [(-1, ValueError), (1.5, TypeError), (False, TypeError)])
def test_min_units_must_be_a_non_negative_int(min_units, error):
    _refused_prune(error, "min_units", fraction=0.5, min_units=min_units)


@pytest.mark.parametrize(
    "fraction, error",
    [
        (1.5, ValueError),
        (1.0, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("0.3", TypeError),
    ],
)
def test_fraction_must_be_in_zero_one(fraction, error):
    _refused_prune(error, "fraction", fraction=fraction)


@pytest.mark.parametrize(
    "ratio, error",
    [
        (1.5, ValueError),
        (1.0, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_a_ratio_outside_zero_one_is_refused_naming_the_layer(ratio, error):
    model, _, pruner = _mlp_with_optimizer()
    before = snapshot(model)
    with pytest.raises(error, match=r"ratios.*'0'"):
        prune_groups(pruner, fraction=0.0, ratios={model[0]: ratio})
    assert_unchanged(before, model)
    with pytest.raises(error, match="ratios"):
        select_units(pruner.groups(), fraction=0.0, ratios={model[0]: ratio})


def test_a_ratio_for_a_layer_of_another_model_is_refused():
    other = nn.Linear(4, 8)
    _, pruner = _refused_prune(
        ValueError,
        r"ratios.*not a layer of the pruner's model.*Linear\(in_features=4",
        fraction=0.0,
        ratios={other: 0.5},
    )
    with pytest.raises(ValueError, match=r"ratios.*Linear\(in_features=4"):
        select_units(pruner.groups(), fraction=0.0, ratios={other: 0.5})


def test_a_ratio_for_a_layer_that_is_no_group_source_is_refused():
    # the classifier's outputs are left out by default; a ReLU owns no units
    _refused_prune(ValueError, r"ratios.*'4'.*include_outputs", fraction=0.0, ratios_of=lambda model: {model[4]: 0.5})
    _refused_prune(ValueError, r"ratios.*'1'", fraction=0.0, ratios_of=lambda model: {model[1]: 0.5})
    model, _, pruner = _mlp_with_optimizer()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ratios.*'0'.*ignored"):
        prune_groups(pruner, fraction=0.0, ratios={model[0]: 0.5}, ignored_layers=[model[0]])
    assert_unchanged(before, model)


def test_a_ratios_key_that_is_not_a_module_is_refused():
    _refused_prune(TypeError, "ratios", fraction=0.0, ratios={"0": 0.5})


def test_ratios_within_range_still_prune():
    model, optimizer, pruner = _mlp_with_optimizer()
    prune_groups(pruner, fraction=0.0, ratios={model[0]: 0.5, model[2]: 0.0})
    assert model[0].out_features == 4 and model[2].out_features == 6
    assert optimizer.state[model[0].weight]["momentum_buffer"].shape == model[0].weight.shape


def _nan_in_second_group(group):
    values = np.arange(1.0, group.num_units + 1)
    if group.num_units == 6:
        values[3] = math.nan
    return values


@pytest.mark.parametrize("global_ranking", [True, False])
def test_nan_scores_are_refused_naming_the_group(global_ranking):
    _refused_prune(
        ValueError, r"group {1}.*NaN.*\[3\]", fraction=0.3, scores=_nan_in_second_group, global_ranking=global_ranking
    )


def test_infinite_scores_are_refused_in_a_global_ranking_only():
    def scores(group):
        values = np.arange(1.0, group.num_units + 1)
        values[0] = math.inf  # "never remove unit 0": fine per group, meaningless once normalised
        return values

    _refused_prune(ValueError, r"group {0}.*global_ranking", fraction=0.3, scores=scores, global_ranking=True)
    model, _, pruner = _mlp_with_optimizer()
    prune_groups(pruner, fraction=0.5, scores=scores)
    assert model[0].out_features == 4 and model[2].out_features == 3


# --------------------------------------------------------------------------------------------
# IterativePruning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 2.5}, TypeError, "steps"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": -1}, ValueError, "steps"),
        ({"steps": True}, TypeError, "steps"),
        ({"steps": 2.0}, TypeError, "steps"),
        ({"every": 2.5}, TypeError, "every"),
        ({"every": 0}, ValueError, "every"),
        ({"every": -3}, ValueError, "every"),
        ({"every": True}, TypeError, "every"),
        ({"target": 1.5}, ValueError, "target"),
        ({"target": 1.0}, ValueError, "target"),
        ({"target": -0.2}, ValueError, "target"),
        ({"target": float("nan")}, ValueError, "target"),
        ({"target": True}, TypeError, "target"),
        ({"target": "0.5"}, TypeError, "target"),
        ({"round_to": 0}, ValueError, "round_to"),
        ({"round_to": 1.5}, TypeError, "round_to"),
        ({"min_units": -1}, ValueError, "min_units"),
    ],
)
def test_iterative_pruning_checks_its_arguments(kwargs, error, match):
    model, optimizer, pruner = _mlp_with_optimizer()
    before = snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        IterativePruning(pruner, **{"target": 0.5, "steps": 2, "every": 1, **kwargs})
    assert_unchanged(before, model, optimizer)


def test_a_refused_iterative_event_changes_neither_the_model_nor_the_schedule():
    model, optimizer, pruner = _mlp_with_optimizer()
    schedule = IterativePruning(pruner, target=0.5, steps=2, every=1, scores=_nan_in_second_group)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="NaN"):
        schedule.step()
    assert_unchanged(before, model, optimizer)
    assert (schedule.step_count, schedule.events, schedule.plans) == (0, 0, [])
    schedule.scores = None
    schedule.step()
    assert (schedule.step_count, schedule.events) == (1, 1) and model[0].out_features == 6


@pytest.mark.parametrize("rounding", ["round", "", None, 1, "Floor"])
def test_an_unknown_rounding_is_refused(rounding):
    _, pruner = _refused_prune(ValueError, "rounding", fraction=0.5, rounding=rounding)
    with pytest.raises(ValueError, match="rounding"):
        select_units(pruner.groups(), fraction=0.5, rounding=rounding)
    with pytest.raises(ValueError, match="rounding"):
        IterativePruning(pruner, target=0.5, rounding=rounding)

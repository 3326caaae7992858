"""Checkpoints and schedules refuse bad input before anything changes.

- ``load_pruned`` checks the manifest and the state dict against each other (stale manifest, extra
  or missing key, wrong-shaped tensor) on a copy before the fresh model is resized; a manifest that
  is not a JSON object, a malformed ``param:`` record or an impossible Dropout ``p`` is refused.
- ``prune_groups`` / ``select_units`` / ``IterativePruning`` check their numbers (``round_to``,
  ``fraction``, ``ratios``, ``steps``, ``every``, ``target``, ``min_units``), the layers ``ratios``
  names, and the scores (NaN), before the model, the optimizer or the schedule changes.
"""

import json
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner.pruner import Pruner
from torchpruner.pruner.checkpoint import load_pruned, pruning_manifest, resize_to_manifest, save_pruned

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


@pytest.mark.parametrize("edit, match", [
    (_add_a_key, r"unexpected.*'head\.weight'"),
    (_drop_a_key, r"missing.*'fc\.bias'"),
    (_reshape_a_tensor, r"fc\.weight.*\[3, 7\].*\[3, 5\]"),
])
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


@pytest.mark.parametrize("key", ["param:weight", "param::0", "param:weight:x", "param:weight:0:1", "param:weight:1.0",
                                 "sideways"])
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

"""The oracles themselves can fail: each one rejects a planted defect (float64)."""

import pytest
import torch
import torch.nn as nn

from torchpruner import Pruner

from oracles import (
    assert_prune_equals_zeroed_twin,
    assert_state_matches,
    assert_unchanged,
    kept,
    masked_at_mask_points,
    masked_units,
    rebuilt,
    snapshot,
    train,
    twin_of,
)


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, [(torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))] * 2)
    return model, optimizer


def _edit_value(model, optimizer):
    with torch.no_grad():  # the next float64: one bit
        model[0].weight[0, 0] = torch.nextafter(model[0].weight[0, 0], torch.tensor(1.0, dtype=torch.float64))


def _edit_running_stat(model, optimizer):
    model[1].running_var[2] = torch.nextafter(model[1].running_var[2], torch.tensor(0.0, dtype=torch.float64))


def _edit_grad(model, optimizer):
    model[4].bias.grad = None


def _edit_parameter_object(model, optimizer):
    model[4].bias = nn.Parameter(model[4].bias.detach().clone())


def _edit_attribute(model, optimizer):
    model[0].out_features = 5


def _edit_dropout(model, optimizer):
    model[3].p = 0.1


def _edit_mode(model, optimizer):
    model[1].eval()


def _edit_kept_units(model, optimizer):
    model[0]._torchpruner_kept_units = {"out": [0, 1, 2, 3, 4, 5]}


def _edit_hook(model, optimizer):
    model[2].register_forward_hook(lambda m, i, o: o)


def _edit_optimizer_state(model, optimizer):
    optimizer.state[model[0].weight]["momentum_buffer"][0, 0] += 1


def _edit_optimizer_option(model, optimizer):
    optimizer.param_groups[0]["lr"] = 0.2


EDITS = [
    _edit_value,
    _edit_running_stat,
    _edit_grad,
    _edit_parameter_object,
    _edit_attribute,
    _edit_dropout,
    _edit_mode,
    _edit_kept_units,
    _edit_hook,
    _edit_optimizer_state,
    _edit_optimizer_option,
]


@pytest.mark.parametrize("edit", EDITS, ids=lambda f: f.__name__[len("_edit_") :])
def test_assert_unchanged_sees_every_edit(edit):
    model, optimizer = _trained()
    before = snapshot(model, optimizer)
    assert_unchanged(before, model, optimizer)
    edit(model, optimizer)
    with pytest.raises(AssertionError):
        assert_unchanged(before, model, optimizer)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def test_zeroed_twin_rejects_other_units_and_a_float32_model():
    x = torch.randn(5, 4, dtype=torch.float64)
    model = _mlp()
    assert_prune_equals_zeroed_twin(
        model,
        lambda: Pruner(model, (4,)).prune_model(model[0], [1, 4], [model[2]]),
        lambda twin: masked_units(twin[1], [1, 4]),
        x,
    )
    model = _mlp()
    with pytest.raises(AssertionError):
        assert_prune_equals_zeroed_twin(
            model,
            lambda: Pruner(model, (4,)).prune_model(model[0], [1, 4], [model[2]]),
            lambda twin: masked_units(twin[1], [1, 3]),
            x,
        )
    model = _mlp()
    with pytest.raises(AssertionError):  # mask points of other units
        assert_prune_equals_zeroed_twin(
            model,
            lambda: Pruner(model, (4,)).prune_model(model[0], [1, 4]),
            lambda twin: masked_at_mask_points(twin, (x,), (twin[0], [1, 5])),
            x,
        )
    model = _mlp().float()
    with pytest.raises(AssertionError, match="float64"):
        assert_prune_equals_zeroed_twin(
            model,
            lambda: Pruner(model, (4,)).prune_model(model[0], [1], [model[2]]),
            lambda twin: masked_units(twin[1], [1]),
            x.float(),
        )


def test_state_matches_rejects_a_wrong_slice_and_other_optimizer_state():
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters())
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))] * 2
    train(model, optimizer, data)
    twin, twin_optimizer = twin_of(model, optimizer, lambda m: torch.optim.Adam(m.parameters()))
    Pruner(model, (4,), optimizer=optimizer).prune_model(model[0], [2], [model[2]])
    keep = [0, 1, 3, 4, 5]
    slices = {"0.weight": kept(keep), "0.bias": kept(keep), "2.weight": kept(None, keep)}
    assert_state_matches(model, twin, slices, optimizer=optimizer, reference_optimizer=twin_optimizer)
    with pytest.raises(AssertionError):
        assert_state_matches(model, twin, {**slices, "0.bias": kept([0, 1, 2, 3, 4])})
    train(twin, twin_optimizer, data[:1])  # the twin moves on alone
    with pytest.raises(AssertionError):
        assert_state_matches(
            model, twin, slices, optimizer=optimizer, reference_optimizer=twin_optimizer, rtol=1e-9, atol=1e-12
        )


def test_rebuilt_is_strict():
    model = _mlp()
    small = rebuilt(
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
        model,
        {"0.weight": kept([0, 1, 2, 3, 5]), "0.bias": kept([0, 1, 2, 3, 5]), "2.weight": kept(None, [0, 1, 2, 3, 5])},
    )
    assert torch.equal(small[0].weight, model[0].weight[[0, 1, 2, 3, 5]]) and small[0].weight.dtype == torch.float64
    with pytest.raises(RuntimeError, match="size mismatch"):  # a forgotten slicer
        rebuilt(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), model, {"0.weight": kept(range(5))})

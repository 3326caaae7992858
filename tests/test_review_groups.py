"""Review findings on automatic discovery, coupled groups, prune_groups / IterativePruning and
pruned checkpoints. Each test pins one defect (float64, eval mode where outputs are compared).
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchpruner import IterativePruning, Pruner, load_pruned, save_pruned
from torchpruner.schedule import prune_groups, select_units

from oracles import assert_prune_equals_zeroed_twin, assert_state_matches, assert_unchanged, masked_units, snapshot

torch.set_num_threads(1)
D = torch.float64


# --------------------------------------------------------------------------------------------
# Pruned checkpoints of a group with a bare parameter (position embedding, class token, layer scale)
# --------------------------------------------------------------------------------------------


class TokenNet(nn.Module):
    """Integer tokens -> Embedding + a bare position-embedding Parameter -> token MLP -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.pos = nn.Parameter(torch.randn(1, 5, 6))
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens) + self.pos
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def test_checkpoint_round_trip_of_a_group_with_a_bare_parameter(tmp_path):
    torch.manual_seed(0)
    model = TokenNet().double().eval()
    tokens = torch.randint(0, 10, (2, 5))
    pruner = Pruner(model, example_inputs=tokens)
    twin = copy.deepcopy(model)
    pruner.prune_model(model.emb, [1, 4])  # the embedding stream: emb, pos, fc1 in, fc2 out, head in
    assert model.pos.shape == (1, 5, 4)
    with torch.no_grad():  # zeroed twin: the stream units are zero everywhere (no norm layer here)
        twin.emb.weight[:, [1, 4]] = 0
        twin.pos[..., [1, 4]] = 0
        twin.fc2.weight[[1, 4]] = 0
        twin.fc2.bias[[1, 4]] = 0
        torch.testing.assert_close(model(tokens), twin(tokens), atol=1e-12, rtol=0)
    save_pruned(model, tmp_path / "m.pt")
    fresh = TokenNet().double().eval()
    load_pruned(fresh, tmp_path / "m.pt")
    assert_state_matches(fresh, model)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens), atol=0, rtol=0)
    # the fresh model remembers which position dims it holds: a second round trip works too
    save_pruned(fresh, tmp_path / "f.pt")
    again = TokenNet().double().eval()
    load_pruned(again, tmp_path / "f.pt")
    assert_state_matches(again, model)


# --------------------------------------------------------------------------------------------
# Rounding: fractions of the ORIGINAL units, not one unit less because of binary floats
# --------------------------------------------------------------------------------------------


def mlp(hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


@pytest.mark.parametrize("hidden, target", [(10, 0.7), (20, 0.7), (100, 0.29), (100, 0.57)])
def test_iterative_pruning_reaches_the_target_of_the_original_units(hidden, target):
    model = mlp(hidden)
    schedule = IterativePruning(Pruner(model, input_size=(4,)), target=target, steps=1, every=1)
    schedule.step()
    assert model[0].out_features == hidden - round(target * hidden)  # 10 * (1 - 0.7) is 3.0000000000000004


@pytest.mark.parametrize("hidden, fraction", [(100, 0.29), (100, 0.57), (50, 0.58)])
@pytest.mark.parametrize("global_ranking", [False, True])
def test_prune_groups_fraction_is_not_rounded_down_by_float_error(hidden, fraction, global_ranking):
    model = mlp(hidden)
    groups = Pruner(model, input_size=(4,)).groups()
    selection = select_units(groups, fraction=fraction, global_ranking=global_ranking)
    assert len(selection[groups[0]]) == round(fraction * hidden)  # 0.29 * 100 is 28.999999999999996


@pytest.mark.parametrize(
    "hidden, fraction, rounding, round_to, removed",
    [
        (3, 0.3, "floor", 1, 0),  # 0.9 of a unit: none by default
        (3, 0.3, "nearest", 1, 1),
        (3, 0.1, "nearest", 1, 0),  # 0.3 of a unit
        (3, 0.1, "ceil", 1, 1),
        (4, 0.125, "nearest", 1, 1),  # a half rounds up
        (25, 0.28, "ceil", 1, 7),  # 25 * 0.28 is 7.000000000000001: not 8
        (25, 0.58, "nearest", 1, 15),  # 25 * 0.58 is 14.499999999999998: a half, so 15
        (100, 0.29, "nearest", 1, 29),  # 28.999999999999996
        (40, 0.3, "floor", 8, 8),  # 12 units: one multiple of 8 at most
        (40, 0.3, "nearest", 8, 16),  # 1.5 multiples of 8: two
        (40, 0.3, "ceil", 8, 16),
        (3, 0.9, "ceil", 1, 2),  # capped by min_units=1: a group keeps one unit
    ],
)
def test_rounding_turns_the_fraction_into_a_count(hidden, fraction, rounding, round_to, removed):
    model = mlp(hidden)
    pruner = Pruner(model, input_size=(4,))
    selection = select_units(pruner.groups(), fraction=fraction, rounding=rounding, round_to=round_to)
    assert sum(len(units) for units in selection.values()) == removed
    plan = prune_groups(pruner, fraction=fraction, rounding=rounding, round_to=round_to)
    assert model[0].out_features == hidden - removed, plan


@pytest.mark.parametrize(
    "hidden, target, rounding, round_to, min_units, removed",
    [
        (3, 0.3, "floor", 1, 1, 0),
        (3, 0.3, "nearest", 1, 1, 1),
        (3, 0.3, "ceil", 1, 1, 1),
        (40, 0.3, "floor", 8, 1, 8),  # in multiples of round_to, as select_units counts them
        (40, 0.3, "nearest", 8, 1, 16),
        (40, 0.3, "ceil", 8, 1, 16),
        (10, 0.95, "nearest", 1, 0, 9),  # min_units=0 still leaves a unit (it used to raise)
        (10, 0.95, "ceil", 1, 0, 9),
    ],
)
def test_rounding_applies_to_each_event_of_an_iterative_schedule(
    hidden, target, rounding, round_to, min_units, removed
):
    model = mlp(hidden)
    pruner = Pruner(model, input_size=(4,))
    expected = select_units(pruner.groups(), target, rounding=rounding, round_to=round_to, min_units=min_units)
    assert sum(len(units) for units in expected.values()) == removed  # one event: the same count
    schedule = IterativePruning(
        pruner, target=target, steps=1, every=1, rounding=rounding, round_to=round_to, min_units=min_units
    )
    schedule.step()
    assert model[0].out_features == hidden - removed


def test_rounding_with_a_global_ranking_rounds_the_total():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    groups = Pruner(model, input_size=(4,)).groups()  # 5 units: 0.3 of them is 1.5
    for rounding, removed in (("floor", 1), ("nearest", 2), ("ceil", 2)):
        selection = select_units(groups, fraction=0.3, global_ranking=True, rounding=rounding)
        assert sum(len(units) for units in selection.values()) == removed, rounding


# --------------------------------------------------------------------------------------------
# An op whose arguments the analysis cannot read refuses its group, not the whole model
# --------------------------------------------------------------------------------------------


class ShapeFromTensor(nn.Module):
    """``y.mean(dim=y.dim() - 1)``: the dim is a traced value, not a literal."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = self.b(y - y.mean(dim=y.dim() - 1, keepdim=True))
        return self.fc2(F.relu(self.fc1(y.mean((2, 3)))))


def test_unreadable_op_arguments_refuse_only_their_group():
    model = ShapeFromTensor().double().eval()
    pruner = Pruner(model, input_size=(3, 6, 6))
    groups = pruner.groups()  # used to raise TypeError ("object of type 'Node' has no len()")
    assert any(model.fc1 in g for g in groups)
    before = snapshot(model)
    with pytest.raises(ValueError, match="mean"):
        pruner.prune_model(model.a, [1])
    assert_unchanged(before, model)
    pruner.prune_model(model.fc1, [0, 5])
    assert model.fc2.in_features == 6


# --------------------------------------------------------------------------------------------
# A stale group (from before a prune) or a group of another model is refused clearly
# --------------------------------------------------------------------------------------------


def test_stale_group_refused_with_a_clear_error_and_nothing_changed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3)).double()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8, dtype=D)).sum().backward()
    optimizer.step()
    pruner = Pruner(model, input_size=(3, 8, 8), optimizer=optimizer)
    group = pruner.groups()[0]
    pruner.prune_group(group, [0])
    before = snapshot(model, optimizer)
    for units in ([1], [3]):  # used to fail with an IndexError from the bookkeeping
        with pytest.raises(ValueError, match="groups again"):
            pruner.prune_group(group, units)
        assert_unchanged(before, model, optimizer)
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="another model"):
        Pruner(other, input_size=(3, 8, 8)).prune_group(pruner.groups()[0], [0])
    pruner.prune_group(pruner.groups()[0], [1])
    assert model[0].out_channels == 2


def test_std_and_var_with_unbiased_argument_keep_the_unit_axis():
    """torch.std(x, dim, unbiased, keepdim): the third slot is not keepdim. Reducing the token axis
    before the unit axis must move the units from axis 2 to axis 1 (zeroed twin, float64)."""
    import torch
    import torch.nn as nn

    from torchpruner import Pruner

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 6)
            self.fc = nn.Linear(6, 3)

        def forward(self, tokens):
            h = torch.relu(self.proj(tokens))  # [N, L, 6], units on the last axis
            return self.fc(torch.std(h, 1, True, False) + h.var(1, False))

    torch.manual_seed(0)
    model = Net().double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    assert_prune_equals_zeroed_twin(
        model,
        lambda: Pruner(model, input_size=(5, 4)).prune_model(model.proj, [1, 4]),
        lambda twin: masked_units(twin.proj, [1, 4], axis=-1),
        x,
        rtol=1e-12,
        atol=1e-12,
    )
    assert model.fc.in_features == 4

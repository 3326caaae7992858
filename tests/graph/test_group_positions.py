"""Which positions of a tensor a selection of group units removes (``Group.positions``,
``DependencyGraph.removed_positions``): against membership written out slot by slot, for every
form a caller passes units in, on a model whose tensors hold several groups (a concatenation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from torchpruner import Pruner
from torchpruner.graph.dependency import get_dependency_graph


class Concat(nn.Module):
    """``head`` reads a concatenation of two groups (positions 0..5 and 6..9 of its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


def _setup():
    model = Concat()
    pruner = Pruner(model, input_size=(3, 4, 4))
    groups = pruner.groups()
    dep = get_dependency_graph(pruner.graph())
    spaces = {id(r.space): r.space for g in groups for r in g._roles}
    return groups, dep, list(spaces.values())


def _expected(group, space, units) -> list[int]:
    unit_of = group._unit_of(space)
    wanted = {int(u) for u in units}
    return [i for i, u in enumerate(unit_of.tolist()) if u >= 0 and u in wanted]


FORMS = {
    "list": list,
    "tuple": tuple,
    "set": set,
    "array": lambda u: np.asarray(u, dtype=np.int64),
    "tensor": lambda u: torch.tensor(u, dtype=torch.long),
    "generator": lambda u: (x for x in u),
    "numpy ints": lambda u: [np.int32(x) for x in u],
}


@given(data=st.data(), form=st.sampled_from(sorted(FORMS)))
def test_positions_are_the_slots_of_the_chosen_units_in_any_form(data, form):
    groups, _dep, spaces = _setup()
    group = data.draw(st.sampled_from(groups))
    units = data.draw(st.lists(st.integers(0, group.num_units - 1), max_size=group.num_units + 2))
    for space in spaces:
        got = group.positions(space, FORMS[form](units))
        assert got.dtype == np.int64
        assert got.tolist() == _expected(group, space, units)


def test_units_outside_the_group_remove_nothing():
    groups, _dep, spaces = _setup()
    for group in groups:
        for space in spaces:
            assert group.positions(space, [group.num_units, group.num_units + 7, -5]).tolist() == []
            assert group.positions(space, []).tolist() == []


@given(data=st.data())
def test_removed_positions_are_the_union_over_the_selection(data):
    groups, dep, spaces = _setup()
    selection = {
        g: data.draw(st.lists(st.integers(0, g.num_units - 1), max_size=g.num_units, unique=True)) for g in groups
    }
    for space in spaces:
        expected = sorted({p for g, units in selection.items() for p in _expected(g, space, units)})
        assert dep.removed_positions(space, selection).tolist() == expected


def test_a_concatenation_holds_both_groups():
    groups, dep, spaces = _setup()
    head_in = next(r.space for g in groups for r in g._roles if r.module_name == "head" and r.direction == "in")
    everything = {g: list(range(g.num_units)) for g in groups}
    assert dep.removed_positions(head_in, everything).tolist() == list(range(10))
    assert sum(len(g.positions(head_in, range(g.num_units))) for g in groups) == 10


@pytest.mark.parametrize("units", [[0, 0, 1], [1, 0]])
def test_repeated_and_unsorted_units_give_sorted_unique_positions(units):
    groups, _dep, spaces = _setup()
    for group in groups:
        for space in spaces:
            got = group.positions(space, units).tolist()
            assert got == sorted(set(got)) == _expected(group, space, units)

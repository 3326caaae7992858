"""The grouped-layout rules (grouped / depthwise convolutions, GroupNorm) against a per-group
reading written out unit by unit: which removals keep ``groups`` (the same count in every
group), which remove whole groups (and with them the conv groups' output channels and weight
rows), and which are refused. The rules count per group in one pass; a depthwise convolution
has one group per channel, so these are the layers where a per-group loop would cost."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from torchpruner.rules import GroupedSliceError, TensorSlice, UnitSelection, get_slicing_rule


def _counts(remove: list[int], num_units: int, groups: int) -> list[int]:
    per_group = num_units // groups
    return [sum(1 for i in remove if g * per_group <= i < (g + 1) * per_group) for g in range(groups)]


def _kind(remove: list[int], num_units: int, groups: int) -> str:
    counts, per_group = _counts(remove, num_units, groups), num_units // groups
    if groups == 1:
        return "plain"
    if len(set(counts)) == 1 and counts[0] < per_group:
        return "within"
    if all(c in (0, per_group) for c in counts):
        return "whole"
    return "refused"


def _slices(edits) -> dict[tuple[str, int], TensorSlice]:
    return {(e.tensor_name, e.axis): e for e in edits if isinstance(e, TensorSlice)}


LAYOUTS = [(6, 6, 6), (12, 12, 12), (6, 12, 3), (8, 4, 2), (12, 6, 3)]  # (in, out, groups)


@given(data=st.data(), layout=st.sampled_from(LAYOUTS))
def test_grouped_conv_input_removals_follow_the_per_group_reading(data, layout):
    in_channels, out_channels, groups = layout
    conv = nn.Conv2d(in_channels, out_channels, 3, groups=groups)
    rule = get_slicing_rule(conv)
    remove = sorted(data.draw(st.sets(st.integers(0, in_channels - 1), min_size=1, max_size=in_channels - 1)))
    selection = UnitSelection.from_remove(torch.tensor(remove), in_channels)
    kind = _kind(remove, in_channels, groups)
    if kind == "refused":
        with pytest.raises(GroupedSliceError, match="units per group"):
            rule.prune_in(conv, selection)
        return
    out_removed = rule.removed_out_after_in(conv, selection)
    edits = _slices(rule.prune_in(conv, selection))
    if kind == "within":
        assert out_removed is None
        per_group = in_channels // groups
        kept = [[i for i in range(per_group) if g * per_group + i not in remove] for g in range(groups)]
        weight = edits[("weight", 1)]
        assert weight.keep.tolist() == kept[0]
        if weight.group_keep is not None:  # the groups keep different positions
            assert [k.tolist() for k in weight.group_keep] == kept
        else:
            assert all(k == kept[0] for k in kept)
        return
    in_per_group, out_per_group = in_channels // groups, out_channels // groups
    gone = sorted({i // in_per_group for i in remove})
    assert out_removed.tolist() == [g * out_per_group + j for g in gone for j in range(out_per_group)]
    kept = [g for g in range(groups) if g not in gone]
    assert edits[("weight", 0)].keep.tolist() == [g * out_per_group + j for g in kept for j in range(out_per_group)]
    assert edits[("bias", 0)].keep.tolist() == edits[("weight", 0)].keep.tolist()


@given(data=st.data(), layout=st.sampled_from([(8, 4), (6, 3), (6, 6), (4, 1)]))
def test_group_norm_loses_whole_groups_only(data, layout):
    channels, groups = layout
    norm = nn.GroupNorm(groups, channels)
    rule = get_slicing_rule(norm)
    remove = sorted(data.draw(st.sets(st.integers(0, channels - 1), min_size=1, max_size=channels - 1)))
    selection = UnitSelection.from_remove(torch.tensor(remove), channels)
    per_group = channels // groups
    counts = _counts(remove, channels, groups)
    if not all(c in (0, per_group) for c in counts):
        with pytest.raises(GroupedSliceError, match=re.escape(f"these indices remove {counts} channels per group")):
            rule.prune_in(norm, selection)
        return
    edits = rule.prune_in(norm, selection)
    groups_left = [e.new for e in edits if getattr(e, "attribute", None) == "num_groups"]
    assert groups_left == [counts.count(0)]

"""Slicing rules of the torch.nn layers (registered on import of :mod:`torchpruner.rules`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from torchpruner._ops import PARAMETER_FREE_PASS_THROUGH_MODULES

from .edits import Edit, set_attribute, slice_tensor
from .registry import (
    DROPOUT_POLICIES,
    GroupedSliceError,
    SlicingRule,
    UnitSelection,
    register_slicing_rule,
    register_slicing_rule_by_path,
)
from .units import conv_blocked_side


@register_slicing_rule(nn.Linear)
class LinearRule(SlicingRule[nn.Linear]):
    """``weight [out, in]``; units on the last axis of input and output."""

    input_unit_axis = -1
    tensors = frozenset({"weight", "bias"})

    def out_units(self, module: nn.Linear) -> int:
        return module.out_features

    def in_units(self, module: nn.Linear) -> int:
        return module.in_features

    def prune_out(self, module: nn.Linear, selection: UnitSelection) -> list[Edit]:
        return (
            slice_tensor(module, "weight", 0, selection.keep)
            + slice_tensor(module, "bias", 0, selection.keep)
            + set_attribute(module, "out_features", len(selection.keep))
        )

    def prune_in(self, module: nn.Linear, selection: UnitSelection) -> list[Edit]:
        return slice_tensor(module, "weight", 1, selection.keep) + set_attribute(
            module, "in_features", len(selection.keep)
        )


@register_slicing_rule_by_path("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(SlicingRule[nn.Module]):
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with ``weight [in, out]``,
    ``nx`` inputs and ``nf`` outputs; units on the last axis of input and output."""

    input_unit_axis = -1
    tensors = frozenset({"weight", "bias"})

    @staticmethod
    def _weight_shape(module: nn.Module) -> torch.Size:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # a Parameter on every Conv1D
        return weight.shape

    def out_units(self, module: nn.Module) -> int:
        return int(self._weight_shape(module)[1])

    def in_units(self, module: nn.Module) -> int:
        return int(self._weight_shape(module)[0])

    def prune_out(self, module: nn.Module, selection: UnitSelection) -> list[Edit]:
        return (
            slice_tensor(module, "weight", 1, selection.keep)
            + slice_tensor(module, "bias", 0, selection.keep)
            + set_attribute(module, "nf", len(selection.keep))
        )

    def prune_in(self, module: nn.Module, selection: UnitSelection) -> list[Edit]:
        edits = slice_tensor(module, "weight", 0, selection.keep)
        return edits + set_attribute(module, "nx", len(selection.keep)) if hasattr(module, "nx") else edits


@register_slicing_rule(nn.Bilinear)
class BilinearRule(SlicingRule[nn.Bilinear]):
    """``weight [out, in1, in2]``: output units only (its two inputs are ambiguous)."""

    tensors = frozenset({"weight", "bias"})

    def out_units(self, module: nn.Bilinear) -> int:
        return module.out_features

    def prune_out(self, module: nn.Bilinear, selection: UnitSelection) -> list[Edit]:
        return (
            slice_tensor(module, "weight", 0, selection.keep)
            + slice_tensor(module, "bias", 0, selection.keep)
            + set_attribute(module, "out_features", len(selection.keep))
        )


@register_slicing_rule(nn.Embedding)
class EmbeddingRule(SlicingRule[nn.Embedding]):
    """``weight [num_embeddings, embedding_dim]``: the embedding dims are its units."""

    tensors = frozenset({"weight"})

    def out_units(self, module: nn.Embedding) -> int:
        return module.embedding_dim

    def prune_out(self, module: nn.Embedding, selection: UnitSelection) -> list[Edit]:
        return slice_tensor(module, "weight", 1, selection.keep) + set_attribute(
            module, "embedding_dim", len(selection.keep)
        )


def _per_group_removal(remove: torch.Tensor, num_units: int, groups: int) -> list[torch.Tensor]:
    per_group = num_units // groups
    return [remove[(remove >= g * per_group) & (remove < (g + 1) * per_group)] - g * per_group for g in range(groups)]


def _per_group_counts(remove: torch.Tensor, num_units: int, groups: int) -> list[int]:
    """How many of ``remove`` fall in each of ``groups`` equal blocks of ``num_units`` (the lengths
    of :func:`_per_group_removal`, in one pass: a depthwise conv has a group per channel)."""
    per_group = num_units // groups
    inside = remove[(remove >= 0) & (remove < groups * per_group)]
    counts: list[int] = torch.bincount(inside // per_group, minlength=groups).tolist()
    return counts


@register_slicing_rule(nn.modules.conv._ConvNd)
class ConvRule(SlicingRule[nn.modules.conv._ConvNd]):
    """Conv1d/2d/3d (``weight [out, in/groups, k...]``) and ConvTranspose1d/2d/3d
    (``weight [in, out/groups, k...]``), with groups.

    Grouped convolutions: the units removed from one side must be the same number in every group
    (``groups`` is kept) or whole groups (``groups`` shrinks, which also removes the other side's
    units of those groups: allowed when the convolution consumes the pruned units, e.g. a depthwise
    convolution, whose output channels then go too). Anything else is refused.
    """

    input_unit_axis = 1
    tensors = frozenset({"weight", "bias"})

    def out_units(self, module: nn.modules.conv._ConvNd) -> int:
        return module.out_channels

    def in_units(self, module: nn.modules.conv._ConvNd) -> int:
        return module.in_channels

    def _classify(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> str:
        groups = module.groups
        if groups == 1:
            return "plain"
        counts = _per_group_counts(selection.remove, selection.num_units, groups)
        per_group = selection.num_units // groups
        if len(set(counts)) == 1 and counts[0] < per_group:
            return "within"
        if all(c in (0, per_group) for c in counts):
            return "whole"
        raise GroupedSliceError(
            f"grouped {type(module).__name__} (groups={groups}, {per_group} units per group) would lose "
            f"{counts} units per group: prune the same number of units in every group, or whole groups"
        )

    def prune_out(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> list[Edit]:
        return self._prune(module, selection, "out")

    def prune_in(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> list[Edit]:
        return self._prune(module, selection, "in")

    def removed_out_after_in(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> torch.Tensor | None:
        if self._classify(module, selection) != "whole":
            return None
        removed_groups = self._removed_groups(module, selection)
        out_per_group = module.out_channels // module.groups
        starts = torch.tensor(removed_groups, dtype=torch.long) * out_per_group
        return (starts[:, None] + torch.arange(out_per_group)).flatten()

    def _removed_groups(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> list[int]:
        per_group = selection.num_units // module.groups
        removed: list[int] = torch.unique(selection.remove // per_group, sorted=True).tolist()
        return removed

    def _prune(self, module: nn.modules.conv._ConvNd, selection: UnitSelection, direction: str) -> list[Edit]:
        kind = self._classify(module, selection)
        blocked = conv_blocked_side(module) == direction  # this side's units sit on weight dim 0
        count_attr = "out_channels" if direction == "out" else "in_channels"
        new_count = len(selection.keep)
        edits: list[Edit] = []
        if kind == "whole":
            if direction == "out":
                raise GroupedSliceError(
                    f"removing whole output groups of grouped {type(module).__name__} would leave its input "
                    f"channels of those groups unused; prune the same number of units in every group instead"
                )
            # whole input groups: the output channels of those groups go too
            removed_groups = set(self._removed_groups(module, selection))
            groups_left = module.groups - len(removed_groups)
            out_per_group = module.out_channels // module.groups
            in_per_group = module.in_channels // module.groups
            kept_groups = torch.tensor([g for g in range(module.groups) if g not in removed_groups], dtype=torch.long)
            keep_out = (kept_groups[:, None] * out_per_group + torch.arange(out_per_group)).flatten()
            keep_in_rows = (kept_groups[:, None] * in_per_group + torch.arange(in_per_group)).flatten()
            keep_dim0 = keep_out if conv_blocked_side(module) == "out" else keep_in_rows
            edits += slice_tensor(module, "weight", 0, keep_dim0)
            edits += slice_tensor(module, "bias", 0, keep_out)
            edits += set_attribute(module, "in_channels", len(keep_in_rows))
            edits += set_attribute(module, "out_channels", len(keep_out))
            edits += set_attribute(module, "groups", groups_left)
            return edits
        if blocked:
            edits += slice_tensor(module, "weight", 0, selection.keep)
        else:
            if kind == "plain":
                edits += slice_tensor(module, "weight", 1, selection.keep)
            else:
                per_group = selection.num_units // module.groups
                removals = _per_group_removal(selection.remove, selection.num_units, module.groups)
                group_keep = []
                for removed in removals:
                    mask = torch.ones(per_group, dtype=torch.bool)
                    mask[removed] = False
                    group_keep.append(mask.nonzero().flatten())
                if all(torch.equal(k, group_keep[0]) for k in group_keep):
                    edits += slice_tensor(module, "weight", 1, group_keep[0])
                else:
                    edits += slice_tensor(module, "weight", 1, group_keep[0], group_keep=group_keep)
        if direction == "out":
            edits += slice_tensor(module, "bias", 0, selection.keep)
        edits += set_attribute(module, count_attr, new_count)
        return edits


@register_slicing_rule_by_path(
    "timm.layers.std_conv.StdConv2d",
    "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2d",
    "timm.layers.std_conv.ScaledStdConv2dSame",
)
class StandardizedConvRule(ConvRule):
    """timm's weight-standardised convolutions (NF-ResNet, BiT): each output channel's weight is
    standardised over its own fan-in in the forward, then scaled by ``gain [out, 1, 1, 1]``
    (ScaledStdConv2d) and the constant ``scale``. A leaf: its weight has units on two axes, which
    the traced computation cannot carry.

    Removing output channels is exact (``gain`` goes with them). Removing input channels
    standardises the kept weights over the smaller fan-in: like pruning the axis of a LayerNorm,
    zeroing those inputs is not the same model (compare with a rebuilt smaller model); ``scale``
    (``gamma / sqrt(fan_in)`` at construction) is kept, so the kept weights keep their size."""

    tensors = frozenset({"weight", "bias", "gain"})

    def prune_out(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> list[Edit]:
        edits = super().prune_out(module, selection)
        if isinstance(getattr(module, "gain", None), torch.Tensor):
            edits += slice_tensor(module, "gain", 0, selection.keep)
        return edits

    def prune_in(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> list[Edit]:
        edits = super().prune_in(module, selection)
        if module.groups > 1 and isinstance(getattr(module, "gain", None), torch.Tensor):
            removed_out = self.removed_out_after_in(module, selection)  # whole groups: their outputs go
            if removed_out is not None:
                keep = torch.ones(module.out_channels, dtype=torch.bool)
                keep[removed_out] = False
                edits += slice_tensor(module, "gain", 0, keep.nonzero().flatten())
        return edits


@register_slicing_rule(nn.modules.batchnorm._NormBase)
class ChannelNormRule(SlicingRule[nn.modules.batchnorm._NormBase]):
    """BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm: per-channel affine and running stats.

    ``num_batches_tracked`` is a scalar and stays as it is.
    """

    passes_units_through = True
    input_unit_axis = 1
    tensors = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})

    def out_units(self, module: nn.modules.batchnorm._NormBase) -> int:
        return module.num_features

    in_units = out_units

    def prune_in(self, module: nn.modules.batchnorm._NormBase, selection: UnitSelection) -> list[Edit]:
        keep = selection.keep
        edits: list[Edit] = []
        for name in ("weight", "bias", "running_mean", "running_var"):
            if name in module._parameters or name in module._buffers:
                edits += slice_tensor(module, name, 0, keep)
        return edits + set_attribute(module, "num_features", len(keep))

    prune_out = prune_in


@register_slicing_rule(nn.GroupNorm)
class GroupNormRule(SlicingRule[nn.GroupNorm]):
    """GroupNorm: whole groups only (removing part of a group changes the statistics of the rest)."""

    passes_units_through = True
    input_unit_axis = 1
    tensors = frozenset({"weight", "bias"})

    def out_units(self, module: nn.GroupNorm) -> int:
        return module.num_channels

    in_units = out_units

    def prune_in(self, module: nn.GroupNorm, selection: UnitSelection) -> list[Edit]:
        per_group = module.num_channels // module.num_groups
        counts = _per_group_counts(selection.remove, selection.num_units, module.num_groups)
        if not all(c in (0, per_group) for c in counts):
            raise GroupedSliceError(
                f"GroupNorm ({module.num_groups} groups of {per_group} channels) can only lose "
                f"whole groups; these indices remove {counts} channels per group"
            )
        keep = selection.keep
        groups_left = sum(1 for c in counts if c == 0)
        return (
            slice_tensor(module, "weight", 0, keep)
            + slice_tensor(module, "bias", 0, keep)
            + set_attribute(module, "num_channels", len(keep))
            + set_attribute(module, "num_groups", groups_left)
        )

    prune_out = prune_in


@register_slicing_rule(nn.LayerNorm, nn.RMSNorm)
class LayerNormRule(SlicingRule[nn.LayerNorm | nn.RMSNorm]):
    """LayerNorm / RMSNorm over the last ``len(normalized_shape)`` dims.

    The pruned units may sit on any of the normalised dims (the last one by default). The
    statistics of the remaining units change: not equivalent to masking, by construction.
    """

    passes_units_through = True
    tensors = frozenset({"weight", "bias"})

    def _param_axis(self, module: nn.LayerNorm | nn.RMSNorm, selection: UnitSelection) -> int:
        dims = len(module.normalized_shape)
        if selection.axis is None or selection.ndim is None:
            return dims - 1
        axis = selection.axis - (selection.ndim - dims)
        if not 0 <= axis < dims:
            raise ValueError(
                f"{type(module).__name__} normalises the last {dims} dim(s) but the pruned units "
                f"are on axis {selection.axis} of a {selection.ndim}-d input"
            )
        if module.normalized_shape[axis] != selection.num_units:
            raise ValueError(
                f"{type(module).__name__} normalized_shape {tuple(module.normalized_shape)} has "
                f"{module.normalized_shape[axis]} entries on the pruned axis, not {selection.num_units}"
            )
        return axis

    def out_units(self, module: nn.LayerNorm | nn.RMSNorm) -> int:
        return int(module.normalized_shape[-1])

    in_units = out_units

    def prune_in(self, module: nn.LayerNorm | nn.RMSNorm, selection: UnitSelection) -> list[Edit]:
        axis = self._param_axis(module, selection)
        shape = list(module.normalized_shape)
        shape[axis] = len(selection.keep)
        edits: list[Edit] = []
        for name in ("weight", "bias"):
            if name in module._parameters:
                edits += slice_tensor(module, name, axis, selection.keep)
        return edits + set_attribute(module, "normalized_shape", tuple(shape))

    prune_out = prune_in


@register_slicing_rule(nn.PReLU)
class PReLURule(SlicingRule[nn.PReLU]):
    """PReLU: one slope per channel (dim 1), or a single shared slope (nothing to slice)."""

    passes_units_through = True
    input_unit_axis = 1
    tensors = frozenset({"weight"})

    def out_units(self, module: nn.PReLU) -> int | None:
        return module.num_parameters if module.num_parameters > 1 else None

    in_units = out_units

    def prune_in(self, module: nn.PReLU, selection: UnitSelection) -> list[Edit]:
        if module.num_parameters == 1:
            return []
        return slice_tensor(module, "weight", 0, selection.keep) + set_attribute(
            module, "num_parameters", len(selection.keep)
        )

    prune_out = prune_in


@register_slicing_rule(nn.modules.dropout._DropoutNd)
class DropoutRule(SlicingRule[nn.modules.dropout._DropoutNd]):
    """The Dropout family: no tensors; ``p`` follows the pruner's ``dropout_policy``."""

    passes_units_through = True
    has_unit_state = False
    tensors: frozenset[str] = frozenset()

    def prune_in(self, module: nn.modules.dropout._DropoutNd, selection: UnitSelection) -> list[Edit]:
        policy = DROPOUT_POLICIES[selection.dropout_policy]
        new_p = float(policy(module.p, selection.num_units, len(selection.remove)))
        return set_attribute(module, "p", new_p)

    prune_out = prune_in


@register_slicing_rule(*PARAMETER_FREE_PASS_THROUGH_MODULES)
class ParameterFreeRule(SlicingRule[nn.Module]):
    """Element-wise activations, pooling, Identity, Flatten: nothing to slice, units pass through."""

    passes_units_through = True
    has_unit_state = False
    tensors: frozenset[str] = frozenset()

    def prune_in(self, module: nn.Module, selection: UnitSelection) -> list[Edit]:
        return []

    prune_out = prune_in

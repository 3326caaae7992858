"""Slicing rules: how each layer type loses units, in a registry keyed by module type.

A rule answers four questions about a module (the four verbs):

``out_units(module)``
    how many units the module produces (``out_features``, ``out_channels``...), or None.
``in_units(module)``
    how many units it reads (``in_features``, ``in_channels``...), or None when any count works
    (Dropout, activations).
``prune_out(module, selection)``
    the edits that remove the selected *output* units (the module is the pruned layer).
``prune_in(module, selection)``
    the edits that remove the selected *input* units (the module consumes the pruned layer).

Rules never modify anything: they return :class:`~torchpruner.pruner.plan.TensorSlice` and
:class:`~torchpruner.pruner.plan.AttributeChange` edits that the planner collects, validates and
only then applies. A rule whose module keeps its input units in its output (BatchNorm, LayerNorm,
PReLU, Dropout, activations, depthwise convolutions) sets ``passes_units_through = True``: after
``prune_in`` the same units disappear from its output, so the layers after it are pruned too.

Register a rule for your own layer (subclasses of a registered type find the rule of the nearest
registered base class)::

    import torch.nn as nn
    from torchpruner.pruner import SlicingRule, register_slicing_rule, slice_tensor, set_attribute

    class Scale(nn.Module):                 # y = x * weight, per channel on dim 1
        def __init__(self, channels):
            super().__init__()
            self.channels = channels
            self.weight = nn.Parameter(torch.ones(channels))
        def forward(self, x):
            return x * self.weight.view(1, -1, *([1] * (x.dim() - 2)))

    @register_slicing_rule(Scale)
    class ScaleRule(SlicingRule):
        passes_units_through = True         # channel c in -> channel c out
        input_unit_axis = 1
        def out_units(self, module): return module.channels
        def in_units(self, module): return module.channels
        def prune_out(self, module, selection):
            return [slice_tensor(module, "weight", 0, selection.keep),
                    set_attribute(module, "channels", len(selection.keep))]
        prune_in = prune_out

Then ``Pruner.prune_model(conv, indices, cascading_modules=[scale, next_conv])`` works.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Type, TypeVar

import torch
import torch.nn as nn

from torchpruner.graph.trace import register_leaf_module

from .plan import AttributeChange, Edit, TensorSlice

logger = logging.getLogger(__name__)

__all__ = [
    "UnitSelection",
    "SlicingRule",
    "register_slicing_rule",
    "get_slicing_rule",
    "slice_tensor",
    "set_attribute",
    "DROPOUT_POLICIES",
]

#: How a Dropout after a pruned layer changes its rate ``p`` when ``k`` of ``n`` units go.
DROPOUT_POLICIES: Dict[str, Callable[[float, int, int], float]] = {
    # the 2020 TorchPruner rule: fewer units, proportionally less dropout
    "linear": lambda p, n, k: p * (1.0 - k / n),
    # Han et al. 2015 ("Learning both weights and connections"): D_r = D_o * sqrt(C_r / C_o)
    "sqrt": lambda p, n, k: p * math.sqrt((n - k) / n),
    "keep": lambda p, n, k: p,
}


@dataclass(frozen=True)
class UnitSelection:
    """The units a rule removes from one side (input or output) of a module.

    Attributes:
        remove: sorted, unique int64 indices of the units to remove (CPU tensor).
        keep: sorted int64 indices of the units that stay (the complement of ``remove``).
        num_units: the number of units on that side before pruning.
        axis: axis of the units in the module's input/output tensor (batch dim included), when
            known from the trace; None otherwise.
        ndim: number of dims of that tensor, when known.
        dropout_policy: name of the rule for Dropout rates (see :data:`DROPOUT_POLICIES`).
    """

    remove: torch.Tensor
    keep: torch.Tensor
    num_units: int
    axis: Optional[int] = None
    ndim: Optional[int] = None
    dropout_policy: str = "linear"

    @classmethod
    def from_remove(cls, remove: torch.Tensor, num_units: int, **kwargs) -> "UnitSelection":
        remove = torch.as_tensor(remove, dtype=torch.long).flatten().unique(sorted=True)
        mask = torch.ones(num_units, dtype=torch.bool)
        mask[remove] = False
        return cls(remove=remove, keep=mask.nonzero().flatten(), num_units=num_units, **kwargs)


class SlicingRule:
    """Base class of slicing rules; see the module docstring for the four verbs.

    Class attributes:
        passes_units_through: True when input unit ``c`` is output unit ``c`` (after ``prune_in``
            the same units leave the output, so pruning continues downstream).
        input_unit_axis: where the module reads its units: ``1`` (channels, ``[N, C, ...]``),
            ``-1`` (last dim, ``[N, ..., D]``) or None (anywhere / checked by the rule).
        has_unit_state: True when the module holds per-unit tensors (then it must be listed
            in ``cascading_modules`` when pruned units flow into it).
    """

    passes_units_through: bool = False
    input_unit_axis: Optional[int] = None
    has_unit_state: bool = True

    def out_units(self, module: nn.Module) -> Optional[int]:
        return None

    def in_units(self, module: nn.Module) -> Optional[int]:
        return None

    def prune_out(self, module: nn.Module, selection: UnitSelection) -> List[Edit]:
        raise TypeError(f"{type(module).__name__} cannot be pruned on its output units")

    def prune_in(self, module: nn.Module, selection: UnitSelection) -> List[Edit]:
        raise TypeError(f"{type(module).__name__} cannot consume pruned units")

    def removed_out_after_in(self, module: nn.Module, selection: UnitSelection) -> Optional[torch.Tensor]:
        """Output units that disappear when ``selection`` is removed from the input.

        None for consumers (their output keeps its size). The default follows
        ``passes_units_through``; grouped convolutions override it.
        """
        return selection.remove if self.passes_units_through else None


_RULES: Dict[type, SlicingRule] = {}
R = TypeVar("R", bound=Type[SlicingRule])


def register_slicing_rule(*module_types: type) -> Callable[[R], R]:
    """Class decorator: use this rule for ``module_types`` (and their subclasses).

    Args:
        module_types: ``nn.Module`` subclasses; a later registration replaces an earlier one.
    """
    for module_type in module_types:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"register_slicing_rule expects nn.Module subclasses, got {module_type!r}")

    def decorator(rule_class: R) -> R:
        if not (isinstance(rule_class, type) and issubclass(rule_class, SlicingRule)):
            raise TypeError(f"{rule_class!r} is not a SlicingRule subclass")
        instance = rule_class()
        for module_type in module_types:
            _RULES[module_type] = instance
            if not module_type.__module__.startswith(("torch.", "torchvision.")):
                register_leaf_module(module_type)  # the graph shows the layer, not the ops inside it
        return rule_class

    return decorator


def get_slicing_rule(module: nn.Module) -> Optional[SlicingRule]:
    """The rule registered for ``type(module)`` or its nearest registered base class."""
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)
        if rule is not None:
            return rule
    return None


# --------------------------------------------------------------------------------------------
# Edit helpers for rules
# --------------------------------------------------------------------------------------------

def slice_tensor(module: nn.Module, tensor_name: str, axis: int, keep: torch.Tensor,
                 group_keep: Optional[Sequence[torch.Tensor]] = None) -> List[Edit]:
    """An edit that keeps ``keep`` along ``axis`` of a parameter or buffer of ``module``.

    Returns an empty list when the tensor is None (``bias=False``, untracked BatchNorm stats).

    Args:
        module: the module that owns the tensor.
        tensor_name: attribute name of the parameter or buffer (``"weight"``, ``"running_mean"``).
        axis: the axis that is sliced.
        keep: indices kept along ``axis``.
        group_keep: for grouped layers: the tensor is cut into ``len(group_keep)`` equal blocks
            along dim 0 and block ``j`` keeps ``group_keep[j]`` along ``axis`` (which must not be 0).
    """
    if tensor_name in module._parameters:
        tensor, is_parameter = module._parameters[tensor_name], True
    elif tensor_name in module._buffers:
        tensor, is_parameter = module._buffers[tensor_name], False
    else:
        raise TypeError(f"{type(module).__name__} has no parameter or buffer named {tensor_name!r}")
    if tensor is None:
        return []
    axis = axis % tensor.dim()
    keep = torch.as_tensor(keep, dtype=torch.long).cpu()
    groups = None
    if group_keep is not None:
        if axis == 0:
            raise ValueError("group_keep slices within blocks of dim 0; axis must not be 0")
        groups = tuple(torch.as_tensor(k, dtype=torch.long).cpu() for k in group_keep)
    return [TensorSlice(module=module, tensor_name=tensor_name, axis=axis, keep=keep,
                        old_shape=tuple(tensor.shape), is_parameter=is_parameter, group_keep=groups)]


def set_attribute(module: nn.Module, attribute: str, value) -> List[Edit]:
    """An edit that sets ``module.<attribute> = value`` (skipped when already equal)."""
    old = getattr(module, attribute)
    if old == value:
        return []
    return [AttributeChange(module=module, attribute=attribute, old=old, new=value)]


# --------------------------------------------------------------------------------------------
# Built-in rules
# --------------------------------------------------------------------------------------------

@register_slicing_rule(nn.Linear)
class LinearRule(SlicingRule):
    """``weight [out, in]``; units on the last axis of input and output."""

    input_unit_axis = -1

    def out_units(self, module: nn.Linear) -> int:
        return module.out_features

    def in_units(self, module: nn.Linear) -> int:
        return module.in_features

    def prune_out(self, module: nn.Linear, selection: UnitSelection) -> List[Edit]:
        return (slice_tensor(module, "weight", 0, selection.keep) + slice_tensor(module, "bias", 0, selection.keep)
                + set_attribute(module, "out_features", len(selection.keep)))

    def prune_in(self, module: nn.Linear, selection: UnitSelection) -> List[Edit]:
        return slice_tensor(module, "weight", 1, selection.keep) + set_attribute(module, "in_features", len(selection.keep))


@register_slicing_rule(nn.Bilinear)
class BilinearRule(SlicingRule):
    """``weight [out, in1, in2]``: output units only (its two inputs are ambiguous)."""

    def out_units(self, module: nn.Bilinear) -> int:
        return module.out_features

    def prune_out(self, module: nn.Bilinear, selection: UnitSelection) -> List[Edit]:
        return (slice_tensor(module, "weight", 0, selection.keep) + slice_tensor(module, "bias", 0, selection.keep)
                + set_attribute(module, "out_features", len(selection.keep)))


@register_slicing_rule(nn.Embedding)
class EmbeddingRule(SlicingRule):
    """``weight [num_embeddings, embedding_dim]``: the embedding dims are its units."""

    def out_units(self, module: nn.Embedding) -> int:
        return module.embedding_dim

    def prune_out(self, module: nn.Embedding, selection: UnitSelection) -> List[Edit]:
        return slice_tensor(module, "weight", 1, selection.keep) + set_attribute(module, "embedding_dim", len(selection.keep))


def _per_group_removal(remove: torch.Tensor, num_units: int, groups: int) -> List[torch.Tensor]:
    per_group = num_units // groups
    return [remove[(remove >= g * per_group) & (remove < (g + 1) * per_group)] - g * per_group for g in range(groups)]


class GroupedSliceError(ValueError):
    """Pruning that would break the group structure of a grouped convolution."""


@register_slicing_rule(nn.modules.conv._ConvNd)
class ConvRule(SlicingRule):
    """Conv1d/2d/3d (``weight [out, in/groups, k...]``) and ConvTranspose1d/2d/3d
    (``weight [in, out/groups, k...]``), with groups.

    Grouped convolutions: the units removed from one side must be the same number in every group
    (``groups`` is kept) or whole groups (``groups`` shrinks, which also removes the other side's
    units of those groups: allowed when the convolution consumes the pruned units, e.g. a depthwise
    convolution, whose output channels then go too). Anything else is refused.
    """

    input_unit_axis = 1

    def out_units(self, module: nn.modules.conv._ConvNd) -> int:
        return module.out_channels

    def in_units(self, module: nn.modules.conv._ConvNd) -> int:
        return module.in_channels

    # dim 0 of the weight is split into groups: out channels for Conv, in channels for ConvTranspose
    @staticmethod
    def _sides(module: nn.modules.conv._ConvNd, direction: str) -> str:
        """"blocked" when ``direction``'s units sit on weight dim 0 (contiguous per group), else "local"."""
        on_dim0 = (direction == "out") != bool(module.transposed)
        return "blocked" if on_dim0 else "local"

    def _classify(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> str:
        groups = module.groups
        if groups == 1:
            return "plain"
        counts = [len(r) for r in _per_group_removal(selection.remove, selection.num_units, groups)]
        per_group = selection.num_units // groups
        if len(set(counts)) == 1 and counts[0] < per_group:
            return "within"
        if all(c in (0, per_group) for c in counts):
            return "whole"
        raise GroupedSliceError(
            f"grouped {type(module).__name__} (groups={groups}, {per_group} units per group) would lose "
            f"{counts} units per group: prune the same number of units in every group, or whole groups")

    def prune_out(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> List[Edit]:
        return self._prune(module, selection, "out")

    def prune_in(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> List[Edit]:
        return self._prune(module, selection, "in")

    def removed_out_after_in(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> Optional[torch.Tensor]:
        if self._classify(module, selection) != "whole":
            return None
        removed_groups = self._removed_groups(module, selection)
        out_per_group = module.out_channels // module.groups
        return torch.cat([torch.arange(g * out_per_group, (g + 1) * out_per_group) for g in removed_groups]).long()

    def _removed_groups(self, module: nn.modules.conv._ConvNd, selection: UnitSelection) -> List[int]:
        per_group = selection.num_units // module.groups
        return sorted({int(i) // per_group for i in selection.remove})

    def _prune(self, module: nn.modules.conv._ConvNd, selection: UnitSelection, direction: str) -> List[Edit]:
        kind = self._classify(module, selection)
        side = self._sides(module, direction)
        count_attr = "out_channels" if direction == "out" else "in_channels"
        new_count = len(selection.keep)
        edits: List[Edit] = []
        if kind == "whole":
            if direction == "out":
                raise GroupedSliceError(
                    f"removing whole output groups of grouped {type(module).__name__} would leave its input "
                    f"channels of those groups unused; prune the same number of units in every group instead")
            # whole input groups: the output channels of those groups go too
            removed_groups = set(self._removed_groups(module, selection))
            groups_left = module.groups - len(removed_groups)
            out_per_group = module.out_channels // module.groups
            in_per_group = module.in_channels // module.groups
            keep_out = torch.tensor([g * out_per_group + j for g in range(module.groups) if g not in removed_groups
                                     for j in range(out_per_group)], dtype=torch.long)
            keep_in_rows = torch.tensor([g * in_per_group + j for g in range(module.groups) if g not in removed_groups
                                         for j in range(in_per_group)], dtype=torch.long)
            # weight dim 0 holds out channels (Conv) or in channels (ConvTranspose), grouped by block
            keep_dim0 = keep_in_rows if module.transposed else keep_out
            edits += slice_tensor(module, "weight", 0, keep_dim0)
            edits += slice_tensor(module, "bias", 0, keep_out)
            edits += set_attribute(module, "in_channels", len(keep_in_rows))
            edits += set_attribute(module, "out_channels", len(keep_out))
            edits += set_attribute(module, "groups", groups_left)
            return edits
        if side == "blocked":
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


@register_slicing_rule(nn.modules.batchnorm._NormBase)
class ChannelNormRule(SlicingRule):
    """BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm: per-channel affine and running stats.

    ``num_batches_tracked`` is a scalar and stays as it is.
    """

    passes_units_through = True
    input_unit_axis = 1

    def out_units(self, module: nn.modules.batchnorm._NormBase) -> int:
        return module.num_features

    in_units = out_units

    def prune_in(self, module: nn.modules.batchnorm._NormBase, selection: UnitSelection) -> List[Edit]:
        keep = selection.keep
        edits: List[Edit] = []
        for name in ("weight", "bias", "running_mean", "running_var"):
            if name in module._parameters or name in module._buffers:
                edits += slice_tensor(module, name, 0, keep)
        return edits + set_attribute(module, "num_features", len(keep))

    prune_out = prune_in


@register_slicing_rule(nn.GroupNorm)
class GroupNormRule(SlicingRule):
    """GroupNorm: whole groups only (removing part of a group changes the statistics of the rest)."""

    passes_units_through = True
    input_unit_axis = 1

    def out_units(self, module: nn.GroupNorm) -> int:
        return module.num_channels

    in_units = out_units

    def prune_in(self, module: nn.GroupNorm, selection: UnitSelection) -> List[Edit]:
        per_group = module.num_channels // module.num_groups
        counts = [len(r) for r in _per_group_removal(selection.remove, selection.num_units, module.num_groups)]
        if not all(c in (0, per_group) for c in counts):
            raise GroupedSliceError(f"GroupNorm ({module.num_groups} groups of {per_group} channels) can only lose "
                                    f"whole groups; these indices remove {counts} channels per group")
        keep = selection.keep
        groups_left = sum(1 for c in counts if c == 0)
        return (slice_tensor(module, "weight", 0, keep) + slice_tensor(module, "bias", 0, keep)
                + set_attribute(module, "num_channels", len(keep)) + set_attribute(module, "num_groups", groups_left))

    prune_out = prune_in


@register_slicing_rule(nn.LayerNorm, nn.RMSNorm)
class LayerNormRule(SlicingRule):
    """LayerNorm / RMSNorm over the last ``len(normalized_shape)`` dims.

    The pruned units may sit on any of the normalised dims (the last one by default). The
    statistics of the remaining units change: not equivalent to masking, by construction.
    """

    passes_units_through = True

    def _param_axis(self, module: nn.Module, selection: UnitSelection) -> int:
        dims = len(module.normalized_shape)
        if selection.axis is None or selection.ndim is None:
            return dims - 1
        axis = selection.axis - (selection.ndim - dims)
        if not 0 <= axis < dims:
            raise ValueError(f"{type(module).__name__} normalises the last {dims} dim(s) but the pruned units "
                             f"are on axis {selection.axis} of a {selection.ndim}-d input")
        if module.normalized_shape[axis] != selection.num_units:
            raise ValueError(f"{type(module).__name__} normalized_shape {tuple(module.normalized_shape)} has "
                             f"{module.normalized_shape[axis]} entries on the pruned axis, not {selection.num_units}")
        return axis

    def out_units(self, module: nn.Module) -> int:
        return int(module.normalized_shape[-1])

    in_units = out_units

    def prune_in(self, module: nn.Module, selection: UnitSelection) -> List[Edit]:
        axis = self._param_axis(module, selection)
        shape = list(module.normalized_shape)
        shape[axis] = len(selection.keep)
        edits: List[Edit] = []
        for name in ("weight", "bias"):
            if name in module._parameters:
                edits += slice_tensor(module, name, axis, selection.keep)
        return edits + set_attribute(module, "normalized_shape", tuple(shape))

    prune_out = prune_in


@register_slicing_rule(nn.PReLU)
class PReLURule(SlicingRule):
    """PReLU: one slope per channel (dim 1), or a single shared slope (nothing to slice)."""

    passes_units_through = True
    input_unit_axis = 1

    def out_units(self, module: nn.PReLU) -> Optional[int]:
        return module.num_parameters if module.num_parameters > 1 else None

    in_units = out_units

    def prune_in(self, module: nn.PReLU, selection: UnitSelection) -> List[Edit]:
        if module.num_parameters == 1:
            return []
        return slice_tensor(module, "weight", 0, selection.keep) + set_attribute(module, "num_parameters", len(selection.keep))

    prune_out = prune_in


@register_slicing_rule(nn.modules.dropout._DropoutNd)
class DropoutRule(SlicingRule):
    """The Dropout family: no tensors; ``p`` follows the pruner's ``dropout_policy``."""

    passes_units_through = True
    has_unit_state = False

    def prune_in(self, module: nn.modules.dropout._DropoutNd, selection: UnitSelection) -> List[Edit]:
        policy = DROPOUT_POLICIES[selection.dropout_policy]
        new_p = float(policy(module.p, selection.num_units, len(selection.remove)))
        return set_attribute(module, "p", new_p)

    prune_out = prune_in


_PARAMETER_FREE_PASS_THROUGH = tuple(
    getattr(nn, name) for name in (
        "ReLU", "ReLU6", "LeakyReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Hardswish",
        "Hardsigmoid", "Hardtanh", "Sigmoid", "Tanh", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid",
        "Threshold", "Hardshrink", "Softshrink", "Identity", "Flatten",
    ) if hasattr(nn, name)) + (
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd,
)


@register_slicing_rule(*_PARAMETER_FREE_PASS_THROUGH)
class ParameterFreeRule(SlicingRule):
    """Element-wise activations, pooling, Identity, Flatten: nothing to slice, units pass through."""

    passes_units_through = True
    has_unit_state = False

    def prune_in(self, module: nn.Module, selection: UnitSelection) -> List[Edit]:
        return []

    prune_out = prune_in
